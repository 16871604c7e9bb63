"""The tier-2 KV cache: preallocated per-sequence slots for a slice of layers.

One :class:`KVCache` lives on each attention worker (or on the dense worker in
single-tier mode).  It holds K and V for layers ``[layer_start, layer_stop)`` of
``n_slots`` sequences of up to ``max_seq_len`` tokens each, in one preallocated block
per tensor, so its memory is fixed when it is created (until :meth:`~KVCache.resize`
copies the live tokens into a block of another size) and admission control is a matter
of counting free slots.  Sequences allocate a slot, append tokens as they are
attended, and free the slot when they finish; the next sequence reuses it at once.

Layout per layer: ``[n_slots, KVH, max_seq_len, D]``.  A contiguous range of slots is
a strided view, so a micro-batch's decode attention reads K/V in place, without a
gather.

A float32 cache on the CPU is served by the compiled kernel of :mod:`~.cpu_attention`
(on ``threads`` threads; decided when the cache opens, for its life): decode rows and
short prefill chunks through the kernel, longer chunks through torch's
``prefill_attention`` over their own written positions.  Every read stops at a slot's
length, so its memory is taken with ``torch.empty``: opening a cache costs nothing
(zeroing 1.5 GB took 0.6 s here), and pages never written are not committed by the OS.
Other caches use the torch kernels of :mod:`~.attention`, which read padded spans past
a slot's length, where an unwritten NaN would poison the weighted sum even under the
mask: they start zeroed.
"""

from __future__ import annotations

from typing import Hashable

import numpy as np
import torch

from . import cpu_attention
from .attention import AttentionBatch, decode_attention, grouped_prefill_attention, prefill_attention
from .config import ModelConfig

__all__ = ["KVCache", "KVCacheFullError", "KVCacheError"]


class KVCacheError(RuntimeError):
    """A request to the cache is inconsistent with its state (a protocol bug or a stale message)."""


class KVCacheFullError(KVCacheError):
    """No free slot: the caller must wait for a sequence to finish."""


