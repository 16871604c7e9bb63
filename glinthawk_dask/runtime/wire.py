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

import functools
import math
import struct
from typing import Any

import msgpack
import numpy as np
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
# the numpy dtype a received tensor of each wire dtype is read as (its carrier's, if any)
_NUMPY = {t: torch.empty(0, dtype=CARRIERS.get(t, t)).numpy().dtype for t in DTYPES.values()}
_PADS = [memoryview(bytes(n)) for n in range(ALIGN)]
_PREFIX_PACK = PREFIX.pack
_pack = functools.partial(msgpack.packb, use_bin_type=True)
_unpack = functools.partial(msgpack.unpackb, raw=False)


def _pad(n: int) -> int:
    return -n % ALIGN


def data_offset(meta_len: int) -> int:
    """Where the data starts in a frame's body (the body is everything after the prefix)."""
    return meta_len + _pad(meta_len)


def host_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor, as an array over its memory (copied only if the tensor
    is not contiguous); any buffer-taking call (``sendmsg``, ``bytes``) reads them."""
    carrier = CARRIERS.get(t.dtype)
    try:  # the common case: a contiguous host tensor
        raw = (t if carrier is None else t.view(carrier)).numpy()
        if raw.flags.c_contiguous:
            return raw
    except (TypeError, RuntimeError):
        if t.device.type != "cpu":
            raise ValueError("only host tensors go on the wire: copy device tensors to the host first") from None
    t = t.contiguous()
    return (t.view(carrier) if carrier is not None else t).numpy()


def encode(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> list[Any]:
    """The buffers of one frame, to be written in order: the prefix and header as
    ``bytes``, then each tensor's bytes as a numpy array over its memory and padding as
    memoryviews (all readable through the buffer protocol).  ``meta`` must be
    msgpack-able; tensors must be on the host.  ``meta`` gets the tensor table as its
    ``"t"`` entry."""
    out: list[Any] = [None, None]
    table, offset = [], 0
    if tensors:
        for name, t in tensors.items():
            dtype_name = DTYPE_NAMES.get(t.dtype)
            if dtype_name is None:
                raise TypeError(f"cannot send tensors of dtype {t.dtype}")
            table.append((name, dtype_name, t.shape, offset))
            n = t.nbytes
            if n:  # an empty buffer would stall a writer that waits for bytes taken
                out.append(host_bytes(t))
                pad = -n % ALIGN
                if pad:
                    out.append(_PADS[pad])
                offset += n + pad
    meta["t"] = table
    head = _pack(meta)
    pad = -len(head) % ALIGN
    out[0] = _PREFIX_PACK(len(head), offset)
    out[1] = head + _ZEROS[:pad] if pad else head
    return out


def decode(body: bytearray | memoryview, meta_len: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A frame's body (after the prefix) → ``(meta, tensors)``; tensors are views of
    ``body``, which must be writable and must not be reused while they live."""
    meta = _unpack(memoryview(body)[:meta_len])
    base = data_offset(meta_len)
    tensors = {}
    for name, dtype_name, shape, offset in meta.pop("t", ()):
        dtype = DTYPES[dtype_name]
        if math.prod(shape):
            # a numpy array over the buffer, then torch's view of it: the cheapest way in
            t = torch.from_numpy(np.ndarray(shape, _NUMPY[dtype], body, base + offset))
            tensors[name] = t if dtype not in CARRIERS else t.view(dtype)
        else:
            tensors[name] = torch.empty(shape, dtype=dtype)
    return meta, tensors
