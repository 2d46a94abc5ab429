"""numpy <-> `recfunnel.v1.Tensor` conversion, used only by servicers and clients."""

from __future__ import annotations

from typing import Any

import numpy as np

from protos.recfunnel.v1 import tensor_pb2

WIRE_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class BadTensor(ValueError):
    """A Tensor message whose dtype, shape or byte length is inconsistent."""


def to_tensor(array: np.ndarray, dtype: str = "float32") -> tensor_pb2.Tensor:
    if dtype not in WIRE_DTYPES:
        raise BadTensor(f"dtype {dtype!r} unsupported; allowed: {', '.join(WIRE_DTYPES)}")
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[dtype])
    return tensor_pb2.Tensor(dtype=dtype, shape=list(data.shape), data=data.tobytes())


def from_tensor(message: tensor_pb2.Tensor, max_elements: int = 1 << 24) -> np.ndarray:
    """The float32 array a Tensor holds; raises BadTensor naming what is inconsistent."""
    if message.dtype not in WIRE_DTYPES:
        raise BadTensor(f"tensor dtype {message.dtype!r} unsupported; allowed: {', '.join(WIRE_DTYPES)}")
    shape = tuple(int(s) for s in message.shape)
    if any(s < 0 for s in shape):
        raise BadTensor(f"tensor shape {shape} has a negative dimension")
    count = int(np.prod(shape)) if shape else 1
    if count > max_elements:
        raise BadTensor(f"tensor of {count} elements exceeds the limit of {max_elements}")
    dtype = WIRE_DTYPES[message.dtype]
    if len(message.data) != count * dtype.itemsize:
        raise BadTensor(f"tensor data has {len(message.data)} bytes; shape {shape} of {message.dtype} "
                        f"needs {count * dtype.itemsize}")
    return np.frombuffer(message.data, dtype=dtype).reshape(shape).astype(np.float32)
