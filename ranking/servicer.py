"""Ranking servicer: protobuf <-> RankingModel, errors -> status codes."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np

from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc, tensor_pb2, versions_pb2
from protos.serving import bundle_folder, freeze_loaded_objects, served_version, unload_version
from protos.wire import to_tensor
from ranking.batching import DeadlinePassed, MicroBatcher
from ranking.config import RankingConfig
from ranking.inference import InvalidItems, RankCall, RankingModel
from recdata.channels import ALL_CHANNEL_BITS, CHANNELS, MAX_NEW_ITEM_PLACE
from recdata.versions import LoadedVersions

log = logging.getLogger(__name__)
Call = TypeVar("Call")
Out = TypeVar("Out")

MAX_EXPLAIN = 10


def rank_candidates(request: ranking_pb2.RankRequest) -> list[tuple[str, int]]:
    """(item id, channel mask) of each candidate of a checked RankRequest."""
    return list(zip(request.candidate_ids, request.candidate_channels, strict=True))


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, model: RankingModel, config: RankingConfig, executor: ThreadPoolExecutor):
        self.versions = LoadedVersions(model, lambda m: m.version)
        self.config = config
        self.executor = executor
        # Encode and Rank calls that arrive together share one model call per version, run on
        # the serving thread (see ranking.batching); EmbedItems and loading use `executor`.
        wait = config.max_batch_wait_ms / 1000
        self.encode_batcher: MicroBatcher[tuple[RankingModel, list[str]], dict[str, np.ndarray]] = MicroBatcher(
            self._encode_batch, None, config.max_batch_size, wait, "encode")
        self.rank_batcher: MicroBatcher[tuple[RankingModel, RankCall], list[tuple[str, float, list[str]]]] = (
            MicroBatcher(self._rank_batch, None, config.max_batch_size, wait, "rank"))
        self._loading = asyncio.Lock()

    @staticmethod
    def _per_model(calls: Sequence[tuple[RankingModel, Call]], run: Callable[[RankingModel, list[Call]], list[Out]]
                   ) -> list[Out]:
        """Run each model's share of a batch in one call; answers in the batch's order."""
        answers: list[Out | None] = [None] * len(calls)
        for model in {id(m): m for m, _ in calls}.values():
            positions = [n for n, (m, _) in enumerate(calls) if m is model]
            for n, answer in zip(positions, run(model, [calls[n][1] for n in positions]), strict=True):
                answers[n] = answer
        return answers  # type: ignore[return-value]  # every position was filled

    def _encode_batch(self, calls: Sequence[tuple[RankingModel, list[str]]]) -> list[dict[str, np.ndarray]]:
        return self._per_model(calls, lambda model, histories: model.encode_many(histories))

    def _rank_batch(self, calls: Sequence[tuple[RankingModel, RankCall]]) -> list[list[tuple[str, float, list[str]]]]:
        return self._per_model(calls, lambda model, ranks: model.rank_many(ranks))

    def stats(self) -> dict[str, dict[str, float]]:
        return {"encode": self.encode_batcher.stats.to_dict(), "rank": self.rank_batcher.stats.to_dict()}

    async def close(self) -> None:
        await self.encode_batcher.close()
        await self.rank_batcher.close()

    @staticmethod
    async def _scored(batcher: MicroBatcher[Call, Out], call: Call, context: grpc.aio.ServicerContext) -> Out:
        """The batcher's result for `call`, dropped unscored once the caller's deadline passed."""
        remaining = context.time_remaining()
        deadline = math.inf if remaining is None else time.monotonic() + remaining
        try:
            return await batcher.submit(call, deadline)
        except DeadlinePassed as error:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
            raise

    async def Encode(self, request: ranking_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> ranking_pb2.EncodeResponse:
        model = await served_version(self.versions, request.model_version, context)
        if request.items_alone:  # a few table rows, no model call: answered here, not batched
            if len(request.history_item_ids) > self.config.max_history:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.history_item_ids)} items; "
                                    f"allowed 0..{self.config.max_history}")
            vectors, unknown = model.item_queries(request.history_item_ids)
            return ranking_pb2.EncodeResponse(
                vectors=[ranking_pb2.ChannelVector(channel=c, vector=to_tensor(v)) for c, v in vectors.items()],
                model_version=model.version, unknown_item_ids=unknown)
        # Items older than max_history carry no weight in the encoder anyway.
        vectors = await self._scored(self.encode_batcher, (model, list(request.history_item_ids)[
            -self.config.max_history :]), context)
        # No vectors when nothing in the history is known to this version: recall uses popularity.
        return ranking_pb2.EncodeResponse(
            vectors=[ranking_pb2.ChannelVector(channel=c, vector=to_tensor(v)) for c, v in vectors.items()],
            model_version=model.version,
        )

    async def Rank(self, request: ranking_pb2.RankRequest,
                   context: grpc.aio.ServicerContext) -> ranking_pb2.RankResponse:
        model = await served_version(self.versions, request.model_version, context)
        if len(request.candidate_ids) > self.config.max_candidates:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.candidate_ids)} candidates; allowed 0..{self.config.max_candidates}")
        if len(request.candidate_channels) != len(request.candidate_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.candidate_channels)} candidate_channels for "
                                f"{len(request.candidate_ids)} candidate_ids; they must be the same length")
        if any(mask > ALL_CHANNEL_BITS for mask in request.candidate_channels):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"candidate_channels hold bits beyond the {len(CHANNELS)} channels; "
                                f"allowed 0..{ALL_CHANNEL_BITS}")
        if not (math.isfinite(request.diversity) and 0 <= request.diversity <= 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"diversity={request.diversity} out of range 0.0..1.0")
        if request.k < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k={request.k} must be >= 0 (0 = all)")
        if not 0 <= request.explain_top <= MAX_EXPLAIN:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"explain_top={request.explain_top} out of range 0..{MAX_EXPLAIN}")
        place = None if self.config.new_item_slot else 0  # unset on the wire: this service's setting
        if request.HasField("new_item_place"):
            place = request.new_item_place
            if not 0 <= place <= MAX_NEW_ITEM_PLACE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"new_item_place={place} out of range "
                                    f"0..{MAX_NEW_ITEM_PLACE} (0 = no place kept for new items)")
        candidates = rank_candidates(request)
        ranked = await self._scored(self.rank_batcher, (model, RankCall(
            list(request.history_item_ids)[-self.config.max_history :], candidates,
            request.k or len(candidates), request.diversity, request.explain_top, place)), context)
        items = [ranking_pb2.ScoredItem(item_id=i, score=s, because_item_ids=b) for i, s, b in ranked]
        return ranking_pb2.RankResponse(items=items, model_version=model.version)

    async def EmbedItems(self, request: ranking_pb2.EmbedItemsRequest,
                         context: grpc.aio.ServicerContext) -> ranking_pb2.EmbedItemsResponse:
        model = await served_version(self.versions, request.model_version, context)
        if not 1 <= len(request.items) <= self.config.max_candidates:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.items)} items; allowed 1..{self.config.max_candidates}")
        ids = [item.item_id for item in request.items]
        if len(set(ids)) != len(ids) or not all(ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "item ids must be non-empty and distinct")
        given = [{name: np.asarray(v.values, dtype=np.float32) for name, v in item.vectors.items()}
                 for item in request.items]
        loop = asyncio.get_running_loop()
        try:  # vectors the version cannot read are refused before anything is encoded
            vectors = await loop.run_in_executor(
                self.executor, model.upsert_items, ids, [item.text for item in request.items],
                [tuple(item.tags) for item in request.items], given)
        except InvalidItems as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return ranking_pb2.EmbedItemsResponse(
            vectors=[tensor_pb2.ChannelVectors(channel=c, vectors=to_tensor(v)) for c, v in vectors.items()],
            model_version=model.version,
        )

    async def LoadVersion(self, request: versions_pb2.LoadVersionRequest,
                          context: grpc.aio.ServicerContext) -> versions_pb2.LoadVersionResponse:
        folder = await bundle_folder(request.bundle_path, context)
        serving = self.versions.get()
        loop = asyncio.get_running_loop()
        async with self._loading:
            try:  # loaded off the event loop: the serving version keeps answering meanwhile
                model = await loop.run_in_executor(self.executor, RankingModel.load, folder, self.config.device)
            except (ValueError, KeyError, RuntimeError) as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bundle {str(folder)!r}: {error}")
            # The language model is the same for every version: share it rather than load it again.
            await loop.run_in_executor(self.executor, model.prepare_item_encoding, serving.text_encoder)
            version = self.versions.add(model, make_default=not request.keep_default)
            freeze_loaded_objects(collect_first=False)  # answering: no full collection now
        log.info("ranking loaded %s; holds %s", version, self.versions.names)
        return versions_pb2.LoadVersionResponse(model_version=version, loaded_versions=self.versions.names)

    async def UnloadVersion(self, request: versions_pb2.UnloadVersionRequest,
                            context: grpc.aio.ServicerContext) -> versions_pb2.UnloadVersionResponse:
        return await unload_version(self.versions, request.model_version, context)
