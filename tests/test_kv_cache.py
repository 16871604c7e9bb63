"""Tier 2 in isolation: the KV cache's accounting and the attention kernels."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from glinthawk_dask.model import attention, cpu_attention, from_name
from glinthawk_dask.model.attention import AttentionBatch, decode_attention, prefill_attention
from glinthawk_dask.model.kv_cache import KVCache, KVCacheError, KVCacheFullError


def _naive_attention(q, k, v, n_groups):
    """Reference: repeat K/V per query head (what we must not do in the engine).

    q: [C, H, D] for the last C positions of k, v: [L, KVH, D].
    """
    c, h, d = q.shape
    length = k.shape[0]
    kr = k.repeat_interleave(n_groups, dim=1)  # [L, H, D]
    vr = v.repeat_interleave(n_groups, dim=1)
    scores = torch.einsum("chd,lhd->hcl", q, kr) / d**0.5  # [H, C, L]
    qpos = torch.arange(length - c, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > qpos, float("-inf"))
    return torch.einsum("hcl,lhd->chd", scores.softmax(-1), vr)  # [C, H, D]


@pytest.mark.parametrize("preset", ["smollm2-135m-instruct", "llama-2-7b", "llama-3-8b", "tiny-gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token_matches_formula(preset, dtype):
    cfg = from_name(preset)
    layers = min(cfg.n_layers, 4)
    cache = KVCache(cfg, n_slots=3, max_seq_len=32, layer_stop=layers, dtype=dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    formula = 2 * layers * cfg.n_kv_heads * cfg.head_dim * elem
    measured = cache.capacity_bytes / (cache.n_slots * cache.max_seq_len)
    assert cache.bytes_per_token == formula
    assert abs(measured - formula) / formula <= 0.10


def test_allocate_append_free_returns_memory():
    cfg = from_name("tiny-gqa")
    cache = KVCache(cfg, n_slots=2, max_seq_len=16)
    a = cache.allocate("a")
    b = cache.allocate("b")
    with pytest.raises(KVCacheFullError):
        cache.allocate("c")
    batch = AttentionBatch.build([a, b], [0, 0], [5, 3])
    q = torch.randn(8, cfg.n_heads, cfg.head_dim)
    kv = torch.randn(8, cfg.n_kv_heads, cfg.head_dim)
    for layer in range(cfg.n_layers):
        cache.attend(layer, q, kv, kv, batch)
    assert cache.length("a") == 5 and cache.length("b") == 3
    assert cache.used_bytes == 8 * cache.bytes_per_token
    cache.free("a")
    assert cache.used_bytes == 3 * cache.bytes_per_token
    assert cache.n_free == 1
    c = cache.allocate("c")
    assert c == a and cache.length("c") == 0
    with pytest.raises(KVCacheError):
        cache.free("a")


def test_cache_rejects_inconsistent_batches():
    cfg = from_name("tiny-mha")
    cache = KVCache(cfg, n_slots=2, max_seq_len=8)
    slot = cache.allocate("s")
    q = torch.randn(1, cfg.n_heads, cfg.head_dim)
    kv = torch.randn(1, cfg.n_kv_heads, cfg.head_dim)
    with pytest.raises(KVCacheError, match="hole"):
        cache.attend(0, q, kv, kv, AttentionBatch.build([slot], [3], [1]))
    with pytest.raises(KVCacheError, match="free slot"):
        cache.attend(0, q, kv, kv, AttentionBatch.build([1 - slot], [0], [1]))
    with pytest.raises(KVCacheError, match="max_seq_len"):
        qq = torch.randn(9, cfg.n_heads, cfg.head_dim)
        kk = torch.randn(9, cfg.n_kv_heads, cfg.head_dim)
        cache.attend(0, qq, kk, kk, AttentionBatch.build([slot], [0], [9]))
    with pytest.raises(KVCacheError, match="not held"):
        cache.attend(cfg.n_layers, q, kv, kv, AttentionBatch.build([slot], [0], [1]))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2), (9, 3), (8, 1)])
def test_prefill_and_decode_kernels_match_naive(n_heads, n_kv_heads):
    torch.manual_seed(0)
    d, length, c = 16, 23, 7
    q = torch.randn(c, n_heads, d)
    k = torch.randn(length, n_kv_heads, d)
    v = torch.randn(length, n_kv_heads, d)
    ref = _naive_attention(q, k, v, n_heads // n_kv_heads)
    got = prefill_attention(q, k.transpose(0, 1), v.transpose(0, 1), start=length - c)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # Decode: the last query alone, in a padded batch with another sequence.
    k_cache = torch.zeros(2, n_kv_heads, length + 5, d)
    v_cache = torch.zeros(2, n_kv_heads, length + 5, d)
    k_cache[1, :, :length] = k.transpose(0, 1)
    v_cache[1, :, :length] = v.transpose(0, 1)
    k_cache[0] = 1e3  # garbage beyond a sequence's length must not leak in
    qd = torch.stack([torch.randn(n_heads, d), q[-1]])
    out = decode_attention(qd, k_cache, v_cache, torch.tensor([4, length]))
    torch.testing.assert_close(out[1], ref[-1], rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["compiled", "torch"])
def kernel(request, monkeypatch):
    """Each KV-cache test runs on the compiled CPU decode kernel and on torch's."""
    monkeypatch.setenv("GLINTHAWK_TORCH_ATTENTION", "1" if request.param == "torch" else "0")
    if request.param == "compiled":
        assert cpu_attention.available()
    return request.param


