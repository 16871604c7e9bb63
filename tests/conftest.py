"""Shared pytest fixtures.

Checkpoint fixtures (loaders and tokenizer tests):

* ``smollm2_gguf``: path of the embedded SmolLM2-135M-Instruct GGUF (session);
* ``hf_reference_model``: ``transformers`` LlamaForCausalLM loaded from that GGUF (session);
* ``make_hf_dir``: factory writing a random HF Llama checkpoint for a ModelConfig.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from glinthawk_dask.model.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Profiles that tests measure (random tiny models, clusters shaped for a test, the real
# model on a machine busy with the suite) are not kept where a user's runs would read
# them: the suite keeps them in a directory of its own, for this process, its worker
# processes (their nannies hand them this config) and the commands it starts.
_PROFILES = Path(tempfile.mkdtemp(prefix="glinthawk-test-profiles-"))
os.environ["DASK_GLINTHAWK__PLANNER__PROFILE_CACHE"] = str(_PROFILES)


@pytest.fixture(scope="session", autouse=True)
def _test_profile_cache():
    """This process reads the suite's profile directory too (dask read its environment
    before this file set it)."""
    import dask

    with dask.config.set({"glinthawk.planner.profile-cache": str(_PROFILES)}):
        yield
    shutil.rmtree(_PROFILES, ignore_errors=True)


# -- checkpoint fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF (fails if not installed)."""
    from glinthawk_dask.errors import ModelLoadError
    from glinthawk_dask.model.resolve import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except ModelLoadError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def hf_reference_model(smollm2_gguf):
    """``transformers`` LlamaForCausalLM from the embedded GGUF: fp32, eval, eager attention."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        str(smollm2_gguf.parent),
        gguf_file=smollm2_gguf.name,
        dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,
    )
    return model.eval()


def hf_llama_config(config: ModelConfig, tie: bool | None = None):
    """A ``transformers.LlamaConfig`` with the shapes of ``config``."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings if tie is None else tie,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )


def build_hf_dir(
    config: ModelConfig, directory: Path, shards: int = 1, tie: bool | None = None, seed: int = 0
):
    """Write a random HF Llama checkpoint with ``config``'s shapes in ``shards`` safetensors files.

    RMSNorm gains are randomized too (``N(1, 0.1^2)``).  Returns ``(directory, model)``.
    """
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(hf_llama_config(config, tie)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(1.0, 0.1)
    directory = Path(directory)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if shards == 1:
        model.save_pretrained(str(directory), max_shard_size=4 * total)
        return directory, model
    # Sharding packs tensors greedily, so search the size limit that yields `shards` files.
    for step in range(200):
        limit = int(total / shards * (1 + 0.02 * step)) + 1
        shutil.rmtree(directory, ignore_errors=True)
        model.save_pretrained(str(directory), max_shard_size=limit)
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        if len(set(index["weight_map"].values())) == shards:
            return directory, model
    raise RuntimeError(f"could not split the checkpoint into {shards} shards")


@pytest.fixture
def make_hf_dir(tmp_path):
    """Factory ``make_hf_dir(config, tmp_path=None, shards=1, tie=None) -> (dir, hf_model)``.

    ``tie=None`` follows ``config.tie_embeddings``.  Each call writes a fresh directory.
    """
    counter = iter(range(10**6))

    def make(config: ModelConfig, directory: Path | None = None, shards: int = 1, tie: bool | None = None):
        base = Path(directory) if directory is not None else tmp_path
        return build_hf_dir(config, base / f"hf-{config.name}-{next(counter)}", shards=shards, tie=tie)

    return make


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    """A GGUFCheckpoint of the embedded model, opened once per session (parsing takes ~2 s)."""
    from glinthawk_dask.model.gguf import GGUFCheckpoint

    return GGUFCheckpoint(smollm2_gguf)


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation of q/k rows (HF order -> GGUF order); w: [n_head * D, in]."""
    # [n_head, 2, D // 2, in] -> [n_head, D // 2, 2, in] -> [n_head * D, in]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_llama_gguf(path: Path, config: ModelConfig, tensors: dict, qtype=None, arch: str = "llama") -> Path:
    """Write a GGUF file holding ``tensors`` (canonical name -> HF-layout tensor) for ``config``.

    Matrices are stored as ``qtype`` (a ``gguf.GGMLQuantizationType``, default F32;
    quantized by the gguf library), norms as F32; q/k rows are permuted like llama.cpp does.
    A value may also be ``(raw_blocks, qtype)``: bytes already in GGUF order, written as is.
    """
    import gguf

    from glinthawk_dask.model.gguf import canonical_to_gguf_name

    qtype = gguf.GGMLQuantizationType.F32 if qtype is None else qtype
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(config.name)
    w.add_uint32(f"{arch}.block_count", config.n_layers)
    w.add_uint32(f"{arch}.context_length", config.max_seq_len)
    w.add_uint32(f"{arch}.embedding_length", config.dim)
    w.add_uint32(f"{arch}.feed_forward_length", config.ffn_dim)
    w.add_uint32(f"{arch}.attention.head_count", config.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", config.n_kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", config.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.norm_eps)
    w.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    w.add_uint32(f"{arch}.rope.dimension_count", config.head_dim)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            raw, raw_type = t
            w.add_tensor(canonical_to_gguf_name(name), raw, raw_dtype=raw_type)
            continue
        t = t.detach().float()
        if name.endswith(".wq"):
            t = llama_cpp_permute(t, config.n_heads)
        elif name.endswith(".wk"):
            t = llama_cpp_permute(t, config.n_kv_heads)
        arr = t.numpy()
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(canonical_to_gguf_name(name), arr.astype("float32"))
        else:
            w.add_tensor(canonical_to_gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# -- object storage fixtures --------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback for the session: ``{"endpoint_url", "key", "secret"}``.

    moto accepts any credentials unless its auth is switched on (POST ``/moto-api/reset-auth``).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh, empty bucket on ``s3_server``: ``(name, storage_options)``.

    The machine's AWS profile and config files are hidden so that only the explicit
    credentials count; ``storage_options`` is keyed by protocol, as pipelines take it.
    """
    import uuid

    import boto3

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client(
        "s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1",
        aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"],
    ).create_bucket(Bucket=name)
    options = {"s3": {"key": s3_server["key"], "secret": s3_server["secret"],
                      "endpoint_url": s3_server["endpoint_url"], "client_kwargs": {"region_name": "us-east-1"}}}
    return name, options