class KVCache:
    """K/V storage and attention for ``n_slots`` sequences over a slice of layers."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        max_seq_len: int,
        *,
        layer_start: int = 0,
        layer_stop: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        threads: int | None = 1,
        zeroed: bool = False,
    ) -> None:
        """``zeroed``: start every position at zero even where no read goes past a
        slot's length (for callers that attend over positions they never wrote, as a
        microbenchmark setting lengths does)."""
        layer_stop = config.n_layers if layer_stop is None else layer_stop
        if not 0 <= layer_start < layer_stop <= config.n_layers:
            raise ValueError(f"bad layer range [{layer_start}, {layer_stop})")
        if n_slots <= 0 or max_seq_len <= 0:
            raise ValueError("n_slots and max_seq_len must be positive")
        self.config = config
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len
        self.layer_start = layer_start
        self.layer_stop = layer_stop
        self.dtype = dtype
        self.device = torch.device(device)
        # threads of the compiled CPU decode kernel; None: torch's intra-op count at each call
        self.threads = threads
        shape = (layer_stop - layer_start, n_slots, config.n_kv_heads, max_seq_len, config.head_dim)
        self.compiled = self.compiled_for(dtype, self.device)  # every read within a slot's length
        self._alloc = torch.empty if self.compiled and not zeroed else torch.zeros  # (resize allocates alike)
        self.k = self._alloc(shape, dtype=dtype, device=self.device)  # [Ll, S, KVH, L, D]
        self.v = self._alloc(shape, dtype=dtype, device=self.device)  # [Ll, S, KVH, L, D]
        self.lengths = np.zeros(n_slots, dtype=np.int64)  # tokens cached per slot
        self._slot_of: dict[Hashable, int] = {}
        self._owner: list[Hashable | None] = [None] * n_slots
        self._free: list[int] = list(range(n_slots - 1, -1, -1))  # pop() gives the lowest

    @staticmethod
    def compiled_for(dtype: torch.dtype, device: torch.device | str) -> bool:
        """Whether the compiled kernel serves a cache of ``dtype`` on ``device`` opened now
        (float32 on the CPU, Numba there and not switched off)."""
        return torch.device(device).type == "cpu" and dtype == torch.float32 and cpu_attention.available()

    # -- accounting ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.layer_stop - self.layer_start

    @property
    def bytes_per_token(self) -> int:
        """K+V bytes of one token over this cache's layers."""
        return self.config.kv_bytes_per_token(self.k.element_size(), self.n_layers)

    @property
    def capacity_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def used_bytes(self) -> int:
        """Bytes holding tokens of live sequences."""
        return int(self.lengths.sum()) * self.bytes_per_token

    @property
    def n_free(self) -> int:
        return len(self._free)

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._slot_of

    def __repr__(self) -> str:
        return (
            f"<KVCache layers [{self.layer_start}, {self.layer_stop}) slots {len(self)}/{self.n_slots} "
            f"max_seq_len {self.max_seq_len} {self.dtype} {self.device}>"
        )

    # -- slots ---------------------------------------------------------------------
    def allocate(self, seq_id: Hashable, slot: int | None = None) -> int:
        """Give ``seq_id`` a slot (the lowest free one, or ``slot`` if given) and return it."""
        if seq_id in self._slot_of:
            raise KVCacheError(f"sequence {seq_id!r} already holds slot {self._slot_of[seq_id]}")
        if slot is None:
            if not self._free:
                raise KVCacheFullError(f"all {self.n_slots} KV slots are in use")
            slot = self._free.pop()
        else:
            if not 0 <= slot < self.n_slots or self._owner[slot] is not None:
                raise KVCacheError(f"slot {slot} is not free")
            self._free.remove(slot)
        self._slot_of[seq_id] = slot
        self._owner[slot] = seq_id
        self.lengths[slot] = 0
        return slot

    def free(self, seq_id: Hashable) -> None:
        """Release the slot of ``seq_id``; its tokens are forgotten."""
        slot = self._slot_of.pop(seq_id, None)
        if slot is None:
            raise KVCacheError(f"sequence {seq_id!r} holds no slot")
        self._owner[slot] = None
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)

    def apply(self, released: list, admitted: list) -> None:
        """Free ``released`` sequences, then give each ``(seq_id, slot)`` of ``admitted``
        its slot; a sequence admitted again (a replayed step) starts over."""
        for seq_id in released:
            if seq_id in self._slot_of:
                self.free(seq_id)
        for seq_id, slot in admitted:
            if seq_id in self._slot_of:
                self.free(seq_id)
            self.allocate(seq_id, slot)

    def resize(self, n_slots: int, moves: list | tuple = ()) -> None:
        """Hold ``n_slots`` slots from now on (fewer or more): each ``(seq_id, slot)`` of
        ``moves`` first takes that slot, and every live sequence must then be below
        ``n_slots``.  The live tokens' K/V are copied, bit for bit, into a new block of
        the new size (the old one is freed), so attention over them is what it was."""
        if n_slots <= 0:
            raise ValueError("n_slots must be positive")
        target = dict(self._slot_of)
        for seq_id, slot in moves:
            if seq_id not in target:
                raise KVCacheError(f"sequence {seq_id!r} holds no slot")
            target[seq_id] = int(slot)
        if len(set(target.values())) != len(target) or any(not 0 <= t < n_slots for t in target.values()):
            raise KVCacheError(f"the live sequences do not fit {n_slots} slots as moved: {sorted(target.values())}")
        shape = (self.n_layers, n_slots, *self.k.shape[2:])
        k = self._alloc(shape, dtype=self.dtype, device=self.device)  # [Ll, S', KVH, L, D]
        v = self._alloc(shape, dtype=self.dtype, device=self.device)
        lengths = np.zeros(n_slots, dtype=np.int64)
        for seq_id, new in target.items():  # the written positions of each live slot
            old = self._slot_of[seq_id]
            n = int(self.lengths[old])
            k[:, new, :, :n] = self.k[:, old, :, :n]
            v[:, new, :, :n] = self.v[:, old, :, :n]
            lengths[new] = n
        self.k, self.v, self.lengths, self.n_slots = k, v, lengths, n_slots
        self._slot_of = target
        self._owner = [None] * n_slots
        for seq_id, slot in target.items():
            self._owner[slot] = seq_id
        self._free = sorted(set(range(n_slots)) - set(target.values()), reverse=True)

    def export(self, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``seq_id``'s cached tokens, copied: ``[Ll, KVH, n, D]`` each (its
        slot stays held: :meth:`free` it)."""
        slot = self._slot_of[seq_id]
        n = int(self.lengths[slot])
        return self.k[:, slot, :, :n].clone(), self.v[:, slot, :, :n].clone()

    def restore(self, seq_id: Hashable, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Give ``seq_id`` ``slot`` holding ``k``/``v`` (``[Ll, KVH, n, D]``, what
        :meth:`export` gave): a sequence taken out comes back, bit for bit."""
        n = k.shape[2]
        want = (self.n_layers, self.k.shape[2], self.k.shape[4])  # Ll, KVH, D
        if k.shape != v.shape or (k.shape[0], k.shape[1], k.shape[3]) != want or n > self.max_seq_len:
            raise KVCacheError(f"K/V of shape {tuple(k.shape)} do not fit this cache")
        self.allocate(seq_id, slot)
        self.k[:, slot, :, :n] = k.to(self.dtype)
        self.v[:, slot, :, :n] = v.to(self.dtype)
        self.lengths[slot] = n

    def slot_of(self, seq_id: Hashable) -> int:
        return self._slot_of[seq_id]

    def length(self, seq_id: Hashable) -> int:
        return int(self.lengths[self._slot_of[seq_id]])

    # -- attention -----------------------------------------------------------------
    def check(self, batch: AttentionBatch) -> None:
        """Validate a micro-batch against the slots: owned, contiguous, within capacity."""
        slots = np.asarray(batch.slots, dtype=np.int64)
        starts = np.asarray(batch.starts, dtype=np.int64)
        ends = starts + np.asarray(batch.counts, dtype=np.int64)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.n_slots):
            raise KVCacheError(f"slot out of range in {batch.slots}")
        if any(self._owner[s] is None for s in batch.slots):
            raise KVCacheError("micro-batch refers to a free slot")
        if np.any(starts > self.lengths[slots]):
            raise KVCacheError("micro-batch would leave a hole in a sequence's cache")
        if np.any(ends > self.max_seq_len):
            raise KVCacheError(f"a sequence would exceed max_seq_len={self.max_seq_len}")

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """Append k/v of ``layer`` for the micro-batch, then attend.

        q: [T, H, D]; k, v: [T, KVH, D] (rotated keys) → o [T, H, D].  The first layer
        of the cache's range validates the batch and advances the sequence lengths.
        """
        li = layer - self.layer_start
        if not 0 <= li < self.n_layers:
            raise KVCacheError(f"layer {layer} is not held here [{self.layer_start}, {self.layer_stop})")
        if li == 0:
            self.check(batch)
            slots = np.asarray(batch.slots, dtype=np.int64)
            ends = np.asarray(batch.starts, dtype=np.int64) + np.asarray(batch.counts, dtype=np.int64)
            self.lengths[slots] = np.maximum(self.lengths[slots], ends)
        kc, vc = self.k[li], self.v[li]  # [S, KVH, L, D]
        kc[batch.token_slots, :, batch.positions] = k.to(self.dtype)  # rows [T, KVH, D]
        vc[batch.token_slots, :, batch.positions] = v.to(self.dtype)
        q = q.to(self.dtype)
        if self.compiled:
            # read from the slots: decode rows and short prefill chunks through the kernel,
            # each row a query over its own positions; longer chunks over their own
            if batch.kernel_rows is None:
                raise KVCacheError(f"a micro-batch laid out for another device than the cache's ({self.device})")
            threads = torch.get_num_threads() if self.threads is None else self.threads
            if batch.kernel_all_rows:
                return cpu_attention.decode_attention_slots(q, kc, vc, batch.kernel_slots, batch.kernel_lengths,
                                                            threads)
            o = torch.empty_like(q)  # [T, H, D]
            if len(batch.kernel_rows):
                o[batch.kernel_rows] = cpu_attention.decode_attention_slots(
                    q[batch.kernel_rows], kc, vc, batch.kernel_slots, batch.kernel_lengths, threads)
            self._prefill_each(kc, vc, q, batch.prefill_long, o)
            return o
        if batch.all_decode_in_range_order:  # the common decode step: q's rows are the range's
            lo, hi = batch.decode_range
            span = batch.decode_span
            return decode_attention(q, kc[lo:hi, :, :span], vc[lo:hi, :, :span], batch.range_lengths,
                                    batch.range_masked)
        o = torch.empty_like(q)  # [T, H, D]
        if len(batch.decode_rows):
            o[batch.decode_rows] = self._decode(kc, vc, q[batch.decode_rows], batch)
        self._prefill(kc, vc, q, batch, o)
        return o

    @staticmethod
    def _prefill(kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, batch: AttentionBatch,
                 o: torch.Tensor) -> None:
        # each longer segment's rows of q [T, H, D] → the same rows of o [T, H, D]
        for group in batch.prefill_groups:  # short ones of similar sizes at once
            o[group.out_rows] = grouped_prefill_attention(q, kc, vc, group)
        KVCache._prefill_each(kc, vc, q, batch.prefill, o)

    @staticmethod
    def _prefill_each(kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor,
                      segments: tuple[tuple[int, int, int, int], ...], o: torch.Tensor) -> None:
        # each segment (row, slot, start, count) on its own: q's rows [C, H, D] → o's
        for row, slot, start, count in segments:
            end = start + count
            o[row : row + count] = prefill_attention(
                q[row : row + count], kc[slot, :, :end], vc[slot, :, :end], start
            )

    def _decode(
        self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        # q: [Nd, H, D] → o [Nd, H, D]
        span = batch.decode_span
        if batch.decode_range is not None:
            # Attend over the whole slot range in place (a strided view, no gather);
            # rows of slots that are not in this batch are computed on a dummy length
            # and dropped.
            lo, hi = batch.decode_range
            idx = batch.range_index  # [Nd]
            qr = q.new_zeros((hi - lo, *q.shape[1:]))  # [R, H, D]
            qr[idx] = q
            o = decode_attention(qr, kc[lo:hi, :, :span], vc[lo:hi, :, :span], batch.range_lengths,
                                 batch.range_masked)
            return o[idx]
        ks = kc[batch.decode_slots, :, :span]  # gathered [Nd, KVH, span, D]
        vs = vc[batch.decode_slots, :, :span]
        return decode_attention(q, ks, vs, batch.decode_lengths)
