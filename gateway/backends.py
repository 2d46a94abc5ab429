"""The gateway's gRPC clients of its stages: recall shards and the ranking service (one or
several replicas).

They speak the internal contracts through the generated stubs alone, so the gateway
depends on `protos`, not on the services' code; every failure becomes StageFailed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from gateway.events import ItemChange
from gateway.funnel import ShardAnswer, StageFailed
from protos.auth import call_metadata
from protos.filters import attributes_to_proto, filter_to_proto
from protos.recfunnel.v1 import (
    ranking_pb2,
    ranking_pb2_grpc,
    recall_pb2,
    recall_pb2_grpc,
    recommender_pb2,
    tensor_pb2,
    versions_pb2,
)
from protos.serving import CHANNEL_OPTIONS
from protos.wire import from_tensor, to_tensor
from recdata.attributes import NO_FILTER, ItemAttributes, ItemFilter
from recdata.channels import ChannelQuery, channel_mask

Reply = TypeVar("Reply")


class _Backend:
    """A channel to one service that can move to a new address, and the call wrapper."""

    channel: grpc.aio.Channel

    def __init__(self, address: str, token: str | None = None):
        self.retired: list[grpc.aio.Channel] = []  # channels to addresses the service has left
        self.metadata = call_metadata(token)  # the internal token, sent on every call
        self.connect(address)

    def connect(self, address: str) -> None:
        """Talk to `address` from the next call on (a restarted service listens on a new port);
        calls already sent finish on the old channel, which closes when they are done."""
        if hasattr(self, "channel"):
            self.retired.append(self.channel)
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stubs(self.channel)

    def _stubs(self, channel: grpc.aio.Channel) -> None:
        raise NotImplementedError

    async def _ask(self, stage: str, rpc: Callable[..., Awaitable[Reply]], request: Any, timeout: float) -> Reply:
        try:
            return await rpc(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise StageFailed(f"{stage}: {error.code().name} {error.details()}", error.code().name) from error

    async def close(self) -> None:
        for channel in [*self.retired, self.channel]:
            await channel.close()


def rank_request(history: list[str], candidates: list[tuple[str, dict[str, float]]], k: int, diversity: float,
                 explain_top: int, model_version: str, new_item_place: int | None = None) -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(
        history_item_ids=history, candidate_ids=[item_id for item_id, _ in candidates],
        candidate_channels=[channel_mask(scores) for _, scores in candidates],
        explain_top=explain_top, model_version=model_version, k=k, diversity=diversity,
        new_item_place=new_item_place)  # None leaves it unset: the service's setting


class GrpcRecall(_Backend):
    """One recall shard, as the funnel's RecallBackend and the catalogue's ShardWriter."""

    def _stubs(self, channel: grpc.aio.Channel) -> None:
        self.stub = recall_pb2_grpc.RecallStub(channel)

    @property
    def stage(self) -> str:
        return f"recall {self.address}"

    async def search(self, queries: list[ChannelQuery], exclude_item_ids: list[str], timeout: float,
                     model_version: str, item_filter: ItemFilter = NO_FILTER) -> ShardAnswer:
        request = recall_pb2.SearchRequest(
            queries=[recall_pb2.ChannelQuery(channel=q.channel, k=q.k, item_ids=q.item_ids,
                                             user_properties=q.user_properties,
                                             vector=None if q.vector is None else to_tensor(q.vector))
                     for q in queries],
            exclude_item_ids=exclude_item_ids, model_version=model_version,
            filter=None if item_filter.is_empty else filter_to_proto(item_filter))
        reply = await self._ask(self.stage, self.stub.Search, request, timeout)
        hits = {r.channel: [(c.item_id, c.score) for c in r.candidates] for r in reply.results}
        return ShardAnswer(hits, reply.model_version, reply.filter_passed)

    async def add_items(self, item_ids: list[str], vectors: dict[str, np.ndarray], timeout: float,
                        model_version: str = "", attributes: list[ItemAttributes] | None = None) -> int:
        request = recall_pb2.AddItemsRequest(item_ids=item_ids, model_version=model_version, vectors=[
            tensor_pb2.ChannelVectors(channel=c, vectors=to_tensor(v)) for c, v in vectors.items()],
            attributes=[attributes_to_proto(a) for a in attributes or ()])
        return (await self._ask(self.stage, self.stub.AddItems, request, timeout)).added

    async def remove_items(self, item_ids: list[str], timeout: float) -> int:
        request = recall_pb2.RemoveItemsRequest(item_ids=item_ids)
        return (await self._ask(self.stage, self.stub.RemoveItems, request, timeout)).removed

    async def load_version(self, bundle_path: str, timeout: float, keep_default: bool = False) -> str:
        request = versions_pb2.LoadVersionRequest(bundle_path=bundle_path, keep_default=keep_default)
        return (await self._ask(self.stage, self.stub.LoadVersion, request, timeout)).model_version

    async def unload_version(self, version: str, timeout: float) -> list[str]:
        request = versions_pb2.UnloadVersionRequest(model_version=version)
        reply = await self._ask(self.stage, self.stub.UnloadVersion, request, timeout)
        return list(reply.loaded_versions)


class GrpcRanking(_Backend):
    """The ranking service, as the funnel's RankingBackend and the catalogue's ItemEmbedder."""

    def _stubs(self, channel: grpc.aio.Channel) -> None:
        self.stub = ranking_pb2_grpc.RankingStub(channel)

    async def encode(self, history: list[str], timeout: float, model_version: str = ""
                     ) -> tuple[dict[str, np.ndarray], str]:
        request = ranking_pb2.EncodeRequest(history_item_ids=history, model_version=model_version)
        reply = await self._ask("encode", self.stub.Encode, request, timeout)
        return {v.channel: from_tensor(v.vector) for v in reply.vectors}, reply.model_version

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]], k: int,
                   diversity: float, explain_top: int, timeout: float, model_version: str,
                   new_item_place: int | None = None) -> list[tuple[str, float, list[str]]]:
        request = rank_request(history, candidates, k, diversity, explain_top, model_version, new_item_place)
        reply = await self._ask("rank", self.stub.Rank, request, timeout)
        return [(i.item_id, i.score, list(i.because_item_ids)) for i in reply.items]

    async def item_vectors(self, item_ids: list[str], timeout: float, model_version: str = ""
                           ) -> tuple[dict[str, np.ndarray], str, list[str]]:
        request = ranking_pb2.EncodeRequest(history_item_ids=item_ids, model_version=model_version, items_alone=True)
        reply = await self._ask("item vectors", self.stub.Encode, request, timeout)
        return ({v.channel: from_tensor(v.vector) for v in reply.vectors}, reply.model_version,
                list(reply.unknown_item_ids))

    async def embed_items(self, items: list[ItemChange], timeout: float, model_version: str = ""
                          ) -> tuple[dict[str, np.ndarray], str]:
        request = ranking_pb2.EmbedItemsRequest(
            items=[ranking_pb2.ItemText(item_id=i.item_id, text=i.text, tags=i.tags,
                                        vectors={name: recommender_pb2.FloatVector(values=v)
                                                 for name, v in i.vectors.items()})
                   for i in items],
            model_version=model_version)
        reply = await self._ask("embed", self.stub.EmbedItems, request, timeout)
        return {v.channel: from_tensor(v.vectors) for v in reply.vectors}, reply.model_version

    async def load_version(self, bundle_path: str, timeout: float, keep_default: bool = False) -> str:
        request = versions_pb2.LoadVersionRequest(bundle_path=bundle_path, keep_default=keep_default)
        return (await self._ask("ranking", self.stub.LoadVersion, request, timeout)).model_version

    async def unload_version(self, version: str, timeout: float) -> list[str]:
        request = versions_pb2.UnloadVersionRequest(model_version=version)
        return list((await self._ask("ranking", self.stub.UnloadVersion, request, timeout)).loaded_versions)



class RankingReplicas:
    """Several ranking services holding the same versions, as one RankingBackend and
    ItemEmbedder: calls go round-robin, and a replica that fails hands the call to the next
    one while the deadline allows. Loading and unloading versions goes to all of them."""

    def __init__(self, replicas: Sequence[GrpcRanking]):
        if not replicas:
            raise ValueError("at least one ranking service address is needed")
        self.replicas = list(replicas)
        self._next = itertools.count()

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def retarget(self, addresses: Sequence[str]) -> bool:
        """Follow replicas that moved; True if any did."""
        if len(addresses) != len(self.replicas):
            raise ValueError(f"{len(addresses)} ranking addresses for {len(self.replicas)} replicas")
        moved = False
        for replica, address in zip(self.replicas, addresses, strict=True):
            if replica.address != address:
                replica.connect(address)
                moved = True
        return moved

    async def _any(self, call: Callable[[GrpcRanking, float], Awaitable[Reply]], timeout: float) -> Reply:
        """`call` on the next replica, then on the others while time is left."""
        deadline = time.monotonic() + timeout
        first = next(self._next) % len(self.replicas)
        failure: StageFailed | None = None
        for step in range(len(self.replicas)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return await call(self.replicas[(first + step) % len(self.replicas)], left)
            except StageFailed as error:
                failure = error
                if error.status == grpc.StatusCode.DEADLINE_EXCEEDED.name:
                    break  # the budget is spent: no replica could answer in time
                if error.status == grpc.StatusCode.INVALID_ARGUMENT.name:
                    break  # every replica holds the same versions: each would refuse it alike
        raise failure or StageFailed("ranking: no time left in the budget", grpc.StatusCode.DEADLINE_EXCEEDED.name)

    async def encode(self, history: list[str], timeout: float, model_version: str = ""
                     ) -> tuple[dict[str, np.ndarray], str]:
        return await self._any(lambda r, left: r.encode(history, left, model_version), timeout)

    async def rank(self, history: list[str], candidates: list[tuple[str, dict[str, float]]], k: int,
                   diversity: float, explain_top: int, timeout: float, model_version: str,
                   new_item_place: int | None = None) -> list[tuple[str, float, list[str]]]:
        return await self._any(lambda r, left: r.rank(history, candidates, k, diversity, explain_top, left,
                                                      model_version, new_item_place), timeout)

    async def item_vectors(self, item_ids: list[str], timeout: float, model_version: str = ""
                           ) -> tuple[dict[str, np.ndarray], str, list[str]]:
        return await self._any(lambda r, left: r.item_vectors(item_ids, left, model_version), timeout)

    async def embed_items(self, items: list[ItemChange], timeout: float, model_version: str = ""
                          ) -> tuple[dict[str, np.ndarray], str]:
        return await self._any(lambda r, left: r.embed_items(items, left, model_version), timeout)

    async def load_version(self, bundle_path: str, timeout: float, keep_default: bool = False) -> str:
        loaded = await asyncio.gather(*(r.load_version(bundle_path, timeout, keep_default) for r in self.replicas))
        if len(set(loaded)) != 1:
            raise StageFailed(f"ranking replicas loaded different versions from {bundle_path}: {sorted(set(loaded))}")
        return loaded[0]

    async def unload_version(self, version: str, timeout: float) -> list[str]:
        remaining = await asyncio.gather(*(r.unload_version(version, timeout) for r in self.replicas))
        return remaining[0]

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()
