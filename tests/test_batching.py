"""Micro-batching: batches form under concurrency, and a batched score is the unbatched one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gateway.backends import GrpcRanking
from ranking import server as ranking_server
from ranking.batching import MicroBatcher
from ranking.config import RankingConfig
from ranking.inference import ItemTables, RankCall, RankingModel
from recdata.channels import CHANNELS, channel_flags, channel_mask


async def test_concurrent_requests_share_batches_and_keep_their_own_results() -> None:
    sizes: list[int] = []

    def double(batch: Sequence[int]) -> list[int]:
        sizes.append(len(batch))
        return [2 * x for x in batch]

    batcher = MicroBatcher(double, ThreadPoolExecutor(1), max_batch_size=8, max_wait_s=0.02)
    try:
        results = await asyncio.gather(*(batcher.submit(n) for n in range(20)))
    finally:
        await batcher.close()
    assert results == [2 * n for n in range(20)]
    assert max(sizes) == 8 and sum(sizes) == 20  # never above the configured size
    assert batcher.stats.mean_batch_size > 1


async def test_batch_size_one_is_batching_off() -> None:
    sizes: list[int] = []

    def record(batch: Sequence[int]) -> list[int]:
        sizes.append(len(batch))
        return list(batch)

    batcher = MicroBatcher(record, ThreadPoolExecutor(1), max_batch_size=1, max_wait_s=0.01)
    try:
        await asyncio.gather(*(batcher.submit(n) for n in range(5)))
    finally:
        await batcher.close()
    assert sizes == [1] * 5


async def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs() -> None:
    def fussy(batch: Sequence[int]) -> list[int]:
        if any(x < 0 for x in batch):
            raise ValueError("negative")
        return list(batch)

    batcher = MicroBatcher(fussy, ThreadPoolExecutor(1), max_batch_size=4, max_wait_s=0.0)
    try:
        with pytest.raises(ValueError, match="negative"):
            await batcher.submit(-1)
        assert await batcher.submit(3) == 3
    finally:
        await batcher.close()


def _channels(mask: int) -> list[str]:
    return [channel for channel, flag in zip(CHANNELS, channel_flags([mask])[0], strict=True) if flag]


def _calls(model: RankingModel) -> list[RankCall]:
    """Users with histories of different lengths (one empty) and candidate lists of different
    lengths, with unknown ids mixed in."""
    rng = np.random.default_rng(0)
    ids = model.tables.item_ids
    calls = []
    for n, history_len in enumerate([0, 1, 3, 12, 80]):
        history = [ids[i] for i in rng.choice(len(ids), history_len, replace=False)]
        chosen = rng.choice(len(ids), 5 + 7 * n, replace=False)
        candidates = [(ids[i], channel_mask(["sequential"] if i % 2 else ["popular", "semantic"])) for i in chosen]
        candidates.append((f"unknown-{n}", channel_mask(["popular"])))
        calls.append(RankCall(history, candidates, k=len(candidates), diversity=0.3 * (n % 2), explain_top=2))
    return calls


def test_batched_scores_equal_unbatched_scores(tiny_bundle: Path) -> None:
    model = RankingModel.load(tiny_bundle, device="cpu")
    calls = _calls(model)
    batched = model.rank_many(calls)
    for call, together in zip(calls, batched, strict=True):
        alone = model.rank_many([call])[0]
        assert [i for i, _, _ in together] == [i for i, _, _ in alone]
        np.testing.assert_allclose([s for _, s, _ in together], [s for _, s, _ in alone], rtol=1e-5, atol=1e-5)
        assert [b for _, _, b in together] == [b for _, _, b in alone]

    histories = [call.history_ids for call in calls]
    together_vectors = model.encode_many(histories)
    for history, vectors in zip(histories, together_vectors, strict=True):
        alone_vectors = model.encode_many([history])[0]
        assert vectors.keys() == alone_vectors.keys()
        for channel in vectors:
            np.testing.assert_allclose(vectors[channel], alone_vectors[channel], atol=1e-5)


async def test_the_service_batches_concurrent_ranks_with_the_same_answers(tiny_bundle: Path) -> None:
    model = RankingModel.load(tiny_bundle, device="cpu")
    calls = _calls(model) * 4
    service = await ranking_server.start(RankingConfig(bundle=tiny_bundle, max_batch_size=16, max_batch_wait_ms=20))
    client = GrpcRanking(service.address)
    try:
        answers = await asyncio.gather(*(
            client.rank(c.history_ids, [(i, dict.fromkeys(_channels(mask), 1.0)) for i, mask in c.candidates],
                        c.k, c.diversity, c.explain_top, 10, "")
            for c in calls))
        stats = service.stats()["rank"]
    finally:
        await client.close()
        await service.stop(0)
    assert stats["requests"] == len(calls) and stats["mean_batch_size"] > 1
    for call, answer in zip(calls, answers, strict=True):
        expected = model.rank_many([call])[0]
        assert [i for i, _, _ in answer] == [i for i, _, _ in expected]
        np.testing.assert_allclose([s for _, s, _ in answer], [s for _, s, _ in expected], rtol=1e-5, atol=1e-5)


def test_rank_reuses_the_query_vectors_encode_computed_for_the_same_history(tiny_bundle: Path) -> None:
    model = RankingModel.load(tiny_bundle, device="cpu")
    uncached = RankingModel.load(tiny_bundle, device="cpu")
    encoder_runs: list[int] = []
    model.query_encoder.register_forward_hook(lambda *_: encoder_runs.append(1))
    ids = model.tables.item_ids
    history, candidates = ids[:6], [(i, channel_mask(["sequential"])) for i in ids[10:30]]

    model.encode_many([history])
    ranked = model.rank_items(history, candidates, k=10, explain_top=2)

    assert len(encoder_runs) == 1  # Encode ran the query encoder; Rank of the same history did not
    expected = uncached.rank_items(history, candidates, k=10, explain_top=2)
    assert [(i, b) for i, _, b in ranked] == [(i, b) for i, _, b in expected]
    np.testing.assert_allclose([s for _, s, _ in ranked], [s for _, s, _ in expected], rtol=1e-5, atol=1e-5)

    model.rank_items(ids[1:7], candidates, k=10)  # another history is encoded afresh
    assert len(encoder_runs) == 2
    # An upsert replaces the item tables; vectors encoded against the old ones are not reused.
    model.tables = ItemTables.build(list(ids), model.tables.item_vectors.numpy(), model.tables.text_vectors,
                                    model.tables.popularity, model.device)
    model.rank_items(history, candidates, k=10)
    assert len(encoder_runs) == 3


async def test_a_request_whose_deadline_passed_in_the_queue_is_dropped_unscored() -> None:
    import time

    from ranking.batching import DeadlinePassed

    scored: list[int] = []

    def slow(batch: Sequence[int]) -> list[int]:
        scored.extend(batch)
        time.sleep(0.05)  # the model is busy with the first batch on the loop's thread
        return list(batch)

    batcher = MicroBatcher(slow, None, max_batch_size=1, max_wait_s=0.0)
    try:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)
        late = asyncio.ensure_future(batcher.submit(2, deadline=time.monotonic() + 0.01))
        in_time = asyncio.ensure_future(batcher.submit(3, deadline=time.monotonic() + 5))
        assert await first == 1 and await in_time == 3
        with pytest.raises(DeadlinePassed, match="before scoring"):
            await late
    finally:
        await batcher.close()
    assert scored == [1, 3] and batcher.stats.expired == 1
