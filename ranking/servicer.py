"""Ranking servicer: protobuf <-> RankingModel, errors -> status codes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc, tensor_pb2
from protos.wire import to_tensor
from ranking.batching import MicroBatcher
from ranking.config import RankingConfig
from ranking.inference import RankCall, RankingModel

MAX_EXPLAIN = 10


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, model: RankingModel, config: RankingConfig, executor: ThreadPoolExecutor):
        self.model = model
        self.config = config
        self.executor = executor
        # Encode and Rank calls that arrive together share one model call each, run on the
        # serving thread (see ranking.batching); only EmbedItems, long and rare, uses `executor`.
        wait = config.max_batch_wait_ms / 1000
        self.encode_batcher: MicroBatcher[list[str], dict[str, np.ndarray]] = MicroBatcher(
            self._encode_batch, None, config.max_batch_size, wait, "encode")
        self.rank_batcher: MicroBatcher[RankCall, list[tuple[str, float, list[str]]]] = MicroBatcher(
            self._rank_batch, None, config.max_batch_size, wait, "rank")

    def _encode_batch(self, histories: Sequence[list[str]]) -> list[dict[str, np.ndarray]]:
        return self.model.encode_many(histories)  # the model served now, also after a swap

    def _rank_batch(self, calls: Sequence[RankCall]) -> list[list[tuple[str, float, list[str]]]]:
        return self.model.rank_many(calls)

    def stats(self) -> dict[str, dict[str, float]]:
        return {"encode": self.encode_batcher.stats.to_dict(), "rank": self.rank_batcher.stats.to_dict()}

    async def close(self) -> None:
        await self.encode_batcher.close()
        await self.rank_batcher.close()

    async def _check_version(self, context: grpc.aio.ServicerContext, model: RankingModel, version: str) -> None:
        if version and version != model.version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model_version {version!r} not served; serving {model.version!r}")

    async def Encode(self, request: ranking_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> ranking_pb2.EncodeResponse:
        model = self.model
        await self._check_version(context, model, request.model_version)
        # Items older than max_history carry no weight in the encoder anyway.
        vectors = await self.encode_batcher.submit(list(request.history_item_ids)[-self.config.max_history :])
        # No vectors when nothing in the history is known to this version: recall uses popularity.
        return ranking_pb2.EncodeResponse(
            vectors=[ranking_pb2.ChannelVector(channel=c, vector=to_tensor(v)) for c, v in vectors.items()],
            model_version=model.version,
        )

    async def Rank(self, request: ranking_pb2.RankRequest,
                   context: grpc.aio.ServicerContext) -> ranking_pb2.RankResponse:
        model = self.model
        await self._check_version(context, model, request.model_version)
        if len(request.candidates) > self.config.max_candidates:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.candidates)} candidates; allowed 0..{self.config.max_candidates}")
        if not (math.isfinite(request.diversity) and 0 <= request.diversity <= 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"diversity={request.diversity} out of range 0.0..1.0")
        if request.k < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k={request.k} must be >= 0 (0 = all)")
        if not 0 <= request.explain_top <= MAX_EXPLAIN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"explain_top={request.explain_top} out of range 0..{MAX_EXPLAIN}")
        candidates = [(c.item_id, {s.channel for s in c.channel_scores}) for c in request.candidates]
        ranked = await self.rank_batcher.submit(RankCall(
            list(request.history_item_ids)[-self.config.max_history :], candidates,
            request.k or len(candidates), request.diversity, request.explain_top))
        items = [ranking_pb2.ScoredItem(item_id=i, score=s, because_item_ids=b) for i, s, b in ranked]
        return ranking_pb2.RankResponse(items=items, model_version=model.version)

    async def EmbedItems(self, request: ranking_pb2.EmbedItemsRequest,
                         context: grpc.aio.ServicerContext) -> ranking_pb2.EmbedItemsResponse:
        model = self.model
        if not 1 <= len(request.items) <= self.config.max_candidates:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.items)} items; allowed 1..{self.config.max_candidates}")
        ids = [item.item_id for item in request.items]
        if len(set(ids)) != len(ids) or not all(ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "item ids must be non-empty and distinct")
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(
            self.executor, model.upsert_items, ids, [item.text for item in request.items],
            [tuple(item.tags) for item in request.items])
        return ranking_pb2.EmbedItemsResponse(
            vectors=[tensor_pb2.ChannelVectors(channel=c, vectors=to_tensor(v)) for c, v in vectors.items()],
            model_version=model.version,
        )
