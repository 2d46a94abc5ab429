"""One recall shard: its partition of the catalogue and one index per channel.

Pure logic, no gRPC: the Recall servicer, the in-process funnel (`bench.in_process`) and the tests call it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable

import faiss
import numpy as np

from recdata.attributes import NO_FILTER, ItemAttributes, ItemFilter
from recdata.bundle import Bundle
from recdata.channels import (
    CHANNELS,
    ITEM2ITEM,
    POPULAR,
    VECTOR_CHANNELS,
    ChannelQuery,
    popular_scores,
    recency_weights,
    shard_of,
    tuning_queries_name,
)
from recdata.dataset import property_value
from recdata.segments import SegmentRule, segment_scores
from retrieval.attributes import AttributeColumns
from retrieval.config import MAX_K, MAX_RECENT_ITEMS, RecallConfig
from retrieval.index import IndexReport, build_index

# A filtered search widens its search breadth (nprobe, efSearch) by 1 / (share of items that
# pass), so it meets about as many passing items as an unfiltered search meets items; capped.
MAX_FILTERED_BREADTH = 4096
# GPU indexes take no id selector: they fetch this many times k / share, then filter.
GPU_OVERFETCH = 2
GPU_MAX_K = 2048  # the largest k FAISS GPU indexes search for
MAX_USER_PROPERTIES = 64


def search_parameters(report: IndexReport, selector: faiss.IDSelector, share: float) -> faiss.SearchParameters:
    """FAISS search parameters that keep only the selected ids, at a breadth for `share`."""
    widen = 1.0 / max(share, 1e-6)
    # The SWIG-generated constructors take keyword arguments that mypy cannot see.
    if report.kind == "hnsw":
        breadth = int(min(MAX_FILTERED_BREADTH, report.params["efSearch"] * widen))
        return faiss.SearchParametersHNSW(sel=selector, efSearch=breadth)  # type: ignore[attr-defined]
    if report.kind in ("ivf", "ivfpq"):
        breadth = int(min(report.params["nlist"], max(1, report.params["nprobe"] * widen)))
        return faiss.SearchParametersIVF(sel=selector, nprobe=breadth)  # type: ignore[call-arg]
    return faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]


def property_pair(text: str) -> tuple[str, float | str]:
    """"age=24" -> ("age", 24.0); a value that reads as no number stays a string."""
    name, _, value = text.partition("=")
    return name, property_value(value)


class InvalidQuery(ValueError):
    """A query the shard cannot answer; the message names the field and the allowed range."""


class RecallShard:
    """Per-channel FAISS search over the items this shard owns."""

    def __init__(self, bundle: Bundle, config: RecallConfig):
        self.config = config
        self.version = bundle.version
        owned = np.asarray([n for n, item_id in enumerate(bundle.item_ids)
                            if shard_of(item_id, config.num_shards) == config.shard_id], dtype=np.int64)
        # FAISS labels are positions in `item_ids`: the bundle's catalogue index for its items,
        # then one new position per upsert. `item_index` maps the items this shard serves now.
        self.item_ids = list(bundle.item_ids)
        self.item_index = {bundle.item_ids[n]: int(n) for n in owned}
        # Labels an index kind could not remove (graph indexes); filtered out of every search.
        self.tombstones: set[int] = set()
        built = {
            channel: build_index(bundle.arrays[channel][owned], owned, config.index_kind, config.exact_scan_bytes,
                                 config.use_gpu, config.target_recall, config.pq_above,
                                 queries=bundle.arrays.get(tuning_queries_name(channel)), measure_bytes=False)
            for channel in VECTOR_CHANNELS
        }
        self.indexes = {channel: index for channel, (index, _) in built.items()}
        self.index_reports = {channel: report for channel, (_, report) in built.items()}
        self.dims = {channel: int(bundle.arrays[channel].shape[1]) for channel in VECTOR_CHANNELS}
        popularity = popular_scores(bundle.arrays["popularity"], bundle.arrays["recent_popularity"],
                                    bundle.manifest["recent_share"])[owned]
        order = np.argsort(-popularity, kind="stable")
        self.popular_items = owned[order]
        self.popular_scores = popularity[order]
        # Every shard holds the whole neighbour table (a history item's neighbours live on any
        # shard) and returns the neighbours it owns; the scores are global, so shard answers merge.
        self.bundle_rows = {item_id: n for n, item_id in enumerate(bundle.item_ids)}
        self.neighbour_ids = bundle.arrays["item2item_ids"]
        self.neighbour_scores = bundle.arrays["item2item_scores"]
        # Segment popularity (users without history, with attributes): the owned items' counts
        # per segment, and the whole catalogue's totals that make scores of shards compare.
        segments = bundle.manifest.get("segments") or {"rule": {}, "names": []}
        self.segment_rule = SegmentRule.from_json(segments["rule"])
        self.segment_rows = {name: n for n, name in enumerate(segments["names"])}
        counts = bundle.arrays.get("segment_counts", np.zeros((0, len(bundle.item_ids)), np.float32))
        self.segment_totals = np.asarray(counts.sum(1), dtype=np.float64)
        self.bundle_items = len(bundle.item_ids)
        self.owned_popularity = np.asarray(bundle.arrays["popularity"], dtype=np.float64)[owned]
        self.popularity_total = float(np.asarray(bundle.arrays["popularity"]).sum())
        self.owned_segment_counts = np.asarray(counts[:, owned], dtype=np.float32)  # segments x owned items
        self.owned_row_of = np.full(len(bundle.item_ids), -1, dtype=np.int64)  # label -> owned row; -1 = upserted
        self.owned_row_of[owned] = np.arange(len(owned))
        # What filters read, for the items this shard owns.
        self.attributes = AttributeColumns()
        self.attributes.grow_to(len(self.item_ids))
        self.attributes.set(owned.tolist(), [bundle.attributes(int(n)) for n in owned])
        self.attributes.set_alive(owned, True)
        # A FAISS index must not change while it is searched; every index access holds this.
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.item_index)

    def validate(self, query: ChannelQuery) -> None:
        if query.channel not in CHANNELS:
            raise InvalidQuery(f"channel {query.channel!r} unknown; allowed: {', '.join(CHANNELS)}")
        if not 1 <= query.k <= MAX_K:
            raise InvalidQuery(f"k={query.k} for channel {query.channel!r} out of range 1..{MAX_K}")
        if query.channel == POPULAR:
            if len(query.user_properties) > MAX_USER_PROPERTIES:
                raise InvalidQuery(f"channel {POPULAR!r} takes 0..{MAX_USER_PROPERTIES} user_properties, got "
                                   f"{len(query.user_properties)}")
            return
        if query.channel == ITEM2ITEM:
            if not 1 <= len(query.item_ids) <= MAX_RECENT_ITEMS:
                raise InvalidQuery(f"channel {ITEM2ITEM!r} needs 1..{MAX_RECENT_ITEMS} recent item_ids, "
                                   f"got {len(query.item_ids)}")
            return
        dim = self.dims[query.channel]
        if query.vector is None or query.vector.shape != (dim,):
            shape = None if query.vector is None else query.vector.shape
            raise InvalidQuery(f"channel {query.channel!r} needs a vector of shape ({dim},), got {shape}")
        if not np.isfinite(query.vector).all():
            raise InvalidQuery(f"channel {query.channel!r} vector has NaN or infinite values")

    def search(self, queries: Iterable[ChannelQuery], exclude_item_ids: Iterable[str] = ()
               ) -> dict[str, list[tuple[str, float]]]:
        """Per channel, up to k (item id, score) pairs best first, none of them excluded."""
        return self.search_filtered(queries, exclude_item_ids)[0]

    def search_filtered(self, queries: Iterable[ChannelQuery], exclude_item_ids: Iterable[str] = (),
                        item_filter: ItemFilter = NO_FILTER) -> tuple[dict[str, list[tuple[str, float]]], int]:
        """`search` keeping only items that pass `item_filter`, applied before each channel's
        top-k is cut; and how many of this shard's items pass (0 without a filter)."""
        queries = list(queries)
        for query in queries:
            self.validate(query)
        if item_filter.is_empty:
            return self._search(queries, exclude_item_ids), 0
        with self._lock:
            allowed = self.attributes.mask(item_filter)
            passed = int(allowed.sum())
            allowed[[self.item_index[i] for i in exclude_item_ids if i in self.item_index]] = False
            allowed[list(self.tombstones)] = False
            return self._search_allowed(queries, allowed, passed), passed

    def _search_allowed(self, queries: list[ChannelQuery], allowed: np.ndarray, passed: int
                        ) -> dict[str, list[tuple[str, float]]]:
        """Per channel, the best k among the `allowed` labels; the caller holds the lock."""
        results: dict[str, list[tuple[str, float]]] = {}
        share = max(passed, 1) / max(self.size, 1)
        for query in queries:
            keep: list[tuple[int, float]]
            if query.channel == POPULAR:
                items, scores = self._popular_order(query.user_properties)
                picked = allowed[items]
                keep = list(zip(items[picked][: query.k].tolist(), scores[picked][: query.k].tolist(), strict=True))
            elif query.channel == ITEM2ITEM:
                keep = self._neighbours(query.item_ids, query.k, set(), allowed)
            elif passed == 0:
                keep = []
            else:
                keep = self._vector_hits(query, allowed, share)
            results[query.channel] = [(self.item_ids[i], s) for i, s in keep]
        return results

    def _vector_hits(self, query: ChannelQuery, allowed: np.ndarray, share: float) -> list[tuple[int, float]]:
        index, report = self.indexes[query.channel], self.index_reports[query.channel]
        vector = np.asarray(query.vector, dtype=np.float32).reshape(1, -1)  # validated
        if report.on_gpu:  # no selectors on GPU indexes: fetch more, then filter
            fetch = int(min(index.ntotal, GPU_MAX_K, GPU_OVERFETCH * query.k / share + 1))
            scores, ids = index.search(vector, max(fetch, 1))
        else:
            packed = np.packbits(allowed, bitorder="little")  # must outlive the search
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(packed))
            scores, ids = index.search(vector, query.k, params=search_parameters(report, selector, share))
        found = ids[0]
        wanted = (found >= 0) & allowed[np.clip(found, 0, len(allowed) - 1)]
        return list(zip(found[wanted][: query.k].tolist(), scores[0][wanted][: query.k].tolist(), strict=True))

    def _search(self, queries: list[ChannelQuery], exclude_item_ids: Iterable[str]
                ) -> dict[str, list[tuple[str, float]]]:
        results: dict[str, list[tuple[str, float]]] = {}
        with self._lock:
            excluded = {self.item_index[i] for i in exclude_item_ids if i in self.item_index} | self.tombstones
            excluded_labels = np.fromiter(excluded, dtype=np.int64, count=len(excluded))
            for query in queries:
                if query.channel == POPULAR:
                    # Lazily: the list holds the whole shard, and k + |excluded| entries suffice.
                    pairs = zip(*self._popular_order(query.user_properties), strict=True)
                    keep = list(itertools.islice(((int(i), float(s)) for i, s in pairs if int(i) not in excluded),
                                                 query.k))
                elif query.channel == ITEM2ITEM:
                    keep = self._neighbours(query.item_ids, query.k, excluded)
                else:
                    # Ask for enough extra hits that k remain after dropping excluded items.
                    fetch = min(query.k + len(excluded), max(self.indexes[query.channel].ntotal, 1))
                    vector = np.asarray(query.vector, dtype=np.float32).reshape(1, -1)  # validated above
                    scores, ids = self.indexes[query.channel].search(vector, fetch)
                    wanted = (ids[0] >= 0) & ~np.isin(ids[0], excluded_labels)
                    keep = list(zip(ids[0][wanted][: query.k].tolist(), scores[0][wanted][: query.k].tolist(),
                                    strict=True))
                results[query.channel] = [(self.item_ids[i], s) for i, s in keep]
        return results

    def _popular_order(self, user_properties: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The served labels best first, with their scores: by popularity, or for a user who gave
        attributes, by the popularity among users of the same segments (see recdata.segments)."""
        rows = [self.segment_rows[name] for name in self.segment_rule.segments_of(dict(
            property_pair(text) for text in user_properties)) if name in self.segment_rows]
        if not rows:
            return self.popular_items, self.popular_scores
        served = self.popular_items  # upserted labels have no counts: they score as unseen items
        owned = np.where(served < len(self.owned_row_of), self.owned_row_of[np.minimum(served, len(
            self.owned_row_of) - 1)], -1)
        counts = np.where(owned >= 0, self.owned_segment_counts[rows][:, owned], 0.0)
        popularity = np.where(owned >= 0, self.owned_popularity[owned], 0.0)
        scores = segment_scores(counts, popularity, self.segment_totals[rows], self.popularity_total,
                                self.bundle_items)
        order = np.argsort(-scores, kind="stable")
        return served[order], scores[order]

    def _neighbours(self, recent: tuple[str, ...], k: int, excluded: set[int], allowed: np.ndarray | None = None
                    ) -> list[tuple[int, float]]:
        """The k owned, served items that co-occur most with the recent items, as (label, score),
        none of them `excluded` and all `allowed` (when given).

        Recent items weigh by their position (the latest most); ids this version never
        trained on have no neighbours and are skipped.
        """
        weights = recency_weights(len(recent))
        known = [(self.bundle_rows[i], w) for i, w in zip(recent, weights, strict=True) if i in self.bundle_rows]
        if not known:
            return []
        rows = np.asarray([r for r, _ in known])
        ids = self.neighbour_ids[rows].ravel()
        contributions = (self.neighbour_scores[rows] * np.asarray([w for _, w in known])[:, None]).ravel()
        present = ids >= 0
        neighbours, inverse = np.unique(ids[present], return_inverse=True)
        totals = np.bincount(inverse, weights=contributions[present])
        hits = []
        for n in np.argsort(-totals, kind="stable"):
            # The neighbour's current label: an upserted item keeps its neighbours.
            label = self.item_index.get(self.item_ids[int(neighbours[n])])
            if label is not None and label not in excluded and (allowed is None or allowed[label]):
                hits.append((label, float(totals[n])))
                if len(hits) == k:
                    break
        return hits

    def _drop_label(self, label: int) -> None:
        """Take one label out of every index (or tombstone it) and out of the popular list."""
        selector = np.asarray([label], dtype=np.int64)
        for channel, index in self.indexes.items():
            # Only exact indexes remove in place; graph indexes cannot and IVF removal scans
            # every list, so for those the label is filtered out of each search instead.
            if self.index_reports[channel].kind == "flat" and not self.index_reports[channel].on_gpu:
                index.remove_ids(selector)  # type: ignore[arg-type]  # the Python wrapper takes arrays
            else:
                self.tombstones.add(label)
        keep = self.popular_items != label
        self.popular_items, self.popular_scores = self.popular_items[keep], self.popular_scores[keep]
        self.attributes.set_alive([label], False)

    def add_items(self, item_ids: list[str], vectors: dict[str, np.ndarray],
                  attributes: list[ItemAttributes] | None = None) -> int:
        """Add or replace items with one (N, dim) array per vector channel and what filters
        read of each (none: no tags, no properties, created unknown); searchable on return."""
        if len(set(item_ids)) != len(item_ids) or not all(item_ids):
            raise InvalidQuery("item_ids must be non-empty and distinct")
        if attributes is not None and len(attributes) != len(item_ids):
            raise InvalidQuery(f"{len(attributes)} attribute sets for {len(item_ids)} item_ids; give one per item "
                               f"or none")
        for channel in VECTOR_CHANNELS:
            array = vectors.get(channel)
            if array is None or array.shape != (len(item_ids), self.dims[channel]):
                shape = None if array is None else array.shape
                raise InvalidQuery(f"channel {channel!r} needs vectors of shape ({len(item_ids)}, "
                                   f"{self.dims[channel]}), got {shape}")
            if not np.isfinite(array).all():
                raise InvalidQuery(f"channel {channel!r} vectors have NaN or infinite values")
        with self._lock:
            labels = np.arange(len(self.item_ids), len(self.item_ids) + len(item_ids), dtype=np.int64)
            for item_id in item_ids:
                if item_id in self.item_index:
                    self._drop_label(self.item_index.pop(item_id))
            for channel in VECTOR_CHANNELS:
                self.indexes[channel].add_with_ids(np.ascontiguousarray(vectors[channel], dtype=np.float32), labels)
            self.item_ids.extend(item_ids)
            self.item_index.update(zip(item_ids, labels.tolist(), strict=True))
            # New items have no interactions yet: last in the popular list.
            self.popular_items = np.concatenate([self.popular_items, labels])
            self.popular_scores = np.concatenate([self.popular_scores, np.zeros(len(labels), np.float32)])
            self.attributes.set(labels.tolist(), attributes or [ItemAttributes()] * len(item_ids))
            self.attributes.set_alive(labels, True)
        return len(item_ids)

    def remove_items(self, item_ids: list[str]) -> int:
        """Remove the items this shard holds; returns how many it held."""
        removed = 0
        with self._lock:
            for item_id in set(item_ids):
                label = self.item_index.pop(item_id, None)
                if label is not None:
                    self._drop_label(label)
                    removed += 1
        return removed
