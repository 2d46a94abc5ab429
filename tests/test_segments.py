"""Segment popularity: users without history served from what they said about themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recdata.bundle import load_bundle
from recdata.channels import POPULAR, ChannelQuery
from recdata.segments import SegmentCounts, band_name, cold_user_report, segment_rule, segment_scores
from recdata.synthetic import SyntheticConfig, generate
from retrieval.config import RecallConfig
from retrieval.shard import RecallShard


def test_numbers_fall_into_quantile_bands_and_wide_strings_are_left_out() -> None:
    rule = segment_rule([{"age": float(a), "zip": f"z{a}", "job": "x" if a % 2 else "y"} for a in range(300)])
    assert len(rule.edges["age"]) == 4 and rule.strings == ("job",)  # 300 zip codes: no segment
    assert rule.segments_of({"age": 10.0, "job": "x", "zip": "z1"}) == ["age=..59.8", "job=x"]
    assert band_name([10.0, 20.0], 25.0) == "20.." and band_name([10.0, 20.0], 15.0) == "10..20"


def test_no_segments_score_as_popularity() -> None:
    popularity = np.asarray([5.0, 50.0, 1.0, 0.0])
    scores = segment_scores(np.zeros((0, 4)), popularity, np.zeros(0), popularity.sum(), 4)
    assert list(np.argsort(-scores)) == [1, 0, 2, 3]


def test_attributes_that_carry_taste_beat_popularity_for_held_out_users() -> None:
    data = generate(SyntheticConfig(num_users=2000, num_items=1000, num_topics=20, seed=3))
    report = cold_user_report(data.sequences, data.user_properties, data.num_items)
    assert report["held_out_users"] == 2000 and report["hr@10_ratio"] > 2  # type: ignore[operator]
    assert report["precision@10_whole_history_ratio"] > 1.5  # type: ignore[operator]


def test_whole_history_precision_by_hand() -> None:
    """Two segments of 30 users, each taking its own two items; every item is as popular. A
    held-out user's top item from attributes is one they took, but not their last one; from
    popularity it is the other segment's wherever the fold left that segment more users."""
    sequences = [np.asarray([0, 2]), np.asarray([1, 3])] * 30
    properties = [{"g": "a"}, {"g": "b"}] * 30
    report = cold_user_report(sequences, properties, num_items=4, k=1)
    assert report["attributes"]["precision@1_whole_history"] == 1.0  # type: ignore[index]
    assert report["attributes"]["hr@1"] == 0.0  # type: ignore[index]
    assert report["popularity"]["precision@1_whole_history"] <= 0.5  # type: ignore[index,operator]
    assert report["precision@1_whole_history_ratio"] >= 2.0  # type: ignore[operator]


def test_a_shard_ranks_popular_items_by_the_users_segment(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    shard = RecallShard(bundle, RecallConfig(bundle=tiny_bundle))
    assert "favourite=topic3" in shard.segment_rows
    everyone = [i for i, _ in shard.search([ChannelQuery(POPULAR, 10)])[POPULAR]]
    fans = [i for i, _ in shard.search([ChannelQuery(POPULAR, 10, user_properties=("favourite=topic3", "age=30"))]
                                       )[POPULAR]]
    tags = dict(zip(bundle.item_ids, (a.tags for a in bundle.item_attributes), strict=True))
    assert sum("topic3" in tags[i] for i in fans) > sum("topic3" in tags[i] for i in everyone)
    unknown = [i for i, _ in shard.search([ChannelQuery(POPULAR, 10, user_properties=("shoe=42",))])[POPULAR]]
    assert unknown == everyone  # nothing the bundle segments by: plain popularity


def test_segments_come_from_training_users_of_enough_size() -> None:
    built = SegmentCounts.build([np.asarray([0, 1]), np.asarray([1])] * 15, [{"g": "a"}, {"g": "b"}] * 15, 3)
    assert built.names == [] and built.counts.shape == (0, 3)  # 15 users each: below MIN_SEGMENT_USERS
