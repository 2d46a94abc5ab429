"""Named precomputed item vectors (an image model's embedding, a price-and-style vector):
their names, the limits a model and the API hold them to, and how item files spell them.

An item file carries a vector `image` in a column named `vector:image`: in CSV the numbers
separated by spaces, in Parquet a list of floats. A missing or empty cell is an item
without that vector, which the item encoder reads as zeros.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

COLUMN_PREFIX = "vector:"
MAX_VECTOR_DIM = 4096     # numbers a vector holds
MAX_VECTOR_NAMES = 8      # named vectors an item (and a model) has
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # also a torch module key: no dots


def check_vector_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"vector name {name[:40]!r} must be 1..32 of a-z, 0-9 and _, starting with a letter")


def vector_column(column: str) -> str | None:
    """The vector name an item file's column holds, or None for another column."""
    if not column.startswith(COLUMN_PREFIX):
        return None
    name = column.removeprefix(COLUMN_PREFIX)
    check_vector_name(name)
    return name


def parse_vector(cell: str | Sequence[float] | None, where: str) -> np.ndarray | None:
    """An item file cell as a float32 vector; None where the cell is empty."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return None
    try:
        values = [float(x) for x in (cell.split() if isinstance(cell, str) else cell)]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: a vector is numbers separated by spaces ({error})") from None
    if not 1 <= len(values) <= MAX_VECTOR_DIM:
        raise ValueError(f"{where}: vector has {len(values)} numbers; allowed 1..{MAX_VECTOR_DIM}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: vector numbers must be finite")
    return np.asarray(values, dtype=np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length; all-zero rows (no vector) stay zero. The item
    encoder reads vectors so: a vision model's scale says nothing of taste, and the LM
    vectors are unit too."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


def format_vector(vector: np.ndarray) -> str:
    """A vector as an item file's CSV cell; float32 round-trips exactly through 9 digits."""
    return " ".join(f"{v:.9g}" for v in vector.tolist())
