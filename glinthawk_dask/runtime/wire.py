"""One frame per data-plane message: a msgpack header and the tensors' raw bytes.

.. code-block:: text

    prefix   <I meta_len> <Q data_len>             12 bytes
    meta     msgpack map, meta_len bytes            names, ints, strings; "t": tensor table
    padding  to a multiple of 16 bytes
    data     each tensor's bytes, each at a 16-byte aligned offset

The tensor table lists ``[name, dtype, shape, offset]``.  A message's tensors are
sent as one set of buffers (no per-array serializer, no pickle, no size walk), and a
received frame is decoded into tensors that are views of the receive buffer (no copy).
bfloat16 goes as its raw 16-bit pattern, like every other dtype.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import torch

__all__ = ["PREFIX", "DTYPES", "DTYPE_NAMES", "CARRIERS", "encode", "decode", "data_offset", "host_bytes"]

PREFIX = struct.Struct("<IQ")  # meta bytes, data bytes (padding included)
ALIGN = 16
_ZEROS = bytes(ALIGN)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CARRIERS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks, viewed as same-size ints


def _pad(n: int) -> int:
    return -n % ALIGN


def data_offset(meta_len: int) -> int:
    """Where the data starts in a frame's body (the body is everything after the prefix)."""
    return meta_len + _pad(meta_len)


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (copied only if it is not contiguous)."""
    carrier = CARRIERS.get(t.dtype)
    try:  # the common case: a contiguous host tensor
        return memoryview((t if carrier is None else t.view(carrier)).numpy()).cast("B")
    except (TypeError, RuntimeError):
        pass
    if t.device.type != "cpu":
        raise ValueError("only host tensors go on the wire: copy device tensors to the host first")
    if not t.numel():
        return memoryview(b"")
    t = t.contiguous()
    return memoryview((t.view(carrier) if carrier is not None else t).numpy()).cast("B")


def encode(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> list[memoryview]:
    """The buffers of one frame (byte views, to be written in order): ``meta`` plus the
    tensor table, then the tensors' bytes.  ``meta`` must be msgpack-able; tensors must be on the host.
    ``meta`` gets the table as its ``"t"`` entry."""
    table, buffers, offset = [], [], 0
    if tensors:
        for name, t in tensors.items():
            dtype_name = DTYPE_NAMES.get(t.dtype)
            if dtype_name is None:
                raise TypeError(f"cannot send tensors of dtype {t.dtype}")
            raw = host_bytes(t)
            table.append((name, dtype_name, t.shape, offset))
            n = raw.nbytes
            if n:  # an empty buffer would stall a writer that waits for bytes taken
                buffers.append(raw)
            pad = -n % ALIGN
            if pad:
                buffers.append(memoryview(_ZEROS[:pad]))
            offset += n + pad
    meta["t"] = table
    head = msgpack.packb(meta, use_bin_type=True)
    pad = -len(head) % ALIGN
    out = [memoryview(PREFIX.pack(len(head), offset)), memoryview(head + _ZEROS[:pad] if pad else head)]
    out += buffers
    return out


def decode(body: bytearray | memoryview, meta_len: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A frame's body (after the prefix) → ``(meta, tensors)``; tensors are views of
    ``body``, which must be writable and must not be reused while they live."""
    view = memoryview(body)
    meta = msgpack.unpackb(view[:meta_len], raw=False)
    base = data_offset(meta_len)
    tensors = {}
    for name, dtype_name, shape, offset in meta.pop("t", ()):
        dtype = DTYPES[dtype_name]
        count = math.prod(shape)
        if count:
            t = torch.frombuffer(body, dtype=dtype, count=count, offset=base + offset)
        else:
            t = torch.empty(0, dtype=dtype)
        tensors[name] = t.view(shape)
    return meta, tensors
