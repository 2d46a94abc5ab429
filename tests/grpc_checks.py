"""Assertions every recfunnel server must pass (standard health and server reflection), and
the real services started together for tests that call them over gRPC."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.harness import (
    free_port,  # noqa: F401 - the tests' helper lives with the benches'
    grpc_stack,
)
from gateway.server import Gateway
from protos.auth import call_metadata


async def assert_health_and_reflection(address: str, service_name: str, token: str | None = None) -> None:
    """Health answers without a token; reflection, like every other method, with `token`."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service_name):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=5,
                                                                    metadata=call_metadata(token))]
        services = {s.name for s in replies[0].list_services_response.service}
        assert service_name in services
        assert "grpc.health.v1.Health" in services


# The services in this process, started as the benches start them.
serving_stack = grpc_stack


@contextmanager
def threaded_stack(bundle: Path, db_path: Path, num_shards: int = 2, **gateway_options: Any
                   ) -> Iterator[tuple[Gateway, grpc.Channel]]:
    """`serving_stack` on an event loop thread of its own and a blocking channel to its gateway:
    for tests that call it synchronously, as hypothesis drives plain functions."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = serving_stack(bundle, db_path, num_shards=num_shards, **gateway_options)
    gateway, _, _ = asyncio.run_coroutine_threadsafe(stack.__aenter__(), loop).result(timeout=300)
    channel = grpc.insecure_channel(gateway.address)
    try:
        yield gateway, channel
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(stack.__aexit__(None, None, None), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
