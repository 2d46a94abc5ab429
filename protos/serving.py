"""What every recfunnel gRPC server has besides its own service: health and reflection, and
the version handling the recall and ranking services share."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> ServerHandle:
    """Start a grpc.aio server with the given services, health and reflection; port 0 picks one."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors or [])
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{bound}"
    log.info("serving %s on %s", ", ".join(service_names), address)
    return ServerHandle(server, address, health_servicer, service_names)


async def bundle_folder(path: str, context: grpc.aio.ServicerContext) -> Path:
    """The folder a LoadVersion names, or INVALID_ARGUMENT when it holds no bundle."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bundle_path {path!r} is not a bundle folder")
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
