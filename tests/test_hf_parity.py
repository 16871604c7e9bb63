"""Logits of the tier ops + KV cache equal Hugging Face transformers at every position,
through chunked prefill and token-by-token decode, for random MHA and GQA configs."""

from __future__ import annotations

import pytest
import torch

from glinthawk_dask.engine.runner import forward_step
from glinthawk_dask.model import ModelConfig, from_name, load_slice
from glinthawk_dask.model.attention import AttentionBatch
from glinthawk_dask.model.hf import HFCheckpoint
from glinthawk_dask.model.kv_cache import KVCache
from glinthawk_dask.model.ops import RopeTable

CONFIGS = [
    from_name("tiny-mha"),
    from_name("tiny-gqa"),
    ModelConfig(name="odd-gqa", dim=60, n_layers=2, n_heads=10, n_kv_heads=5, head_dim=6,
                ffn_dim=97, vocab_size=113, rope_theta=1000.0, max_seq_len=128),
    ModelConfig(name="odd-mqa", dim=80, n_layers=3, n_heads=8, n_kv_heads=1, ffn_dim=131,
                vocab_size=97, max_seq_len=128, tie_embeddings=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_logits_match_transformers_through_prefill_and_decode(config, make_hf_dir):
    directory, hf = make_hf_dir(config)
    with torch.no_grad():  # sharper logits than the default init, so errors show
        for p in hf.parameters():
            p.mul_(4.0)
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(str(directory))
    weights = load_slice(HFCheckpoint(directory))

    torch.manual_seed(0)
    lengths = [29, 7, 41]
    seqs = [torch.randint(0, config.vocab_size, (n,)) for n in lengths]
    with torch.no_grad():
        refs = [hf(s[None]).logits[0] for s in seqs]  # [n, V] each

    cache = KVCache(config, n_slots=4, max_seq_len=64)
    rope = RopeTable.build(config)
    slots = [cache.allocate(i, slot) for i, slot in enumerate([2, 0, 3])]
    prompt = [n - 5 for n in lengths]  # the rest is fed one token at a time
    got = [[] for _ in seqs]
    pos = [0, 0, 0]
    chunk = 9
    while any(p < n for p, n in zip(pos, lengths)):
        segs = []
        for i, n in enumerate(lengths):
            if pos[i] < prompt[i]:
                segs.append((i, min(chunk, prompt[i] - pos[i])))
            elif pos[i] < n:
                segs.append((i, 1))
        ids = [t for i, c in segs for t in seqs[i][pos[i] : pos[i] + c].tolist()]
        batch = AttentionBatch.build([slots[i] for i, _ in segs], [pos[i] for i, _ in segs], [c for _, c in segs])
        logits = forward_step(weights, cache, rope, ids, batch, list(range(len(ids))))
        for (i, c), part in zip(segs, logits.split([c for _, c in segs])):
            got[i].append(part)
            pos[i] += c
    for ref, parts in zip(refs, got):
        ours = torch.cat(parts)
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-5, f"relative error {rel:.2e}"
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
