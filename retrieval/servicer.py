"""Recall servicer: protobuf <-> RecallShard, errors -> status codes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc

from protos.filters import attributes_from_proto, filter_from_proto
from protos.recfunnel.v1 import recall_pb2, recall_pb2_grpc, recommender_pb2, versions_pb2
from protos.serving import bundle_folder, freeze_loaded_objects, served_version, unload_version
from protos.wire import BadTensor, from_tensor
from recdata.bundle import load_bundle
from recdata.channels import ITEM2ITEM, POPULAR, ChannelQuery
from recdata.versions import LoadedVersions
from retrieval.shard import InvalidQuery, RecallShard

log = logging.getLogger(__name__)

MAX_EXCLUDED = 100_000
MAX_UPDATE = 10_000  # items per AddItems / RemoveItems call
MAX_FILTER_PARTS = 1_000  # tags, ranges and values of one filter, together (the gateway allows far fewer)


def filter_parts(f: recommender_pb2.ItemFilter) -> int:
    return (len(f.tags_any) + len(f.tags_all) + len(f.tags_none) + len(f.ranges)
            + sum(len(e.any_of) + 1 for e in f.equals))


class RecallServicer(recall_pb2_grpc.RecallServicer):
    def __init__(self, shard: RecallShard, executor: ThreadPoolExecutor):
        self.versions = LoadedVersions(shard, lambda s: s.version)
        self.executor = executor
        self._loading = asyncio.Lock()  # one LoadVersion at a time: index builds need the memory
        self.search_s = 0.0  # what a Search has been taking (moving average)
        self.expired = 0     # Searches dropped unrun: too little of their budget left

    async def Search(self, request: recall_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> recall_pb2.SearchResponse:
        shard = await served_version(self.versions, request.model_version, context)
        if len(request.exclude_item_ids) > MAX_EXCLUDED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"exclude_item_ids has {len(request.exclude_item_ids)} ids; at most {MAX_EXCLUDED}")
        try:
            queries = [
                ChannelQuery(q.channel, q.k, from_tensor(q.vector) if q.HasField("vector") else None,
                             tuple(q.item_ids), tuple(q.user_properties))
                for q in request.queries
            ]
            for query in queries:
                shard.validate(query)
        except (BadTensor, InvalidQuery) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if filter_parts(request.filter) > MAX_FILTER_PARTS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter has {filter_parts(request.filter)} "
                                f"parts (tags, ranges and values); at most {MAX_FILTER_PARTS}")
        item_filter = filter_from_proto(request.filter)
        exclude = list(request.exclude_item_ids)
        remaining = context.time_remaining()
        if remaining is not None and remaining < self.search_s:
            # Started late (queued behind others): an answer after the deadline is wasted work
            # that the searches still in time would need.
            self.expired += 1
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{remaining * 1000:.1f} ms left of the "
                                f"deadline, a search takes {self.search_s * 1000:.1f} ms: not started")
        started = time.monotonic()
        if shard.size <= shard.config.inline_search_max_items:
            results, passed = shard.search_filtered(queries, exclude, item_filter)
        else:  # FAISS releases the GIL: big searches run beside the event loop
            results, passed = await asyncio.get_running_loop().run_in_executor(
                self.executor, shard.search_filtered, queries, exclude, item_filter)
        self.search_s += 0.1 * (time.monotonic() - started - self.search_s)
        return recall_pb2.SearchResponse(
            results=[
                recall_pb2.ChannelResult(
                    channel=channel,
                    candidates=[recall_pb2.Candidate(item_id=i, score=s) for i, s in hits],
                )
                for channel, hits in results.items()
            ],
            model_version=shard.version,
            shard_id=shard.config.shard_id,
            filter_passed=passed,
        )

    async def ShardInfo(self, request: recall_pb2.ShardInfoRequest,
                        context: grpc.aio.ServicerContext) -> recall_pb2.ShardInfoResponse:
        shard = self.versions.get()
        return recall_pb2.ShardInfoResponse(
            loaded_versions=self.versions.names,
            shard_id=shard.config.shard_id,
            num_shards=shard.config.num_shards,
            model_version=shard.version,
            channels=[
                recall_pb2.ChannelInfo(channel=channel, dim=shard.dims[channel], items=shard.size,
                                       index_kind=shard.index_reports[channel].kind,
                                       recall_at_k=shard.index_reports[channel].recall_at_k,
                                       index_params_json=json.dumps(shard.index_reports[channel].params))
                for channel in shard.indexes
            ] + [recall_pb2.ChannelInfo(channel=ITEM2ITEM, dim=0, items=shard.size, index_kind="cooccurrence"),
                 recall_pb2.ChannelInfo(channel=POPULAR, dim=0, items=shard.size, index_kind="sorted")],
        )

    async def AddItems(self, request: recall_pb2.AddItemsRequest,
                       context: grpc.aio.ServicerContext) -> recall_pb2.AddItemsResponse:
        shard = await served_version(self.versions, request.model_version, context)
        if not 1 <= len(request.item_ids) <= MAX_UPDATE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"item_ids has {len(request.item_ids)} entries; allowed 1..{MAX_UPDATE}")
        try:
            vectors = {v.channel: from_tensor(v.vectors) for v in request.vectors}
            attributes = [attributes_from_proto(a) for a in request.attributes] if request.attributes else None
            loop = asyncio.get_running_loop()
            added = await loop.run_in_executor(self.executor, shard.add_items, list(request.item_ids), vectors,
                                               attributes)
        except (BadTensor, InvalidQuery) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return recall_pb2.AddItemsResponse(added=added)

    async def RemoveItems(self, request: recall_pb2.RemoveItemsRequest,
                          context: grpc.aio.ServicerContext) -> recall_pb2.RemoveItemsResponse:
        if len(request.item_ids) > MAX_UPDATE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"item_ids has {len(request.item_ids)} entries; allowed 0..{MAX_UPDATE}")
        loop = asyncio.get_running_loop()
        removed = [await loop.run_in_executor(self.executor, shard.remove_items, list(request.item_ids))
                   for shard in self.versions.all()]  # a removed item must not return from any version
        return recall_pb2.RemoveItemsResponse(removed=max(removed))

    async def LoadVersion(self, request: versions_pb2.LoadVersionRequest,
                          context: grpc.aio.ServicerContext) -> versions_pb2.LoadVersionResponse:
        folder = await bundle_folder(request.bundle_path, context)
        config = replace(self.versions.get().config, bundle=folder)
        async with self._loading:
            try:  # built off the event loop: searches of the serving version go on meanwhile
                shard = await asyncio.get_running_loop().run_in_executor(
                    self.executor, lambda: RecallShard(load_bundle(folder, mapped=True), config))
            except (ValueError, KeyError) as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bundle {str(folder)!r}: {error}")
            version = self.versions.add(shard, make_default=not request.keep_default)
            freeze_loaded_objects(collect_first=False)  # answering: no full collection now
        log.info("recall shard %d loaded %s; holds %s", config.shard_id, version, self.versions.names)
        return versions_pb2.LoadVersionResponse(model_version=version, loaded_versions=self.versions.names)

    async def UnloadVersion(self, request: versions_pb2.UnloadVersionRequest,
                            context: grpc.aio.ServicerContext) -> versions_pb2.UnloadVersionResponse:
        return await unload_version(self.versions, request.model_version, context)
