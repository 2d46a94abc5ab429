"""The funnel's stages reached over gRPC: recall shards and the ranking service."""

from __future__ import annotations

import grpc
import numpy as np

from gateway.funnel import ShardAnswer, StageFailed
from ranking.client import RankingClient
from retrieval.client import RecallClient
from retrieval.shard import ChannelQuery


class GrpcRecall:
    """One recall shard behind the RecallBackend interface."""

    def __init__(self, address: str):
        self.client = RecallClient(address)

    async def search(self, queries: list[ChannelQuery], exclude_item_ids: list[str], timeout: float,
                     model_version: str) -> ShardAnswer:
        try:
            reply = await self.client.search(queries, exclude_item_ids, timeout, model_version)
        except grpc.RpcError as error:
            raise StageFailed(f"recall {self.client.address}: {error.code().name} {error.details()}") from error
        hits = {r.channel: [(c.item_id, c.score) for c in r.candidates] for r in reply.results}
        return ShardAnswer(hits, reply.model_version)

    async def add_items(self, item_ids: list[str], vectors: dict[str, np.ndarray], timeout: float) -> int:
        try:
            return await self.client.add_items(item_ids, vectors, timeout)
        except grpc.RpcError as error:
            raise StageFailed(f"recall {self.client.address}: {error.code().name} {error.details()}") from error

    async def remove_items(self, item_ids: list[str], timeout: float) -> int:
        try:
            return await self.client.remove_items(item_ids, timeout)
        except grpc.RpcError as error:
            raise StageFailed(f"recall {self.client.address}: {error.code().name} {error.details()}") from error

    async def close(self) -> None:
        await self.client.close()


class GrpcRanking:
    """The ranking service behind the RankingBackend interface."""

    def __init__(self, address: str):
        self.client = RankingClient(address)

    async def encode(self, history: list[str], timeout: float) -> tuple[dict[str, np.ndarray], str]:
        try:
            return await self.client.encode(history, timeout)
        except grpc.RpcError as error:
            raise StageFailed(f"encode: {error.code().name} {error.details()}") from error

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]],
                   explain_top: int, timeout: float, model_version: str
                   ) -> list[tuple[str, float, list[str]]]:
        try:
            reply = await self.client.rank(history, candidates, explain_top, timeout, model_version)
        except grpc.RpcError as error:
            raise StageFailed(f"rank: {error.code().name} {error.details()}") from error
        return [(i.item_id, i.score, list(i.because_item_ids)) for i in reply.items]

    async def embed_items(self, items: list[tuple[str, str, list[str]]], timeout: float
                          ) -> tuple[dict[str, np.ndarray], str]:
        try:
            return await self.client.embed_items(items, timeout)
        except grpc.RpcError as error:
            raise StageFailed(f"embed: {error.code().name} {error.details()}") from error

    async def close(self) -> None:
        await self.client.close()
