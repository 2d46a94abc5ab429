"""Bearer-token authentication and TLS for recfunnel's gRPC servers and clients.

The gateway checks its clients' tokens; the recall and ranking services check one
internal token that only the gateway and the controller hold. Tokens come from config
files or the environment, never from code. Health checks stay open so that load balancers
and Kubernetes probes need no secret; every other method, reflection included, needs a
token when the server has any.
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
BEARER = "Bearer "
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

# Environment variables a deployment sets instead of files.
CLIENT_TOKENS_ENV = "RECFUNNEL_TOKENS"          # comma-separated tokens the gateway accepts
INTERNAL_TOKEN_ENV = "RECFUNNEL_INTERNAL_TOKEN"  # the token between gateway and services
MIN_TOKEN_CHARS = 16  # shorter secrets are guessable; refused at start rather than in use


class AuthConfigError(ValueError):
    """Tokens or TLS files that cannot be used; the message says which and why."""


def check_tokens(tokens: Iterable[str], source: str) -> tuple[str, ...]:
    clean = tuple(t.strip() for t in tokens if t.strip())
    short = [t for t in clean if len(t) < MIN_TOKEN_CHARS]
    if short:
        raise AuthConfigError(f"{source}: {len(short)} token(s) shorter than {MIN_TOKEN_CHARS} characters")
    if any(not t.isascii() or not t.isprintable() or " " in t for t in clean):
        raise AuthConfigError(f"{source}: tokens must be printable ASCII without spaces")
    return clean


def tokens_from_file(path: Path) -> tuple[str, ...]:
    """One token per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as error:
        raise AuthConfigError(f"cannot read tokens file {path}: {error.strerror}") from error
    tokens = check_tokens((line for line in lines if not line.lstrip().startswith("#")), str(path))
    if not tokens:
        raise AuthConfigError(f"tokens file {path} holds no token")
    return tokens


def client_tokens(path: Path | None) -> tuple[str, ...]:
    """The gateway's accepted tokens: the file when given, else $RECFUNNEL_TOKENS (may be empty)."""
    if path is not None:
        return tokens_from_file(path)
    return check_tokens(os.environ.get(CLIENT_TOKENS_ENV, "").split(","), CLIENT_TOKENS_ENV)


def internal_token(path: Path | None) -> str | None:
    """The services' shared token: the file's first token, else $RECFUNNEL_INTERNAL_TOKEN."""
    if path is not None:
        return tokens_from_file(path)[0]
    found = check_tokens([os.environ.get(INTERNAL_TOKEN_ENV, "")], INTERNAL_TOKEN_ENV)
    return found[0] if found else None


def bearer_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER):]
    return None


def _rejecting(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(reject, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>` for one of `tokens`."""

    def __init__(self, tokens: Iterable[str]):
        self.tokens = tuple(t.encode() for t in tokens)
        if not self.tokens:
            raise AuthConfigError("token authentication needs at least one token")

    def allows(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        # Compare against every token in constant time, so timing tells nothing about any of them.
        matches = [hmac.compare_digest(given, known) for known in self.tokens]  # all of them, always
        return any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_of(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if self.allows(token):
            return handler
        why = "no bearer token" if token is None else "the bearer token is not valid"
        return _rejecting(handler, f"{why}: send metadata 'authorization: Bearer <token>'")


def server_interceptors(tokens: Iterable[str]) -> list[grpc.aio.ServerInterceptor]:
    """[TokenAuth] when there are tokens, [] for an open server (the embedded demo, tests)."""
    tokens = tuple(tokens)
    return [TokenAuth(tokens)] if tokens else []


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends on each call: passed per call, since a client interceptor
    would move every call of the serving path onto grpc's slower intercepted code path."""
    return ((AUTHORIZATION, BEARER + token),) if token else ()


@dataclass(frozen=True)
class TlsFiles:
    """PEM certificate chain and private key of a server."""

    cert: Path
    key: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        try:
            chain, key = self.cert.read_bytes(), self.key.read_bytes()
        except OSError as error:
            raise AuthConfigError(f"cannot read TLS file {error.filename}: {error.strerror}") from error
        return grpc.ssl_server_credentials([(key, chain)])


def open_channel(address: str, tls_ca: Path | None = None,
                 options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """An async channel; TLS when `tls_ca` (the PEM of the certificate authority, or of a
    self-signed server certificate) is given."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(address, options=options)
    try:
        root = tls_ca.read_bytes()
    except OSError as error:
        raise AuthConfigError(f"cannot read TLS CA file {tls_ca}: {error.strerror}") from error
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


def add_internal_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--internal-token-file", type=Path, default=None,
                        help=f"file holding the token the gateway sends (else ${INTERNAL_TOKEN_ENV})")
    parser.add_argument("--no-auth", action="store_true",
                        help="accept calls without a token (only on a loopback address you alone use)")
    # The gateway adds its client-token and TLS options beside these.


def internal_token_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """The token a standalone recall or ranking service requires; exits when there is none and
    --no-auth was not given, so a service never runs open by accident."""
    try:
        token = internal_token(args.internal_token_file)
    except AuthConfigError as error:
        parser.error(str(error))
    if token is None and not args.no_auth:
        parser.error(f"no internal token: give --internal-token-file or ${INTERNAL_TOKEN_ENV}, or --no-auth")
    return None if args.no_auth else token
