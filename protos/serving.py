"""What every recfunnel gRPC server has besides its own service: health and reflection, and
the version handling the recall and ranking services share."""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.auth import TlsFiles, server_interceptors
from protos.recfunnel.v1 import versions_pb2
from recdata.bundle import MANIFEST
from recdata.versions import DefaultVersionInUse, LoadedVersions, VersionNotLoaded

log = logging.getLogger(__name__)
Served = TypeVar("Served")

# Vectors and candidate lists make bigger messages than gRPC's 4 MiB default allows.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def freeze_loaded_objects(collect_first: bool = True) -> None:
    """Take every object alive now out of the cyclic garbage collector's view (`gc.freeze`).

    A service that has loaded its models holds hundreds of thousands of long-lived Python
    objects (torch, transformers, its tables). CPython's full collection walks all of them
    with the GIL held: 220 ms in the ML-100K ranking service, seen as 200 ms stalls in the
    cluster's p99 under load. Models free by reference count when unloaded (they hold no
    cycles), so freezing them loses nothing; objects made while serving are collected as
    before. `collect_first` clears garbage before it is frozen, a full collection that a
    service only affords before it starts answering.
    """
    if collect_first:
        gc.collect()
    gc.freeze()


class _Undecodable:
    """What a request deserializer returns for bytes that are no valid message."""

    def __init__(self, reason: str):
        self.reason = reason


class UnaryWrapper(grpc.aio.ServerInterceptor):
    """Wraps the handler of each unary-unary method it applies to, once per method."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def applies(self, method: str) -> bool:
        return True

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not self.applies(method):
            return handler
        wrapped = self._wrapped[method] = self.wrap(method, handler)
        return wrapped


class RejectUndecodable(UnaryWrapper):
    """Answers INVALID_ARGUMENT to request bytes that do not parse (corrupt wire format,
    invalid UTF-8 in a string field), where grpc would answer UNKNOWN with a traceback in
    the log. Covers the unary-unary methods, which every recfunnel RPC is."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse, behaviour = handler.request_deserializer, handler.unary_unary

        def tolerant_parse(raw: bytes) -> Any:
            try:
                return parse(raw) if parse is not None else raw
            except DecodeError as error:
                return _Undecodable(str(error))

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is no valid {method.rsplit('/', 1)[-1]} message: {request.reason}")
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, request_deserializer=tolerant_parse,
                                                   response_serializer=handler.response_serializer)


class ServerHandle:
    """A started server with its bound address and its health servicer."""

    def __init__(self, server: grpc.aio.Server, address: str, health_servicer: health.aio.HealthServicer,
                 service_names: list[str]):
        self.server = server
        self.address = address
        self.health = health_servicer
        self.service_names = service_names

    async def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for `grace` seconds."""
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)


async def start_server(
    host: str,
    port: int,
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: list[str],
    tokens: tuple[str, ...] = (),
    tls: TlsFiles | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> ServerHandle:
    """Start a grpc.aio server with the given services, health and reflection; port 0 picks one.

    With `tokens`, every call but a health check needs one of them as its bearer token;
    with `tls`, the port speaks TLS only. `interceptors` see every call that passed the token check.
    """
    server = grpc.aio.server(options=CHANNEL_OPTIONS,
                             interceptors=[*server_interceptors(tokens), *interceptors, RejectUndecodable()])
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{bound}"
    log.info("serving %s on %s (%s, %s)", ", ".join(service_names), address, "TLS" if tls else "plaintext",
             "token auth" if tokens else "no auth")
    return ServerHandle(server, address, health_servicer, service_names)


async def bundle_folder(path: str, context: grpc.aio.ServicerContext) -> Path:
    """The folder a LoadVersion names, or INVALID_ARGUMENT when it holds no bundle."""
    folder = Path(path)
    try:
        found = (folder / MANIFEST).is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL in it
        found = False
    if not found:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bundle_path {path[:200]!r} is not a bundle folder")
    return folder


async def served_version(versions: LoadedVersions[Served], version: str,
                         context: grpc.aio.ServicerContext) -> Served:
    """The named version (empty = the default), held by the caller for its whole call so a
    swap meanwhile cannot change it; FAILED_PRECONDITION when it is not loaded."""
    try:
        return versions.get(version)
    except VersionNotLoaded as error:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        raise  # abort raises; this line only tells the type checker


async def unload_version(versions: LoadedVersions[Any], version: str,
                         context: grpc.aio.ServicerContext) -> versions_pb2.UnloadVersionResponse:
    """Drop a loaded version: NOT_FOUND when it is not held, FAILED_PRECONDITION for the default."""
    try:
        versions.remove(version)
    except VersionNotLoaded as error:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
    except DefaultVersionInUse as error:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    return versions_pb2.UnloadVersionResponse(loaded_versions=versions.names)
