"""Interactions read in chunks equal one read whole; the vectorised synthetic writer keeps the
generator's structure; co-occurrence sums in chunks equal one pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import recdata.reader as reader
from cluster.cli import app
from recdata.dataset import read_interactions
from recdata.item_stats import cooccurrence_neighbours, pair_weights
from recdata.synthetic import SyntheticConfig, generate, write_parquet

SMALL = SyntheticConfig(num_users=300, num_items=400, num_topics=8, mean_length=15, seed=4)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    interactions, items, _ = write_parquet(SMALL, tmp_path_factory.mktemp("synthetic"))
    return interactions, items


@pytest.mark.parametrize("fmt", ["parquet", "csv", "pairs"])
def test_reading_in_chunks_equals_reading_whole(synthetic: tuple[Path, Path], tmp_path: Path, fmt: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    interactions, items = synthetic
    frame = pd.read_parquet(interactions)
    path = interactions
    if fmt == "csv":
        path = tmp_path / "events.csv"
        frame.astype({"user": str, "item": str}).to_csv(path, index=False)
    elif fmt == "pairs":
        path = tmp_path / "events.txt"
        ordered = frame.sort_values(["timestamp"], kind="stable")
        path.write_text("".join(f"{u}\t{i}\n" for u, i in zip(ordered["user"], ordered["item"], strict=True)))
    whole = read_interactions(path, fmt, items)
    monkeypatch.setattr(reader, "CHUNK_ROWS", 97)  # many chunks, and ids first seen in later ones
    monkeypatch.setattr(reader, "CSV_BLOCK_BYTES", 4096)
    shown: list[tuple[int, int]] = []
    chunked = read_interactions(path, fmt, items, progress=lambda done, total: shown.append((done, total)))
    assert chunked.fingerprint() == whole.fingerprint()
    # Progress after every chunk, rising to the whole file (rows of Parquet, bytes of text).
    assert len(shown) > 3 and shown == sorted(shown) and shown[0][0] == 0 and shown[-1][0] == shown[-1][1]
    assert shown[-1][1] == (len(frame) if fmt == "parquet" else path.stat().st_size)
    assert whole.user_ids[:3] == list(dict.fromkeys(frame["user"] if fmt != "pairs" else ordered["user"]))[:3]
    assert whole.num_interactions == len(frame)


def test_chunked_ids_follow_first_appearance_across_chunks() -> None:
    import pyarrow as pa

    ids = reader.IdMap()
    first = ids.encode(pa.array(["b", "a", "b"]))
    second = ids.encode(pa.array(["c", "a", "d"]).dictionary_encode())
    assert first.tolist() == [0, 1, 0] and second.tolist() == [2, 1, 3] and ids.ids == ["b", "a", "c", "d"]
    with pytest.raises(ValueError, match="missing"):
        ids.encode(pa.array(["e", None]))


def test_synthetic_parquet_has_the_generators_structure(synthetic: tuple[Path, Path]) -> None:
    interactions, items = synthetic
    data = read_interactions(interactions, "parquet", items)
    again = read_interactions(write_parquet(SMALL, interactions.parent / "again")[0], "parquet", items)
    assert again.fingerprint() == data.fingerprint()  # seeded
    lengths = np.array([len(s) for s in data.sequences])
    assert lengths.min() >= SMALL.min_length and abs(lengths.mean() - SMALL.mean_length) < 3
    assert all(len(np.unique(s)) == len(s) for s in data.sequences)  # nobody takes an item twice
    counts = np.sort(np.bincount(np.concatenate(data.sequences), minlength=data.num_items))[::-1]
    assert counts[: data.num_items // 10].sum() > 0.3 * counts.sum()  # power-law popularity
    assert all((np.diff(t) > 0).all() for t in data.timestamps or [])
    # Sequences follow series: the next item is often the current one's sequel, far above chance.
    reference = generate(SMALL)
    topic_of = {i: t.split("topic")[1] for i, t in zip(data.item_ids, (tags[0] for tags in data.item_tags),
                                                       strict=True)}
    same_topic = np.mean([topic_of[data.item_ids[a]] == topic_of[data.item_ids[b]]
                          for s in data.sequences for a, b in zip(s[:-1], s[1:], strict=True)])
    assert same_topic > 0.6 and len(reference.item_ids) == data.num_items
    assert data.item_texts[0].startswith("The ") and "story" in data.item_texts[0]


def test_synth_writes_parquet_by_default(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--users", "50", "--items", "80",
                                      "--topics", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "interactions.parquet").is_file() and (tmp_path / "items.csv").is_file()
    assert set(pd.read_parquet(tmp_path / "interactions.parquet").columns) == {"user", "item", "timestamp"}


def test_co_occurrence_in_chunks_equals_one_pass() -> None:
    data = generate(SMALL)
    keys, weights = pair_weights(data.sequences, data.num_items, pairs_per_chunk=1 << 30)
    chunked_keys, chunked_weights = pair_weights(data.sequences, data.num_items, pairs_per_chunk=50)
    assert (keys == chunked_keys).all()
    np.testing.assert_allclose(weights, chunked_weights)
    # By hand: two histories, [0 1 2] and [1 0]: 0-1 at distance 1 twice (2.0), 0-2 at 2 (0.5), 1-2 at 1 (1.0).
    hand_keys, hand_weights = pair_weights([np.array([0, 1, 2]), np.array([1, 0])], 3)
    assert dict(zip(hand_keys.tolist(), hand_weights.tolist(), strict=True)) == {
        0 * 3 + 1: 2.0, 1 * 3 + 0: 2.0, 0 * 3 + 2: 0.5, 2 * 3 + 0: 0.5, 1 * 3 + 2: 1.0, 2 * 3 + 1: 1.0}
    ids, _ = cooccurrence_neighbours([np.array([0, 1, 2]), np.array([1, 0])], 3, neighbours=2)
    assert ids[0].tolist() == [1, 2]
