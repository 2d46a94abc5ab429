"""The packaged MiniLM loads offline and gives meaningful, cached sentence vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranking.text_encoder import TextEncoder


def test_related_texts_are_closer_than_unrelated(text_encoder: TextEncoder) -> None:
    v = text_encoder.encode(["A scary horror movie about ghosts", "A frightening haunted house film",
                             "A cooking show about baking bread"])
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_empty_text_has_no_signal_and_repeats_hit_the_cache(text_encoder: TextEncoder) -> None:
    v = text_encoder.encode(["", "same text", "same text"])
    assert not v[0].any()
    np.testing.assert_array_equal(v[1], v[2])
    assert TextEncoder._key("same text") in text_encoder._cache


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(tmp_path)


def test_vectors_kept_on_disk_are_not_encoded_again(tmp_path: Path, text_encoder: TextEncoder) -> None:
    class CountingEncoder(TextEncoder):
        embedded = 0

        def embed(self, texts: list[str]) -> np.ndarray:
            type(self).embedded += len(texts)
            return super().embed(texts)

    texts = ["a quiet garden", "a golden engine", "", "a quiet garden"]
    first = CountingEncoder(disk_cache=tmp_path, batch_size=1)
    seen: list[tuple[int, int]] = []
    vectors = first.encode(texts, progress=lambda done, total: seen.append((done, total)))
    assert CountingEncoder.embedded == 2 and seen == [(1, 2), (2, 2)]  # each distinct text once
    np.testing.assert_allclose(vectors[:2], text_encoder.encode(texts[:2]), atol=1e-6)
    CountingEncoder.embedded = 0
    again = CountingEncoder(disk_cache=tmp_path).encode(texts + ["a new text"])
    assert CountingEncoder.embedded == 1  # only the new text; the rest came from disk
    np.testing.assert_array_equal(again[:4], vectors)
    assert len(list(tmp_path.glob("*.sqlite"))) == 1
