"""What the gateway tells an observer about the calls it answers.

The gateway depends on no metrics system: the host that runs it passes an observer (the
Ray host passes one that records `ray.util.metrics`, see `cluster/metrics.py`); standalone
it observes nothing.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import grpc

from protos.serving import UnaryWrapper

PUBLIC_PREFIXES = ("/recfunnel.v1.Recommender/", "/recfunnel.v1.Rollout/")


class GatewayObserver(Protocol):
    def answered(self, method: str, seconds: float, degraded: bool) -> None:
        """A public call answered OK after `seconds`; `degraded` for a partial Recommend answer."""

    def refused(self, method: str, status: str) -> None:
        """A public call answered with an error status (its gRPC status name)."""

    def feedback(self, written: int, duplicates: int) -> None:
        """Events acknowledged by one Feedback call: newly written, and already logged."""


class ObservingInterceptor(UnaryWrapper):
    """Times every public call and reports its outcome to the observer."""

    def __init__(self, observer: GatewayObserver):
        super().__init__()
        self.observer = observer

    def applies(self, method: str) -> bool:
        return method.startswith(PUBLIC_PREFIXES)

    def wrap(self, full_name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        method, behaviour, observer = full_name.rsplit("/", 1)[-1], handler.unary_unary, self.observer

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                reply = await behaviour(request, context)
            except BaseException:
                observer.refused(method, (context.code() or grpc.StatusCode.UNKNOWN).name)
                raise
            observer.answered(method, time.monotonic() - started, bool(getattr(reply, "degraded", False)))
            if method == "Feedback":
                observer.feedback(reply.accepted - reply.duplicates, reply.duplicates)
            return reply

        return grpc.unary_unary_rpc_method_handler(observed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
