"""Run the ranking service as a gRPC server: `python -m ranking --bundle DIR`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from protos.auth import add_internal_auth_arguments, internal_token_of
from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc
from protos.serving import ServerHandle, freeze_loaded_objects, start_server
from ranking.config import RankingConfig
from ranking.inference import RankingModel
from ranking.servicer import RankingServicer

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["Ranking"].full_name


@dataclass
class RankingService:
    handle: ServerHandle
    servicer: RankingServicer

    @property
    def address(self) -> str:
        return self.handle.address

    def stats(self) -> dict[str, dict[str, float]]:
        """Micro-batching counters: batches, requests and mean batch size per method."""
        return self.servicer.stats()

    async def stop(self, grace: float = 2.0) -> None:
        await self.handle.stop(grace)
        await self.servicer.close()


async def start(config: RankingConfig) -> RankingService:
    """Load the bundle's models and start serving them."""
    torch.set_num_threads(config.threads)
    # Encode and Rank batches run on this event loop's thread, torch parallelising inside each
    # call with `threads` threads; the executor loads models and embeds new items.
    executor = ThreadPoolExecutor(1, thread_name_prefix="ranking")
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(executor, RankingModel.load, config.bundle, config.device)
    # Load the language model now, so the first UpsertItems does not pay for it.
    await loop.run_in_executor(executor, model.prepare_item_encoding)
    freeze_loaded_objects()
    servicer = RankingServicer(model, config, executor)
    handle = await start_server(
        config.host, config.port,
        [lambda server: ranking_pb2_grpc.add_RankingServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        tokens=(config.internal_token,) if config.internal_token else (),
    )
    return RankingService(handle, servicer)


async def serve(config: RankingConfig) -> None:
    service = await start(config)
    try:
        await service.handle.server.wait_for_termination()
    finally:
        await service.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ranking", description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests per model call (1 = no batching)")
    parser.add_argument("--max-batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    add_internal_auth_arguments(parser)
    args = parser.parse_args(argv)
    token = internal_token_of(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(RankingConfig(bundle=args.bundle, host=args.host, port=args.port, threads=args.threads,
                                    max_batch_size=args.max_batch_size, max_batch_wait_ms=args.max_batch_wait_ms,
                                    device=args.device, internal_token=token)))
