"""Request-time filters: the columnar masks agree with the one-item reference, and a filtered
recall search never returns an item outside its filter yet still fills k where items pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recdata.attributes import ItemAttributes, ItemFilter, NumberRange, PropertyEquals
from recdata.bundle import load_bundle
from recdata.channels import ITEM2ITEM, POPULAR, SEMANTIC, SEQUENTIAL, ChannelQuery
from retrieval.attributes import AttributeColumns
from retrieval.config import RecallConfig
from retrieval.shard import RecallShard

TAGS = ("a", "b", "c", "d")
BRANDS = ("x", "y", "z")

attributes = st.builds(
    ItemAttributes,
    tags=st.lists(st.sampled_from(TAGS), max_size=3).map(tuple),
    properties=st.fixed_dictionaries({}, optional={
        "price": st.floats(0, 100, allow_nan=False), "brand": st.sampled_from(BRANDS),
        "year": st.sampled_from([1990.0, 2000.0, 2010.0, "unknown"])}),
    created_ms=st.integers(0, 10),
)
bounds = st.one_of(st.none(), st.floats(0, 100, allow_nan=False))
filters = st.builds(
    ItemFilter,
    tags_any=st.lists(st.sampled_from(TAGS), max_size=2).map(tuple),
    tags_all=st.lists(st.sampled_from(TAGS), max_size=2).map(tuple),
    tags_none=st.lists(st.sampled_from(TAGS), max_size=1).map(tuple),
    ranges=st.lists(st.builds(NumberRange, st.sampled_from(["price", "year", "absent"]), bounds, bounds),
                    max_size=2).map(tuple),
    equals=st.lists(st.builds(PropertyEquals, st.sampled_from(["brand", "year"]),
                              st.lists(st.sampled_from([*BRANDS, "unknown"]), min_size=1, max_size=2).map(tuple)),
                    max_size=1).map(tuple),
    newer_than_ms=st.integers(0, 10),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(attributes, min_size=1, max_size=30), filters, st.data())
def test_the_columnar_mask_is_the_reference_filter(items: list[ItemAttributes], item_filter: ItemFilter,
                                                    data: st.DataObject) -> None:
    columns = AttributeColumns()
    columns.set(list(range(len(items))), items)
    alive = data.draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items)))
    columns.set_alive(np.flatnonzero(alive), True)
    expected = [a and item_filter.passes(item) for a, item in zip(alive, items, strict=True)]
    assert columns.mask(item_filter).tolist() == expected


def test_empty_filter_passes_everything() -> None:
    assert ItemFilter().is_empty and ItemFilter().passes(ItemAttributes())
    assert not ItemFilter(newer_than_ms=5).passes(ItemAttributes(created_ms=5))
    assert not ItemFilter(ranges=(NumberRange("price", high=20),)).passes(ItemAttributes(properties={"price": "cheap"}))


def shard_of_kind(bundle: Path, kind: str) -> RecallShard:
    return RecallShard(load_bundle(bundle), RecallConfig(bundle=bundle, index_kind=kind))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_filtered_search_returns_only_passing_items_and_fills_k(tiny_bundle: Path, kind: str) -> None:
    bundle = load_bundle(tiny_bundle)
    shard = shard_of_kind(tiny_bundle, kind)
    passing = ItemFilter(ranges=(NumberRange("price", high=20.0),), tags_none=("topic0",))
    allowed = {item_id for n, item_id in enumerate(bundle.item_ids) if passing.passes(bundle.attributes(n))}
    assert 20 < len(allowed) < len(bundle.item_ids) / 2
    rng = np.random.default_rng(3)
    for n in rng.integers(0, len(bundle.item_ids), 5):
        queries = [ChannelQuery(SEQUENTIAL, 10, bundle.arrays[SEQUENTIAL][n]),
                   ChannelQuery(SEMANTIC, 10, bundle.arrays[SEMANTIC][n]),
                   ChannelQuery(ITEM2ITEM, 10, item_ids=(bundle.item_ids[n],)), ChannelQuery(POPULAR, 10)]
        exclude = sorted(allowed)[:3]
        results, passed = shard.search_filtered(queries, exclude, passing)
        assert passed == len(allowed)
        for channel, hits in results.items():
            found = {i for i, _ in hits}
            assert found <= allowed - set(exclude), channel
        assert len(results[SEQUENTIAL]) == len(results[SEMANTIC]) == len(results[POPULAR]) == 10
    if kind == "flat":  # exact: the best passing items, as brute force over them finds
        vector = bundle.arrays[SEMANTIC][7]
        rows = [n for n, i in enumerate(bundle.item_ids) if i in allowed]
        best = np.asarray(rows)[np.argsort(-(bundle.arrays[SEMANTIC][rows] @ vector), kind="stable")[:10]]
        hits = shard.search_filtered([ChannelQuery(SEMANTIC, 10, vector)], (), passing)[0][SEMANTIC]
        assert [i for i, _ in hits] == [bundle.item_ids[n] for n in best]


def test_a_filter_nothing_passes_answers_empty(tiny_bundle: Path) -> None:
    shard = shard_of_kind(tiny_bundle, "flat")
    vector = load_bundle(tiny_bundle).arrays[SEQUENTIAL][0]
    nothing = ItemFilter(equals=(PropertyEquals("brand", ("no-such-brand",)),))
    results, passed = shard.search_filtered([ChannelQuery(SEQUENTIAL, 10, vector), ChannelQuery(POPULAR, 10)], (),
                                            nothing)
    assert passed == 0 and results == {SEQUENTIAL: [], POPULAR: []}


def test_upserted_items_are_filtered_by_their_own_attributes(tiny_bundle: Path) -> None:
    shard = shard_of_kind(tiny_bundle, "flat")
    rng = np.random.default_rng(0)
    vectors = {c: rng.normal(size=(2, shard.dims[c])).astype(np.float32) for c in (SEQUENTIAL, SEMANTIC)}
    shard.add_items(["new-cheap", "new-dear"], vectors, [
        ItemAttributes(("fresh",), {"price": 1.0}, created_ms=2_000_000_000_000),
        ItemAttributes(("fresh",), {"price": 500.0}, created_ms=2_000_000_000_000)])
    fresh_and_cheap = ItemFilter(tags_all=("fresh",), ranges=(NumberRange("price", high=10.0),),
                                 newer_than_ms=1_900_000_000_000)
    results, passed = shard.search_filtered([ChannelQuery(SEMANTIC, 5, vectors[SEMANTIC][1]),
                                             ChannelQuery(POPULAR, 5)], (), fresh_and_cheap)
    assert passed == 1 and results[SEMANTIC] and {i for i, _ in results[SEMANTIC]} == {"new-cheap"}
    shard.add_items(["new-cheap"], {c: v[:1] for c, v in vectors.items()},
                    [ItemAttributes(("fresh",), {"price": 50.0}, created_ms=2_000_000_000_000)])
    assert shard.search_filtered([ChannelQuery(POPULAR, 5)], (), fresh_and_cheap) == ({POPULAR: []}, 0)
