"""The GGUF container: header, metadata and tensor table parsed in one pass, tensor
data as memory-mapped arrays.

``gguf.GGUFReader`` builds numpy views for every item of every metadata array, which
for a 49k-token vocabulary (token strings, scores, types and 49k merges) takes 3-6
seconds, in every process that opens the file.  :class:`GGUFFile` reads the same
format with ``struct`` and leaves arrays unread until asked (their bounds are found by
walking the string lengths: tens of milliseconds).  Tensor data comes back exactly as
``GGUFReader`` gives it, so ``gguf.quants.dequantize`` reads it the same way: float and
integer types as typed arrays of the tensor's shape (innermost dimension last),
quantized types as ``uint8`` rows of their blocks' bytes.

.. code-block:: text

    "GGUF" <u32 version 2|3> <u64 tensors> <u64 kv pairs>
    kv:     <string key> <u32 value type> value         string: <u64 n> n bytes (UTF-8)
            array: <u32 item type> <u64 n> n items
    tensor: <string name> <u32 n_dims> <u64 dim> * n_dims (innermost first) <u32 ggml type> <u64 offset>
    padding to general.alignment (32), then the tensors' data, each at its offset
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

__all__ = ["GGUFFile", "GGUFArray", "GGUFTensor"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# value type -> (struct format, size) for scalars
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}
# tensor types stored as plain typed elements (the rest are blocks of bytes)
_ELEMENTS = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, read only when asked: ``len()``, :meth:`values`."""

    file: "GGUFFile"
    item_type: GGUFValueType
    count: int
    offset: int  # of the first item

    def __len__(self) -> int:
        return self.count

    def values(self) -> list[Any] | np.ndarray:
        """The items: a numpy array for numbers, a list of ``str``, or a list of lists
        for arrays of arrays."""
        if self.item_type in _NUMPY:
            return np.frombuffer(self.file.buffer, _NUMPY[self.item_type], self.count, self.offset)
        out, off = [], self.offset
        for _ in range(self.count):
            value, off = self.file._value(self.item_type, off)
            if isinstance(value, GGUFArray):  # an inner array: plain lists
                value = value.values()
                value = value.tolist() if isinstance(value, np.ndarray) else value
            out.append(value)
        return out


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: ``name``, ``qtype``, ``shape`` (outermost dimension
    first, as torch has it), and ``data``, the file's bytes as ``GGUFReader`` gives
    them (see the module docstring)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """A GGUF file, memory-mapped and parsed (metadata and tensor table, no tensor data).

    ``metadata``: every key; scalars as Python values (strings decoded), arrays as
    :class:`GGUFArray`.  ``tensors``: name -> :class:`GGUFTensor`, in file order.
    Raises ``ValueError`` for anything that is not a little-endian GGUF of version 2 or
    3, or that ends before what its header declares.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._view = memoryview(self.buffer)  # slices of it cost no array object
        self._size = len(self.buffer)
        if self._size < 24 or self._view[:4] != MAGIC:
            raise ValueError("no GGUF magic at the start")
        version = _U32.unpack_from(self.buffer, 4)[0]
        if version not in VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            what = f"big-endian version {swapped}" if swapped in VERSIONS else f"version {version}"
            raise ValueError(f"GGUF {what}: only little-endian versions 2 and 3 are read")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", self.buffer, 8)
        off = 24
        self._bound(n_kv * 13 + n_tensors * 28, off, "metadata and tensor table")  # their smallest sizes
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, off = self._string(off)
            vtype, off = self._type(off)
            if key in self.metadata:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.metadata[key], off = self._value(vtype, off)
        table = []
        for _ in range(n_tensors):
            name, off = self._string(off)
            n_dims, off = self._u32(off)
            self._bound(8 * n_dims, off, f"dimensions of tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buffer, off)
            off += 8 * n_dims
            raw, off = self._u32(off)
            try:
                qtype = GGMLQuantizationType(raw)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown ggml type {raw}") from None
            offset, off = self._u64(off)
            table.append((name, qtype, dims, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        self.data_offset = off + -off % alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, qtype, dims, offset in table:
            if name in self.tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            self.tensors[name] = self._tensor(name, qtype, dims, self.data_offset + offset)

    # -- parsing --------------------------------------------------------------------------
    def _bound(self, n: int, off: int, what: str) -> None:
        if off + n > self._size:
            raise ValueError(f"the file ends at byte {self._size}, inside the {what} (byte {off} + {n})")

    def _u32(self, off: int) -> tuple[int, int]:
        self._bound(4, off, "header")
        return _U32.unpack_from(self.buffer, off)[0], off + 4

    def _u64(self, off: int) -> tuple[int, int]:
        self._bound(8, off, "header")
        return _U64.unpack_from(self.buffer, off)[0], off + 8

    def _type(self, off: int) -> tuple[GGUFValueType, int]:
        raw, off = self._u32(off)
        try:
            return GGUFValueType(raw), off
        except ValueError:
            raise ValueError(f"unknown metadata value type {raw} at byte {off - 4}") from None

    def _string(self, off: int) -> tuple[str, int]:
        n, off = self._u64(off)
        self._bound(n, off, "string")
        return str(self._view[off : off + n], "utf-8"), off + n

    def _value(self, vtype: GGUFValueType, off: int) -> tuple[Any, int]:
        """The value of type ``vtype`` at ``off`` (arrays as :class:`GGUFArray`) and the
        offset after it."""
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            size = struct.calcsize(fmt)
            self._bound(size, off, "metadata")
            return struct.unpack_from(fmt, self.buffer, off)[0], off + size
        if vtype == GGUFValueType.STRING:
            return self._string(off)
        # an array
        item_type, off = self._type(off)
        count, off = self._u64(off)
        start = off
        if item_type in _NUMPY:
            off += count * np.dtype(_NUMPY[item_type]).itemsize
            self._bound(0, off, "metadata array")
        elif item_type == GGUFValueType.STRING:
            buf, size, unpack = self.buffer, self._size, _U64.unpack_from
            for _ in range(count):  # the hot loop: a vocabulary's strings, lengths only
                if off + 8 > size:
                    self._bound(8, off, "metadata array")
                off += 8 + unpack(buf, off)[0]
            self._bound(0, off, "metadata array")
        else:  # arrays of arrays: walk each
            for _ in range(count):
                _, off = self._value(item_type, off)
        return GGUFArray(self, item_type, count, start), off

    def _tensor(self, name: str, qtype: GGMLQuantizationType, dims: tuple[int, ...], start: int) -> GGUFTensor:
        shape = tuple(int(d) for d in reversed(dims))  # outermost first
        n_elems = int(np.prod(shape, dtype=np.int64)) if shape else 1
        block, type_size = GGML_QUANT_SIZES[qtype]
        if n_elems % block or (shape and shape[-1] % block):
            raise ValueError(f"tensor {name!r} of {shape} does not divide into {qtype.name} blocks of {block}")
        n_bytes = n_elems // block * type_size
        self._bound(n_bytes, start, f"data of tensor {name!r}")
        element = _ELEMENTS.get(qtype)
        if element is not None:
            data = np.frombuffer(self.buffer, element, n_elems, start).reshape(shape)
        else:  # [..., bytes of a row's blocks]
            data = np.frombuffer(self.buffer, np.uint8, n_bytes, start).reshape(
                *shape[:-1], shape[-1] // block * type_size)
        return GGUFTensor(name, qtype, shape, data)
