"""A discrete-event model of a run: what tokens/s a plan gets on a profile's hardware.

Two levels:

* **Continuous batching, step by step** (:func:`simulate`).  The requests of a
  :class:`Workload` are admitted into micro-batch slots, prompts are prefilled in
  chunks within ``max_step_tokens``, decoding sequences take one token per step and
  leave when their output length is reached, as :class:`~glinthawk_dask.engine.scheduler.BatchScheduler`
  does.  Each round every busy micro-batch takes one step.
* **The pipeline of one round** (:func:`round_period`).  Micro-batches of given shapes
  cycle through the layers: a dense job per layer on their slice's dense worker (one
  compute stream, higher layers first), a round trip to their attention worker (network
  time plus induced latency each way) and the attention job there (one stream, in
  order of arrival), then across slices.  The events are simulated until the cycle is
  steady, and the period of one step is read off it.  When the tiers share a machine's
  cores, a job that starts while the other tier computes runs slower by the profile's
  slowdown; a dense job that starts after its worker idled runs at the profile's cold
  cost.  Rounds of the same shape (tokens, context read, rows) are simulated once.

Single-tier and in-process runs have no attention tier: attention runs on the dense
worker, inside its job.  A hybrid run mixes both: its first ``local_micro_batches``
micro-batches keep their KV on the dense worker and run a whole slice as one job, as
single-tier ones do; the rest are two-tier.  (Single-tier is hybrid with every
micro-batch local, two-tier hybrid with none.)  Everything here is pure Python on numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Sequence

from ..model.config import ModelConfig
from .profile import Profile

__all__ = ["Workload", "RunConfig", "Prediction", "MicroBatchShape", "simulate", "round_period"]

MODES = ("two-tier", "single-tier", "in-process", "hybrid")


@dataclass(frozen=True)
class Workload:
    """The requests of a run: a prompt length and an output length for each."""

    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.prompt_lens) != len(self.output_lens) or not self.prompt_lens:
            raise ValueError("a workload needs one prompt length and one output length per request")
        if min(self.prompt_lens) < 1 or min(self.output_lens) < 1:
            raise ValueError("prompt and output lengths must be at least 1")

    @classmethod
    def uniform(cls, n: int, prompt: int, output: int) -> "Workload":
        return cls((prompt,) * n, (output,) * n)

    @classmethod
    def resample(cls, prompt_lens: Sequence[int], output_lens: Sequence[int] | int, n: int,
                 seed: int = 0) -> "Workload":
        """``n`` requests drawn from samples of lengths (``output_lens`` may be one number)."""
        rng = random.Random(seed)
        outs = [output_lens] if isinstance(output_lens, int) else list(output_lens)
        return cls(tuple(rng.choice(prompt_lens) for _ in range(n)), tuple(rng.choice(outs) for _ in range(n)))

    @property
    def n(self) -> int:
        return len(self.prompt_lens)

    @property
    def max_len(self) -> int:
        return max(p + o for p, o in zip(self.prompt_lens, self.output_lens))


@dataclass(frozen=True)
class RunConfig:
    """A plan to evaluate: the knobs a spec or the CLI sets."""

    mode: str = "two-tier"
    micro_batch_size: int = 32
    micro_batches: int = 1
    dense: int = 1  # dense workers, one layer slice each
    attention: int = 1  # attention workers per slice
    max_seq_len: int | None = None  # KV slot capacity; None: sized to the workload
    max_step_tokens: int = 512
    latency: float = 0.0  # seconds added to every inter-tier message
    dtype_bytes: int = 4
    local_micro_batches: int = 0  # hybrid: how many micro-batches (the first ones) are local
    local_batch_size: int | None = None  # hybrid: slots of each local micro-batch (None: micro_batch_size)
    dense_kv_budget: float | None = None  # KV bytes one dense worker may hold (single-tier, hybrid)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if min(self.micro_batch_size, self.micro_batches, self.dense, self.attention) < 1:
            raise ValueError("micro-batch size, micro-batches, dense and attention workers must be at least 1")
        if self.local_micro_batches < 0 or (self.mode == "hybrid" and self.local_micro_batches > self.micro_batches):
            raise ValueError(f"local micro-batches must be 0..{self.micro_batches} (the micro-batches), "
                             f"not {self.local_micro_batches}")
        if self.local_batch_size is not None and not 1 <= self.local_batch_size <= self.micro_batch_size:
            raise ValueError(f"the local batch size must be 1..{self.micro_batch_size} (the micro-batch size), "
                             f"not {self.local_batch_size}")
        if self.dense_kv_budget is not None and not self.dense_kv_budget >= 0:
            raise ValueError(f"the dense KV budget must be a number of bytes, not {self.dense_kv_budget!r}")

    @property
    def n_local(self) -> int:
        """Micro-batches whose KV and attention stay on the dense worker."""
        if self.mode == "hybrid":
            return self.local_micro_batches
        return 0 if self.mode == "two-tier" else self.micro_batches


@dataclass
class Prediction:
    """What the simulator expects of a run."""

    config: RunConfig
    feasible: bool
    reason: str = ""
    seconds: float = 0.0
    generated_tokens: int = 0
    steps: int = 0
    dense_util: float = 0.0  # busy share of each dense worker's compute stream
    attention_util: float = 0.0  # busy share of each attention worker's stream
    kv_bytes_attention: float = 0.0  # KV reserved on the fullest attention worker
    kv_bytes_dense: float = 0.0  # KV reserved on each dense worker
    bottleneck: str = ""  # "dense", "attention" or "round trip"
    micro_batch_size: int = 0  # as placed (the workload may fill fewer slots than asked, a dense KV
    # budget shrinks single-tier micro-batches); hybrid: the size of the remote micro-batches
    micro_batches: int = 0  # all of them, local ones included
    local_micro_batches: int = 0  # micro-batches with KV on the dense worker, as placed (single-tier: all)
    local_batch_size: int = 0  # slots of each of them (0: none local)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def cost_per_million(self, dense_price: float | None, attention_price: float | None) -> float | None:
        """Dollars per million generated tokens at these $/hour prices (None if unpriced)."""
        if dense_price is None or (self.remote and attention_price is None):
            return None
        c = self.config
        per_hour = c.dense * dense_price + (c.dense * c.attention * attention_price if self.remote else 0)
        return per_hour / 3600.0 / self.tokens_per_s * 1e6 if self.tokens_per_s else None

    @property
    def remote(self) -> bool:
        """Whether the run uses attention workers (two-tier, or hybrid with remote micro-batches)."""
        c = self.config
        return c.mode == "two-tier" or (c.mode == "hybrid" and self.micro_batches > self.local_micro_batches)


@dataclass(frozen=True)
class MicroBatchShape:
    """One micro-batch step: tokens run, KV positions read, attention work, rows sampled."""

    tokens: int
    kv_read: int  # sum over segments of (start + count): positions each attends over
    attn_units: int  # sum over segments of count x (start + count): query-key pairs
    rows: int  # sequences sampled (the head's rows)
    seqs: int

    def bucket(self) -> "MicroBatchShape":
        """A nearby shape that rounds share (costs vary slowly with these sizes)."""
        return MicroBatchShape(_b(self.tokens), _b(self.kv_read, 1.2), _b(self.attn_units, 1.2), _b(self.rows),
                               _b(self.seqs))


@functools.lru_cache(maxsize=1 << 16)
def _b(x: int, step: float = 1.1) -> int:
    if x <= 16:
        return x
    return int(round(step ** round(math.log(x, step))))


# -- one round --------------------------------------------------------------------------


@dataclass
class _Costs:
    """Seconds of each stage of one micro-batch step on one slice."""

    first: float  # the first dense job (driver step on slice 0, embed, layer 0's pre-attention)
    dense: float  # a middle dense job (post-attention of one layer, pre-attention of the next)
    last: float  # the last dense job (post-attention, and the head on the last slice)
    attention: float  # one layer's attention on the attention worker
    net: float  # one round trip to the attention worker, induced latency included
    hop: float  # to the next slice (hidden states) or back to the driver (tokens)


def _stage_costs(p: Profile, m: ModelConfig, c: RunConfig, s: MicroBatchShape, n_slices: int,
                 local: bool | None = None) -> list[_Costs]:
    """Costs of a micro-batch: ``local`` ones (default: not two-tier) compute attention
    in the dense job; the others send it to an attention worker."""
    if local is None:
        local = c.mode != "two-tier"
    elem = c.dtype_bytes
    d = p.dense_layer_s(m, s.tokens, elem)
    kv_bytes = s.kv_read * m.kv_size * 2 * elem
    flops = 4.0 * s.attn_units * m.q_size
    driver = p.dense.step_s + p.dense.step_per_seq_s * s.seqs
    head = p.head_s(m, s.rows, elem)
    out = []
    for k in range(n_slices):
        first_extra = driver if k == 0 else 0.0
        last_extra = head if k == n_slices - 1 else 0.0
        hop = p.net_s(s.tokens * m.dim * elem) if k + 1 < n_slices else (p.rtt_s if n_slices > 1 else 0.0)
        if not local:
            nbytes = s.tokens * (2 * m.q_size + 2 * m.kv_size) * elem  # q, k, v out and o back
            msg = p.msg_cpu(nbytes)
            a = p.attention.cost.seconds(kv_bytes, flops)
            net = p.net_s(nbytes) + 2 * c.latency
            out.append(_Costs(first=first_extra + d / 2 + msg, dense=d + msg, last=d / 2 + last_extra,
                              attention=a, net=net, hop=hop))
        else:
            local = p.dense.attention or p.attention.cost
            a = local.seconds(kv_bytes, flops)
            out.append(_Costs(first=first_extra, dense=d + a, last=last_extra, attention=0.0, net=0.0, hop=hop))
    return out


@dataclass
class _Server:
    busy_until: float = 0.0
    queue: list = field(default_factory=list)
    busy: float = 0.0  # seconds of work started inside the measured window
    idle_since: float = 0.0


def round_period(profile: Profile, model: ModelConfig, config: RunConfig, shapes: Sequence[MicroBatchShape],
                 layers: int, *, cycles: int = 5, n_local: int | None = None) -> tuple[float, float, float]:
    """Steady-state seconds per step when micro-batches of ``shapes`` cycle through
    ``layers`` layers per slice together; with the busy shares of the dense and
    attention streams.  The first ``n_local`` shapes are local micro-batches (attention
    on the dense worker; default: all of them, none for two-tier, the config's local
    ones for hybrid), the rest remote; remote ones are dealt round-robin to the
    slice's attention workers.  Exact for ``layers`` up to 6; beyond, the period is
    extended linearly in the layers from 3 and 6 (every middle layer costs the same)."""
    if n_local is None:
        n_local = min(config.n_local, len(shapes))
    if layers <= 6:
        return _simulate_round(profile, model, config, shapes, layers, cycles, n_local)
    p3, d3, a3 = _simulate_round(profile, model, config, shapes, 3, cycles, n_local)
    p6, d6, a6 = _simulate_round(profile, model, config, shapes, 6, cycles, n_local)
    f = (layers - 6) / 3.0
    period = p6 + (p6 - p3) * f
    dense_busy = d6 * p6 + (d6 * p6 - d3 * p3) * f
    attn_busy = a6 * p6 + (a6 * p6 - a3 * p3) * f
    return period, min(1.0, dense_busy / period), min(1.0, attn_busy / period)


_EPS = 1e-9  # seconds: instants closer than this are the same instant


def _simulate_round(profile: Profile, model: ModelConfig, config: RunConfig, shapes: Sequence[MicroBatchShape],
                    layers: int, cycles: int, n_local: int) -> tuple[float, float, float]:
    n_slices = config.dense
    remote = [mb >= n_local for mb in range(len(shapes))]  # attention on an attention worker
    costs = [_stage_costs(profile, model, config, s, n_slices, local=not remote[mb]) for mb, s in enumerate(shapes)]
    dense = [_Server() for _ in range(n_slices)]
    attn = [[_Server() for _ in range(config.attention)] for _ in range(n_slices)]
    shared, fd, fa = profile.shared_host, profile.dense_slowdown, profile.attention_slowdown
    cold = profile.dense.cold_factor
    serial = config.mode == "in-process"  # the in-process engine runs micro-batches in turn

    events: list = []  # (time, seq, mb, state)
    seq = 0
    done_at: list[list[float]] = [[] for _ in shapes]
    window: list[float] = [math.inf, 0.0]  # the measured window: cycles 2 .. end

    # when the attention side works (reading a request, computing, answering): a dense job
    # that overlaps such work runs at the profile's both-compute speed
    active: list[tuple[float, float]] = []

    def overlaps(t0: float, t1: float) -> bool:
        # time only moves on: ended ones go.  A job that starts as the attention work it
        # waited for ends does not overlap it (the sums of floats that make the two
        # instants differ in the last bits, which decided contention at random)
        active[:] = [iv for iv in active if iv[1] > t0 + _EPS]
        return any(a < t1 - _EPS for a, _ in active)

    def dense_busy(t: float) -> bool:
        return any(d.busy_until > t + _EPS for d in dense)

    def start(server: _Server, t: float, base: float, kind: str) -> float:
        dur = base
        if shared and kind == "dense" and fd > 1.0 and overlaps(t, t + base):
            dur *= fd
        elif shared and kind == "attention" and dense_busy(t):
            dur *= fa
        if kind == "dense" and t - server.idle_since > 5e-4 and server.busy_until <= t:
            dur *= cold
        server.busy_until = t + dur
        server.idle_since = t + dur
        if window[0] <= t:
            server.busy += dur
        return t + dur

    def push(t: float, mb: int, state: tuple) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, mb, state))

    # a state is (cycle, slice, layer, phase); phases: "dense" job of `layer` to run,
    # "attention" job of `layer`, "hop" to the next slice
    def run_dense(t: float, mb: int, state: tuple, queued: bool = False) -> None:
        cyc, k, layer, _ = state
        srv = dense[k]
        if not queued and (srv.busy_until > t or srv.queue):
            heapq.heappush(srv.queue, (-(k * layers + layer), t, mb, state))  # higher layers first
            return
        c = costs[mb][k]
        if not remote[mb]:
            base = c.first + c.dense * layers + c.last
            push(start(srv, t, base, "dense"), mb, (cyc, k, layers, "done_dense"))
            return
        base = c.first if layer == 0 else (c.last if layer == layers else c.dense)
        push(start(srv, t, base, "dense"), mb, (cyc, k, layer, "done_dense"))

    def run_attention(t: float, mb: int, state: tuple, queued: bool = False) -> None:
        cyc, k, layer, _ = state
        srv = attn[k][(mb - n_local) % config.attention]
        if not queued and (srv.busy_until > t or srv.queue):
            srv.queue.append((t, mb, state))
            return
        push(start(srv, t, costs[mb][k].attention, "attention"), mb, (cyc, k, layer, "done_attention"))

    def release(srv: _Server, t: float, kind: str) -> None:
        if not srv.queue:
            return
        if kind == "dense":
            _, _, mb, state = heapq.heappop(srv.queue)
            run_dense(t, mb, state, queued=True)
        else:
            _, mb, state = srv.queue.pop(0)
            run_attention(t, mb, state, queued=True)

    order = list(range(len(shapes)))
    if serial:  # one after another: the next starts when the previous ends
        push(0.0, 0, (0, 0, 0, "dense"))
    else:
        for mb in order:
            push(0.0, mb, (0, 0, 0, "dense"))
    while events:
        t, _, mb, state = heapq.heappop(events)
        cyc, k, layer, phase = state
        c = costs[mb][k]
        if phase == "dense":
            run_dense(t, mb, state)
        elif phase == "done_dense":
            if layer < layers and remote[mb]:
                if shared:  # the attention side's work for this request (induced latency is idle time)
                    lat = config.latency
                    active.append((t + lat, t + lat + (c.net - 2 * lat) + c.attention))
                push(t + c.net / 2, mb, (cyc, k, layer, "attention"))
            else:
                push(t + c.hop, mb, (cyc, k, layer, "hop"))
            release(dense[k], t, "dense")
        elif phase == "attention":
            run_attention(t, mb, state)
        elif phase == "done_attention":
            release(attn[k][(mb - n_local) % config.attention], t, "attention")
            push(t + c.net / 2, mb, (cyc, k, layer + 1, "dense"))
        elif phase == "hop":
            if k + 1 < n_slices:
                push(t, mb, (cyc, k + 1, 0, "dense"))
                continue
            done_at[mb].append(t)
            if cyc == 1 and (not serial or mb == len(shapes) - 1):
                window[0] = min(window[0], t)
            if serial:
                nxt, ncyc = (mb + 1, cyc) if mb + 1 < len(shapes) else (0, cyc + 1)
                if ncyc < cycles:
                    push(t, nxt, (ncyc, 0, 0, "dense"))
                else:
                    window[1] = t
            elif cyc + 1 < cycles:
                push(t, mb, (cyc + 1, 0, 0, "dense"))
            else:
                window[1] = max(window[1], t)
    if serial:
        first = done_at[-1][1]
        period = (done_at[-1][-1] - first) / (cycles - 2)
    else:
        period = sum((d[-1] - d[1]) / (cycles - 2) for d in done_at) / len(done_at)
    span = max(window[1] - window[0], 1e-12)
    dense_share = max(s.busy for s in dense) / span
    attn_share = max((w.busy for ws in attn for w in ws), default=0.0) / span
    return period, min(1.0, dense_share), min(1.0, attn_share)


# -- a whole run ------------------------------------------------------------------------


class _Seq:
    __slots__ = ("prompt", "out", "cached", "made")

    def __init__(self, prompt: int, out: int) -> None:
        self.prompt, self.out, self.cached, self.made = prompt, out, 0, 0

    @property
    def length(self) -> int:
        return self.prompt + self.made


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
        cap = profile.attention.kv_bytes
        if cap is not None and per_worker > cap:
            return _infeasible(pred, f"KV of {per_worker / 2**30:.2f} GiB per attention worker exceeds its "
                                     f"{cap / 2**30:.2f} GiB")
    if c.mode == "in-process":
        pred.kv_bytes_dense = depth * mb_size * kv_slot
        if dense_cap is not None and pred.kv_bytes_dense > dense_cap:
            return _infeasible(pred, f"KV of {pred.kv_bytes_dense / 2**30:.2f} GiB per dense worker exceeds its "
                                     f"{dense_cap / 2**30:.2f} GiB")
    if c.max_step_tokens < max(mb_size, pred.local_batch_size):
        return _infeasible(pred, "max_step_tokens below the micro-batch size")
    too_long = [p for p in workload.prompt_lens if p >= seq_len]
    if too_long:
        return _infeasible(pred, f"a prompt of {too_long[0]} tokens leaves no room in KV slots of {seq_len}")

    sizes = [pred.local_batch_size if mb < n_local else mb_size for mb in range(depth)]
    waiting = [(_Seq(p, min(o, seq_len - p))) for p, o in zip(workload.prompt_lens, workload.output_lens)]
    waiting.reverse()  # pop() takes the first request
    running: list[list[_Seq]] = [[] for _ in range(depth)]
    if cache is None:
        cache = {}
    # what a round depends on besides its shapes (the mode only through where attention
    # runs, which the key's local/remote split says: single-tier, two-tier and hybrid
    # rounds of the same split are the same rounds)
    base_key = (id(profile), model.name, model.dim, model.n_layers, c.mode == "in-process", c.dense,
                c.dtype_bytes, layers)
    remote_key = (c.attention, c.latency)
    total = dense_busy = attn_busy = 0.0
    steps = generated = 0

    def period_of(groups: tuple, j: int) -> tuple[float, float, float]:
        # a round costs as its micro-batches at their mean shape (they differ little once
        # decoding; prefill rounds are few), local and remote ones averaged apart;
        # ``groups`` holds each side's count and sums of the shape fields, ``j`` the
        # decode steps since (every sequence's context grown by j)
        (nl, local), (nr, remote) = groups
        ml = _mean_bucket(nl, local, j) if nl else None
        mr = _mean_bucket(nr, remote, j) if nr else None
        key = (base_key, nl, ml, nr, mr, remote_key if nr else None)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = round_period(profile, model, c, [ml] * nl + [mr] * nr, layers, n_local=nl)
        return hit

    while waiting or any(running):
        plans = []
        sums = ([0, [0] * 5], [0, [0] * 5])  # local, remote: micro-batches and sums of their shapes
        for mb in range(depth):
            while len(running[mb]) < sizes[mb] and waiting:
                running[mb].append(waiting.pop())
            plan = _plan_step(running[mb], c.max_step_tokens)
            if plan is None:
                continue
            plans.append((mb, plan[1]))
            sh, side = plan[0], sums[mb >= n_local]
            side[0] += 1
            side[1] = [a + b for a, b in zip(side[1], (sh.tokens, sh.kv_read, sh.attn_units, sh.rows, sh.seqs))]
        groups = tuple((k, tuple(v)) for k, v in sums)
        # rounds of decode alone, nobody finishing or joining: only the contexts grow, so
        # they are costed without planning each step again
        repeat = 1
        full = not waiting or all(len(r) == sizes[mb] for mb, r in enumerate(running))  # no slot to admit into
        if full and all(cnt == 1 for _, segs in plans for _, cnt in segs):
            repeat = min(sq.out - sq.made for _, segs in plans for sq, _ in segs)
        for j in range(repeat):
            period, du, au = period_of(groups, j)
            total += period
            dense_busy += du * period
            attn_busy += au * period
        steps += len(plans) * repeat
        for mb, segments in plans:
            for sq, count in segments:
                sq.cached += count + repeat - 1
                if sq.cached == sq.length + repeat - 1:  # sampled (each repeated round samples once)
                    sq.made += repeat
                    generated += repeat
            running[mb] = [sq for sq in running[mb] if sq.made < sq.out]
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


def _plan_step(seqs: list[_Seq], budget: int):
    """The shape of one step and its segments, as the batch scheduler plans it:
    decode tokens first, then prompt chunks within the token budget."""
    segments = []
    tokens = kv_read = units = rows = 0
    for prefill in (False, True):
        for sq in seqs:
            pending = sq.length - sq.cached
            if pending <= 0 or budget <= 0 or (pending > 1) != prefill:
                continue
            count = min(pending, budget)
            segments.append((sq, count))
            tokens += count
            end = sq.cached + count
            kv_read += end
            units += count * end
            rows += count == pending
            budget -= count
    if not segments:
        return None
    return MicroBatchShape(tokens, kv_read, units, rows, len(segments)), segments


def _infeasible(pred: Prediction, reason: str) -> Prediction:
    pred.feasible = False
    pred.reason = reason
    return pred
