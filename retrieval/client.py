"""Typed async client of one recall shard."""

from __future__ import annotations

import grpc
import numpy as np

from protos.recfunnel.v1 import recall_pb2, recall_pb2_grpc, tensor_pb2
from protos.serving import CHANNEL_OPTIONS
from protos.wire import to_tensor
from retrieval.shard import ChannelQuery


class RecallClient:
    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = recall_pb2_grpc.RecallStub(self.channel)

    async def search(self, queries: list[ChannelQuery], exclude_item_ids: list[str], timeout: float,
                     model_version: str = "") -> recall_pb2.SearchResponse:
        request = recall_pb2.SearchRequest(
            queries=[
                recall_pb2.ChannelQuery(
                    channel=q.channel, k=q.k,
                    vector=to_tensor(np.asarray(q.vector)) if q.vector is not None else None,
                )
                for q in queries
            ],
            exclude_item_ids=exclude_item_ids,
            model_version=model_version,
        )
        return await self.stub.Search(request, timeout=timeout)

    async def add_items(self, item_ids: list[str], vectors: dict[str, np.ndarray], timeout: float) -> int:
        request = recall_pb2.AddItemsRequest(item_ids=item_ids, vectors=[
            tensor_pb2.ChannelVectors(channel=c, vectors=to_tensor(v)) for c, v in vectors.items()])
        return (await self.stub.AddItems(request, timeout=timeout)).added

    async def remove_items(self, item_ids: list[str], timeout: float) -> int:
        reply = await self.stub.RemoveItems(recall_pb2.RemoveItemsRequest(item_ids=item_ids), timeout=timeout)
        return reply.removed

    async def info(self, timeout: float = 5.0) -> recall_pb2.ShardInfoResponse:
        return await self.stub.ShardInfo(recall_pb2.ShardInfoRequest(), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()
