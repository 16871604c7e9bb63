"""GGUFFile reads what gguf.GGUFReader reads: the same metadata values and the same
tensor arrays (so gguf.quants.dequantize sees identical inputs), and refuses files that
are not little-endian GGUF v2/v3 or end early, naming where."""

from __future__ import annotations

import struct

import gguf
import gguf.quants
import numpy as np
import pytest

from glinthawk_dask.model.gguf_file import GGUFArray, GGUFFile

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def _reader_values(reader: gguf.GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def _ours(f: GGUFFile) -> dict:
    out = {}
    for key, value in f.metadata.items():
        if isinstance(value, GGUFArray):
            value = value.values()
            value = value.tolist() if isinstance(value, np.ndarray) else value
        out[key] = value
    return out


def assert_same_as_reader(path) -> GGUFFile:
    reader = gguf.GGUFReader(path)
    f = GGUFFile(path)
    want = _reader_values(reader)
    got = _ours(f)
    assert list(got) == list(want)  # same keys, same order
    for key in want:
        if key.endswith(".nested"):  # the reader flattens arrays of arrays; checked apart
            continue
        assert got[key] == want[key], key
        assert type(got[key]) is type(want[key]) or isinstance(want[key], list), key
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        ours = f.tensors[t.name]
        assert ours.qtype == t.tensor_type
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert ours.data.dtype == t.data.dtype and ours.data.shape == t.data.shape
        assert np.array_equal(ours.data, t.data)
        if t.tensor_type in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16):
            assert np.array_equal(gguf.quants.dequantize(ours.data, ours.qtype),
                                  gguf.quants.dequantize(t.data, t.tensor_type))
    assert f.data_offset == reader.data_offset
    return f


def test_embedded_model_reads_as_the_reader_does(smollm2_gguf):
    f = assert_same_as_reader(smollm2_gguf)
    tokens = f.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GGUFArray) and len(tokens) == 49152  # unread until asked
    assert f.metadata["general.architecture"] == "llama"


def _write(path, tensors=(), kv=(), alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    for add, key, value in kv:
        getattr(w, add)(key, value)
    for name, arr, raw in tensors:
        if raw is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_kind(tmp_path, alignment):
    rng = np.random.default_rng(0)
    m = rng.standard_normal((8, 64)).astype(np.float32)
    kv = [("add_uint8", "k.u8", 7), ("add_int8", "k.i8", -7), ("add_uint16", "k.u16", 600),
          ("add_int16", "k.i16", -600), ("add_uint32", "k.u32", 70000), ("add_int32", "k.i32", -70000),
          ("add_float32", "k.f32", 1e-5), ("add_uint64", "k.u64", 2**40), ("add_int64", "k.i64", -(2**40)),
          ("add_float64", "k.f64", 0.1), ("add_bool", "k.bool", True), ("add_string", "k.str", "héllo ✓"),
          ("add_array", "k.ints", [1, 2, 3]), ("add_array", "k.floats", [0.5, 1.5]),
          ("add_array", "k.strs", ["a", "", "ü" * 40]), ("add_array", "k.empty", []),
          ("add_array", "k.nested", [[1, 2], [3]])]
    tensors = [("f32", m, None), ("f16", m.astype(np.float16), None), ("vec", m[0], None),
               ("i32", np.arange(12, dtype=np.int32).reshape(3, 4), None),
               ("q8_0", gguf.quants.quantize(m, Q.Q8_0), Q.Q8_0),
               ("q4_0", gguf.quants.quantize(m, Q.Q4_0), Q.Q4_0),
               ("q4_1", gguf.quants.quantize(m, Q.Q4_1), Q.Q4_1),
               ("bf16", gguf.quants.quantize(m, Q.BF16), Q.BF16)]
    path = _write(tmp_path / "all.gguf", tensors, kv, alignment)
    f = assert_same_as_reader(path)
    assert f.metadata["k.str"] == "héllo ✓" and f.metadata["k.bool"] is True
    assert f.metadata["k.strs"].values() == ["a", "", "ü" * 40]
    assert f.metadata["k.nested"].values() == [[1, 2], [3]]
    assert np.array_equal(gguf.quants.dequantize(f.tensors["q8_0"].data, Q.Q8_0).reshape(8, 64),
                          gguf.quants.dequantize(gguf.quants.quantize(m, Q.Q8_0), Q.Q8_0))
    if alignment:
        assert f.data_offset % alignment == 0


def _header(version=3, n_tensors=0, n_kv=1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


@pytest.mark.parametrize("data, match", [
    (b"GGML" + bytes(40), "no GGUF magic"),
    (_header(version=1) + bytes(32), "version 1: only little-endian versions 2 and 3"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + bytes(32), "big-endian version"),
    (_header() + _string("k") + struct.pack("<I", 99) + bytes(16), "unknown metadata value type 99"),
    # an array of a million strings in a file of a few bytes: found at once, not after a long walk
    (_header() + _string("k") + struct.pack("<IIQ", V.ARRAY, V.STRING, 10**6) + _string("x"), "file ends"),
    (_header() + _string("k") + struct.pack("<I", V.STRING) + struct.pack("<Q", 2**62), "file ends"),
    (_header(n_kv=2**60), "file ends at byte"),
    (_header() + _string("k") + struct.pack("<IIQ", V.ARRAY, V.UINT32, 2**40), "inside the metadata array"),
])
def test_bad_files_are_value_errors_that_say_where(tmp_path, data, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        GGUFFile(path)


def test_tensor_data_past_the_end(tmp_path):
    m = np.ones((4, 32), dtype=np.float32)
    path = _write(tmp_path / "t.gguf", [("w", m, None)])
    data = path.read_bytes()
    path.write_bytes(data[:-16])
    with pytest.raises(ValueError, match="inside the data of tensor 'w'"):
        GGUFFile(path)


def test_duplicate_key(tmp_path):
    entry = _string("k") + struct.pack("<IB", V.UINT8, 1)
    path = tmp_path / "dup.gguf"
    path.write_bytes(_header(n_kv=2) + entry + entry + bytes(32))
    with pytest.raises(ValueError, match="'k' appears twice"):
        GGUFFile(path)
