"""`recfunnel bench transport`: what one round trip between two local processes costs on this
machine when it idles between requests, for gRPC and for a bare asyncio socket.

The cluster's p50 at low load is the in-process funnel plus FUNNEL_HOPS sequential gRPC round
trips, each made while the services sleep. A round trip wakes sleeping threads: one per side for
an asyncio echo, several per side for grpc.aio (its event engine's poller and thread pool, the
completion-queue thread, the event loop). On a virtual machine whose idle vCPUs halt, each wake
costs far more than it does back to back. This bench shows the two costs side by side, with the
machine's idle driver, so the transport floor under a p50 target can be checked on any host.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.harness import percentiles_ms
from protos.serving import CHANNEL_OPTIONS

BACK_TO_BACK_CALLS = 300
WARM_UP_CALLS = 50


def _serve_grpc(ports: Any) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _serve_echo(ports: Any) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64):
            writer.write(data)
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def health_check_caller(address: str, timeout: float = 5.0) -> tuple[Any, Any]:
    """An empty unary call to the gRPC health service at `address`, and the close of its channel."""
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = health_pb2_grpc.HealthStub(channel)

    async def call() -> None:
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)

    return call, channel.close


async def _grpc_caller(port: int) -> tuple[Any, Any]:
    return health_check_caller(f"127.0.0.1:{port}")


async def _echo_caller(port: int) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def call() -> None:
        writer.write(b"ping")
        await writer.drain()
        await reader.readexactly(4)

    async def close() -> None:
        writer.close()
        await writer.wait_closed()

    return call, close


async def _timed(call: Any) -> float:
    start = time.perf_counter()
    await call()
    return (time.perf_counter() - start) * 1000


async def round_trips(call: Any, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Round trips back to back, then one at a time after random idle gaps (Poisson arrivals at
    `rate`). Each is timed from its send, not from when it was due: the caller's own timer
    wake-up is not the transport's (the serving bench's open-loop clock counts it once a request)."""
    for _ in range(WARM_UP_CALLS):
        await call()
    back_to_back = [await _timed(call) for _ in range(BACK_TO_BACK_CALLS)]
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, int(rate * seconds * 2) + 10)
    idle: list[float] = []
    deadline = time.monotonic() + seconds
    for gap in gaps:
        await asyncio.sleep(float(gap))
        if idle and time.monotonic() > deadline:  # one idle call at least, however short the run
            break
        idle.append(await _timed(call))
    busy, quiet = percentiles_ms(back_to_back, (50,)), percentiles_ms(idle, (50, 90))
    return {"idle_p50_ms": quiet["p50_ms"], "idle_p90_ms": quiet["p90_ms"],
            "idle_calls": len(idle), "back_to_back_p50_ms": busy["p50_ms"],
            "idle_extra_ms": round(quiet["p50_ms"] - busy["p50_ms"], 3)}


def _probe(serve: Any, caller: Any, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    # A fresh interpreter for the server: grpc's threads do not survive a fork.
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=serve, args=(ports,), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)

        async def run() -> dict[str, Any]:
            call, close = await caller(port)
            try:
                return await round_trips(call, rate, seconds, seed)
            finally:
                await close()

        return asyncio.run(run())
    finally:
        server.terminate()
        server.join(10)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def idle_settings() -> dict[str, str | None]:
    """How this machine's CPUs idle: the cpuidle driver, and how long a KVM guest polls before
    it halts a vCPU (0: it halts at once, and every wake-up goes through the host)."""
    return {"cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver"),
            "guest_halt_poll_ns": _read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")}


def run_transport_bench(rate: float = 10.0, seconds: float = 8.0, seed: int = 0) -> dict[str, Any]:
    if not 0 < rate <= 100:
        raise ValueError(f"rate must be in (0, 100] requests/s, got {rate}")
    if not 0 < seconds <= 600:
        raise ValueError(f"seconds must be in (0, 600], got {seconds}")
    report: dict[str, Any] = {"rate": rate, "seconds": seconds, "machine": idle_settings(),
                              "asyncio_tcp": _probe(_serve_echo, _echo_caller, rate, seconds, seed),
                              "grpc_aio": _probe(_serve_grpc, _grpc_caller, rate, seconds, seed)}
    report["grpc_extra_over_asyncio_idle_ms"] = round(
        report["grpc_aio"]["idle_p50_ms"] - report["asyncio_tcp"]["idle_p50_ms"], 3)
    return report
