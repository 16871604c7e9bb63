"""A discrete-event model of a run: what tokens/s a plan gets on a profile's hardware.

Two levels:

* **Continuous batching, step by step** (:func:`simulate`).  The requests of a
  :class:`Workload` are admitted into micro-batch slots, prompts are prefilled in
  chunks within ``max_step_tokens``, decoding sequences take one token per step and
  leave when their output length is reached, as :class:`~glinthawk_dask.engine.scheduler.BatchScheduler`
  does.  Each round every busy micro-batch takes one step.  A micro-batch is kept as
  sums (:class:`_Batch`), so a step costs its prompt chunks rather than its sequences,
  and stretches of decode where nobody joins or leaves are planned in one go.  The steps
  depend on the micro-batches alone: a sweep takes them once for every configuration of
  the same micro-batches (any workers, latency or mode) and costs each one's rounds.
* **The pipeline of one round** (:func:`round_period`).  Micro-batches of given shapes
  cycle through the layers: a dense job per layer on their slice's dense worker (one
  compute stream, in the order they become ready), a round trip to their attention
  worker (network time plus induced latency each way) and the attention job there (one
  stream, in order of arrival), then across slices.  The events are simulated until the
  cycle is steady, and the period of one step is read off it.  When the tiers share a machine's
  cores, a job that starts while the other tier computes runs slower by the profile's
  slowdown for a pipeline that deep (measured in chains of dense jobs and attention
  round trips two and three deep); a dense job that starts after its worker idled,
  however briefly (a pipeline one deep: every job after its round trip, as the profile
  measured the cold cost), runs at the profile's cold cost, and pays the profile's idle
  excess for a gap longer than the one the cold cost was measured after (a pipeline
  waiting out tens of milliseconds of latency).  Rounds of the same shape
  (tokens, context read, rows) are simulated once.

Single-tier and in-process runs have no attention tier: attention runs on the dense
worker, inside its job.  A hybrid run mixes both: its first ``local_micro_batches``
micro-batches keep their KV on the dense worker and run a whole slice as one job, as
single-tier ones do; the rest are two-tier.  (Single-tier is hybrid with every
micro-batch local, two-tier hybrid with none.)  Everything here is Python on numbers (a
long sweep has Numba compile the rounds' event loop: :func:`~.rounds.compile_kernel`).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
import threading

from ..model.config import ModelConfig
from .profile import Profile
from .rounds import round_period
from .workload import MODES, MicroBatchShape, Prediction, RunConfig, Workload, _b

__all__ = ["MODES", "Workload", "RunConfig", "Prediction", "MicroBatchShape", "simulate", "round_period",
           "weight_bytes"]


class _Batch:
    """One micro-batch's sequences as :class:`~glinthawk_dask.engine.scheduler.BatchScheduler`
    steps them, kept as sums so a step costs its prompt chunks, not its sequences: the
    ones with a token a step (decoding, or a prompt's last token: their count, the sum of
    their lengths, when each finishes) and the prompts still being prefilled, in slot
    order; a request takes the lowest free slot, as there."""

    __slots__ = ("steps", "dec_n", "dec_len", "ends", "prefill", "free")

    def __init__(self, size: int) -> None:
        self.steps = 0  # steps this micro-batch has taken
        self.dec_n = 0  # sequences with one token a step
        self.dec_len = 0  # the sum of their lengths: positions each one's next token attends over
        self.ends: list[tuple[int, int, int]] = []  # heap: (steps after which one ends, its final length, slot)
        self.prefill: list[list[int]] = []  # [slot, prompt, cached, out], sorted by slot
        self.free = list(range(size))  # heap of free slots

    def __len__(self) -> int:
        return self.dec_n + len(self.prefill)

    def admit(self, prompt: int, out: int) -> None:
        slot = heapq.heappop(self.free)
        if prompt == 1:
            self._decode(slot, prompt, 0, out)
        else:
            bisect.insort(self.prefill, [slot, prompt, 0, out])

    def _decode(self, slot: int, prompt: int, made: int, out: int) -> None:
        # from now on one token a step until ``out`` are made (``made`` so far)
        self.dec_n += 1
        self.dec_len += prompt + made
        heapq.heappush(self.ends, (self.steps + out - made, prompt + out, slot))

    def plan(self, budget: int) -> tuple[tuple[int, int, int, int, int], list[tuple[list[int], int]]]:
        """The shape of the next step (tokens, KV read, attention units, rows, sequences)
        and its prompt chunks, as the batch scheduler plans it: the one-token sequences
        first (the budget, at least the micro-batch size, holds them all), then prompt
        chunks in slot order within the token budget."""
        tokens = rows = seqs = self.dec_n
        kv_read = units = self.dec_len
        budget -= self.dec_n
        chunks = []
        for entry in self.prefill:
            if budget <= 0:
                break
            _, prompt, cached, _ = entry
            pending = prompt - cached
            count = min(pending, budget)
            chunks.append((entry, count))
            end = cached + count
            tokens += count
            kv_read += end
            units += count * end
            rows += count == pending
            seqs += 1
            budget -= count
        return (tokens, kv_read, units, rows, seqs), chunks

    def advance(self, chunks: list[tuple[list[int], int]], repeat: int = 1) -> int:
        """Take the planned step ``repeat`` times (more than once only without prompt
        chunks); the tokens sampled."""
        self.steps += repeat
        self.dec_len += self.dec_n * repeat
        sampled = self.dec_n * repeat
        while self.ends and self.ends[0][0] <= self.steps:
            _, length, slot = heapq.heappop(self.ends)
            self.dec_n -= 1
            self.dec_len -= length
            heapq.heappush(self.free, slot)
        done = 0  # chunks run the first prompts in slot order; all but the last end their prompt
        for entry, count in chunks:
            entry[2] += count
            slot, prompt, cached, out = entry
            if cached == prompt:  # its last token ran: one sampled
                done += 1
                sampled += 1
                if out > 1:
                    self._decode(slot, prompt, 1, out)
                else:
                    heapq.heappush(self.free, slot)
            elif cached == prompt - 1:  # the last token is left: a step of one, as decoding
                done += 1
                self._decode(slot, prompt, 0, out)
        del self.prefill[:done]
        return sampled


def simulate(profile: Profile, model: ModelConfig, workload: Workload, config: RunConfig,
             cache: dict | None = None) -> Prediction:
    """Predict a run of ``workload`` under ``config`` on ``profile``'s hardware.

    ``cache`` (a dict, shared by the calls of a sweep) keeps simulated rounds, which
    configurations of the same workers and latency have in common."""
    c = config
    n = workload.n
    seq_len = min(c.max_seq_len or workload.max_len, model.max_seq_len)
    mb_size = min(c.micro_batch_size, n)
    local_size = min(c.local_batch_size or mb_size, mb_size) if c.mode == "hybrid" else mb_size
    asked = max(1, min(c.micro_batches, math.ceil(n / mb_size)))
    c = dataclasses.replace(c, micro_batch_size=mb_size, micro_batches=asked,
                            local_micro_batches=min(c.local_micro_batches, asked) if c.mode == "hybrid"
                            else c.local_micro_batches,
                            local_batch_size=None if c.local_batch_size is None else min(c.local_batch_size,
                                                                                         mb_size))
    pred = Prediction(config=c, feasible=True, micro_batch_size=mb_size, micro_batches=asked,
                      local_micro_batches=c.n_local, local_batch_size=local_size if c.n_local else 0)
    if c.dense > model.n_layers:
        return _infeasible(pred, f"{c.dense} slices for {model.n_layers} layers")
    layers = math.ceil(model.n_layers / c.dense)
    kv_slot = model.kv_size * 2 * c.dtype_bytes * layers * seq_len  # one slot's KV on one slice
    weights = weight_bytes(model, layers, c.dtype_bytes, ends=c.dense == 1)
    dense_cap = profile.dense.kv_budget(weights)
    if dense_cap is not None and dense_cap < 0:
        return _infeasible(pred, f"a slice's weights ({weights / 2**30:.1f} GiB) do not fit a dense worker: "
                                 "use more dense workers")

    if c.mode in ("single-tier", "hybrid"):
        budget = min((b for b in (dense_cap, c.dense_kv_budget) if b is not None), default=None)
        # micro-batches as asked: local ones the budget shrinks may need more than ceil(n / size)
        placed = _place(n, mb_size, config.micro_batches, config.n_local, local_size, kv_slot, budget, seq_len)
        if isinstance(placed, str):
            return _infeasible(pred, placed)
        depth, n_local, local_size = placed
        if c.mode == "single-tier":
            mb_size = local_size
            c = dataclasses.replace(c, micro_batches=depth)
        else:
            c = dataclasses.replace(c, micro_batches=depth, local_micro_batches=n_local)
        pred.config, pred.micro_batch_size, pred.micro_batches = c, mb_size, depth
        pred.local_micro_batches, pred.local_batch_size = n_local, local_size if n_local else 0
        pred.kv_bytes_dense = n_local * local_size * kv_slot
    depth, n_local = c.micro_batches, c.n_local
    if depth > n_local:  # remote micro-batches: KV on the attention workers
        per_worker = math.ceil((depth - n_local) / c.attention) * mb_size * kv_slot
        pred.kv_bytes_attention = per_worker
        cap = profile.attention.kv_cap(c.attention * c.dense)  # the slices' groups dealt roomiest first
        if cap is not None and per_worker > cap:
            return _infeasible(pred, f"KV of {per_worker / 2**30:.2f} GiB per attention worker exceeds its "
                                     f"{cap / 2**30:.2f} GiB")
    if c.mode == "in-process":
        pred.kv_bytes_dense = depth * mb_size * kv_slot
        if dense_cap is not None and pred.kv_bytes_dense > dense_cap:
            return _infeasible(pred, f"KV of {pred.kv_bytes_dense / 2**30:.2f} GiB per dense worker exceeds its "
                                     f"{dense_cap / 2**30:.2f} GiB")
    sizes = tuple(pred.local_batch_size if mb < n_local else mb_size for mb in range(depth))  # as placed
    if c.max_step_tokens < max(sizes):  # a step holds its largest micro-batch whole, as runs do
        c = dataclasses.replace(c, max_step_tokens=max(sizes))
        pred.config = c
    too_long = [p for p in workload.prompt_lens if p >= seq_len]
    if too_long:
        return _infeasible(pred, f"a prompt of {too_long[0]} tokens leaves no room in KV slots of {seq_len}")

    if cache is None:
        cache = {}
    # the steps depend on the micro-batches and the workload alone: configurations that
    # differ in workers, attention placement or latency take the same steps (one trace),
    # and only the rounds' costs differ
    trace_key = ("steps", id(workload), sizes, n_local, c.max_step_tokens, seq_len)
    trace = cache.get(trace_key)
    if trace is None:
        with _TRACING:  # once, when a sweep's threads share the cache (tracing holds the GIL anyway)
            trace = cache.get(trace_key)
            if trace is None:
                trace = cache[trace_key] = _steps(workload, sizes, n_local, c.max_step_tokens, seq_len)
    runs, steps, generated = trace
    # what a round depends on besides its shapes (the mode only through where attention
    # runs, which the key's local/remote split says: single-tier, two-tier and hybrid
    # rounds of the same split are the same rounds)
    base_key = (id(profile), model.name, model.dim, model.n_layers, c.mode == "in-process", c.dense,
                c.dtype_bytes, layers)
    total = dense_busy = attn_busy = 0.0
    for (nl, ml, nr, mr), count in runs:
        # a round costs as its micro-batches at their mean shape (they differ little once
        # decoding; prefill rounds are few), local and remote ones averaged apart.  Remote
        # micro-batches are dealt round-robin to the attention workers: with as many workers
        # as micro-batches or more, each has its own and the rest idle, so any more workers
        # give the same round, bit for bit
        key = (base_key, nl, ml, nr, mr, (min(c.attention, nr), c.latency) if nr else None)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = round_period(profile, model, c, [ml] * nl + [mr] * nr, layers, n_local=nl,
                                            memo=cache)
        period, du, au = hit
        for _ in range(count):  # added one round at a time, as the rounds run
            total += period
            dense_busy += du * period
            attn_busy += au * period
    pred.seconds, pred.generated_tokens, pred.steps = total, generated, steps
    pred.dense_util = dense_busy / total if total else 0.0
    pred.attention_util = attn_busy / total if total else 0.0
    if not pred.remote:
        pred.bottleneck = "dense"
    elif max(pred.dense_util, pred.attention_util) < 0.8:
        pred.bottleneck = "round trip"
    else:
        pred.bottleneck = "dense" if pred.dense_util >= pred.attention_util else "attention"
    return pred


_TRACING = threading.Lock()


def _steps(workload: Workload, sizes: tuple[int, ...], n_local: int, budget: int,
           seq_len: int) -> tuple[list[tuple[tuple, int]], int, int]:
    """The rounds of a run of ``workload`` in micro-batches of ``sizes`` slots (the first
    ``n_local`` local), steps of at most ``budget`` tokens and KV slots of ``seq_len``:
    each round's key, ``(local micro-batches, their bucketed mean shape, remote ones,
    theirs)``, with how many rounds in a row have it; the micro-batch steps and the tokens
    sampled."""
    waiting = [(p, min(o, seq_len - p)) for p, o in zip(workload.prompt_lens, workload.output_lens)]
    waiting.reverse()  # pop() takes the first request
    batches = [_Batch(size) for size in sizes]
    runs: list[list] = []
    steps = generated = 0
    while waiting or any(batches):
        plans = []
        sums = ([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0])  # local, remote: micro-batches, sums of their shapes
        for mb, batch in enumerate(batches):
            while len(batch) < sizes[mb] and waiting:
                batch.admit(*waiting.pop())
            if not batch:
                continue
            shape, chunks = batch.plan(budget)
            plans.append((batch, chunks))
            side = sums[mb >= n_local]
            side[0] += 1
            for f in range(5):
                side[f + 1] += shape[f]
        (nl, *local), (nr, *remote) = sums
        # rounds of decode alone, nobody finishing or joining: only the contexts grow, so
        # they are keyed without planning each step again (a prefill chunk of one token
        # is not decode: it samples nothing unless it ends its prompt)
        repeat = 1
        full = not waiting or all(len(b) == sizes[mb] for mb, b in enumerate(batches))  # no slot to admit into
        if full and not any(chunks for _, chunks in plans):
            repeat = min(b.ends[0][0] - b.steps for b, _ in plans)
        for j in range(repeat):  # ``j`` decode steps on: every sequence's context grown by j
            key = (nl, _mean_bucket(nl, local, j) if nl else None, nr, _mean_bucket(nr, remote, j) if nr else None)
            if runs and runs[-1][0] == key:
                runs[-1][1] += 1
            else:
                runs.append([key, 1])
        steps += len(plans) * repeat
        for batch, chunks in plans:
            generated += batch.advance(chunks, repeat)
    return [(key, count) for key, count in runs], steps, generated


def _mean_bucket(k: int, sums: tuple, j: int) -> MicroBatchShape:
    """The bucketed mean shape of ``k`` micro-batches whose shape fields sum to ``sums``,
    after ``j`` more decode steps (each sequence reads one position more per step)."""
    tokens, kv_read, units, rows, seqs = sums  # (as MicroBatchShape(means).bucket(), without the detour)
    return MicroBatchShape(_b(max(1, round(tokens / k))), _b(max(1, round((kv_read + j * seqs) / k)), 1.2),
                           _b(max(1, round((units + j * seqs) / k)), 1.2), _b(max(1, round(rows / k))),
                           _b(max(1, round(seqs / k))))


def _place(n: int, size: int, depth: int, n_local: int, local_size: int, kv_slot: float, budget: float | None,
           seq_len: int) -> tuple[int, int, int] | str:
    """Micro-batches, local ones and their slots as placed under a dense KV ``budget``
    (bytes, None: unbounded): each of the ``n_local`` local micro-batches (the first
    ones) gets ``min(local_size, budget // (kv_slot * n_local))`` slots, the others
    ``size``.  Micro-batches that the ``n`` requests (admitted in order) would leave
    empty are dropped, and the budget shared again among the local ones left.  A reason
    when not one slot fits."""
    while True:
        slots = local_size
        if n_local and budget is not None:
            slots = min(local_size, int(budget // (kv_slot * n_local)))
            if slots < 1:
                return (f"not one sequence of {seq_len} tokens fits the dense KV budget ({_size(budget)} for "
                        f"{n_local} micro-batch{'es' if n_local > 1 else ''} on a dense worker, {_size(kv_slot)} a "
                        "slot): lower max_seq_len or the micro-batches on the dense worker, or raise the budget")
        held = used = 0
        for mb in range(depth):
            used += 1
            held += slots if mb < n_local else size
            if held >= n:
                break
        if used == depth or n_local <= used:
            return used, min(n_local, used), slots
        depth, n_local = used, used


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def weight_bytes(model: ModelConfig, layers: int, elem: int, ends: bool = True) -> float:
    """Weights a dense worker holds for ``layers`` layers (with the embedding and head
    when ``ends``: the first and last slices hold one each, so count them fully)."""
    from .profile import _layer_params

    ends_params = model.vocab_size * model.dim * (1 if model.tie_embeddings else 2) if ends else \
        model.vocab_size * model.dim
    return (layers * _layer_params(model) + ends_params) * elem


def _infeasible(pred: Prediction, reason: str) -> Prediction:
    pred.feasible = False
    pred.reason = reason
    return pred
