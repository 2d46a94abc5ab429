"""Item text vectors from a pool of Ray actors are the ones one process computes, and land in
the encoder's caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from cluster import text_on_ray
from cluster.text_on_ray import encode_texts, ray_embedder
from ranking.text_encoder import TextEncoder


@pytest.fixture
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_actors_encode_what_one_process_does_and_fill_the_disk_cache(local_ray, text_encoder: TextEncoder,
                                                                     tmp_path: Path) -> None:
    texts = [f"item {i}: a story of {word}" for i, word in enumerate(["rivers", "stone", "light"] * 700)] + ["", ""]
    on_ray = TextEncoder(disk_cache=tmp_path, batch_size=32)
    seen: list[tuple[int, int]] = []
    vectors = on_ray.encode(texts, progress=lambda done, total: seen.append((done, total)),
                            embedder=ray_embedder(on_ray, actors=2))
    np.testing.assert_allclose(vectors, text_encoder.encode(texts), atol=1e-5)
    assert not vectors[-1].any()  # an empty text has no signal
    assert seen[-1] == (2100, 2100) and len(seen) > 1  # progress as the parts came back
    again = TextEncoder(disk_cache=tmp_path)
    assert again.missing(texts) == []  # everything reached the disk cache


def test_a_pool_starts_only_when_enough_texts_are_missing(text_encoder: TextEncoder,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pools: list[int] = []

    def recording_pool(encoder: TextEncoder, actors: int, use_gpu: bool = False):  # type: ignore[no-untyped-def]
        pools.append(actors)
        return encoder.local_batches  # the same vectors, without starting Ray

    monkeypatch.setattr(text_on_ray, "ray_embedder", recording_pool)
    monkeypatch.setattr(text_on_ray, "RAY_TEXTS_AT_LEAST", 3)
    vectors = encode_texts(["pool test: a garden", "pool test: an engine"], text_encoder, actors=4)
    assert vectors.shape == (2, 384) and pools == []  # two missing texts: encoded here
    encode_texts(["pool test: a garden", "pool test: an engine", "pool test: a kite", "pool test: a river"],
                 text_encoder, actors=4)
    assert pools == []  # two cached; the two missing are still fewer than 3
    encode_texts(["pool test: one", "pool test: two", "pool test: three"], text_encoder, actors=4)
    assert pools == [4]
