"""Ranking servicer: protobuf <-> RankingModel, errors -> status codes."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc, tensor_pb2
from protos.wire import to_tensor
from ranking.config import RankingConfig
from ranking.inference import RankingModel

MAX_EXPLAIN = 10


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, model: RankingModel, config: RankingConfig, executor: ThreadPoolExecutor):
        self.model = model
        self.config = config
        self.executor = executor

    async def _check_version(self, context: grpc.aio.ServicerContext, model: RankingModel, version: str) -> None:
        if version and version != model.version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model_version {version!r} not served; serving {model.version!r}")

    async def Encode(self, request: ranking_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> ranking_pb2.EncodeResponse:
        model = self.model
        await self._check_version(context, model, request.model_version)
        tables = model.tables
        # Items older than max_history carry no weight in the encoder anyway.
        history = model.indexes(list(request.history_item_ids)[-self.config.max_history :], tables)
        if len(history) == 0:  # nothing this version knows: no query vectors, recall uses popularity
            return ranking_pb2.EncodeResponse(model_version=model.version)
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self.executor, model.encode, [history], tables)
        return ranking_pb2.EncodeResponse(
            vectors=[ranking_pb2.ChannelVector(channel=c, vector=to_tensor(v[0])) for c, v in vectors.items()],
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
        loop = asyncio.get_running_loop()
        ranked = await loop.run_in_executor(
            self.executor, model.rank_items, list(request.history_item_ids)[-self.config.max_history :], candidates,
            request.k or len(candidates), request.diversity, request.explain_top)
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
