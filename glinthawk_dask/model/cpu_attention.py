"""Decode attention on the CPU, read straight from the KV slots (compiled with Numba).

The attention tier spends its time in one operation: a query token per sequence against
that sequence's cached keys and values.  With GQA the batched matmuls behind
:func:`~.attention.decode_attention` are a few hundred tiny ``[G, D] x [D, L]`` products
(``G`` query heads per KV head; 3 for SmolLM2), and the BLAS pays its per-call overhead
on each: on one core of the development VM, 64 sequences of 140 cached tokens took
1.3-2.3 ms a layer.  This kernel walks each sequence's slot once for the scores and once
for the weighted values, only up to that sequence's length, with no gather and no mask,
and computes the softmax in between with a vectorized exponential: the same layer takes
0.56-0.87 ms (``benchmarks/bench_attention_kernel.py``).

Each ``(sequence, KV head)`` is computed start to end by one thread in a fixed order, so
the result does not depend on how many threads share the work: every engine that
attends through :class:`~.kv_cache.KVCache` gets the same bits for the same inputs.
With ``threads`` > 1 the sequences are split in contiguous ranges of equal work over a
small pool of threads (the kernel releases the GIL); small batches stay on the calling
thread.  Results equal :func:`~.attention.decode_attention`'s to float rounding (the
order of the sums, and an exponential within 2 ulp of torch's).

Only float32 caches on the CPU use it (:meth:`~.kv_cache.KVCache.compiled_for`); other
dtypes and devices, and a machine without Numba, use :func:`~.attention.decode_attention`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from typing import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "decode_attention_slots", "warm"]

# Below this many cached positions to read (sum of lengths x KV heads), a split over
# threads costs more in hand-overs than it saves: about 0.1 ms of work on one core.
PARALLEL_MIN_POSITIONS = 24_576

_kernel: Callable | None = None  # compiled on first use
_missing = False  # Numba could not be imported
_compile_lock = threading.Lock()


def _compile() -> Callable | None:
    """The kernel, compiled (from Numba's on-disk cache after the first time), or
    None where Numba is missing.  Imported lazily: Numba takes a second to import."""
    global _kernel, _missing
    if _kernel is not None or _missing:
        return _kernel
    with _compile_lock:
        if _kernel is None and not _missing:
            _kernel, _missing = _build()
    return _kernel


def _build() -> tuple[Callable | None, bool]:
    try:  # Numba is a dependency; a platform without its wheels keeps the torch kernel
        import numba
    except ImportError:  # pragma: no cover - exercised only where Numba is missing
        logger.warning("Numba is not installed: decode attention uses the torch kernel")
        return None, True
    # Reassociation lets LLVM vectorize the dot products over D; the order within a
    # (sequence, head) is still fixed by the code, the same on every call.
    jit = numba.njit(fastmath={"reassoc", "nsz", "contract"}, nogil=True, boundscheck=False,
                     error_model="numpy", cache=True)

    @jit
    def attend(q, kc, vc, slots, lengths, scale, lo, hi, out):  # pragma: no cover - compiled
        # q [B, KVH, G, D]; kc, vc [S, KVH, L, D]; slots, lengths [B]; out [B, KVH, G, D]:
        # for b in [lo, hi), out[b, h, g] = softmax(q[b, h, g] . kc[slot, h, :n] * scale) @ vc[slot, h, :n]
        # with slot = slots[b], n = lengths[b].
        _, kvh, g_n, d_n = q.shape
        span = 1
        for b in range(lo, hi):
            span = max(span, lengths[b])
        s = np.empty((g_n, span), np.float32)  # [G, n] scores, then probabilities
        bits = np.empty(span, np.int32)  # 2**t of each exp, built as float32 bit patterns
        scale2 = bits.view(np.float32)
        for b in range(lo, hi):
            slot = slots[b]
            n = lengths[b]
            for h in range(kvh):
                k = kc[slot, h]  # [L, D]
                v = vc[slot, h]
                qq = q[b, h]  # [G, D]
                for pos in range(n):
                    kl = k[pos]
                    for g in range(g_n):
                        acc = np.float32(0.0)
                        for d in range(d_n):
                            acc += qq[g, d] * kl[d]
                        s[g, pos] = acc * scale
                for g in range(g_n):
                    row = s[g]
                    top = row[0]
                    for pos in range(1, n):
                        top = max(top, row[pos])
                    # exp(x) = 2**t * exp(r), x = t ln2 + r, |r| <= ln2 / 2 (Cephes' expf:
                    # a degree-6 polynomial, within 2 ulp); x below -87 is taken as -87
                    # (1.6e-38 instead of less, next to the row's largest term, 1).
                    for pos in range(n):
                        x = max(row[pos] - top, np.float32(-87.0))
                        t = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
                        r = x - t * np.float32(0.693359375) - t * np.float32(-2.12194440e-4)
                        p = np.float32(1.9875691500e-4)
                        p = p * r + np.float32(1.3981999507e-3)
                        p = p * r + np.float32(8.3334519073e-3)
                        p = p * r + np.float32(4.1665795894e-2)
                        p = p * r + np.float32(1.6666665459e-1)
                        p = p * r + np.float32(5.0000001201e-1)
                        row[pos] = p * r * r + r + np.float32(1.0)
                        bits[pos] = (np.int32(t) + np.int32(127)) << 23
                    total = np.float32(0.0)
                    for pos in range(n):
                        row[pos] *= scale2[pos]
                        total += row[pos]
                    inv = np.float32(1.0) / total
                    for pos in range(n):
                        row[pos] *= inv
                o = out[b, h]  # [G, D]
                for g in range(g_n):
                    for d in range(d_n):
                        o[g, d] = 0.0
                for pos in range(n):
                    vl = v[pos]
                    for g in range(g_n):
                        w = s[g, pos]
                        for d in range(d_n):
                            o[g, d] += w * vl[d]

    # Compile now, on a tiny problem, so that no run's first step pays for it.
    q = torch.zeros(1, 1, 1)
    cache = torch.zeros(1, 1, 1, 1)
    _attend(attend, q, cache, cache, torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1)
    return attend, False


def available() -> bool:
    """Whether the compiled kernel serves this process: Numba is installed and the
    environment does not ask for the torch kernel (``GLINTHAWK_TORCH_ATTENTION=1``, for
    comparisons)."""
    return os.environ.get("GLINTHAWK_TORCH_ATTENTION", "") in ("", "0") and _compile() is not None


def warm() -> None:
    """Compile the kernel for the tensors a KV cache passes it (or load it from Numba's
    cache: about a second here, Numba's import included), so that a run's first decode
    step does not.  Nothing where the kernel does not serve."""
    if not available():
        return
    q = torch.zeros(1, 2, 4)  # [B, H, D], as a request's rows
    kv = torch.zeros(1, 1, 2, 4)  # [S, KVH, L, D], one layer of a cache
    one = torch.ones(1, dtype=torch.int64)  # [B]
    decode_attention_slots(q, kv, kv, one - 1, one, 1)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _helpers(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of at least ``n`` helper threads, shared by every caller in the process."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="glinthawk-attention")
            _pool_size = n
        return _pool


def _split(kernel: Callable, args: tuple, lengths: np.ndarray, kvh: int, threads: int) -> None:
    """Run ``kernel(*args, lo, hi, out)`` over ``[0, B)``: on this thread, or in ``threads``
    contiguous ranges of about equal work (cached positions) on the pool and this thread."""
    *head, out = args
    b = len(lengths)
    work = int(lengths.sum())
    if threads <= 1 or b < 2 or work * kvh < PARALLEL_MIN_POSITIONS:
        kernel(*head, 0, b, out)
        return
    threads = min(threads, b)
    cuts = np.searchsorted(np.cumsum(lengths), [work * i / threads for i in range(1, threads)], side="left")
    bounds = [0, *(int(c) + 1 for c in cuts), b]
    ranges = [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    pool = _helpers(len(ranges) - 1)
    futures = [pool.submit(kernel, *head, lo, hi, out) for lo, hi in ranges[1:]]
    kernel(*head, *ranges[0], out)
    for f in futures:
        f.result()


def decode_attention_slots(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    threads: int = 1,
) -> torch.Tensor:
    """One query token per sequence against its slot's cached keys/values.

    q: [B, H, D]; k_cache, v_cache: [S, KVH, L, D] (one layer of a :class:`~.kv_cache.KVCache`);
    slots, lengths: [B] (int64; each sequence's slot and attended length, ≤ L) → o [B, H, D].
    Equal to :func:`~.attention.decode_attention` on the gathered slots up to float
    rounding.  ``threads`` > 1 splits the sequences over that many threads (the result is
    the same bits).  float32 tensors on the CPU only.
    """
    kernel = _compile()
    if kernel is None:
        raise RuntimeError("the compiled decode kernel needs Numba: pip install numba")
    return _attend(kernel, q, k_cache, v_cache, slots, lengths, threads)


def _attend(attend: Callable, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
            lengths: torch.Tensor, threads: int) -> torch.Tensor:
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    if b == 0:
        return q.new_empty((0, h, d))
    qn = q.detach().contiguous().view(b, kvh, h // kvh, d).numpy()  # [B, KVH, G, D]
    kn, vn = k_cache.detach().numpy(), v_cache.detach().numpy()  # [S, KVH, L, D]
    ln = lengths.numpy()
    out = np.empty((b, kvh, h // kvh, d), np.float32)  # [B, KVH, G, D]
    _split(attend, (qn, kn, vn, slots.numpy(), ln, np.float32(d**-0.5), out), ln, kvh, threads)
    return torch.from_numpy(out).view(b, h, d)
