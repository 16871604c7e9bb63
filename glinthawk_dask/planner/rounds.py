"""The pipeline of one round: micro-batches of given shapes cycling through a slice's
layers (see :mod:`glinthawk_dask.planner.simulate` for the model), simulated event by
event until steady (:func:`round_period`)."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

from ..model.config import ModelConfig
from .profile import Profile, attention_work, request_bytes
from .workload import MicroBatchShape, RunConfig

__all__ = ["round_period"]


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
    kv_bytes, flops = attention_work(m, s.kv_read, s.attn_units, elem)
    driver = p.dense.step_s + p.dense.step_per_seq_s * s.seqs
    head = p.head_s(m, s.rows, elem)
    out = []
    for k in range(n_slices):
        first_extra = driver if k == 0 else 0.0
        last_extra = head if k == n_slices - 1 else 0.0
        hop = p.net_s(s.tokens * m.dim * elem) if k + 1 < n_slices else (p.rtt_s if n_slices > 1 else 0.0)
        if not local:
            nbytes = request_bytes(m, s.tokens, elem)
            msg = p.msg_cpu(nbytes)
            a = p.attention.cost.seconds(kv_bytes, flops)
            net = p.net_s(nbytes) + 2 * c.latency
            out.append(_Costs(first=first_extra + d / 2 + msg, dense=d + msg, last=d / 2 + last_extra,
                              attention=a, net=net, hop=hop))
        else:
            local = p.dense.attention or p.attention.cost
            a = local.seconds(kv_bytes, flops)
            out.append(_Costs(first=first_extra, dense=(d + a) * p.dense.local_factor, last=last_extra,
                              attention=0.0, net=0.0, hop=hop))
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
    shared = profile.shared_host
    fd, fa = profile.slowdowns(len(shapes))  # a slice's micro-batches are all in flight at once
    cold, cold_s = profile.dense.cold_factor, profile.dense.cold_s
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
        if kind == "dense" and t - server.idle_since > _EPS and server.busy_until <= t:
            dur = dur * cold + cold_s
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
            heapq.heappush(srv.queue, (t, mb, state))  # in the order they became ready, as the runtime runs them
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
            _, mb, state = heapq.heappop(srv.queue)
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
