"""Checkpoint readers: GGUF, Hugging Face safetensors, synthetic, and spec resolution."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_llama_gguf, llama_cpp_permute
from glinthawk_dask.errors import ModelLoadError
from glinthawk_dask.model import hf as hf_module
from glinthawk_dask.model.checkpoint import GLOBAL_NAMES, CheckpointSource, MissingTensorError, layer_tensor_names
from glinthawk_dask.model.config import PRESETS, ModelConfig, from_name
from glinthawk_dask.model.gguf import GGUFCheckpoint, canonical_to_gguf_name
from glinthawk_dask.model.hf import HFCheckpoint, canonical_to_hf_name
from glinthawk_dask.model.resolve import DEFAULT_MODEL, resolve_checkpoint
from glinthawk_dask.model.synthetic import SyntheticCheckpoint
from glinthawk_dask.model.weights import load_slice

Q = gguf.GGMLQuantizationType
# Small shapes whose inner dims are multiples of 32 (GGUF block quantization).
TINY_GGUF = ModelConfig(
    name="tiny-gguf", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=80,
    norm_eps=2.0**-17, rope_theta=10000.0, max_seq_len=128,  # eps exact in float32
)


def canonical_names(config: ModelConfig) -> list[str]:
    names = [n for n in GLOBAL_NAMES if n != "lm_head" or not config.tie_embeddings]
    return names + [n for i in range(config.n_layers) for n in layer_tensor_names(i)]


def random_tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    src = SyntheticCheckpoint(config, seed=7)
    return {n: src.get(n) for n in canonical_names(config)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- GGUF: the embedded SmolLM2 against transformers' own GGUF loader ------------------------


def test_gguf_config_matches_preset(smollm2_checkpoint, hf_reference_model):
    cfg = smollm2_checkpoint.config
    preset = from_name("smollm2-135m-instruct")
    assert cfg.replace(name=preset.name, norm_eps=preset.norm_eps) == preset
    assert cfg.norm_eps == hf_reference_model.config.rms_norm_eps == 9.999999747378752e-06
    assert cfg.name == smollm2_checkpoint.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert isinstance(smollm2_checkpoint, CheckpointSource)
    assert smollm2_checkpoint.bos_token_id == 1
    assert smollm2_checkpoint.eos_token_ids == (2,)
    assert "<|im_start|>" in smollm2_checkpoint.chat_template


@pytest.mark.parametrize("layer", [0, 1, 17, 29])
def test_gguf_layer_tensors_equal_transformers(smollm2_checkpoint, hf_reference_model, layer):
    ref = hf_reference_model.state_dict()
    for name in layer_tensor_names(layer):
        got = smollm2_checkpoint.get(name)
        want = ref[canonical_to_hf_name(name)]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.equal(got, want), name


def test_gguf_global_tensors_equal_transformers(smollm2_checkpoint, hf_reference_model):
    ref = hf_reference_model.state_dict()
    assert torch.equal(smollm2_checkpoint.get("embed"), ref["model.embed_tokens.weight"])
    assert torch.equal(smollm2_checkpoint.get("final_norm"), ref["model.norm.weight"])
    assert smollm2_checkpoint.config.tie_embeddings and not smollm2_checkpoint.has("lm_head")
    with pytest.raises(MissingTensorError, match="lm_head"):
        smollm2_checkpoint.get("lm_head")


def _record_dequantized(monkeypatch, src: GGUFCheckpoint) -> list[str]:
    """Make every gguf dequantize call append the GGUF tensor name it read."""
    by_id = {id(t.data): t.name for t in src.file.tensors.values()}
    seen: list[str] = []
    real = gguf.quants.dequantize

    def spy(data, qtype):
        seen.append(by_id[id(data)])
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", spy)
    return seen


def test_gguf_slice_reads_only_its_layers(smollm2_checkpoint, monkeypatch):
    seen = _record_dequantized(monkeypatch, smollm2_checkpoint)
    before = rss_bytes()
    sw = load_slice(smollm2_checkpoint, 10, 12)
    grown = rss_bytes() - before
    want = {canonical_to_gguf_name(n) for i in (10, 11) for n in layer_tensor_names(i)}
    assert sorted(seen) == sorted(want)
    assert sw.embed is None and sw.lm_head is None and sw.final_norm is None
    per_layer = sum(t.numel() * 4 for t in sw.layers[0].tensors())  # ~14 MB fp32
    assert sw.nbytes() == 2 * per_layer
    # The whole model in fp32 is ~540 MB; two layers plus dequantization scratch is far less.
    assert grown < 120 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_gguf_last_slice_reads_head(smollm2_checkpoint, monkeypatch):
    seen = _record_dequantized(monkeypatch, smollm2_checkpoint)
    sw = load_slice(smollm2_checkpoint, 29, 30)
    want = {canonical_to_gguf_name(n) for n in layer_tensor_names(29)}
    assert set(seen) == want | {"token_embd.weight", "output_norm.weight"}
    assert sw.embed is None and sw.lm_head is not None and sw.lm_head.shape == (49152, 576)


# -- GGUF: small files written here (types, permutation, errors) -----------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1])
def test_gguf_roundtrip_types(tmp_path, qtype):
    """Writing HF-layout tensors like llama.cpp (permuted, quantized) and reading them back."""
    tensors = random_tensors(TINY_GGUF)
    src = GGUFCheckpoint(build_llama_gguf(tmp_path / "m.gguf", TINY_GGUF, tensors, qtype))
    assert src.config == TINY_GGUF
    for name, want in tensors.items():
        got = src.get(name)
        if want.ndim == 2 and qtype != Q.F32:  # expect the library's quantization error exactly
            stored = gguf.quants.quantize(want.numpy(), qtype)
            want = torch.from_numpy(gguf.quants.dequantize(stored, qtype).reshape(want.shape).copy())
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, want), name


def random_k_blocks(rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize these) with finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(rows, cols // block, size)  # view: edits land in raw
    scale = np.full(1, 1e-3, np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # ..., d (fp16) last
        blocks[..., -2:] = scale
    else:  # Q4_K / Q5_K: d, dmin (fp16) first
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    return raw


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_k_quants(tmp_path, qtype):
    cfg = TINY_GGUF.replace(dim=256, ffn_dim=256)
    tensors: dict = random_tensors(cfg)
    raw = {n: random_k_blocks(tensors[n].shape[0], cfg.dim, qtype) for n in ("layers.0.wq", "layers.0.w_up")}
    tensors.update({n: (r, qtype) for n, r in raw.items()})
    src = GGUFCheckpoint(build_llama_gguf(tmp_path / "k.gguf", cfg, tensors))
    up = src.get("layers.0.w_up")
    assert torch.equal(up, torch.from_numpy(gguf.quants.dequantize(raw["layers.0.w_up"], qtype)))
    assert torch.isfinite(up).all() and up.abs().max() > 0
    q = src.get("layers.0.wq")  # HF row order; permuting it back gives the stored rows
    stored = torch.from_numpy(gguf.quants.dequantize(raw["layers.0.wq"], qtype))
    assert torch.equal(llama_cpp_permute(q, cfg.n_heads), stored)


def test_gguf_pickles_without_its_memory_map(tmp_path):
    tensors = random_tensors(TINY_GGUF)
    src = GGUFCheckpoint(build_llama_gguf(tmp_path / "m.gguf", TINY_GGUF, tensors))
    copy = pickle.loads(pickle.dumps(src))
    assert copy._file is None and copy.config == src.config
    assert torch.equal(copy.get("layers.1.wk"), tensors["layers.1.wk"])


def test_gguf_rejects_other_architectures(tmp_path):
    path = build_llama_gguf(tmp_path / "q.gguf", TINY_GGUF, random_tensors(TINY_GGUF), arch="qwen2")
    with pytest.raises(ModelLoadError, match=r"q\.gguf.*'qwen2'.*only 'llama'"):
        GGUFCheckpoint(path)


def test_gguf_missing_tensor(tmp_path):
    tensors = random_tensors(TINY_GGUF)
    del tensors["layers.1.w_up"]
    path = build_llama_gguf(tmp_path / "m.gguf", TINY_GGUF, tensors)
    with pytest.raises(ModelLoadError, match=r"m\.gguf.*blk\.1\.ffn_up\.weight"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("content", ["random", "magic+random", "empty"])
def test_gguf_garbage_file(tmp_path, content):
    path = tmp_path / "bad.gguf"
    data = {"random": os.urandom(4096), "magic+random": b"GGUF" + os.urandom(4096), "empty": b""}
    path.write_bytes(data[content])
    with pytest.raises(ModelLoadError, match=r"bad\.gguf is not a readable GGUF file"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("keep", [0.00001, 0.5])
def test_gguf_truncated_file(tmp_path, smollm2_gguf, keep):
    data = smollm2_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])  # cut in the metadata / in the tensor data
    with pytest.raises(ModelLoadError, match=r"cut\.gguf is not a readable GGUF file \(corrupt or truncated"):
        GGUFCheckpoint(path)


# -- Hugging Face safetensors directories ----------------------------------------------------


@pytest.mark.parametrize(
    "preset,shards,tie",
    [("tiny-gqa", 1, False), ("tiny-gqa", 3, False), ("tiny-mha", 1, True), ("tiny-mha", 3, True)],
)
def test_hf_dir_equals_model(make_hf_dir, tmp_path, preset, shards, tie):
    cfg = from_name(preset)
    directory, model = make_hf_dir(cfg, tmp_path, shards=shards, tie=tie)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(files) == shards
    src = HFCheckpoint(directory)
    assert src.config == cfg.replace(name=directory.name, tie_embeddings=tie)
    ref = model.state_dict()
    for name in canonical_names(src.config):
        assert torch.equal(src.get(name), ref[canonical_to_hf_name(name)]), name
    assert src.has("lm_head") == (not tie)
    sw = load_slice(src)
    assert torch.equal(sw.layer(1).attn_norm, ref["model.layers.1.input_layernorm.weight"])
    assert not torch.equal(sw.layer(1).attn_norm, torch.ones_like(sw.layer(1).attn_norm))
    assert (sw.lm_head is sw.embed) == tie
    assert torch.equal(sw.lm_head, ref["lm_head.weight"])


def test_hf_slice_reads_only_its_layers(make_hf_dir, tmp_path, monkeypatch):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path, shards=3)
    src = HFCheckpoint(directory)
    seen: list[str] = []
    real = hf_module.safe_open

    class SpyOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            seen.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(hf_module, "safe_open", SpyOpen)
    load_slice(src, 1, 2)
    assert sorted(seen) == sorted(canonical_to_hf_name(n) for n in layer_tensor_names(1))
    seen.clear()
    load_slice(src, 2, 3)
    assert set(seen) == {canonical_to_hf_name(n) for n in layer_tensor_names(2)} | {
        "model.norm.weight", "lm_head.weight"}


def test_hf_missing_tensor(make_hf_dir, tmp_path):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path)
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, directory / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        HFCheckpoint(directory)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert str(directory) in str(err.value)
    assert isinstance(err.value, MissingTensorError)


def test_hf_index_names_absent_tensor(make_hf_dir, tmp_path):
    """An index that promises a tensor its shard lacks fails when that tensor is read."""
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path, shards=3)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    state = load_file(shard)
    del state["model.layers.0.self_attn.q_proj.weight"]
    save_file(state, shard)
    src = HFCheckpoint(directory)
    with pytest.raises(ModelLoadError, match=r"q_proj"):
        src.get("layers.0.wq")


def test_hf_missing_config(make_hf_dir, tmp_path):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        HFCheckpoint(directory)
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        resolve_checkpoint(str(directory))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "mistral"}, "only 'llama'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "'llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
        ({"attention_bias": True}, "biases"),
    ],
)
def test_hf_refuses_unsupported_config(make_hf_dir, tmp_path, change, message):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(change)
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message):
        HFCheckpoint(directory)


def test_hf_refuses_pickled_weights(make_hf_dir, tmp_path):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*safetensors") as err:
        resolve_checkpoint(str(directory))
    assert "arbitrary code" in str(err.value)


# -- synthetic weights ---------------------------------------------------------------------


def test_synthetic_is_deterministic_across_slices():
    src = SyntheticCheckpoint(from_name("tiny-gqa"))
    a, b = load_slice(src, 0, 2), load_slice(src, 1, 3)
    for x, y in zip(a.layers[1].tensors(), b.layers[0].tensors()):
        assert torch.equal(x, y)
    assert torch.equal(load_slice(SyntheticCheckpoint(from_name("tiny-gqa")), 2, 3).lm_head, b.lm_head)
    other = SyntheticCheckpoint(from_name("tiny-gqa"), seed=1).get("layers.1.wq")
    assert not torch.equal(other, src.get("layers.1.wq"))
    norm = src.get("layers.0.attn_norm")
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0.05
    assert 0.015 < src.get("layers.0.w_up").std() < 0.025


def test_synthetic_big_shapes():
    src = SyntheticCheckpoint(from_name("llama-2-7b"))
    assert src.get("layers.31.w_down").shape == (4096, 11008)
    assert not src.has("layers.32.wq") and src.has("lm_head")
    with pytest.raises(MissingTensorError):
        src.get("layers.32.wq")


# -- resolving specs --------------------------------------------------------------------------


def test_resolve_default_model(smollm2_gguf):
    src = resolve_checkpoint(DEFAULT_MODEL)
    assert isinstance(src, GGUFCheckpoint) and src.path == smollm2_gguf.resolve()


def test_resolve_paths(tmp_path, make_hf_dir):
    (tmp_path / "one").mkdir()
    path = build_llama_gguf(tmp_path / "one" / "m.gguf", TINY_GGUF, random_tensors(TINY_GGUF))
    assert isinstance(resolve_checkpoint(str(path)), GGUFCheckpoint)
    assert resolve_checkpoint(str(path.parent)).path == path  # the directory's only .gguf
    shutil.copy(path, path.parent / "other.gguf")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        resolve_checkpoint(str(path.parent))
    directory, _ = make_hf_dir(from_name("tiny-mha"), tmp_path)
    assert isinstance(resolve_checkpoint(str(directory)), HFCheckpoint)
    src = resolve_checkpoint("random:llama-2-7b")
    assert isinstance(src, SyntheticCheckpoint) and src.config == from_name("llama-2-7b")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("llama-2-7b", r"no weights ship for preset 'llama-2-7b'.*random:llama-2-7b"),
        ("gpt-5", r"unknown model 'gpt-5'.*known presets: .*smollm2-135m-instruct"),
        ("/nonexistent/model.gguf", r"no such file or directory: /nonexistent/model\.gguf.*presets"),
        ("random:gpt-5", r"unknown model preset 'gpt-5'.*llama-2-7b"),
        ("", "empty model spec"),
    ],
)
def test_resolve_errors(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_checkpoint(spec)


def test_every_preset_has_a_random_form():
    for name in PRESETS:
        assert resolve_checkpoint(f"random:{name}").config == PRESETS[name]
