"""Which torch device a model runs on: CUDA when torch sees one, unless configured."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1"), or None for CUDA where torch sees a device and the
    CPU elsewhere. A device this machine lacks is refused here, with what it has, rather
    than failing deep inside the first model call."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device={name!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={name!r}: torch sees no CUDA device here; use 'cpu' or leave it unset")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={name!r}: CUDA devices here are cuda:0..cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"device={name!r}: recfunnel runs on 'cpu' or 'cuda[:N]'")
    return device