def _one_step(cfg, slots, hist, lens, new, step, max_seq_len):
    """A cache of 8 slots holding ``slots``, each with its cached keys/values ``hist[s]``
    (none where absent), then one step of ``new[s]`` tokens each from ``lens[s]`` on
    (q/k/v ``step[s]``): ``(batch, {slot: o [new, H, D]})``."""
    h, d = cfg.n_heads, cfg.head_dim
    cache = KVCache(cfg, n_slots=8, max_seq_len=max_seq_len, layer_stop=1)
    for s in slots:
        cache.allocate(f"s{s}", s)
        if s in hist:
            k, v = hist[s]
            cache.attend(0, torch.randn(len(k), h, d), k, v, AttentionBatch.build([s], [0], [len(k)]))
    batch = AttentionBatch.build(slots, [lens[s] for s in slots], [new[s] for s in slots])
    q, k, v = (torch.cat([step[s][i] for s in slots]) for i in range(3))
    o = cache.attend(0, q, k, v, batch)
    return batch, dict(zip(slots, o.split([new[s] for s in slots])))


def test_mixed_batch_equals_sequences_alone(kernel):
    """Decode rows, prefill chunks and scattered slots in one micro-batch give the same
    outputs as each sequence on its own."""
    torch.manual_seed(1)
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    lens = {0: 9, 3: 1, 5: 14, 7: 4}  # tokens already cached per slot
    new = {0: 1, 3: 6, 5: 1, 7: 1}  # tokens in this step
    hist = {s: (torch.randn(n, kvh, d), torch.randn(n, kvh, d)) for s, n in lens.items()}
    step = {s: (torch.randn(n, h, d), torch.randn(n, kvh, d), torch.randn(n, kvh, d)) for s, n in new.items()}

    def run(slots):
        return _one_step(cfg, slots, hist, lens, new, step, max_seq_len=32)[1]

    together = run([5, 0, 3, 7])
    for s in lens:
        torch.testing.assert_close(together[s], run([s])[s], rtol=0, atol=1e-6)


