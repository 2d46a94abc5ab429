"""Typed async client of the ranking service."""

from __future__ import annotations

import grpc
import numpy as np

from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc
from protos.serving import CHANNEL_OPTIONS
from protos.wire import from_tensor


class RankingClient:
    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = ranking_pb2_grpc.RankingStub(self.channel)

    async def encode(self, history: list[str], timeout: float, model_version: str = ""
                     ) -> tuple[dict[str, np.ndarray], str]:
        """Per-channel query vectors for a history, and the version that made them."""
        reply = await self.stub.Encode(
            ranking_pb2.EncodeRequest(history_item_ids=history, model_version=model_version), timeout=timeout)
        return {v.channel: from_tensor(v.vector) for v in reply.vectors}, reply.model_version

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]],
                   explain_top: int, timeout: float, model_version: str = "") -> ranking_pb2.RankResponse:
        request = ranking_pb2.RankRequest(
            history_item_ids=history,
            candidates=[
                ranking_pb2.RankCandidate(
                    item_id=item_id,
                    channel_scores=[ranking_pb2.ChannelScore(channel=c, score=s) for c, s in scores.items()],
                )
                for item_id, scores in candidates
            ],
            explain_top=explain_top,
            model_version=model_version,
        )
        return await self.stub.Rank(request, timeout=timeout)

    async def embed_items(self, items: list[tuple[str, str, list[str]]], timeout: float
                          ) -> tuple[dict[str, np.ndarray], str]:
        """Encode (item_id, text, tags) items, which the service keeps for ranking; vectors per channel."""
        request = ranking_pb2.EmbedItemsRequest(
            items=[ranking_pb2.ItemText(item_id=i, text=t, tags=tags) for i, t, tags in items])
        reply = await self.stub.EmbedItems(request, timeout=timeout)
        return {v.channel: from_tensor(v.vectors) for v in reply.vectors}, reply.model_version

    async def close(self) -> None:
        await self.channel.close()
