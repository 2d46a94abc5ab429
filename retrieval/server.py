"""Run one recall shard as a gRPC server: `python -m retrieval --bundle DIR [--shard-id N ...]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from protos.auth import add_internal_auth_arguments, internal_token_of
from protos.recfunnel.v1 import recall_pb2, recall_pb2_grpc
from protos.serving import ServerHandle, freeze_loaded_objects, start_server
from recdata.bundle import load_bundle
from retrieval.config import RecallConfig
from retrieval.servicer import RecallServicer
from retrieval.shard import RecallShard

SERVICE_NAME = recall_pb2.DESCRIPTOR.services_by_name["Recall"].full_name


@dataclass
class RecallService:
    handle: ServerHandle
    servicer: RecallServicer

    @property
    def address(self) -> str:
        return self.handle.address

    async def stop(self, grace: float = 2.0) -> None:
        await self.handle.stop(grace)


async def start(config: RecallConfig) -> RecallService:
    """Build the shard's indexes from the bundle and start serving them."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(config.search_threads, thread_name_prefix="recall")
    shard = await loop.run_in_executor(executor, lambda: RecallShard(load_bundle(config.bundle, mapped=True), config))
    freeze_loaded_objects()
    servicer = RecallServicer(shard, executor)
    handle = await start_server(
        config.host, config.port,
        [lambda server: recall_pb2_grpc.add_RecallServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        tokens=(config.internal_token,) if config.internal_token else (),
    )
    return RecallService(handle, servicer)


def use_serving_threads(config: RecallConfig) -> None:
    """In a process that is this shard alone: FAISS's OpenMP threads for serving, once the
    first build is done (a process shared with other work keeps its own setting)."""
    import faiss

    faiss.omp_set_num_threads(config.omp_threads)


async def serve(config: RecallConfig) -> None:
    service = await start(config)
    use_serving_threads(config)
    try:
        await service.handle.server.wait_for_termination()
    finally:
        await service.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval", description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--shard-id", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--index-kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"])
    add_internal_auth_arguments(parser)
    args = parser.parse_args(argv)
    token = internal_token_of(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = RecallConfig(bundle=args.bundle, shard_id=args.shard_id, num_shards=args.num_shards,
                          host=args.host, port=args.port, index_kind=args.index_kind, internal_token=token)
    asyncio.run(serve(config))
