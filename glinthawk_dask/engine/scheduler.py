"""Continuous batching over micro-batches: which tokens of which sequences run next.

The scheduler owns sequence state and KV slot assignment, and nothing else: it knows
no tensors and no model.  Each micro-batch owns a fixed, contiguous range of KV slots.
:meth:`BatchScheduler.schedule` admits waiting requests into the micro-batch's free
slots and plans one step: one token for every decoding sequence, then prompt chunks of
prefilling sequences within a token budget (chunked prefill).  After the model has run
the step, :meth:`BatchScheduler.update` appends the sampled tokens, finishes sequences
and frees their slots, so the next request takes a slot at the next step.

A sequence's KV is always a prefix of its tokens (prompt + generated), so a cache lost
with a worker can be rebuilt by resetting ``n_cached`` to 0: the same prefill path
recomputes it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence as Seq

import torch

from ..sampling import SamplingParams, find_stop, make_generator
from .request import FINISH_LENGTH, FINISH_STOP, Completion, Request

__all__ = ["Sequence", "Step", "BatchScheduler"]


@dataclass(eq=False)
class Sequence:
    """Runtime state of one request: its tokens, KV slot and progress."""

    request: Request
    micro_batch: int
    slot: int
    token_ids: list[int]  # prompt + generated
    n_prompt: int
    generator: torch.Generator | None
    n_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    text: str = ""  # completion text so far (only tracked with stop strings)
    t_arrival: float = 0.0  # time.perf_counter() when the request was queued
    t_first: float | None = None  # ... when its first token was sampled
    readmit: bool = False  # its KV was lost: admit it again with the next step

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.n_prompt :]

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < self.n_prompt


@dataclass
class Step:
    """One step of one micro-batch: segments to run and rows to sample."""

    micro_batch: int
    seqs: list[Sequence]
    starts: list[int]
    counts: list[int]
    input_ids: list[int]  # [T] tokens of all segments laid end to end
    sample_seqs: list[Sequence]  # sequences that get a new token from this step
    sample_rows: list[int]  # row of each one's last token in input_ids
    admitted: list[Sequence] = field(default_factory=list)  # new in this micro-batch
    restored: list[Sequence] = field(default_factory=list)  # taken out before (swap_out): their KV goes back first

    @property
    def slots(self) -> list[int]:
        return [s.slot for s in self.seqs]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


class BatchScheduler:
    """Plans steps for ``n_micro_batches`` micro-batches of ``micro_batch_size`` slots
    (one size for all, or a list of one size per micro-batch; micro-batch ``m`` owns
    slots ``[bases[m], bases[m] + sizes[m])``).

    ``max_step_tokens`` bounds the tokens of one step (decode tokens plus prefill
    chunks); ``max_seq_len`` is the KV capacity of a slot (prompt + generated).
    ``eos_token_ids`` end a sequence unless its params say ``ignore_eos``;
    ``detokenize`` turns completion ids into text for stop strings and outputs.
    """

    def __init__(
        self,
        *,
        n_micro_batches: int,
        micro_batch_size: int | Seq[int],
        max_step_tokens: int,
        max_seq_len: int,
        eos_token_ids: Iterable[int] = (),
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> None:
        sizes = [micro_batch_size] * n_micro_batches if isinstance(micro_batch_size, int) else list(micro_batch_size)
        if n_micro_batches < 1 or len(sizes) != n_micro_batches or min(sizes) < 1:
            raise ValueError("need at least one micro-batch of at least one slot (and one size per micro-batch)")
        if max_step_tokens < max(sizes):
            raise ValueError("max_step_tokens must be at least micro_batch_size")
        self.n_micro_batches = n_micro_batches
        self.sizes = sizes
        self.bases = [sum(sizes[:m]) for m in range(n_micro_batches)]
        self.micro_batch_size = max(sizes)
        self.max_step_tokens = max_step_tokens
        self.max_seq_len = max_seq_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.detokenize = detokenize
        self.waiting: collections.deque[tuple[Request, float]] = collections.deque()
        self.running: list[dict[int, Sequence]] = [{} for _ in range(n_micro_batches)]
        self._free_slots: list[list[int]] = [
            list(range(b + n - 1, b - 1, -1)) for b, n in zip(self.bases, sizes)
        ]
        self.retired: set[int] = set()  # micro-batches that admit no more (see retire)
        self.caps: dict[int, int] = {}  # micro-batches admitting up to this many sequences (see cap)
        self.swapped: collections.deque[Sequence] = collections.deque()  # taken out, waiting for a slot (swap_out)
        self._next_base = sum(sizes)  # the first slot number no micro-batch ever had

    # -- growing -------------------------------------------------------------------
    def add_micro_batches(self, sizes: Seq[int]) -> list[int]:
        """Add micro-batches of ``sizes`` slots after the others (slot numbers are never
        reused); their indices."""
        if not sizes or min(sizes) < 1:
            raise ValueError("need at least one micro-batch of at least one slot")
        new = []
        for n in sizes:
            base = self._next_base
            self._next_base += int(n)
            new.append(len(self.sizes))
            self.sizes.append(int(n))
            self.bases.append(base)
            self.running.append({})
            self._free_slots.append(list(range(base + n - 1, base - 1, -1)))
        self.n_micro_batches = len(self.sizes)
        self.micro_batch_size = max(self.sizes)
        self.max_step_tokens = max(self.max_step_tokens, self.micro_batch_size)
        return new

    def retire(self, mb: int) -> None:
        """Admit nothing more into micro-batch ``mb``: its sequences run to their end, and
        then it is :meth:`drained`."""
        self.retired.add(mb)

    def drained(self, mb: int) -> bool:
        """Whether ``mb`` is retired and has no sequence left."""
        return mb in self.retired and not self.running[mb]

    # -- resizing ------------------------------------------------------------------
    def cap(self, mb: int, n: int) -> None:
        """Admit into micro-batch ``mb`` only while it runs fewer than ``n`` sequences
        (before it shrinks to ``n`` slots: see :meth:`resize`)."""
        self.caps[mb] = int(n)

    def swap_out(self, mb: int, k: int, max_tokens: int | None = None) -> list[Sequence]:
        """Take up to ``k`` of micro-batch ``mb``'s sequences out, highest slot first,
        while their cached tokens come to at most ``max_tokens`` in all (a sequence whose KV
        is not cached, or past that, ends the take), their slots freed.  Once their KV is
        out of the cache, :meth:`set_aside` them."""
        running, out, tokens = self.running[mb], [], 0
        for slot in sorted(running, reverse=True)[:k]:
            seq = running[slot]
            tokens += seq.n_cached
            if seq.readmit or not seq.n_cached or (max_tokens is not None and tokens > max_tokens):
                break
            out.append(running.pop(slot))
        out.reverse()  # (in slot order: they go back in it)
        self._free_slots[mb] = sorted(self._free_slots[mb] + [seq.slot for seq in out], reverse=True)
        return out

    def set_aside(self, seqs: list[Sequence]) -> None:
        """Sequences taken out (:meth:`swap_out`) wait, ahead of the queue, for a slot of
        any micro-batch, where :meth:`schedule` puts them back (``Step.restored``: their
        KV must be back before the step runs)."""
        self.swapped.extend(seqs)

    def may_resize(self, mb: int, n: int) -> bool:
        """Whether ``mb`` can take ``n`` slots now: its sequences fit them, and no
        micro-batch was numbered after it (slots past its own would be theirs)."""
        return len(self.running[mb]) <= n and (n <= self.sizes[mb] or self.bases[mb] == max(self.bases))

    def resize(self, mb: int, n: int) -> list[tuple[str, int]]:
        """Give micro-batch ``mb`` ``n`` slots from now on (see :meth:`may_resize`): its
        sequences in slots past them move to its lowest free slots.  The moves, as
        ``(sequence id, slot)``: their KV must move the same way before the next step."""
        if not self.may_resize(mb, n):
            raise ValueError(f"micro-batch {mb} cannot take {n} slots now")
        base, running = self.bases[mb], self.running[mb]
        free = sorted(set(range(base, base + n)) - set(running))
        moves = []
        for old, new in zip(sorted(s for s in running if s >= base + n), free):
            seq = running.pop(old)
            seq.slot = new
            running[new] = seq
            moves.append((seq.id, new))
        self.sizes[mb] = int(n)
        self._free_slots[mb] = sorted(set(range(base, base + n)) - set(running), reverse=True)
        self._next_base = max(self._next_base, base + n)
        self.caps.pop(mb, None)
        self.micro_batch_size = max(self.sizes)
        self.max_step_tokens = max(self.max_step_tokens, self.micro_batch_size)
        return moves

    # -- queue ---------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        """Slots of every micro-batch (retired ones included)."""
        return sum(self.sizes)

    def add(self, request: Request) -> None:
        """Queue a request; it is admitted when a slot frees up."""
        if not request.prompt_token_ids:
            raise ValueError(f"request {request.id!r} has no prompt tokens")
        if len(request.prompt_token_ids) >= self.max_seq_len:
            raise ValueError(
                f"request {request.id!r}: prompt of {len(request.prompt_token_ids)} tokens "
                f"leaves no room in a KV slot of {self.max_seq_len}"
            )
        self.waiting.append((request, time.perf_counter()))

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.swapped) or any(self.running)

    def n_running(self) -> int:
        return sum(len(r) for r in self.running)

    def rebuild(self, mb: int) -> int:
        """Forget the KV of micro-batch ``mb``'s sequences (a lost cache): their next
        steps prefill their tokens so far again, and the first re-admits them.
        Returns the number of tokens to rebuild."""
        n = 0
        for seq in self.running[mb].values():
            seq.n_cached = 0
            seq.readmit = True
            n += len(seq.token_ids)
        return n

    def n_tokens_in_flight(self) -> int:
        """Tokens (prompt + generated) of the running sequences: the KV a lost cache held."""
        return sum(len(s.token_ids) for r in self.running for s in r.values()) + sum(
            len(s.token_ids) for s in self.swapped)

    # -- planning ------------------------------------------------------------------
    def _room(self, mb: int) -> int:
        """How many more sequences micro-batch ``mb`` takes now: its free slots, within
        its cap (see :meth:`cap`); none once retired."""
        if mb in self.retired:
            return 0
        free = len(self._free_slots[mb])
        cap = self.caps.get(mb)
        return free if cap is None else max(0, min(free, cap - len(self.running[mb])))

    def _restore(self, mb: int) -> list[Sequence]:
        restored = []
        for _ in range(min(self._room(mb), len(self.swapped))):
            seq = self.swapped.popleft()
            seq.micro_batch, seq.slot = mb, self._free_slots[mb].pop()
            self.running[mb][seq.slot] = seq
            restored.append(seq)
        return restored

    def _admit(self, mb: int) -> list[Sequence]:
        admitted = []
        for _ in range(min(self._room(mb), len(self.waiting))):
            req, t_arrival = self.waiting.popleft()
            seq = Sequence(
                request=req,
                micro_batch=mb,
                slot=self._free_slots[mb].pop(),
                token_ids=list(req.prompt_token_ids),
                n_prompt=len(req.prompt_token_ids),
                generator=None if req.params.is_greedy else make_generator(req.params.seed),
                t_arrival=t_arrival,
            )
            self.running[mb][seq.slot] = seq
            admitted.append(seq)
        return admitted

    def schedule(self, mb: int) -> Step | None:
        """Admit into micro-batch ``mb`` and plan its next step (None if it is idle)."""
        readmitted = [s for s in self.running[mb].values() if s.readmit]
        for s in readmitted:
            s.readmit = False
        restored = self._restore(mb)
        admitted = readmitted + self._admit(mb)
        seqs = sorted(self.running[mb].values(), key=lambda s: s.slot)
        step = Step(mb, [], [], [], [], [], [], admitted, restored)
        budget = self.max_step_tokens
        # Decoding sequences first (one token each), then prompt chunks in slot order.
        for phase_prefill in (False, True):
            for seq in seqs:
                pending = len(seq.token_ids) - seq.n_cached
                if pending <= 0 or budget <= 0 or (pending > 1) != phase_prefill:
                    continue
                count = min(pending, budget)
                row = len(step.input_ids)
                step.seqs.append(seq)
                step.starts.append(seq.n_cached)
                step.counts.append(count)
                step.input_ids.extend(seq.token_ids[seq.n_cached : seq.n_cached + count])
                if count == pending:
                    step.sample_seqs.append(seq)
                    step.sample_rows.append(row + count - 1)
                budget -= count
        return step if step.seqs else None

    # -- results -------------------------------------------------------------------
    def update(self, step: Step, next_tokens: Seq[int]) -> list[Completion]:
        """Record that ``step`` ran and append ``next_tokens`` (one per sample row).

        Returns the completions of sequences that finished; their slots are free.
        """
        for seq, count in zip(step.seqs, step.counts):
            seq.n_cached += count
        done = []
        for seq, token in zip(step.sample_seqs, next_tokens):
            if self._append(seq, int(token)):
                done.append(self._finish(seq))
        return done

    def _append(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            seq.finish_reason = FINISH_STOP  # the stopping token is not part of the output
            return True
        seq.token_ids.append(token)
        if p.stop and self.detokenize is not None:
            seq.text = self.detokenize(seq.output_ids)
            cut = find_stop(seq.text, p.stop)
            if cut is not None:
                seq.text = seq.text[:cut]
                seq.finish_reason = FINISH_STOP
                return True
        if len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_seq_len:
            seq.finish_reason = FINISH_LENGTH
            return True
        return False

    def _finish(self, seq: Sequence) -> Completion:
        del self.running[seq.micro_batch][seq.slot]
        self._free_slots[seq.micro_batch].append(seq.slot)
        self._free_slots[seq.micro_batch].sort(reverse=True)
        if seq.params.stop and self.detokenize is not None:
            text = seq.text
        else:
            text = self.detokenize(seq.output_ids) if self.detokenize is not None else ""
        n_out = len(seq.output_ids)
        t_first = seq.t_first if seq.t_first is not None else time.perf_counter()
        return Completion(
            id=seq.id,
            prompt=seq.request.prompt,
            prompt_token_ids=seq.token_ids[: seq.n_prompt],
            completion=text,
            completion_token_ids=seq.output_ids,
            finish_reason=seq.finish_reason,
            time_to_first_token=t_first - seq.t_arrival,
            time_per_token=(time.perf_counter() - t_first) / (n_out - 1) if n_out > 1 else None,
        )
