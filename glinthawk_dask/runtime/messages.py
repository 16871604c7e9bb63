"""Tensors in messages of distributed's rpc (the data plane has its own frames, see
:mod:`~glinthawk_dask.runtime.wire`).

Tensors travel as ``{"dtype", "shape", "data"}`` where ``data`` is a numpy byte view
wrapped for distributed's zero-copy frame serialization; no pickle is involved.
bfloat16 (which numpy lacks) travels as its 16-bit pattern.  Everything else in a
message is msgpack-able (ints, strings, lists, dicts).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from distributed.protocol import to_serialize

from .wire import CARRIERS, DTYPE_NAMES, DTYPES

__all__ = ["pack", "unpack", "DTYPES"]


def pack(t: torch.Tensor) -> dict[str, Any]:
    """A tensor (any device) → a message field."""
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send tensors of dtype {t.dtype}")
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    arr = t.view(CARRIERS.get(t.dtype, t.dtype)).numpy()
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data": to_serialize(arr)}


def unpack(d: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """A message field → a tensor on ``device``."""
    dtype = DTYPES[d["dtype"]]
    arr = np.asarray(d["data"])
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr).view(dtype).reshape(d["shape"])
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)
