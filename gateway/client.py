"""Typed async client of the public Recommender service, with a deadline on every call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from protos.auth import call_metadata, open_channel
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc


class RecommenderClient:
    def __init__(self, address: str, timeout: float = 2.0, token: str | None = None, tls_ca: Path | None = None):
        """`token`: the bearer token the gateway wants; `tls_ca`: the PEM to verify its TLS port."""
        self.address = address
        self.timeout = timeout
        self.channel = open_channel(address, tls_ca=tls_ca)
        self.metadata = call_metadata(token)
        self.stub = recommender_pb2_grpc.RecommenderStub(self.channel)

    async def recommend(self, user_id: str, k: int = 10, exclude: Sequence[str] = (),
                        context: Sequence[str] = (), diversity: float = 0.0, explain: bool = False,
                        timeout: float | None = None) -> recommender_pb2.RecommendResponse:
        request = recommender_pb2.RecommendRequest(
            user_id=user_id, k=k, exclude_item_ids=list(exclude), context_item_ids=list(context),
            diversity=diversity, explain=explain)
        return await self.stub.Recommend(request, timeout=timeout or self.timeout, metadata=self.metadata)

    async def feedback(self, events: Sequence[tuple[str, str, str, float]], timeout: float | None = None
                       ) -> int:
        """Send (user_id, item_id, event_type, value) events; returns how many were accepted."""
        request = recommender_pb2.FeedbackRequest(events=[
            recommender_pb2.Event(user_id=u, item_id=i, event_type=t, value=v) for u, i, t, v in events])
        reply = await self.stub.Feedback(request, timeout=timeout or self.timeout, metadata=self.metadata)
        return reply.accepted

    async def close(self) -> None:
        await self.channel.close()