def test_short_prefill_chunks_are_computed_together_as_each_alone(kernel):
    """Prefill chunks ending within GROUP_PREFILL_MAX positions are computed at once,
    padded to the longest (fresh prompts of different lengths, a chunk that continues a
    cached prefix); longer ones and decode rows beside them as before: every sequence's
    outputs are those it gets alone (one segment: the one-by-one path)."""
    from glinthawk_dask.model.attention import GROUP_PREFILL_MAX

    torch.manual_seed(2)
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    long_start = GROUP_PREFILL_MAX - 3
    lens = {0: 0, 1: 0, 2: 5, 4: 9, 6: long_start}  # tokens already cached per slot
    new = {0: 7, 1: 2, 2: 4, 4: 1, 6: 8}  # tokens in this step (slot 6 ends past the bound)
    hist = {s: (torch.randn(n, kvh, d), torch.randn(n, kvh, d)) for s, n in lens.items() if n}
    step = {s: (torch.randn(n, h, d), torch.randn(n, kvh, d), torch.randn(n, kvh, d)) for s, n in new.items()}

    def run(slots):
        return _one_step(cfg, slots, hist, lens, new, step, max_seq_len=GROUP_PREFILL_MAX + 16)

    batch, together = run([6, 2, 0, 4, 1])
    # slots 1 and 0 (2 and 7 fresh tokens) together; slot 2 (4 tokens after 5) would pad
    # the pair past twice its work, slot 6 ends past the bound: one by one
    assert [g.slots.tolist() for g in batch.prefill_groups] == [[1, 0]]
    assert sorted(seg[1] for seg in batch.prefill) == [2, 6]
    for s in lens:
        alone_batch, alone = run([s])
        assert alone_batch.prefill_groups == ()
        torch.testing.assert_close(together[s], alone[s], rtol=0, atol=1e-6)


def test_the_compiled_kernel_computes_prefill_chunks_as_the_torch_kernel(monkeypatch):
    """Short prefill chunks (fresh prompts of different lengths, one continuing a cached
    prefix) go through the compiled kernel a token at a time, the chunk past the bound
    through torch's, decode rows beside them: the outputs are torch's to float rounding."""
    from glinthawk_dask.model.attention import GROUP_PREFILL_MAX

    torch.manual_seed(3)
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    lens = {0: 0, 1: 0, 2: 5, 4: 9, 6: GROUP_PREFILL_MAX - 3}
    new = {0: 7, 1: 2, 2: 4, 4: 1, 6: 8}
    hist = {s: (torch.randn(n, kvh, d), torch.randn(n, kvh, d)) for s, n in lens.items() if n}
    step = {s: (torch.randn(n, h, d), torch.randn(n, kvh, d), torch.randn(n, kvh, d)) for s, n in new.items()}
    monkeypatch.setenv("GLINTHAWK_TORCH_ATTENTION", "0")
    assert cpu_attention.available()
    out = {}
    for name, flag in (("compiled", "0"), ("torch", "1")):
        monkeypatch.setenv("GLINTHAWK_TORCH_ATTENTION", flag)
        batch, out[name] = _one_step(cfg, [6, 2, 0, 4, 1], hist, lens, new, step,
                                     max_seq_len=GROUP_PREFILL_MAX + 16)
    assert batch.kernel_rows.tolist() == [8 + i for i in range(14)]  # every row but slot 6's chunk
    assert [seg[1] for seg in batch.prefill_long] == [6]
    for s in lens:
        torch.testing.assert_close(out["compiled"][s], out["torch"][s], rtol=1e-5, atol=1e-6)


def test_prefill_groups_pad_at_most_twice_their_work():
    """A chunk ending at 250 beside sixty fresh prompts of 3-5 tokens: the prompts go in
    groups whose padded work is at most twice their own, the chunk alone."""
    counts = [3, 4, 5] * 20
    slots, starts = list(range(61)), [0] * 60 + [240]
    batch = AttentionBatch.build(slots, starts, counts + [10])
    assert [seg[1] for seg in batch.prefill] == [60]
    assert sum(len(g.slots) for g in batch.prefill_groups) == 60
    for g in batch.prefill_groups:
        own = sum(int(v) ** 2 for v in g.valid.sum(dim=1))  # fresh prompts: a chunk x its end
        assert g.rows.numel() * g.length <= 2 * own


