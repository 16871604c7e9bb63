"""The pipeline of one round: micro-batches of given shapes cycling through a slice's
layers (see :mod:`glinthawk_dask.planner.simulate` for the model), simulated event by
event until steady (:func:`round_period`)."""

from __future__ import annotations

import collections
import heapq
import math
from dataclasses import dataclass
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


# event phases of a micro-batch at (cycle, slice, layer)
_DENSE, _DONE_DENSE, _ATTENTION, _DONE_ATTENTION, _HOP = range(5)


def _simulate_round(profile: Profile, model: ModelConfig, config: RunConfig, shapes: Sequence[MicroBatchShape],
                    layers: int, cycles: int, n_local: int) -> tuple[float, float, float]:
    # One loop over events (time, order, micro-batch, cycle, slice, layer, phase), the
    # servers' state in flat lists: a sweep simulates thousands of rounds, and calls and
    # objects per event would be most of its time.
    n_slices, n_attn, n_mb = config.dense, config.attention, len(shapes)
    remote = [mb >= n_local for mb in range(n_mb)]  # attention on an attention worker
    costs = [_stage_costs(profile, model, config, s, n_slices, local=not remote[mb]) for mb, s in enumerate(shapes)]
    # a local micro-batch runs a slice as one job; a remote one a job per layer boundary
    whole = [[c.first + c.dense * layers + c.last for c in cs] for cs in costs]
    attn_of = [(mb - n_local) % n_attn for mb in range(n_mb)]  # its attention worker on each slice
    d_until, d_idle, d_busy = [0.0] * n_slices, [0.0] * n_slices, [0.0] * n_slices
    d_queue: list[list] = [[] for _ in range(n_slices)]  # heaps, in the order jobs became ready
    a_until = [[0.0] * n_attn for _ in range(n_slices)]
    a_busy = [[0.0] * n_attn for _ in range(n_slices)]
    a_queue: list[list[collections.deque]] = [[collections.deque() for _ in range(n_attn)] for _ in range(n_slices)]
    shared = profile.shared_host
    fd, fa = profile.slowdowns(n_mb)  # a slice's micro-batches are all in flight at once
    contend = shared and fd > 1.0
    cold, cold_s = profile.dense.cold_factor, profile.dense.cold_s
    serial = config.mode == "in-process"  # the in-process engine runs micro-batches in turn
    latency = config.latency
    eps = _EPS

    events: list = []
    order = 0
    done_at: list[list[float]] = [[] for _ in shapes]
    w_start, w_end = math.inf, 0.0  # the measured window: cycles 2 .. end
    # when the attention side works (reading a request, computing, answering): a dense job
    # that overlaps such work runs at the profile's both-compute speed
    active: list[tuple[float, float]] = []
    push = heapq.heappush
    pop = heapq.heappop

    def run_dense(t: float, mb: int, cyc: int, k: int, layer: int) -> None:
        # starts now on its dense worker (the caller knows it is free)
        nonlocal order
        if not remote[mb]:
            base, layer = whole[mb][k], layers
        else:
            c = costs[mb][k]
            base = c.first if layer == 0 else (c.last if layer == layers else c.dense)
        dur = base
        if contend:
            # time only moves on: ended ones go.  A job that starts as the attention work it
            # waited for ends does not overlap it (the sums of floats that make the two
            # instants differ in the last bits, which decided contention at random)
            if active:
                active[:] = [iv for iv in active if iv[1] > t + eps]
                t1 = t + base - eps
                for a, _ in active:
                    if a < t1:
                        dur *= fd
                        break
        if t - d_idle[k] > eps and d_until[k] <= t:  # after an idle gap: cold
            dur = dur * cold + cold_s
        d_until[k] = d_idle[k] = t + dur
        if w_start <= t:
            d_busy[k] += dur
        order += 1
        push(events, (t + dur, order, mb, cyc, k, layer, _DONE_DENSE))

    def run_attention(t: float, mb: int, cyc: int, k: int, layer: int) -> None:
        nonlocal order
        w = attn_of[mb]
        dur = costs[mb][k].attention
        if shared:
            for u in d_until:
                if u > t + eps:  # a dense worker computes meanwhile
                    dur *= fa
                    break
        a_until[k][w] = t + dur
        if w_start <= t:
            a_busy[k][w] += dur
        order += 1
        push(events, (t + dur, order, mb, cyc, k, layer, _DONE_ATTENTION))

    if serial:  # one after another: the next starts when the previous ends
        order += 1
        push(events, (0.0, order, 0, 0, 0, 0, _DENSE))
    else:
        for mb in range(n_mb):
            order += 1
            push(events, (0.0, order, mb, 0, 0, 0, _DENSE))
    while events:
        t, _, mb, cyc, k, layer, phase = pop(events)
        if phase == _DENSE:
            if d_until[k] > t or d_queue[k]:
                push(d_queue[k], (t, mb, cyc, k, layer))  # waits its turn, as the runtime runs them
            else:
                run_dense(t, mb, cyc, k, layer)
        elif phase == _DONE_DENSE:
            c = costs[mb][k]
            order += 1
            if layer < layers and remote[mb]:
                if shared:  # the attention side's work for this request (induced latency is idle time)
                    active.append((t + latency, t + latency + (c.net - 2 * latency) + c.attention))
                push(events, (t + c.net / 2, order, mb, cyc, k, layer, _ATTENTION))
            else:
                push(events, (t + c.hop, order, mb, cyc, k, layer, _HOP))
            if d_queue[k]:
                _, qmb, qcyc, qk, qlayer = pop(d_queue[k])
                run_dense(t, qmb, qcyc, qk, qlayer)
        elif phase == _ATTENTION:
            w = attn_of[mb]
            if a_until[k][w] > t or a_queue[k][w]:
                a_queue[k][w].append((mb, cyc, layer))
            else:
                run_attention(t, mb, cyc, k, layer)
        elif phase == _DONE_ATTENTION:
            queue = a_queue[k][attn_of[mb]]
            if queue:
                qmb, qcyc, qlayer = queue.popleft()
                run_attention(t, qmb, qcyc, k, qlayer)
            order += 1
            push(events, (t + costs[mb][k].net / 2, order, mb, cyc, k, layer + 1, _DENSE))
        else:  # _HOP
            if k + 1 < n_slices:
                order += 1
                push(events, (t, order, mb, cyc, k + 1, 0, _DENSE))
                continue
            done_at[mb].append(t)
            if cyc == 1 and (not serial or mb == n_mb - 1):
                w_start = min(w_start, t)
            if serial:
                nxt, ncyc = (mb + 1, cyc) if mb + 1 < n_mb else (0, cyc + 1)
                if ncyc < cycles:
                    order += 1
                    push(events, (t, order, nxt, ncyc, 0, 0, _DENSE))
                else:
                    w_end = t
            elif cyc + 1 < cycles:
                order += 1
                push(events, (t, order, mb, cyc + 1, 0, 0, _DENSE))
            else:
                w_end = max(w_end, t)
    if serial:
        first = done_at[-1][1]
        period = (done_at[-1][-1] - first) / (cycles - 2)
    else:
        period = sum((d[-1] - d[1]) / (cycles - 2) for d in done_at) / len(done_at)
    span = max(w_end - w_start, 1e-12)
    dense_share = max(d_busy) / span
    attn_share = max((b for bs in a_busy for b in bs), default=0.0) / span
    return period, min(1.0, dense_share), min(1.0, attn_share)
