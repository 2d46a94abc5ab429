"""Ranking servicer: protobuf <-> RankingModel, errors -> status codes."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc
from protos.wire import to_tensor
from ranking.config import RankingConfig
from ranking.inference import RankingModel

MAX_EXPLAIN = 10


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, model: RankingModel, config: RankingConfig, executor: ThreadPoolExecutor):
        self.model = model
        self.config = config
        self.executor = executor

    async def _check(self, context: grpc.aio.ServicerContext, model: RankingModel, version: str,
                     history: list[str]) -> np.ndarray:
        if version and version != model.version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model_version {version!r} not served; serving {model.version!r}")
        if len(history) > self.config.max_history:
            history = history[-self.config.max_history :]  # older items carry no weight anyway
        return model.indexes(history)

    async def Encode(self, request: ranking_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> ranking_pb2.EncodeResponse:
        model = self.model
        history = await self._check(context, model, request.model_version, list(request.history_item_ids))
        if len(history) == 0:  # nothing this version knows: no query vectors, recall uses popularity
            return ranking_pb2.EncodeResponse(model_version=model.version)
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self.executor, model.encode, [history])
        return ranking_pb2.EncodeResponse(
            vectors=[ranking_pb2.ChannelVector(channel=c, vector=to_tensor(v[0])) for c, v in vectors.items()],
            model_version=model.version,
        )

    async def Rank(self, request: ranking_pb2.RankRequest,
                   context: grpc.aio.ServicerContext) -> ranking_pb2.RankResponse:
        model = self.model
        history_ids = list(request.history_item_ids)[-self.config.max_history :]
        history = await self._check(context, model, request.model_version, history_ids)
        if len(request.candidates) > self.config.max_candidates:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.candidates)} candidates; allowed 0..{self.config.max_candidates}")
        if not 0 <= request.explain_top <= MAX_EXPLAIN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"explain_top={request.explain_top} out of range 0..{MAX_EXPLAIN}")
        known = [c for c in request.candidates if c.item_id in model.item_index]
        candidates = np.asarray([model.item_index[c.item_id] for c in known], dtype=np.int64)
        channels = [{s.channel for s in c.channel_scores} for c in known]
        loop = asyncio.get_running_loop()
        ranked = await loop.run_in_executor(self.executor, model.rank, history, candidates, channels)
        known_history = [i for i in history_ids if i in model.item_index]
        scores = {c.item_id: (float(s), because) for c, s, because in
                  zip(known, ranked.scores, ranked.because, strict=True)}
        items = []
        for candidate in request.candidates:
            # Candidates this version does not know score lowest rather than failing the call.
            score, because = scores.get(candidate.item_id, (float("-inf"), []))
            items.append(ranking_pb2.ScoredItem(
                item_id=candidate.item_id, score=score,
                because_item_ids=[known_history[p] for p in because[: request.explain_top]],
            ))
        return ranking_pb2.RankResponse(items=items, model_version=model.version)