def test_decode_steps_in_slot_order_take_the_short_path_with_the_same_outputs(kernel):
    """A decode step whose rows are the slots lo..hi-1 in order attends straight over the
    slot range (no scatter, no gather); its outputs are bit-identical to the general path's
    and each sequence's on its own.  Layouts out of order or with holes keep the general path,
    with the range's lengths (1 for a hole) and mask precomputed once for the step."""
    torch.manual_seed(2)
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    lens = {0: 5, 1: 9, 2: 2, 3: 7, 4: 3}  # tokens already cached per slot
    hist = {s: (torch.randn(n, kvh, d), torch.randn(n, kvh, d)) for s, n in lens.items()}
    step = {s: (torch.randn(1, h, d), torch.randn(1, kvh, d), torch.randn(1, kvh, d)) for s in lens}

    def decode(slots, general=False):
        cache = KVCache(cfg, n_slots=6, max_seq_len=32, layer_stop=1)
        for s in slots:
            cache.allocate(f"s{s}", s)
            k, v = hist[s]
            cache.attend(0, torch.randn(len(k), h, d), k, v, AttentionBatch.build([s], [0], [len(k)]))
        batch = AttentionBatch.build(slots, [lens[s] for s in slots], [1] * len(slots))
        if general:
            batch = dataclasses.replace(batch, all_decode_in_range_order=False)
        q, k, v = (torch.cat([step[s][i] for s in slots]) for i in range(3))
        return batch, dict(zip(slots, cache.attend(0, q, k, v, batch)))

    in_order, fast = decode([0, 1, 2, 3, 4])
    assert in_order.all_decode_in_range_order and in_order.decode_range == (0, 5) and in_order.decode_span == 10
    _, general = decode([0, 1, 2, 3, 4], general=True)
    for s in lens:
        assert torch.equal(fast[s], general[s])
        torch.testing.assert_close(fast[s], decode([s])[1][s], rtol=0, atol=1e-6)

    shuffled, out = decode([3, 1, 4, 0, 2])
    assert shuffled.decode_range == (0, 5) and not shuffled.all_decode_in_range_order
    holes, out_holes = decode([0, 2, 4])
    assert holes.decode_range == (0, 5) and not holes.all_decode_in_range_order
    assert holes.range_lengths.tolist() == [6, 1, 3, 1, 4] and holes.range_index.tolist() == [0, 2, 4]
    assert holes.range_masked.shape == (5, 6) and holes.range_masked.sum(1).tolist() == [0, 5, 3, 5, 2]
    for s in lens:
        torch.testing.assert_close(out[s], fast[s], rtol=0, atol=1e-6)
    for s in (0, 2, 4):
        torch.testing.assert_close(out_holes[s], fast[s], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_heads,n_kv_heads,d", [(9, 3, 64), (6, 2, 16), (8, 1, 32), (4, 4, 8)])
def test_compiled_decode_matches_the_torch_kernel_whatever_the_threads(n_heads, n_kv_heads, d, monkeypatch):
    """The compiled kernel reads each sequence's slot up to its length only (garbage beyond
    it never leaks in), matches the torch kernel on the gathered slots, and gives the same
    bits on 1, 2 or 3 threads (each sequence and head is one thread's, in a fixed order)."""
    torch.manual_seed(3)
    n_slots, max_len = 11, 40
    k_cache = torch.randn(n_slots, n_kv_heads, max_len, d)
    v_cache = torch.randn(n_slots, n_kv_heads, max_len, d)
    slots = torch.tensor([7, 2, 9, 0, 4, 5, 10])
    lengths = torch.tensor([1, 17, 40, 3, 29, 8, 33])
    for s, n in zip(slots.tolist(), lengths.tolist()):
        k_cache[s, :, n:] = 1e3  # beyond the attended length: must not count
        v_cache[s, :, n:] = -1e3
    q = torch.randn(len(slots), n_heads, d)
    span = int(lengths.max())
    ref = decode_attention(q, k_cache[slots, :, :span], v_cache[slots, :, :span], lengths)
    monkeypatch.setattr(cpu_attention, "PARALLEL_MIN_POSITIONS", 0)  # split even this small batch
    outs = [cpu_attention.decode_attention_slots(q, k_cache, v_cache, slots, lengths, threads=t)
            for t in (1, 2, 3)]
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert cpu_attention.decode_attention_slots(q[:0], k_cache, v_cache, slots[:0], lengths[:0]).shape == (0, n_heads, d)


def test_cache_attends_float32_on_the_cpu_with_the_compiled_kernel(monkeypatch):
    """A float32 CPU cache sends its decode rows and its prefill chunks that end within
    the bound (each token a query of its own) through the compiled kernel, and longer
    chunks through the torch kernel beside it; bfloat16 and the torch switch keep the
    torch kernel."""
    calls = []
    compiled = cpu_attention.decode_attention_slots
    monkeypatch.setattr(cpu_attention, "decode_attention_slots", lambda *a, **k: calls.append(len(a[0])) or compiled(*a, **k))
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def step(dtype):
        cache = KVCache(cfg, n_slots=4, max_seq_len=16, layer_stop=1, dtype=dtype)
        for s in range(3):
            cache.allocate(s, s)
        prefill = AttentionBatch.build([0, 1, 2], [0, 0, 0], [3, 2, 4])
        cache.attend(0, torch.randn(9, h, d), torch.randn(9, kvh, d), torch.randn(9, kvh, d), prefill)
        decode = AttentionBatch.build([0, 1, 2], [3, 2, 4], [1, 1, 1])
        cache.attend(0, torch.randn(3, h, d), torch.randn(3, kvh, d), torch.randn(3, kvh, d), decode)
        mixed = AttentionBatch.build([0, 1, 2], [4, 3, 5], [1, 3, 1])
        return cache.attend(0, torch.randn(5, h, d), torch.randn(5, kvh, d), torch.randn(5, kvh, d), mixed)

    assert step(torch.float32).shape == (5, h, d)
    assert calls == [9, 3, 5]  # every row of each step
    calls.clear()
    monkeypatch.setattr(attention, "GROUP_PREFILL_MAX", 4)  # the mixed step's chunk (positions 3-5) past it
    assert step(torch.float32).shape == (5, h, d)
    assert calls == [9, 3, 2]
    calls.clear()
    step(torch.bfloat16)
    monkeypatch.setenv("GLINTHAWK_TORCH_ATTENTION", "1")
    step(torch.float32)
    assert calls == []


def test_without_numba_the_cache_keeps_the_torch_kernel(monkeypatch, caplog):
    """A machine without Numba's wheels attends with the torch kernel and says so once."""
    monkeypatch.setattr(cpu_attention, "_kernel", None)
    monkeypatch.setattr(cpu_attention, "_missing", False)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba → ImportError
    with caplog.at_level("WARNING", logger=cpu_attention.__name__):
        assert not cpu_attention.available()
        assert not cpu_attention.available()
    assert sum("Numba is not installed" in r.message for r in caplog.records) == 1
    cfg = from_name("tiny-gqa")
    cache = KVCache(cfg, n_slots=2, max_seq_len=8, layer_stop=1)
    for s in range(2):
        cache.allocate(s, s)
    batch = AttentionBatch.build([0, 1], [0, 0], [1, 1])
    q = torch.randn(2, cfg.n_heads, cfg.head_dim)
    kv = torch.randn(2, cfg.n_kv_heads, cfg.head_dim)
    assert cache.attend(0, q, kv, kv, batch).shape == q.shape
    with pytest.raises(RuntimeError, match="pip install numba"):
        cpu_attention.decode_attention_slots(q, cache.k[0], cache.v[0], batch.decode_slots, batch.decode_lengths)


def test_warming_compiles_the_kernel_a_cache_calls():
    """``warm()`` (what an attention worker runs as it starts) compiles the one kernel
    specialization a float32 cache's decode steps call, so a run's first step finds it
    ready: in a fresh interpreter, the steps after it add none."""
    code = """
import torch
from glinthawk_dask.model import cpu_attention, from_name
from glinthawk_dask.model.attention import AttentionBatch
from glinthawk_dask.model.kv_cache import KVCache
assert not cpu_attention._kernel
cpu_attention.warm()
warmed = list(cpu_attention._compile().signatures)
cfg = from_name("tiny-gqa")
h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
cache = KVCache(cfg, n_slots=4, max_seq_len=16, layer_stop=1, dtype=torch.float32)
for s in range(3):
    cache.allocate(s, s)
for slots, starts, counts in (([0, 1, 2], [0, 0, 0], [3, 2, 4]), ([0, 1, 2], [3, 2, 4], [1, 1, 1]),
                              ([0, 1, 2], [4, 3, 5], [1, 3, 1])):
    t = sum(counts)
    cache.attend(0, torch.randn(t, h, d), torch.randn(t, kvh, d), torch.randn(t, kvh, d),
                 AttentionBatch.build(slots, starts, counts))
print(len(warmed), len(cpu_attention._compile().signatures))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_a_compiled_cache_opens_unwritten_and_reads_only_what_it_wrote():
    """A float32 CPU cache is opened without zeroing (``torch.empty``): its reads stop at
    each slot's length.  Filled with NaN where nothing was written, a prefill step
    (fresh prompts, one chunk past the bound), a decode step and a mixed step with a
    reused slot give exactly a zeroed cache's outputs."""
    from glinthawk_dask.model.attention import GROUP_PREFILL_MAX

    torch.manual_seed(4)
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    seq = GROUP_PREFILL_MAX + 32
    steps = [  # (slots, starts, counts)
        ([0, 1, 2], [0, 0, 0], [5, 1, GROUP_PREFILL_MAX + 3]),  # slot 2's chunk ends past the bound
        ([0, 1, 2], [5, 1, GROUP_PREFILL_MAX + 3], [1, 1, 1]),
        ([0, 1, 2], [6, 2, GROUP_PREFILL_MAX + 4], [3, 1, 2]),
    ]
    data = [tuple(torch.randn(sum(c), *shape) for shape in ((h, d), (kvh, d), (kvh, d))) for _, _, c in steps]
    out = {}
    for name, zeroed in (("unwritten", False), ("zeroed", True)):
        cache = KVCache(cfg, n_slots=4, max_seq_len=seq, layer_stop=1, zeroed=zeroed)
        assert cache.compiled
        if not zeroed:
            cache.k.fill_(float("nan"))
            cache.v.fill_(float("nan"))
        for s in range(3):
            cache.allocate(s, s)
        outs = []
        for i, ((slots, starts, counts), (q, k, v)) in enumerate(zip(steps, data)):
            if i == 2:  # slot 1 finished; its slot goes to a new sequence, written from 0
                cache.apply([1], [("new", 1)])
                starts = [starts[0], 0, starts[2]]
            outs.append(cache.attend(0, q, k, v, AttentionBatch.build(slots, starts, counts)))
        out[name] = outs
    for a, b in zip(out["unwritten"], out["zeroed"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_caches_the_torch_kernels_serve_start_zeroed(monkeypatch):
    """The torch kernels read past a slot's length under a mask: bfloat16 caches, and
    float32 ones while the torch kernel is asked for, start at zero."""
    cfg = from_name("tiny-gqa")
    assert KVCache(cfg, n_slots=2, max_seq_len=8).compiled
    bf16 = KVCache(cfg, n_slots=2, max_seq_len=8, dtype=torch.bfloat16)
    monkeypatch.setenv("GLINTHAWK_TORCH_ATTENTION", "1")
    switched = KVCache(cfg, n_slots=2, max_seq_len=8)
    for cache in (bf16, switched):
        assert not cache.compiled
        assert not cache.k.any() and not cache.v.any()


def test_a_resized_cache_attends_bit_for_bit_as_before(kernel):
    """Shrinking a cache moves its live sequences into the slots kept, and growing it
    adds free slots: every sequence's next steps give exactly the outputs the cache of
    the old size gives, and the free slots are the new ones."""
    torch.manual_seed(3)
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def step(cache, slots, starts, counts, qkv):
        batch = AttentionBatch.build(slots, starts, counts)
        return [cache.attend(layer, *qkv, batch) for layer in range(cfg.n_layers)]

    same, resized = (KVCache(cfg, n_slots=6, max_seq_len=24) for _ in range(2))
    lens = [5, 3, 7]
    for cache in (same, resized):
        for seq in ("a", "b", "c", "x"):
            cache.allocate(seq)
        cache.free("b")
    torch.manual_seed(4)
    first = [torch.randn(sum(lens), n, d) for n in (h, kvh, kvh)]
    for cache in (same, resized):  # a, c and x prefill in slots 0, 2 and 3
        step(cache, [0, 2, 3], [0, 0, 0], lens, first)
    resized.resize(3, [("x", 1)])  # slot 2 stays, 3 moves into 1: three slots left
    assert resized.n_slots == 3 and resized.slot_of("x") == 1 and resized.n_free == 0
    assert resized.capacity_bytes == same.capacity_bytes // 2 and resized.used_bytes == same.used_bytes
    with pytest.raises(KVCacheError):
        resized.resize(2)  # (three live sequences do not fit two slots)
    for n_new in (1, 1, 4):  # two decode steps, then a chunk each
        qkv = [torch.randn(3 * n_new, n, d) for n in (h, kvh, kvh)]
        starts = [same.length(s) for s in ("a", "c", "x")]
        want = step(same, [0, 2, 3], starts, [n_new] * 3, qkv)
        got = step(resized, [0, 2, 1], starts, [n_new] * 3, qkv)
        for w, g in zip(want, got):
            assert torch.equal(w, g)
        if n_new == 1 and resized.n_slots == 3:
            resized.resize(5)  # grows: slots 3 and 4 are new and free
            assert resized.n_slots == 5 and resized.n_free == 2 and resized.allocate("y") == 3
            resized.free("y")
    assert [resized.length(s) for s in ("a", "c", "x")] == [same.length(s) for s in ("a", "c", "x")]


def test_a_sequence_exported_and_restored_elsewhere_attends_bit_for_bit_as_before(kernel):
    """A sequence's K/V taken out of a cache (its slot freed) and restored into another
    slot, of another cache, gives exactly the attention outputs it would have given."""
    torch.manual_seed(5)
    cfg = from_name("tiny-gqa")
    h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same, other = KVCache(cfg, n_slots=4, max_seq_len=24), KVCache(cfg, n_slots=3, max_seq_len=24)
    for cache in (same, other):
        cache.allocate("x", 1)
    qkv = [torch.randn(6, n, d) for n in (h, kvh, kvh)]
    for cache in (same, other):
        for layer in range(cfg.n_layers):
            cache.attend(layer, *qkv, AttentionBatch.build([1], [0], [6]))
    k, v = other.export("x")
    assert k.shape == (cfg.n_layers, kvh, 6, d)
    other.free("x")
    other.restore("x", 2, k, v)
    with pytest.raises(KVCacheError):
        other.restore("y", 0, k[:, :1], v[:, :1])  # (not the cache's heads)
    assert other.length("x") == 6 and other.slot_of("x") == 2
    for start in (6, 7):
        qkv = [torch.randn(1, n, d) for n in (h, kvh, kvh)]
        for layer in range(cfg.n_layers):
            want = same.attend(layer, *qkv, AttentionBatch.build([1], [start], [1]))
            assert torch.equal(other.attend(layer, *qkv, AttentionBatch.build([2], [start], [1])), want)
