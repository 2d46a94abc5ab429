"""A model version on disk: safetensors weights and arrays plus a JSON manifest.

Layout of a bundle folder:
    manifest.json         version id, model configs, metrics, creation time
    items.json            item ids in index order (the id map every stage shares), their
                          texts, and the attributes filters read (tags, properties, times)
    arrays.safetensors    item vectors per channel, all-time and recent popularity,
                          item2item co-occurrence neighbours
    query_encoder.safetensors, ranker.safetensors   model weights

Nothing is pickled: tensors go through safetensors and everything else through JSON.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from recdata.attributes import ItemAttributes

MANIFEST = "manifest.json"
ITEMS = "items.json"
ARRAYS = "arrays.safetensors"
FORMAT_VERSION = 3  # 2: item2item neighbours, recent popularity, four ranker channel flags; 3: next items


def new_version_id(prefix: str) -> str:
    """A sortable, unique model version id: `<prefix>-<utc time>-<random>`."""
    return f"{prefix}-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


@dataclass
class Bundle:
    """Everything one model version serves with; `arrays` are numpy, weights torch-free."""

    version: str
    item_ids: list[str]
    item_texts: list[str]
    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any] = field(default_factory=dict)
    item_attributes: list[ItemAttributes] = field(default_factory=list)  # [] = none recorded

    def attributes(self, row: int) -> ItemAttributes:
        return self.item_attributes[row] if self.item_attributes else ItemAttributes()

    def save(self, folder: Path, weights: dict[str, dict[str, np.ndarray]]) -> Path:
        """Write the bundle and the named weight sets (`<name>.safetensors`) to `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, folder / ARRAYS)
        for name, tensors in weights.items():
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                      folder / f"{name}.safetensors")
        (folder / ITEMS).write_text(
            json.dumps({"item_ids": self.item_ids, "item_texts": self.item_texts,
                        "item_attributes": [a.to_json() for a in self.item_attributes]}), "utf-8"
        )
        manifest = {"format": FORMAT_VERSION, "version": self.version, **self.manifest}
        # The manifest goes last: a folder with a manifest is a complete bundle.
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), "utf-8")
        return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    """A bundle's manifest alone (version, configs, metrics), without its arrays."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{folder} is not a recfunnel bundle (no {MANIFEST})")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text("utf-8"))
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder}: bundle format {manifest.get('format')}, expected {FORMAT_VERSION}")
    return manifest


# safetensors' dtype names -> numpy's, for the dtypes bundles hold.
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_arrays(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only arrays mapped from the file, not read into
    memory: a recall shard touches only the rows it owns, and the processes of one machine
    share the pages. Written by hand because safetensors' numpy loader copies every tensor;
    the format is an 8-byte little-endian header length, a JSON header of dtype, shape and
    byte offsets, then the data."""
    with path.open("rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_length))
    start = 8 + header_length
    arrays: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        if end == begin:  # numpy cannot map zero bytes
            arrays[name] = np.zeros(shape, dtype=dtype)
            continue
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return arrays


def load_bundle(folder: Path, mapped: bool = False) -> Bundle:
    """Read a bundle's manifest, id map and arrays (weights load with `load_weights`).
    `mapped`: map the arrays read-only from the file (see `map_arrays`) instead of reading
    them; for readers that copy out what they keep, like a recall shard its own rows."""
    manifest = read_manifest(folder)
    items = json.loads((folder / ITEMS).read_text("utf-8"))
    return Bundle(
        version=manifest["version"],
        item_ids=items["item_ids"],
        item_texts=items["item_texts"],
        arrays=map_arrays(folder / ARRAYS) if mapped else load_file(folder / ARRAYS),
        manifest=manifest,
        # Bundles written before items had attributes have none: every filter part fails on them.
        item_attributes=[ItemAttributes.from_json(a) for a in items.get("item_attributes", [])],
    )


def load_weights(folder: Path, name: str) -> dict[str, np.ndarray]:
    """One named weight set of a bundle as numpy arrays."""
    return load_file(folder / f"{name}.safetensors")
