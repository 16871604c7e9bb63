"""Tokenizer wrapper: same ids as transformers' AutoTokenizer, cached GGUF conversion."""

from __future__ import annotations

import json
import time

import pytest

from glinthawk_dask.errors import InvalidRequestError, ModelLoadError
from glinthawk_dask.model.config import from_name
from glinthawk_dask.model.hf import HFCheckpoint
from glinthawk_dask.model.synthetic import SyntheticCheckpoint
from glinthawk_dask.tokenizer import Tokenizer, tokenizer_cache_dir

TEXTS = [
    "Hello world",
    "",
    "  leading and trailing spaces  ",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # square\n",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "1234567890 3.14159 $100,000.00",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi — ça va? 🙂"},
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "And now?"},
    ],
]


@pytest.fixture(scope="session")
def reference_tokenizer(smollm2_gguf):
    """transformers' own tokenizer for the embedded GGUF (converted fresh, ~10 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, local_files_only=True
    )


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_checkpoint, tokenizer_cache):
    """Our tokenizer for the embedded GGUF, converted into an empty cache (first use)."""
    assert not any(tokenizer_cache.iterdir())
    return Tokenizer.from_checkpoint(smollm2_checkpoint, cache_dir=tokenizer_cache)


def plain_ids(encoded) -> list[int]:
    if not isinstance(encoded, list):
        encoded = encoded["input_ids"]
    return list(encoded)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(smollm2_tokenizer, reference_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    assert ids == reference_tokenizer(text)["input_ids"]
    assert all(type(i) is int for i in ids)


@pytest.mark.parametrize("messages", CHATS)
def test_encode_chat_matches_transformers(smollm2_tokenizer, reference_tokenizer, messages):
    ids = smollm2_tokenizer.encode_chat(messages)
    want = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert type(ids) is list and all(type(i) is int for i in ids)
    assert ids == plain_ids(want)
    assert smollm2_tokenizer.decode(ids[-3:]) == "assistant\n"  # ends with the reply header


def test_decode(smollm2_tokenizer):
    for text in TEXTS[:5] + TEXTS[6:]:
        assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text
    ids = smollm2_tokenizer.encode(TEXTS[5])
    assert smollm2_tokenizer.decode(ids) == "user\nspecial tokens in text"  # specials skipped


def test_special_ids(smollm2_tokenizer, smollm2_checkpoint):
    assert smollm2_tokenizer.eos_token_ids == (2,) == smollm2_checkpoint.eos_token_ids
    assert smollm2_tokenizer.bos_token_id == 1 == smollm2_checkpoint.bos_token_id
    assert smollm2_tokenizer.has_chat_template
    assert smollm2_tokenizer.vocab_size == 49152 == smollm2_checkpoint.config.vocab_size


def test_cache_is_reused(smollm2_tokenizer, smollm2_gguf, tokenizer_cache):
    entries = [p for p in tokenizer_cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    files = sorted(p.name for p in entries[0].iterdir())
    assert "tokenizer.json" in files
    assert all(name.endswith((".json", ".jinja")) for name in files), files  # no pickle
    start = time.perf_counter()
    cached = Tokenizer.from_gguf(smollm2_gguf, cache_dir=tokenizer_cache)
    assert time.perf_counter() - start < 5.0  # conversion takes ~10 s; loading JSON < 1 s
    for text in TEXTS:
        assert cached.encode(text) == smollm2_tokenizer.encode(text)
    assert cached.encode_chat(CHATS[1]) == smollm2_tokenizer.encode_chat(CHATS[1])
    assert cached.eos_token_ids == smollm2_tokenizer.eos_token_ids
    assert cached.bos_token_id == smollm2_tokenizer.bos_token_id
    assert [p for p in tokenizer_cache.iterdir() if not p.name.startswith(".")] == entries


def test_a_cached_tokenizer_loads_without_autotokenizers_scan(smollm2_tokenizer, smollm2_gguf, tokenizer_cache,
                                                              reference_tokenizer, monkeypatch):
    """A converted tokenizer is read back as its own class, not through AutoTokenizer
    (whose lookup scans every model package transformers ships: ~0.7 s a process), and
    gives the reference's ids."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer used for a cached tokenizer")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    cached = Tokenizer.from_gguf(smollm2_gguf, cache_dir=tokenizer_cache)
    for text in TEXTS:
        assert cached.encode(text) == reference_tokenizer(text)["input_ids"]
    for messages in CHATS:
        want = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert cached.encode_chat(messages) == plain_ids(want)
    assert (cached.eos_token_ids, cached.bos_token_id) == (smollm2_tokenizer.eos_token_ids, 1)


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GLINTHAWK_CACHE_DIR", str(tmp_path))
    assert tokenizer_cache_dir() == tmp_path / "tokenizers"
    monkeypatch.delenv("GLINTHAWK_CACHE_DIR")
    assert tokenizer_cache_dir().parts[-3:] == (".cache", "glinthawk", "tokenizers")


def test_hf_dir_tokenizer(make_hf_dir, tmp_path, reference_tokenizer, smollm2_tokenizer):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path)
    reference_tokenizer.save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_checkpoint(HFCheckpoint(directory))
    assert tok.eos_token_ids == (2, 7)
    for text in TEXTS:
        assert tok.encode(text) == smollm2_tokenizer.encode(text)


def test_hf_dir_without_tokenizer(make_hf_dir, tmp_path):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer from"):
        Tokenizer.from_checkpoint(HFCheckpoint(directory))


def test_no_tokenizer_for_synthetic():
    assert Tokenizer.from_checkpoint(SyntheticCheckpoint(from_name("tiny-mha"))) is None


def test_chat_without_template(make_hf_dir, tmp_path, reference_tokenizer):
    directory, _ = make_hf_dir(from_name("tiny-gqa"), tmp_path)
    reference_tokenizer.save_pretrained(str(directory))
    (directory / "chat_template.jinja").unlink()
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_dir(directory)
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.encode_chat(CHATS[0])
