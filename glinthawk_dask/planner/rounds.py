"""The pipeline of one round: micro-batches of given shapes cycling through a slice's
layers (see :mod:`glinthawk_dask.planner.simulate` for the model), simulated event by
event until steady (:func:`round_period`), in Python or compiled with Numba
(:func:`compile_kernel`), with the same results."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Callable, Sequence

import numpy as np

from ..model.config import ModelConfig
from .profile import Profile, attention_work, idle_excess_at, request_bytes
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
                 layers: int, *, cycles: int = 5, n_local: int | None = None,
                 memo: dict | None = None) -> tuple[float, float, float]:
    """Steady-state seconds per step when micro-batches of ``shapes`` cycle through
    ``layers`` layers per slice together; with the busy shares of the dense and
    attention streams.  The first ``n_local`` shapes are local micro-batches (attention
    on the dense worker; default: all of them, none for two-tier, the config's local
    ones for hybrid), the rest remote; remote ones are dealt round-robin to the
    slice's attention workers.  Exact for ``layers`` up to 6; beyond, the period is
    extended linearly in the layers from 3 and 6 (every middle layer costs the same).
    ``memo`` (a dict, shared by a sweep's rounds) keeps each shape's stage costs."""
    if n_local is None:
        n_local = min(config.n_local, len(shapes))
    costs = _cost_array(profile, model, config, shapes, n_local, {} if memo is None else memo)
    kernel = _compiled
    if kernel is None:  # lists index fastest in Python, arrays in compiled code
        kernel, flat = _round_events, costs.ravel().tolist()
    else:
        flat = costs.ravel()
    fd, fa = profile.slowdowns(len(shapes))  # a slice's micro-batches are all in flight at once
    idle_g, idle_e, idle_base = _idle_args(profile, kernel is not _round_events)

    def simulate_round(layers: int) -> tuple[float, float, float]:
        return kernel(  # (one type for each argument: one compiled signature)
            flat, len(shapes), int(config.dense), int(n_local), int(config.attention), int(layers), int(cycles),
            bool(profile.shared_host), float(fd), float(fa), float(profile.dense.cold_factor),
            float(profile.dense.cold_s), idle_g, idle_e, idle_base, config.mode == "in-process",
            float(config.latency), _EPS)

    if layers <= 6:
        return simulate_round(layers)
    p3, d3, a3 = simulate_round(3)
    p6, d6, a6 = simulate_round(6)
    f = (layers - 6) / 3.0
    period = p6 + (p6 - p3) * f
    dense_busy = d6 * p6 + (d6 * p6 - d3 * p3) * f
    attn_busy = a6 * p6 + (a6 * p6 - a3 * p3) * f
    return period, min(1.0, dense_busy / period), min(1.0, attn_busy / period)


_EPS = 1e-9  # seconds: instants closer than this are the same instant


def _idle_args(profile: Profile, arrays: bool):
    """The kernel's view of the dense worker's idle excess: its gaps and seconds (from
    a point at no gap; numpy arrays for compiled code, lists for Python) and the excess
    the cold cost already holds (at ``idle_ref_s``)."""
    d = profile.dense
    pts = [(0.0, 0.0)] + list(d.idle_excess or ())
    gaps, excess = [float(g) for g, _ in pts], [float(e) for _, e in pts]
    base = idle_excess_at(d.idle_excess, d.idle_ref_s) if d.idle_excess else 0.0
    if arrays:
        return np.array(gaps), np.array(excess), float(base)
    return gaps, excess, float(base)


# event phases of a micro-batch at (cycle, slice, layer)
_DENSE, _DONE_DENSE, _ATTENTION, _DONE_ATTENTION, _HOP = range(5)
# fields of a stage's costs in the kernel's array
_FIRST, _MID, _LAST, _ATTN, _NET, _HOPS = range(6)


def _cost_array(profile: Profile, model: ModelConfig, config: RunConfig, shapes: Sequence[MicroBatchShape],
                n_local: int, memo: dict) -> np.ndarray:
    """``[micro-batch, slice, 6]``: seconds of each stage (:class:`_Costs`' fields in
    order, ``_FIRST`` .. ``_HOPS``), costed once for each distinct shape and side and
    kept in ``memo``."""
    costs = np.empty((len(shapes), config.dense, 6))
    # besides the shape and side, stage costs depend on the hardware, the model and these
    # fields of the config alone
    base = ("stage costs", id(profile), model, config.dense, config.dtype_bytes, config.latency)
    for mb, s in enumerate(shapes):
        key = (base, s, mb < n_local)
        row = memo.get(key)
        if row is None:
            row = memo[key] = [(c.first, c.dense, c.last, c.attention, c.net, c.hop)
                               for c in _stage_costs(profile, model, config, s, config.dense, local=mb < n_local)]
        costs[mb] = row
    return costs


_compiled: Callable | None = None  # _round_events compiled, once compile_kernel() has run
_compile_lock = threading.Lock()


def kernel_compiled() -> bool:
    """Whether rounds run compiled now (the compiled kernel releases the GIL: rounds of
    different configurations can run in threads at once)."""
    return _compiled is not None


def compile_kernel() -> bool:
    """Compile the events of a round with Numba; the rounds simulated from then on use
    it (with the same results, bit for bit: no fastmath).  About a second in a new
    process (from Numba's on-disk cache), six the first time on a machine; worth
    it for sweeps that would take longer than that (:func:`~.plan.sweep` decides).
    False where Numba is missing (rounds stay in Python)."""
    global _compiled
    with _compile_lock:
        if _compiled is None:
            try:
                import numba
            except ImportError:  # pragma: no cover - only where Numba has no wheels
                return False
            kernel = numba.njit(cache=True, nogil=True)(_round_events)
            # compiled (or loaded) now, for arguments of the types round_period passes
            kernel(np.zeros(6), 1, 1, 0, 1, 1, 3, False, 1.0, 1.0, 1.0, 0.0, np.zeros(1), np.zeros(1), 0.0, False,
                   0.0, _EPS)
            _compiled = kernel
    return True


def _round_events(costs, n_mb, n_slices, n_local, n_attn, layers, cycles, shared, fd, fa, cold, cold_s,
                  idle_g, idle_e, idle_base, serial, latency, eps):
    """The events of one round (see :func:`round_period`): (period, dense busy share,
    attention busy share).  ``costs`` is ``[micro-batch, slice, 6]`` (:class:`_Costs`'
    fields in order), flattened.  A dense job after an idle gap costs ``cold`` times
    more plus ``cold_s``, plus what the idle excess curve (``idle_g`` gaps, ``idle_e``
    seconds, from a point at no gap) gives at its gap beyond ``idle_base``.

    One loop over events (time, order, micro-batch, cycle, slice, layer, phase) kept in a
    heap, the servers' state and queues in flat lists: Python runs it as it is, fast for
    Python, and Numba compiles it (:func:`compile_kernel`)."""
    contend = shared and fd > 1.0  # a dense job overlapping attention work runs slower
    n_sa = n_slices * n_attn
    d_until = [0.0] * n_slices
    d_idle = [0.0] * n_slices  # when each dense worker last went idle
    d_busy = [0.0] * n_slices  # seconds of work started inside the measured window
    dq = [0.0] * (n_slices * n_mb * 4)  # [slice, i, 4] dense jobs waiting: (ready at, mb, cycle, layer)
    dq_n = [0] * n_slices
    a_until = [0.0] * n_sa  # [slice, attention worker]
    a_busy = [0.0] * n_sa
    aq = [0] * (n_sa * n_mb * 3)  # [slice, attention worker, i, 3] waiting, in arrival order: (mb, cycle, layer)
    aq_head = [0] * n_sa
    aq_n = [0] * n_sa
    # when the attention side works (reading a request, computing, answering): a dense job
    # that overlaps such work runs at the profile's both-compute speed
    act_from = [0.0]
    act_to = [0.0]
    n_active = 0
    done_at = [0.0] * (n_mb * cycles)  # [mb, cycle]
    done_n = [0] * n_mb
    w_start, w_end = math.inf, 0.0  # the measured window: cycles 2 .. end
    events = [(0.0, 0, 0, 0, 0, 0, 0)]
    events.pop()
    order = 0
    if serial:  # one after another: the next starts when the previous ends
        order += 1
        heappush(events, (0.0, order, 0, 0, 0, 0, _DENSE))
    else:
        for mb in range(n_mb):
            order += 1
            heappush(events, (0.0, order, mb, 0, 0, 0, _DENSE))
    while events:
        t, _, mb, cyc, k, layer, phase = heappop(events)
        start_dense = start_attention = False
        if phase == _DENSE:  # waits its turn, in the order jobs became ready, as the runtime runs them
            i = dq_n[k]
            q = (k * n_mb + i) * 4
            dq[q], dq[q + 1], dq[q + 2], dq[q + 3] = t, mb, cyc, layer
            dq_n[k] = i + 1
            start_dense = not (d_until[k] > t or i > 0)
        elif phase == _DONE_DENSE:
            c = (mb * n_slices + k) * 6  # its costs on this slice
            order += 1
            if layer < layers and mb >= n_local:
                if contend:  # the attention side's work for this request (induced latency is idle time)
                    if n_active == len(act_from):
                        act_from.append(0.0)
                        act_to.append(0.0)
                    act_from[n_active] = t + latency
                    act_to[n_active] = t + latency + (costs[c + _NET] - 2 * latency) + costs[c + _ATTN]
                    n_active += 1
                heappush(events, (t + costs[c + _NET] / 2, order, mb, cyc, k, layer, _ATTENTION))
            else:
                heappush(events, (t + costs[c + _HOPS], order, mb, cyc, k, layer, _HOP))
            start_dense = dq_n[k] > 0
        elif phase == _ATTENTION:
            kw = k * n_attn + (mb - n_local) % n_attn  # its attention worker on this slice
            q = (kw * n_mb + (aq_head[kw] + aq_n[kw]) % n_mb) * 3
            aq[q], aq[q + 1], aq[q + 2] = mb, cyc, layer
            aq_n[kw] += 1
            start_attention = not (a_until[kw] > t or aq_n[kw] > 1)
        elif phase == _DONE_ATTENTION:
            kw = k * n_attn + (mb - n_local) % n_attn
            start_attention = aq_n[kw] > 0
        else:  # _HOP
            if k + 1 < n_slices:
                order += 1
                heappush(events, (t, order, mb, cyc, k + 1, 0, _DENSE))
                continue
            done_at[mb * cycles + done_n[mb]] = t
            done_n[mb] += 1
            if cyc == 1 and (not serial or mb == n_mb - 1):
                w_start = min(w_start, t)
            if serial:
                nxt, ncyc = (mb + 1, cyc) if mb + 1 < n_mb else (0, cyc + 1)
                if ncyc < cycles:
                    order += 1
                    heappush(events, (t, order, nxt, ncyc, 0, 0, _DENSE))
                else:
                    w_end = t
            elif cyc + 1 < cycles:
                order += 1
                heappush(events, (t, order, mb, cyc + 1, 0, 0, _DENSE))
            else:
                w_end = max(w_end, t)
        if start_dense:  # the first ready of slice k's waiting jobs starts now
            base_q = k * n_mb * 4
            best = base_q
            for i in range(1, dq_n[k]):
                q = base_q + i * 4
                for f in range(4):
                    if dq[q + f] != dq[best + f]:
                        if dq[q + f] < dq[best + f]:
                            best = q
                        break
            jmb, jcyc, jlayer = int(dq[best + 1]), int(dq[best + 2]), int(dq[best + 3])
            last = base_q + (dq_n[k] - 1) * 4
            dq[best], dq[best + 1], dq[best + 2], dq[best + 3] = dq[last], dq[last + 1], dq[last + 2], dq[last + 3]
            dq_n[k] -= 1
            jc = (jmb * n_slices + k) * 6
            if jmb < n_local:  # a local micro-batch runs the slice as one job
                base, jlayer = costs[jc + _FIRST] + costs[jc + _MID] * layers + costs[jc + _LAST], layers
            else:
                base = costs[jc + _FIRST] if jlayer == 0 else (
                    costs[jc + _LAST] if jlayer == layers else costs[jc + _MID])
            dur = base
            if contend and n_active > 0:
                # time only moves on: ended ones go.  A job that starts as the attention work it
                # waited for ends does not overlap it (the sums of floats that make the two
                # instants differ in the last bits, which decided contention at random)
                kept = 0
                for i in range(n_active):
                    if act_to[i] > t + eps:
                        act_from[kept], act_to[kept] = act_from[i], act_to[i]
                        kept += 1
                n_active = kept
                t1 = t + base - eps
                for i in range(n_active):
                    if act_from[i] < t1:
                        dur *= fd
                        break
            if t - d_idle[k] > eps and d_until[k] <= t:  # after an idle gap: cold
                dur = dur * cold + cold_s
                gap = t - d_idle[k]
                ex = idle_e[len(idle_e) - 1]  # held beyond the last point
                for i in range(1, len(idle_g)):
                    if gap <= idle_g[i]:
                        ex = idle_e[i - 1] + (idle_e[i] - idle_e[i - 1]) * (gap - idle_g[i - 1]) / (
                            idle_g[i] - idle_g[i - 1])
                        break
                if ex > idle_base:  # a longer wait than the cold cost's
                    dur += ex - idle_base
            d_until[k] = t + dur
            d_idle[k] = t + dur
            if w_start <= t:
                d_busy[k] += dur
            order += 1
            heappush(events, (t + dur, order, jmb, jcyc, k, jlayer, _DONE_DENSE))
        if start_attention:  # the first to arrive at (k, w) starts now
            h = aq_head[kw]
            q = (kw * n_mb + h) * 3
            jmb, jcyc, jlayer = aq[q], aq[q + 1], aq[q + 2]
            aq_head[kw] = (h + 1) % n_mb
            aq_n[kw] -= 1
            dur = costs[(jmb * n_slices + k) * 6 + _ATTN]
            if shared:
                for u in d_until:
                    if u > t + eps:  # a dense worker computes meanwhile
                        dur *= fa
                        break
            a_until[kw] = t + dur
            if w_start <= t:
                a_busy[kw] += dur
            order += 1
            heappush(events, (t + dur, order, jmb, jcyc, k, jlayer, _DONE_ATTENTION))
        if phase == _DONE_ATTENTION:
            order += 1
            heappush(events, (t + costs[(mb * n_slices + k) * 6 + _NET] / 2, order, mb, cyc, k, layer + 1, _DENSE))
    last = n_mb - 1
    if serial:
        period = (done_at[last * cycles + done_n[last] - 1] - done_at[last * cycles + 1]) / (cycles - 2)
    else:
        period = 0.0
        for mb in range(n_mb):
            period += (done_at[mb * cycles + cycles - 1] - done_at[mb * cycles + 1]) / (cycles - 2)
        period /= n_mb
    span = max(w_end - w_start, 1e-12)
    dense = 0.0
    for b in d_busy:
        dense = max(dense, b)
    attention = 0.0
    for b in a_busy:
        attention = max(attention, b)
    return period, min(1.0, dense / span), min(1.0, attention / span)
