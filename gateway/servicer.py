"""Recommender servicer: the public contract <-> the funnel, the catalogue and the event log."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace

import grpc

from gateway.admission import Admission, Overloaded, Priority
from gateway.catalogue import Catalogue
from gateway.config import GatewayConfig
from gateway.events import Event, EventStore, ItemChange, StoreUnavailable, UserRecord, UserView, read_user
from gateway.experiments import NO_EXPERIMENT, Assignment, RunningExperiment, Variant
from gateway.exposures import ExposureLog
from gateway.funnel import Answer, Funnel, Recommendation, RecommendQuery, SimilarQuery, StageFailed, UnknownItems
from gateway.group_commit import GroupCommit
from gateway.pages import PageSessions, request_fingerprint
from gateway.propensity import Explorer, ranked_positions
from gateway.rollout import Rollout, VariantVersions
from gateway.validation import (
    InvalidRequest,
    check_event,
    check_filter,
    check_id,
    check_id_list,
    check_item,
    check_properties,
    check_recommend,
    check_similar,
    check_size,
    check_vectors,
)
from protos.filters import filter_from_proto, properties_of
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc, versions_pb2, versions_pb2_grpc

log = logging.getLogger(__name__)
MAX_PATH_BYTES = 4096  # a bundle folder path, as Linux's PATH_MAX
request_log = logging.getLogger("recfunnel.requests")
REPORTED_TYPES = frozenset({"click", "purchase", "interaction"})  # tagged by name in the metrics, as configured ones
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a refusal: when a retry may succeed


def query_of(request: recommender_pb2.RecommendRequest, user: UserView, k: int | None = None,
             exclude: Sequence[str] = (), variant: Variant | None = None, model_version: str = ""
             ) -> RecommendQuery:
    """The funnel's query for a request: the logged history, then the request's context; never
    an item the user hid. An experiment `variant` sets the diversity a request leaves at 0,
    the channels' budgets and the new-item place, and `model_version` (its bundle's) the model that answers."""
    diversity = request.diversity
    if not diversity and variant is not None and variant.diversity is not None:
        diversity = variant.diversity
    return RecommendQuery(user_id=request.user_id, k=k or request.k,
                          history=user.history + list(request.context_item_ids),
                          exclude_item_ids=[*request.exclude_item_ids, *user.hidden, *exclude],
                          explain=request.explain, diversity=diversity,
                          item_filter=filter_from_proto(request.filter),
                          user_properties=tuple(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                                                for name, value in sorted(user.properties.items())),
                          channel_budgets=dict(variant.channel_budgets) if variant and variant.channel_budgets
                          else None, model_version=model_version,
                          new_item_place=variant.new_item_place if variant is not None else None)


def recommended(items: list[Recommendation]) -> list[recommender_pb2.RecommendedItem]:
    return [recommender_pb2.RecommendedItem(item_id=r.item_id, score=r.score, channels=r.channels,
                                            because_item_ids=r.because_item_ids) for r in items]


def paging_fingerprint(request: recommender_pb2.RecommendRequest) -> bytes:
    return request_fingerprint(request.filter.SerializeToString(deterministic=True),
                               "\x1f".join(request.context_item_ids).encode(),
                               "\x1f".join(request.exclude_item_ids).encode(),
                               f"{request.diversity}:{request.explain}:{request.page_size}".encode())


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, funnel: Funnel, catalogue: Catalogue, events: EventStore, config: GatewayConfig,
                 executor: ThreadPoolExecutor, appender: GroupCommit, admission: Admission,
                 exposures: ExposureLog | None = None, variant_versions: VariantVersions | None = None):
        self.funnel = funnel
        self.exposures = exposures or ExposureLog(events, replace(config.exposures, enabled=False))
        self.admission = admission
        self.catalogue = catalogue
        self.events = events
        self.appender = appender  # Feedback's writes: calls that meet share a commit
        self.config = config
        self.executor = executor
        self.pages = PageSessions(config.paging)
        self.explorer = Explorer(config.exploration)
        self.variant_versions = variant_versions  # None: variants that name a bundle never start
        self.experiment = RunningExperiment(config.experiments[0] if config.experiments else None, events,
                                            executor, config.experiment_poll_s)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _budget(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds downstream calls may take: the client's deadline or the configured default."""
        remaining = context.time_remaining()
        budget = self.config.default_deadline_s if remaining is None else remaining
        return budget * 0.95  # keep a little to serialise the answer

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        return time.monotonic() + self._budget(context)

    @asynccontextmanager
    async def _slot(self, priority: Priority, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """The body runs admitted, or the call is refused at once with RESOURCE_EXHAUSTED and a
        retry hint (`retry-after-ms` in the trailing metadata): nothing of it was done."""
        try:
            ticket = await self.admission.acquire(priority, self._deadline(context))
        except Overloaded as error:
            retry_ms = max(1, math.ceil(error.retry_after_s * 1000))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded, nothing done; retry after "
                                f"{retry_ms} ms with backoff: {error}",
                                trailing_metadata=((RETRY_AFTER_KEY, str(retry_ms)),))
        try:
            yield
        finally:
            self.admission.release(ticket)

    async def Recommend(self, request: recommender_pb2.RecommendRequest,
                        context: grpc.aio.ServicerContext) -> recommender_pb2.RecommendResponse:
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        try:
            check_size("Recommend", request.ByteSize(), self.config.limits)
            check_recommend(request.user_id, request.k, request.exclude_item_ids,
                            request.context_item_ids, request.diversity, self.config.limits, request.page_size)
            check_filter("filter", request.filter, self.config.limits)
            if request.page_token and not request.page_size:
                raise InvalidRequest("page_token given without page_size; send the page_size of the first page")
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        async with self._slot(Priority.RECOMMEND, context):
            return await self._recommend(request, context, request_id, started)

    async def _read_user(self, user_id: str) -> tuple[UserView, bool]:
        """The user's history and hidden items; empty (and store_down) while the store is out:
        an answer from the request's context and popularity, marked degraded, is still one."""
        try:
            return await read_user(self.events, user_id, self.config.history_length, self.executor,
                                   self.config.feedback), False
        except StoreUnavailable:
            return UserView([], []), True

    async def _recommend(self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext,
                         request_id: str, started: float) -> recommender_pb2.RecommendResponse:
        deadline = self._deadline(context)
        user, store_down = await self._read_user(request.user_id)
        if request.page_size:
            return await self._page(request, context, request_id, started, deadline, user, store_down)
        assigned = self._assignment(request.user_id)
        query = query_of(request, user, variant=assigned.variant, model_version=assigned.model_version)
        answer = await self.funnel.recommend(query, deadline)
        self._log_answer(request_id, request.user_id, request.k, len(query.history), answer, store_down, started)
        swapped = self.explorer.pair_to_swap(len(answer.items)) if request.user_id else None
        ranked = ranked_positions(len(answer.items), swapped)
        items = [answer.items[place] for place in ranked]
        self.exposures.offer(request_id, request.user_id, [(r.item_id, r.score) for r in items],
                             answer.model_version, assigned.label, ranked)
        return recommender_pb2.RecommendResponse(
            items=recommended(items), model_version=answer.model_version,
            degraded=answer.degraded or store_down, recall_coverage=answer.recall_coverage, request_id=request_id,
            filter_passed=answer.filter_passed, experiment=assigned.experiment, variant=assigned.variant_name)

    def _assignment(self, user_id: str) -> Assignment:
        """The running experiment's variant for this user; `NO_EXPERIMENT` when none runs."""
        experiment = self.experiment.get()
        versions = self.variant_versions
        loaded = versions is not None and versions.ready(experiment)  # loads or unloads what it names
        if experiment is None or (experiment.bundles and not loaded):
            return NO_EXPERIMENT
        assigned = experiment.assignment(user_id)
        return replace(assigned, model_version=versions.version_of(assigned.variant)) if versions else assigned

    async def _page(self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext,
                    request_id: str, started: float, deadline: float, user: UserView, store_down: bool
                    ) -> recommender_pb2.RecommendResponse:
        """One page of a token's ranked list (see gateway.pages), ranking more when it runs out."""
        fingerprint = paging_fingerprint(request)
        try:
            if request.page_token:
                token, session = request.page_token, self.pages.resume(request.page_token, request.user_id,
                                                                       fingerprint)
            else:
                token, session = self.pages.open(request.user_id, fingerprint)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        drop = set(user.history) | set(user.hidden) | set(request.context_item_ids)
        degraded, coverage = store_down, 1.0
        assigned = self._assignment(request.user_id)
        async with session.lock:
            page = session.take(request.page_size, drop)
            while len(page) < request.page_size and not session.exhausted:
                ahead = min(request.page_size * self.config.paging.pages_ahead, self.config.limits.max_k)
                query = query_of(request, user, ahead, sorted(session.seen()), assigned.variant,
                                 assigned.model_version)
                answer = await self.funnel.recommend(query, deadline)
                degraded, coverage = degraded or answer.degraded, min(coverage, answer.recall_coverage)
                session.model_version = session.model_version or answer.model_version
                session.filter_passed = answer.filter_passed or session.filter_passed
                session.extend(answer.items)
                page += session.take(request.page_size - len(page), drop)
            if session.finished:
                self.pages.close(token)
        self._log_answer(request_id, request.user_id, request.page_size, len(user.history),
                         Answer(page, session.model_version, degraded, coverage), store_down, started)
        self.exposures.offer(request_id, request.user_id, [(r.item_id, r.score) for r in page], session.model_version,
                             assigned.label)
        return recommender_pb2.RecommendResponse(
            items=recommended(page), model_version=session.model_version, degraded=degraded,
            recall_coverage=coverage, request_id=request_id,
            next_page_token="" if session.finished else token, filter_passed=session.filter_passed,
            experiment=assigned.experiment, variant=assigned.variant_name)

    def _log_answer(self, request_id: str, user_id: str, k: int, history: int, answer: Answer, store_down: bool,
                    started: float) -> None:
        if request_log.isEnabledFor(logging.INFO):  # the line's JSON costs time even when dropped
            request_log.info(json.dumps({
                "request_id": request_id, "user_id": user_id, "k": k,
                "history": history, "returned": len(answer.items),
                "degraded": answer.degraded or store_down, "coverage": answer.recall_coverage,
                "model_version": answer.model_version,
                "ms": round((time.monotonic() - started) * 1000, 2),
                "stages_ms": {k: round(v, 2) for k, v in answer.stages_ms.items()}, "skipped": answer.skipped,
            }))

    async def SimilarItems(self, request: recommender_pb2.SimilarItemsRequest,
                           context: grpc.aio.ServicerContext) -> recommender_pb2.SimilarItemsResponse:
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        try:
            check_size("SimilarItems", request.ByteSize(), self.config.limits)
            check_similar(request, self.config.limits)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        async with self._slot(Priority.RECOMMEND, context):
            deadline = self._deadline(context)
            user, store_down = (await self._read_user(request.user_id) if request.user_id
                                else (UserView([], []), False))
            query = SimilarQuery(list(request.item_ids), request.k, user.history,
                                 [*request.exclude_item_ids, *user.hidden], filter_from_proto(request.filter))
            try:
                answer = await self.funnel.similar(query, deadline)
            except UnknownItems as error:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{error}; every item_ids entry must be in the "
                                    f"catalogue (trained on, or added with UpsertItems)")
            self._log_answer(request_id, request.user_id, request.k, len(user.history), answer, store_down, started)
            if request.user_id:  # an item page shown to nobody in particular is no one's exposure
                self.exposures.offer(request_id, request.user_id, [(r.item_id, r.score) for r in answer.items],
                                     answer.model_version)
            return recommender_pb2.SimilarItemsResponse(
                items=recommended(answer.items), model_version=answer.model_version,
                degraded=answer.degraded or store_down, recall_coverage=answer.recall_coverage,
                request_id=request_id, filter_passed=answer.filter_passed)

    async def Feedback(self, request: recommender_pb2.FeedbackRequest,
                       context: grpc.aio.ServicerContext) -> recommender_pb2.FeedbackResponse:
        limits = self.config.limits
        try:
            check_size("Feedback", request.ByteSize(), limits)
            if not 1 <= len(request.events) <= limits.max_events:
                raise InvalidRequest(f"events has {len(request.events)} entries; allowed 1..{limits.max_events}")
            for n, e in enumerate(request.events):
                check_event(n, e.user_id, e.item_id, e.event_type, e.value, e.timestamp_ms, e.event_id, limits,
                            e.request_id)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        events = [Event(e.user_id, e.item_id, e.event_type or "interaction", e.value, e.timestamp_ms, e.event_id,
                        e.request_id) for e in request.events]
        try:
            async with self._slot(Priority.WRITE, context):
                accepted, duplicates = await self.appender.append(events)  # returns only once committed
        except StoreUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"nothing acknowledged; retry with the same event ids: "
                                f"{error}")
        if not duplicates:  # a retried call was counted the first time (the store counts exactly)
            self.exposures.attribute((e.request_id, self._metric_type(e.event_type)) for e in events if e.request_id)
        return recommender_pb2.FeedbackResponse(accepted=accepted, duplicates=duplicates)

    def _metric_type(self, event_type: str) -> str:
        """The event type as a metric tag: configured types and the report's defaults by name,
        any other as "other", so that callers' free-form types cannot grow the metrics."""
        known = event_type in self.config.feedback.weights or event_type in REPORTED_TYPES
        return event_type if known else "other"

    async def UpsertItems(self, request: recommender_pb2.UpsertItemsRequest,
                          context: grpc.aio.ServicerContext) -> recommender_pb2.UpsertItemsResponse:
        limits = self.config.limits
        try:
            check_size("UpsertItems", request.ByteSize(), limits)
            if not 1 <= len(request.items) <= limits.max_items:
                raise InvalidRequest(f"items has {len(request.items)} entries; allowed 1..{limits.max_items}")
            check_id_list("items[].item_id", [i.item_id for i in request.items], limits, limits.max_items)
            if len({i.item_id for i in request.items}) != len(request.items):
                raise InvalidRequest("items has duplicate item_id values; each item once per call")
            for n, item in enumerate(request.items):
                check_item(n, item.text, list(item.tags), limits)
                check_properties(n, item.properties, limits)
                check_vectors(n, item.vectors)
                if item.created_ms < 0:
                    raise InvalidRequest(f"items[{n}].created_ms={item.created_ms} must be >= 0 (0 = now)")
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        now_ms = int(time.time() * 1000)  # kept in the change log: a replay keeps the item's time
        items = [ItemChange("upsert", i.item_id, i.text, tuple(i.tags), properties_of(i.properties),
                            i.created_ms or now_ms, {name: list(v.values) for name, v in i.vectors.items()})
                 for i in request.items]
        try:
            async with self._slot(Priority.WRITE, context):
                count, version = await self.catalogue.upsert(items, self._budget(context), self.funnel.model_version)
        except StageFailed as error:
            if error.status == grpc.StatusCode.INVALID_ARGUMENT.name:  # vectors the model does not fuse
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"upsert did not complete, retry is safe: {error}")
        except StoreUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"upsert did not complete, retry is safe: {error}")
        return recommender_pb2.UpsertItemsResponse(upserted=count, model_version=version)

    async def DeleteItems(self, request: recommender_pb2.DeleteItemsRequest,
                          context: grpc.aio.ServicerContext) -> recommender_pb2.DeleteItemsResponse:
        limits = self.config.limits
        try:
            check_size("DeleteItems", request.ByteSize(), limits)
            if not 1 <= len(request.item_ids) <= limits.max_items:
                raise InvalidRequest(f"item_ids has {len(request.item_ids)} entries; allowed 1..{limits.max_items}")
            check_id_list("item_ids", request.item_ids, limits, limits.max_items)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            async with self._slot(Priority.WRITE, context):
                deleted = await self.catalogue.delete(list(request.item_ids), self._budget(context))
        except (StageFailed, StoreUnavailable) as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"delete did not complete, retry is safe: {error}")
        return recommender_pb2.DeleteItemsResponse(deleted=deleted)


    async def UpsertUsers(self, request: recommender_pb2.UpsertUsersRequest,
                          context: grpc.aio.ServicerContext) -> recommender_pb2.UpsertUsersResponse:
        limits = self.config.limits
        try:
            check_size("UpsertUsers", request.ByteSize(), limits)
            if not 1 <= len(request.users) <= limits.max_items:
                raise InvalidRequest(f"users has {len(request.users)} entries; allowed 1..{limits.max_items}")
            check_id_list("users[].user_id", [u.user_id for u in request.users], limits, limits.max_items)
            if len({u.user_id for u in request.users}) != len(request.users):
                raise InvalidRequest("users has duplicate user_id values; each user once per call")
            for n, user in enumerate(request.users):
                check_properties(n, user.properties, limits, "users")
                check_item(n, user.text, [], limits, "users")
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        users = [UserRecord(u.user_id, properties_of(u.properties), u.text) for u in request.users]
        try:
            async with self._slot(Priority.WRITE, context):
                upserted = await self._run(self.events.upsert_users, users)
        except StoreUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"upsert did not complete, retry is safe: {error}")
        return recommender_pb2.UpsertUsersResponse(upserted=upserted)

    async def DeleteUser(self, request: recommender_pb2.DeleteUserRequest,
                         context: grpc.aio.ServicerContext) -> recommender_pb2.DeleteUserResponse:
        try:
            check_size("DeleteUser", request.ByteSize(), self.config.limits)
            check_id("user_id", request.user_id, self.config.limits)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            async with self._slot(Priority.WRITE, context):
                # The history is read from the log at every Recommend: nothing else holds it.
                removed = await self._run(self.events.erase_user, request.user_id)
        except StoreUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"nothing erased; retry: {error}")
        return recommender_pb2.DeleteUserResponse(events_removed=removed)


