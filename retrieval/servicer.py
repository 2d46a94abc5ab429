"""Recall servicer: protobuf <-> RecallShard, errors -> status codes."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos.recfunnel.v1 import recall_pb2, recall_pb2_grpc
from protos.wire import BadTensor, from_tensor
from recdata.channels import ChannelQuery
from retrieval.shard import InvalidQuery, RecallShard

MAX_EXCLUDED = 100_000
MAX_UPDATE = 10_000  # items per AddItems / RemoveItems call


class RecallServicer(recall_pb2_grpc.RecallServicer):
    def __init__(self, shard: RecallShard, executor: ThreadPoolExecutor):
        self.shard = shard
        self.executor = executor

    async def Search(self, request: recall_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> recall_pb2.SearchResponse:
        shard = self.shard  # one version for the whole call, even if a swap happens meanwhile
        if request.model_version and request.model_version != shard.version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model_version {request.model_version!r} not served; this shard "
                                f"serves {shard.version!r}")
        if len(request.exclude_item_ids) > MAX_EXCLUDED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"exclude_item_ids has {len(request.exclude_item_ids)} ids; at most {MAX_EXCLUDED}")
        try:
            queries = [
                ChannelQuery(q.channel, q.k, from_tensor(q.vector) if q.HasField("vector") else None)
                for q in request.queries
            ]
            for query in queries:
                shard.validate(query)
        except (BadTensor, InvalidQuery) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        exclude = list(request.exclude_item_ids)
        if shard.size <= shard.config.inline_search_max_items:
            results = shard.search(queries, exclude)
        else:  # FAISS releases the GIL: big searches run beside the event loop
            results = await asyncio.get_running_loop().run_in_executor(self.executor, shard.search, queries, exclude)
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
        )

    async def ShardInfo(self, request: recall_pb2.ShardInfoRequest,
                        context: grpc.aio.ServicerContext) -> recall_pb2.ShardInfoResponse:
        shard = self.shard
        return recall_pb2.ShardInfoResponse(
            shard_id=shard.config.shard_id,
            num_shards=shard.config.num_shards,
            model_version=shard.version,
            channels=[
                recall_pb2.ChannelInfo(channel=channel, dim=shard.dims[channel], items=shard.size,
                                       index_kind=shard.index_reports[channel].kind,
                                       recall_at_k=shard.index_reports[channel].recall_at_k,
                                       index_params_json=json.dumps(shard.index_reports[channel].params))
                for channel in shard.indexes
            ] + [recall_pb2.ChannelInfo(channel="popular", dim=0, items=shard.size, index_kind="sorted")],
        )

    async def AddItems(self, request: recall_pb2.AddItemsRequest,
                       context: grpc.aio.ServicerContext) -> recall_pb2.AddItemsResponse:
        shard = self.shard
        if not 1 <= len(request.item_ids) <= MAX_UPDATE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"item_ids has {len(request.item_ids)} entries; allowed 1..{MAX_UPDATE}")
        try:
            vectors = {v.channel: from_tensor(v.vectors) for v in request.vectors}
            loop = asyncio.get_running_loop()
            added = await loop.run_in_executor(self.executor, shard.add_items, list(request.item_ids), vectors)
        except (BadTensor, InvalidQuery) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return recall_pb2.AddItemsResponse(added=added)

    async def RemoveItems(self, request: recall_pb2.RemoveItemsRequest,
                          context: grpc.aio.ServicerContext) -> recall_pb2.RemoveItemsResponse:
        if len(request.item_ids) > MAX_UPDATE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"item_ids has {len(request.item_ids)} entries; allowed 0..{MAX_UPDATE}")
        loop = asyncio.get_running_loop()
        removed = await loop.run_in_executor(self.executor, self.shard.remove_items, list(request.item_ids))
        return recall_pb2.RemoveItemsResponse(removed=removed)
