"""Tier-2 attention math: the layout of a micro-batch and attention over cached K/V.

A micro-batch is a list of *segments*, one per sequence: ``count`` new tokens of the
sequence in KV slot ``slot`` at positions ``[start, start + count)``.  Tokens are laid
end to end in segment order (``T = sum(counts)`` rows).  Segments with one token
(decode, or the last token of a prefill) go through a batched kernel; longer ones
(prefill chunks) with a causal mask: short ones of similar sizes together, padded to
the longest (:class:`PrefillGroup`), the others per sequence.  Where the compiled CPU
kernel serves the cache (:mod:`~.cpu_attention`), it takes the short chunks too, each
token as a query of its own over the positions up to its own (``kernel_rows``).

GQA never materializes repeated K/V: query heads are grouped per KV head
(``[.., KVH, G, D]``) and each group attends to its KV head directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["AttentionBatch", "PrefillGroup", "decode_attention", "prefill_attention", "grouped_prefill_attention"]

# Prefill segments ending at most this many positions into their sequence are computed
# together (padded to the longest); longer ones one by one, where padding would cost more
# than the calls it saves.  Per sequence, each segment cost about 0.1 ms of calls a layer
# on the 2-core VM: 512 prompts of 10 tokens spent 1.1 s of a 5.7 s run there.  The
# compiled CPU kernel takes these segments token by token instead: on one core it ran
# 256 prompts of 10 tokens in 1.6 ms against 14 ms grouped, 64 of 128 in 52 against 111,
# 4 of 256 in 12 against 18 (and 2 of 200 alike), so one bound serves both.
GROUP_PREFILL_MAX = 256


def _short(start: int, count: int) -> bool:
    """Whether a prefill segment ends within :data:`GROUP_PREFILL_MAX` positions."""
    return start + count <= GROUP_PREFILL_MAX


@dataclass(frozen=True)
class PrefillGroup:
    """Short prefill segments of a micro-batch, laid out to be computed together.

    ``rows`` [P, C]: the row of each segment's i-th token (padding repeats its first
    row); ``valid`` [P, C]: which of them are real; ``slots`` [P]; ``masked`` [P, C, L]:
    True where a key position is not attended (after the query's own position), with
    ``L`` the largest end of the segments; ``out_rows`` [N]: the real rows in
    ``rows[valid]`` order."""

    rows: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor
    masked: torch.Tensor
    out_rows: torch.Tensor
    length: int

    @classmethod
    def build(cls, segments: Sequence[tuple[int, int, int, int]], device: torch.device | str) -> "PrefillGroup":
        """The group of ``segments`` ``(row, slot, start, count)``."""
        c = max(s[3] for s in segments)
        length = max(s[2] + s[3] for s in segments)
        rows = torch.tensor([[row + i if i < count else row for i in range(c)] for row, _, _, count in segments],
                            dtype=torch.long, device=device)  # [P, C]
        valid = torch.tensor([[i < count for i in range(c)] for *_, count in segments], device=device)  # [P, C]
        qpos = torch.tensor([[start + i for i in range(c)] for _, _, start, _ in segments], device=device)  # [P, C]
        masked = torch.arange(length, device=device)[None, None, :] > qpos[:, :, None]  # [P, C, L]
        slots = torch.tensor([s[1] for s in segments], dtype=torch.long, device=device)  # [P]
        return cls(rows=rows, valid=valid, slots=slots, masked=masked, out_rows=rows[valid], length=length)


@dataclass(frozen=True)
class AttentionBatch:
    """Segments of a micro-batch and the index tensors derived from them.

    Build with :meth:`build`.  ``slots``, ``starts`` and ``counts`` are plain ints so the
    layout can be sent over the network as-is; the tensors are derived.
    """

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    token_slots: torch.Tensor  # [T] KV slot of each token
    positions: torch.Tensor  # [T] position of each token in its sequence
    decode_rows: torch.Tensor  # [Nd] rows of single-token segments
    decode_slots: torch.Tensor  # [Nd]
    decode_lengths: torch.Tensor  # [Nd] attended length (start + 1)
    decode_range: tuple[int, int] | None  # (lo, hi) if decode slots are dense in [lo, hi)
    prefill_segments: tuple[tuple[int, int, int, int], ...]  # (row, slot, start, count) of longer segments
    max_position: int = -1  # the largest position, known on the host (no device sync to check it)
    # Derived once per step for every layer that attends with this layout:
    decode_span: int = 0  # max(decode_lengths), on the host
    range_index: torch.Tensor | None = None  # [Nd] row of each decode slot in [lo, hi) (decode_range only)
    range_lengths: torch.Tensor | None = None  # [hi - lo] attended lengths, 1 for slots not in the batch
    range_masked: torch.Tensor | None = None  # [hi - lo, decode_span] True where a position is not attended
    all_decode_in_range_order: bool = False  # every token is a decode row and the rows are slots lo..hi-1
    # For the compiled CPU kernel (batches built on the CPU): every row it computes, as a
    # query of its own (decode rows and the rows of prefill segments ending within
    # GROUP_PREFILL_MAX), in row order, its slot and attended length (its position + 1);
    # and the longer segments.
    kernel_rows: torch.Tensor | None = None  # [Nk]
    kernel_slots: torch.Tensor | None = None  # [Nk]
    kernel_lengths: torch.Tensor | None = None  # [Nk]
    kernel_all_rows: bool = False  # kernel_rows is every row, 0..T-1
    prefill_long: tuple[tuple[int, int, int, int], ...] = ()  # (row, slot, start, count), ending past the bound

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    @functools.cached_property
    def _torch_prefill(self) -> tuple[tuple[PrefillGroup, ...], tuple[tuple[int, int, int, int], ...]]:
        # laid out on first use: caches the compiled kernel serves never need it
        grouped, alone = _prefill_groups(list(self.prefill_segments))
        return tuple(PrefillGroup.build(g, self.positions.device) for g in grouped), tuple(alone)

    @property
    def prefill_groups(self) -> tuple[PrefillGroup, ...]:
        """Short prefill segments, computed together by the torch kernels (not in :attr:`prefill`)."""
        return self._torch_prefill[0]

    @property
    def prefill(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(row, slot, start, count)`` of the prefill segments the torch kernels compute one by one."""
        return self._torch_prefill[1]

    @classmethod
    def build(
        cls,
        slots: Sequence[int],
        starts: Sequence[int],
        counts: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> "AttentionBatch":
        if not (len(slots) == len(starts) == len(counts)):
            raise ValueError("slots, starts and counts must have the same length")
        if any(c <= 0 for c in counts) or any(s < 0 for s in starts):
            raise ValueError("segment counts must be positive and starts non-negative")
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one micro-batch")
        slots, starts, counts = tuple(map(int, slots)), tuple(map(int, starts)), tuple(map(int, counts))
        token_slots: list[int] = []
        positions: list[int] = []
        dec_rows, dec_slots, dec_lens = [], [], []
        k_rows, k_slots, k_lens = [], [], []
        prefill, prefill_long = [], []
        row = 0
        for slot, start, count in zip(slots, starts, counts):
            token_slots.extend([slot] * count)
            positions.extend(range(start, start + count))
            if count == 1:
                dec_rows.append(row)
                dec_slots.append(slot)
                dec_lens.append(start + 1)
            else:
                prefill.append((row, slot, start, count))
            if count == 1 or _short(start, count):
                k_rows.extend(range(row, row + count))
                k_slots.extend([slot] * count)
                k_lens.extend(range(start + 1, start + count + 1))
            else:
                prefill_long.append((row, slot, start, count))
            row += count

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        decode_span = max(dec_lens, default=0)
        decode_range = range_index = range_lengths = range_masked = None
        in_order = False
        if dec_slots:
            lo, hi = min(dec_slots), max(dec_slots) + 1
            if hi - lo <= 2 * len(dec_slots):
                decode_range = (lo, hi)
                range_index = t([s - lo for s in dec_slots])
                lengths = [1] * (hi - lo)  # rows of slots not in the batch: a dummy length, dropped
                for s, n in zip(dec_slots, dec_lens):
                    lengths[s - lo] = n
                range_lengths = t(lengths)
                range_masked = _masked(range_lengths, decode_span)
                in_order = len(dec_rows) == row and dec_slots == list(range(lo, hi))

        return cls(
            slots=slots, starts=starts, counts=counts,
            token_slots=t(token_slots), positions=t(positions),
            decode_rows=t(dec_rows), decode_slots=t(dec_slots), decode_lengths=t(dec_lens),
            decode_range=decode_range, prefill_segments=tuple(prefill),
            max_position=max((s + c - 1 for s, c in zip(starts, counts)), default=-1),
            decode_span=decode_span, range_index=range_index, range_lengths=range_lengths,
            range_masked=range_masked,
            all_decode_in_range_order=in_order,
            **({"kernel_rows": t(k_rows), "kernel_slots": t(k_slots), "kernel_lengths": t(k_lens),
                "kernel_all_rows": len(k_rows) == row} if torch.device(device).type == "cpu" else {}),
            prefill_long=tuple(prefill_long),
        )


def _prefill_groups(segments: list[tuple[int, int, int, int]]):
    """``(groups, alone)``: the segments ``(row, slot, start, count)`` that end within
    :data:`GROUP_PREFILL_MAX` positions, in groups of two or more whose padded work
    (segments x longest chunk x furthest end) is at most twice their own (each chunk x
    its end), taken in order of their ends; and the rest, one by one.  (Padded to one
    group, a chunk ending at 250 beside sixty fresh prompts of 4 tokens would have cost
    30 times the work.)"""
    short = sorted((s for s in segments if _short(s[2], s[3])), key=lambda s: (s[2] + s[3], s[3]))
    groups: list[list[tuple[int, int, int, int]]] = []
    cur: list[tuple[int, int, int, int]] = []
    c = end = real = 0
    for seg in short:
        c1, end1, real1 = max(c, seg[3]), max(end, seg[2] + seg[3]), real + seg[3] * (seg[2] + seg[3])
        if cur and (len(cur) + 1) * c1 * end1 > 2 * real1:
            groups.append(cur)
            cur, c1, end1, real1 = [], seg[3], seg[2] + seg[3], seg[3] * (seg[2] + seg[3])
        cur.append(seg)
        c, end, real = c1, end1, real1
    if cur:
        groups.append(cur)
    together = [g for g in groups if len(g) >= 2]  # one segment alone: no calls to save
    taken = {seg for g in together for seg in g}
    alone = [seg for seg in segments if seg not in taken]
    return together, alone


def _masked(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L] True at positions ≥ each sequence's length (not attended)."""
    return torch.arange(length, device=lengths.device)[None, :] >= lengths[:, None]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence against its cached keys/values.

    q: [B, H, D]; k_cache, v_cache: [B, KVH, L, D] (L ≥ max(lengths), may be a strided
    view of a larger cache); lengths: [B] → o [B, H, D].  Positions ≥ length are masked
    (``masked`` [B, L], when the caller has it already: ``_masked(lengths, L)``).
    """
    b, h, d = q.shape
    kvh, length = k_cache.shape[1], k_cache.shape[2]
    qg = q.view(b, kvh, h // kvh, d)  # [B, KVH, G, D]
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * d**-0.5  # [B, KVH, G, L]
    if masked is None:
        masked = _masked(lengths, length)  # [B, L]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [B, KVH, G, L]
    return torch.matmul(probs, v_cache).view(b, h, d)  # [B, H, D]


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int
) -> torch.Tensor:
    """Causal attention of a chunk of one sequence.

    q: [C, H, D] for positions [start, start + C); k_cache, v_cache: [KVH, L, D] with
    L = start + C (keys of the chunk already written) → o [C, H, D].
    """
    c, h, d = q.shape
    kvh, length = k_cache.shape[0], k_cache.shape[1]
    g = h // kvh
    qg = q.view(c, kvh, g, d).permute(1, 2, 0, 3).reshape(kvh, g * c, d)  # [KVH, G*C, D]
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * d**-0.5  # [KVH, G*C, L]
    qpos = torch.arange(start, start + c, device=q.device)  # [C]
    masked = torch.arange(length, device=q.device)[None, :] > qpos[:, None]  # [C, L]
    scores = scores.view(kvh, g, c, length).masked_fill(masked, float("-inf"))  # [KVH, G, C, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(probs.view(kvh, g * c, length), v_cache)  # [KVH, G*C, D]
    return o.view(kvh, g, c, d).permute(2, 0, 1, 3).reshape(c, h, d)  # [C, H, D]


def grouped_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: PrefillGroup
) -> torch.Tensor:
    """Causal attention of a group of short prefill chunks at once, each against its
    own sequence's cached keys/values (the chunks' keys already written).

    q: [T, H, D] (the micro-batch's rows); k_cache, v_cache: [S, KVH, Lc, D], every
    slot's cache → o [N, H, D] for ``group.out_rows``.
    """
    p, c = group.rows.shape
    h, d = q.shape[1], q.shape[2]
    kvh = k_cache.shape[1]
    g = h // kvh
    qg = q[group.rows].view(p, c, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(p, kvh, g * c, d)  # [P, KVH, G*C, D]
    ks = k_cache[group.slots, :, : group.length]  # [P, KVH, L, D]
    vs = v_cache[group.slots, :, : group.length]
    scores = torch.matmul(qg, ks.transpose(-1, -2)) * d**-0.5  # [P, KVH, G*C, L]
    scores = scores.view(p, kvh, g, c, group.length).masked_fill(group.masked[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [P, KVH, G, C, L]
    o = torch.matmul(probs.view(p, kvh, g * c, group.length), vs)  # [P, KVH, G*C, D]
    o = o.view(p, kvh, g, c, d).permute(0, 3, 1, 2, 4).reshape(p, c, h, d)  # [P, C, H, D]
    return o[group.valid]  # [N, H, D], in out_rows order