class RolloutServicer(versions_pb2_grpc.RolloutServicer):
    """The gateway's operator surface: which version serves, and the swap to another."""

    def __init__(self, rollout: Rollout):
        self.rollout = rollout

    async def SwapVersion(self, request: versions_pb2.SwapVersionRequest,
                          context: grpc.aio.ServicerContext) -> versions_pb2.SwapVersionResponse:
        size = len(request.bundle_path.encode("utf-8", errors="surrogatepass"))
        if not 1 <= size <= MAX_PATH_BYTES or "\x00" in request.bundle_path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bundle_path is {size} bytes; give a bundle "
                                f"folder path of 1..{MAX_PATH_BYTES} bytes without NUL characters")
        try:
            report = await self.rollout.swap(request.bundle_path)
        except StageFailed as error:
            # The old version still serves: nothing switched unless every service loaded the new one.
            code = (grpc.StatusCode.INVALID_ARGUMENT if error.status == "INVALID_ARGUMENT"  # not a bundle
                    else grpc.StatusCode.FAILED_PRECONDITION)
            await context.abort(code, f"swap not done, still serving the old version: {error}")
        return versions_pb2.SwapVersionResponse(model_version=report.model_version,
                                                previous_version=report.previous_version,
                                                replayed_changes=report.replayed_changes, seconds=report.seconds)

    async def ServingVersion(self, request: versions_pb2.ServingVersionRequest,
                             context: grpc.aio.ServicerContext) -> versions_pb2.ServingVersionResponse:
        try:
            return versions_pb2.ServingVersionResponse(model_version=await self.rollout.serving_version())
        except StageFailed as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"ranking service unreachable: {error}")
            raise
