"""Timings of the model's own ops in this process, on random weights of a model's shape:
what ``glinthawk profile`` runs on each worker (on its compute stream) to build a profile.

Every function returns plain numbers; none knows of Dask.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..engine.request import Request
from ..engine.scheduler import BatchScheduler
from ..model.attention import AttentionBatch
from ..model.config import ModelConfig
from ..model.kv_cache import KVCache
from ..model.ops import head, post_pre_attention
from ..model.synthetic import SyntheticCheckpoint
from ..model.weights import load_slice
from ..sampling import SamplingParams, argmax_rows
from .profile import AttentionCost, AttentionProfile, Curve, DenseProfile, Profile, _layer_params, attention_work

__all__ = ["dense_layer_points", "cold_factor", "local_layer_points", "head_points", "attention_points", "driver_cost",
           "dense_points", "dense_profile", "local_profile", "attention_shapes", "trimmed_mean", "TOKENS",
           "TOKENS_QUICK", "ROWS", "ATTENTION_SHAPES", "LOCAL_SHAPES", "SLOT_FACTOR", "slot_length",
           "LayerCycle", "idle_points", "IDLE_GAPS"]

_MIN_LAYERS = 4  # distinct layers cycled through at least (see _layer_count)
_DEFAULT_CACHE_BYTES = 32 * 2**20  # a last-level cache, where the hardware does not say
ROUNDS = 24  # rounds through the layer curve's points (see _over_rounds): about 2 s here

# the points a profile measures: tokens of a dense layer, rows of the head, and
# [sequences, context, new tokens] of attention (decode at short and long contexts, a prefill chunk)
TOKENS = [1, 4, 16, 64, 256]
TOKENS_QUICK = [1, 16, 64, 256]
ROWS = [1, 16, 64]
ATTENTION_SHAPES = [[1, 64, 1], [32, 32, 1], [16, 256, 1], [64, 128, 1], [32, 1024, 1], [8, 2048, 1], [2, 128, 64]]
SLOT_FACTOR = 1.5  # an attention point's KV slots against its cached positions (see slot_length)


def attention_shapes(model: ModelConfig) -> list[list[int]]:
    """The :data:`ATTENTION_SHAPES` that fit ``model``'s context."""
    return [s for s in ATTENTION_SHAPES if s[1] + s[2] <= model.max_seq_len]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    """The device's last-level cache: a CUDA device's L2, a CPU's largest cache level
    (Linux sysfs), else :data:`_DEFAULT_CACHE_BYTES`."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _DEFAULT_CACHE_BYTES)
    best = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            size = Path(index, "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        try:
            best = max(best, int(size.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or _DEFAULT_CACHE_BYTES


def _layer_count(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """How many distinct layers a timing cycles through: enough that their weights are
    twice the last-level cache (a run reads each layer's weights from memory once a
    step, and on the 2-core VM four SmolLM2 layers, 54 MB of fp32, sat in its 300 MB L3
    and ran 15-25% faster than a run's), at most the model's own layer count."""
    layer_bytes = _layer_params(cfg) * torch.tensor([], dtype=dtype).element_size()
    need = math.ceil(2 * last_level_cache_bytes(device) / max(layer_bytes, 1))
    return max(_MIN_LAYERS, min(cfg.n_layers, need))


class LayerCycle(list):
    """Distinct layers that timings take in turn, each timing from the layer where the
    last one left off (:attr:`cursor`), as a run's steps go through all of a model's
    layers.  Timings that each started again at the first layer read the same four
    layers over and over, whose weights then stayed in the L3 cache: on the 2-core VM
    that priced SmolLM2's dense layer 10-15% below a run's (32 tokens: 2.26-2.42 ms
    against 2.51-2.67 ms through every layer), and every prediction made with it high."""

    cursor = 0

    def take(self, n: int) -> list[tuple[Any, Any]]:
        """The next ``n`` pairs ``(layer, next layer)``, the cursor moved past them."""
        k, start = len(self), self.cursor
        self.cursor = (start + n) % k
        return [(self[(start + i) % k], self[(start + i + 1) % k]) for i in range(n)]


def _layers(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[ModelConfig, LayerCycle]:
    """``(config, layers)``: random layers of ``cfg``'s shape, as many as
    :func:`_layer_count` says; the first is drawn, the rest are copies of it in their own
    memory (a copy is 50 times faster than drawing, and the reads are the same)."""
    n = _layer_count(cfg, dtype, device)
    c = cfg.replace(n_layers=3)  # one middle layer: no embedding, no head
    first = load_slice(SyntheticCheckpoint(c), 1, 2, dtype=dtype, device=device).layers[0]
    layers = [first] + [dataclasses.replace(first, **{f.name: getattr(first, f.name).clone()
                                                      for f in dataclasses.fields(first)}) for _ in range(n - 1)]
    return c, LayerCycle(layers)


@torch.inference_mode()
def _time_layers(cfg, layers: LayerCycle, tokens: int, dtype, device, repeats: int, gap: float = 0.0,
                 evict: torch.Tensor | None = None) -> float:
    """The median of ``repeats`` dense halves of ``tokens`` tokens on the next layers of
    ``layers`` (after two that warm up)."""
    x = torch.randn(tokens, cfg.dim, dtype=dtype, device=device)  # [T, dim]
    o = torch.randn(tokens, cfg.n_heads, cfg.head_dim, dtype=dtype, device=device)  # [T, H, D]
    cos = torch.ones(tokens, cfg.head_dim, dtype=dtype, device=device)  # [T, D]
    times = []
    for a, b in layers.take(repeats + 2):
        if gap:
            time.sleep(gap)
        if evict is not None:
            evict.add_(1.0)
        _sync(device)
        t = time.perf_counter()
        post_pre_attention(cfg, a, b, x, o, cos, cos)
        _sync(device)
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    return times[len(times) // 2]


def _over_rounds(points: list, measure, rounds: int) -> list[float]:
    """``measure(point)`` for every point, in ``rounds`` interleaved rounds: the mean
    over rounds of each point's measure, its highest and lowest sixth left out.

    A VM's speed can swing by 2x between tenths of a second (seen on this project's
    2-core VM: a layer's median over 20 ms ranged 1.3-2.8 ms within 40 s), so one burst
    per point is a lottery, and a run's speed is the mean over its seconds.  But a
    stall of a few hundred milliseconds inside one burst is a run's minute's worth of
    stalls in a profile's two seconds: one profile there priced a 64-token layer at
    25.4 ms, against 5.0-5.6 ms in the day's others (and its 16-token one at 5.7 ms
    against 2.9), and every prediction made from it was 41-53% low.  The trimmed mean
    keeps the swings and drops such bursts."""
    samples: list[list[float]] = [[] for _ in points]
    for _ in range(rounds):
        for i, p in enumerate(points):
            samples[i].append(measure(p))
    return [trimmed_mean(s) for s in samples]


def trimmed_mean(values: list[float], cut: int = 6) -> float:
    """The mean of ``values`` without their highest and lowest ``1/cut`` (none cut from
    fewer than ``cut`` values)."""
    xs = sorted(values)
    k = len(xs) // cut
    kept = xs[k:len(xs) - k]
    return sum(kept) / len(kept)


def dense_layer_points(config: dict, dtype: torch.dtype, device: torch.device,
                       tokens: list[int], repeats: int = 2, rounds: int = ROUNDS,
                       layers: tuple[ModelConfig, LayerCycle] | None = None) -> list[list[float]]:
    """``[[tokens, seconds]]``: one layer's dense half (post-attention of one layer and
    pre-attention of the next), back to back over distinct layers: the median of a
    burst of ``repeats``, a trimmed mean over ``rounds`` rounds through every point.
    ``layers``: :func:`_layers` of ``config`` already built (None: built here)."""
    cfg, layers = layers or _layers(ModelConfig(**config), dtype, device)
    seconds = _over_rounds(tokens, lambda t: _time_layers(cfg, layers, t, dtype, device, repeats), rounds)
    return [[t, s] for t, s in zip(tokens, seconds)]


COLD_GAP = 0.002  # seconds: the idle gap before each job that cold_factor times


def cold_factor(config: dict, dtype: torch.dtype, device: torch.device, tokens: int, repeats: int = 8,
                layers: tuple[ModelConfig, LayerCycle] | None = None) -> float:
    """How much slower a dense layer runs after the worker idled for 2 ms while other
    work passed through the CPU caches (on a CPU; 1.0 elsewhere): what a dense worker
    that waits on attention sees at every layer.  A cluster's profile measures this
    against real round trips instead (``glinthawk_profile_alternate``)."""
    if device.type != "cpu":
        return 1.0
    cfg, layers = layers or _layers(ModelConfig(**config), dtype, device)
    hot = _time_layers(cfg, layers, tokens, dtype, device, repeats)
    evict = torch.zeros(8 * 2**20 // 4)  # 8 MiB touched in the gap, as attention over a cache would
    cold = _time_layers(cfg, layers, tokens, dtype, device, repeats, gap=COLD_GAP, evict=evict)
    return max(1.0, cold / hot)


# seconds of idle gaps before a dense job (see idle_points)
IDLE_GAPS = [0.002, 0.005, 0.02, 0.05]


def idle_points(config: dict, dtype: torch.dtype, device: torch.device, tokens: int = 16,
                gaps: list[float] | None = None, repeats: int = 4, rounds: int = 3,
                layers: tuple[ModelConfig, LayerCycle] | None = None) -> list[list[float]]:
    """``[[gap, seconds]]``: what a dense layer of ``tokens`` tokens costs after the
    worker idled ``gap`` seconds, beyond one back to back (rising with the gap, never
    below 0).  Each round times a burst of ``repeats`` layers back to back, then a burst
    at each gap (every layer after its own gap); the medians of the rounds' medians.

    On the 2-core VM a 16-token SmolLM2 layer took 1.7-1.9 ms back to back, 2.0 after
    5 ms, 2.3 after 20 ms, and 10-25 ms after 35-50 ms on two threads (4.2 ms on one):
    past libgomp's spin the OpenMP helper sleeps, and on a VM waking it can take a
    scheduling slice.  A pipeline whose round trips carry tens of milliseconds of
    latency waits that long before its jobs."""
    gaps = sorted(gaps or IDLE_GAPS)
    cfg, layers = layers or _layers(ModelConfig(**config), dtype, device)
    samples: list[list[float]] = [[] for _ in gaps]
    for _ in range(rounds):
        hot = _time_layers(cfg, layers, tokens, dtype, device, repeats)
        for i, g in enumerate(gaps):
            samples[i].append(_time_layers(cfg, layers, tokens, dtype, device, repeats, gap=g) - hot)
    out, top = [], 0.0
    for g, xs in zip(gaps, samples):
        top = max(top, statistics.median_high(xs))  # a longer wait never costs less (the medians' noise aside)
        out.append([g, top])
    return out


# [sequences, context, new tokens] of the run-shaped local layers: decode micro-batches
LOCAL_SHAPES = [[16, 64, 1], [64, 64, 1]]


@torch.inference_mode()
def local_layer_points(config: dict, dtype: torch.dtype, device: torch.device,
                       shapes: list[list[int]] | None = None, passes: int = 4) -> list[list[float]]:
    """A layer as a run that keeps its KV here computes it (in-process, single-tier and
    the local micro-batches of hybrid): the dense half, then attention through the KV
    cache, over distinct layers, in passes that alternate with the dense half alone (so
    both see the machine of the same moments).  ``[[tokens, kv_bytes, flops, local
    seconds, dense seconds]]`` for each ``[sequences, context, new tokens]`` (medians):
    :func:`dense_profile` prices the same layer with the fitted curves and keeps the
    ratio as the profile's ``local_factor``."""
    cfg, layers = _layers(ModelConfig(**config), dtype, device)
    n = len(layers)
    passes = max(1, round(passes * _MIN_LAYERS / n))  # about as many samples, whatever the layer count
    out = []
    for b, ctx, new in shapes or LOCAL_SHAPES:
        t = b * new
        cache = KVCache(cfg.replace(n_layers=n), b, slot_length(ctx + new), dtype=dtype, device=device,
                        zeroed=True)  # read up to ``ctx`` unwritten: committed, as a run's are
        cache.apply([], [(i, i) for i in range(b)])
        batch = AttentionBatch.build(list(range(b)), [ctx] * b, [new] * b, device=device)
        x = torch.randn(t, cfg.dim, dtype=dtype, device=device)  # [T, dim]
        o = torch.randn(t, cfg.n_heads, cfg.head_dim, dtype=dtype, device=device)  # [T, H, D]
        cos = torch.ones(t, cfg.head_dim, dtype=dtype, device=device)  # [T, D]
        local, alone = [], []
        for p in range(2 * passes + 2):
            with_attention = p % 2 == 0
            for i in range(n):
                cache.lengths[:] = ctx  # every layer decodes at the same context
                _sync(device)
                t0 = time.perf_counter()
                _, q, k, v = post_pre_attention(cfg, layers[i], layers[(i + 1) % n], x, o, cos, cos)
                if with_attention:
                    cache.attend(i, q, k, v, batch)  # [T, H, D]
                _sync(device)
                if p >= 2:  # the first pass of each kind warms up
                    (local if with_attention else alone).append(time.perf_counter() - t0)
        end = ctx + new
        kv_bytes, flops = attention_work(cfg, b * end, b * new * end, cache.k.element_size())
        out.append([t, kv_bytes, flops, sorted(local)[len(local) // 2], sorted(alone)[len(alone) // 2]])
    return out


def head_points(config: dict, dtype: torch.dtype, device: torch.device, rows: list[int],
                repeats: int = 1, rounds: int = ROUNDS // 3) -> list[list[float]]:
    """``[[rows, seconds]]``: final norm, LM head and a greedy pick for that many rows
    (the median of a burst of ``repeats``, a trimmed mean over ``rounds`` rounds)."""
    cfg = ModelConfig(**config).replace(n_layers=1)
    w = load_slice(SyntheticCheckpoint(cfg), 0, 1, dtype=dtype, device=device)  # (not in inference mode)
    xs = {n: torch.randn(n, cfg.dim, dtype=dtype, device=device) for n in rows}  # [N, dim]
    with torch.inference_mode():
        seconds = _over_rounds(rows, lambda n: _time_head(w, xs[n], device, repeats), rounds)
    return [[n, s] for n, s in zip(rows, seconds)]


def _time_head(w, x: torch.Tensor, device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        argmax_rows(head(w, x)).tolist()  # [N, V] → N ids on the host, as greedy sampling ends
        times.append(time.perf_counter() - t)
    times = sorted(times[1:])
    return times[len(times) // 2]


def slot_length(end: int) -> int:
    """The KV slot a profile's attention point at ``end`` cached positions reads from:
    :data:`SLOT_FACTOR` times longer, as a run's slots are sized for its longest sequence
    and its steps decode short of that."""
    return math.ceil(end * SLOT_FACTOR)


@torch.inference_mode()
def attention_points(config: dict, dtype: torch.dtype, device: torch.device, shapes: list[list[int]],
                     repeats: int = 3, max_bytes: int | None = None, threads: int | None = None) -> list[list[float]]:
    """``[[kv_bytes, flops, seconds]]`` for each ``[sequences, context, new tokens]``:
    one layer's attention of a micro-batch through the KV cache, as a run computes it
    (append k/v, attend), over the layers of a step.

    A run's step reads every layer's cache once, so a layer's KV is cold by the time
    the next step reads it again, and the first layer of a step also checks the step's
    layout.  Timing one layer over and over keeps its KV hot in the CPU's caches: on
    the 2-core VM that priced 64 sequences at a context of 80 at 0.77 ms a layer, where
    a run's layers took 1.5-1.6 ms.  So each point is the mean layer of whole passes
    over a cache of the model's layers (:func:`_kv_layer_count`: fewer where their KV
    would pass the last-level cache or ``max_bytes``), the lower half's median over
    ``repeats`` passes after a first that touches the memory.

    The slots are :func:`slot_length` long: a run's slots are sized for its longest
    sequence, and a decode step whose contexts fill two thirds of their slots reads more
    scattered memory than one whose slots are full (32 sequences at 32 cached positions
    took 0.36 ms a layer in full slots, 0.39 ms in slots of 1.5x and 0.41 ms in slots of
    2x; 64 at 128 took 3-4% more).  ``threads``: the cache's (the compiled kernel's)
    threads; None, the caller's torch threads, as an attention worker's caches compute;
    1 for the caches of the dense side (in-process, single-tier, hybrid), which compute
    on one."""
    cfg = ModelConfig(**config)
    elem = torch.tensor([], dtype=dtype).element_size()
    out = []
    for b, ctx, new in shapes:
        end = ctx + new
        slot = slot_length(end)
        kv_bytes, flops = attention_work(cfg, b * end, b * new * end, elem)  # one layer's KV: what a pass cycles
        spare = None if max_bytes is None else max_bytes * end // slot  # a layer holds slot / end times that
        n = _kv_layer_count(cfg, kv_bytes, device, spare)
        # as an attention worker's cache, n layers deep
        cache = KVCache(cfg.replace(n_layers=n), b, slot, dtype=dtype, device=device, threads=threads,
                        zeroed=True)  # read up to ``ctx`` unwritten: committed, as a run's are
        cache.apply([], [(i, i) for i in range(b)])
        q = torch.randn(b * new, cfg.n_heads, cfg.head_dim, dtype=dtype, device=device)  # [T, H, D]
        kv = torch.randn(b * new, cfg.n_kv_heads, cfg.head_dim, dtype=dtype, device=device)  # [T, KVH, D]
        batch = AttentionBatch.build(list(range(b)), [ctx] * b, [new] * b, device=device)
        passes = []
        for _ in range(repeats + 1):
            cache.lengths[:] = ctx  # the step's first layer advances them to ``end``
            _sync(device)
            t = time.perf_counter()
            for layer in range(n):
                cache.attend(layer, q, kv, kv, batch)  # [T, H, D]
            _sync(device)
            passes.append((time.perf_counter() - t) / n)
        del cache
        passes = sorted(passes[1:])[: max(1, repeats // 2)]  # the lower half: other processes' bursts left out
        out.append([kv_bytes, flops, passes[len(passes) // 2]])
    return out


def _kv_layer_count(cfg: ModelConfig, layer_bytes: int, device: torch.device, max_bytes: int | None) -> int:
    """How many layers' KV of ``layer_bytes`` each an attention timing cycles through:
    the model's layers, as a run's step, but no more than just pass the last-level
    cache (a cycle through more than it holds misses it every time; more layers would
    only take longer to allocate) nor more than ``max_bytes`` (the memory the worker can
    spare), and at least one."""
    n = min(cfg.n_layers, math.ceil(last_level_cache_bytes(device) / max(layer_bytes, 1)) + 1)
    if max_bytes is not None:
        n = min(n, int(max_bytes // max(layer_bytes, 1)))
    return max(1, n)


def driver_cost(max_seq_len: int = 4096, sizes: tuple[int, int] = (1, 64)) -> tuple[float, float]:
    """``(seconds per step, seconds per sequence)`` of the run driver's bookkeeping: plan
    a decode step, build its attention layout, record the sampled tokens."""
    per = []
    for n in sizes:
        sched = BatchScheduler(n_micro_batches=1, micro_batch_size=n, max_step_tokens=max(512, n),
                               max_seq_len=max_seq_len)
        params = SamplingParams(max_tokens=max_seq_len - 2, ignore_eos=True)
        for i in range(n):
            sched.add(Request(f"r{i}", [1], params))
        times = []
        for _ in range(12):
            t = time.perf_counter()
            step = sched.schedule(0)
            AttentionBatch.build(step.slots, step.starts, step.counts)
            sched.update(step, [2] * len(step.sample_seqs))
            times.append(time.perf_counter() - t)
        times = sorted(times[2:])
        per.append(times[len(times) // 2])
    (n0, n1), (t0, t1) = sizes, per
    per_seq = max(0.0, (t1 - t0) / (n1 - n0))
    return max(0.0, t0 - per_seq * n0), per_seq


def dense_points(config: dict, dtype: torch.dtype, device: torch.device, tokens: list[int] | None = None,
                 rows: list[int] | None = None, shapes: list[list[int]] | None = None, *,
                 cold: bool = False, idle: bool = False, rounds: int = ROUNDS) -> dict:
    """A dense worker's timings for a profile, measured here (plain numbers, ready to
    cross the network): the layer curve at ``tokens`` (over ``rounds`` rounds); with
    ``cold``, the cold factor (after gaps of 2 ms); with ``idle``, the excess after
    longer gaps (:func:`idle_points`); the head curve at ``rows``; attention points at
    ``shapes``; the driver's cost.  :func:`dense_profile` turns them into a
    :class:`DenseProfile`."""
    out: dict = {"device": device.type, "dtype": str(dtype).removeprefix("torch."),
                 "threads": torch.get_num_threads()}
    # the layers the dense timings take in turn, built once (about 0.9 s for SmolLM2 here)
    layers = _layers(ModelConfig(**config), dtype, device) if tokens or idle else None
    if tokens:
        out["layer_s"] = dense_layer_points(config, dtype, device, tokens, rounds=rounds, layers=layers)
        if cold:
            out["cold_factor"] = cold_factor(config, dtype, device, tokens[len(tokens) // 2], layers=layers)
            out["idle_ref_s"] = COLD_GAP
    if idle:
        out["idle_excess"] = idle_points(config, dtype, device, layers=layers)
    if rows:
        out["head_s"] = head_points(config, dtype, device, rows)
    if shapes:
        # the dense side's caches compute on one thread: in a run, the kernel's split over
        # two took as long as one (8 x (1,000 + 64) in process: 24.5 tok/s on two, 24.6 on one)
        out["attention"] = attention_points(config, dtype, device, shapes, threads=1)
        out["local_layer"] = local_layer_points(config, dtype, device)
    out["step_s"], out["step_per_seq_s"] = driver_cost()
    return out


def dense_profile(points: dict, attention: AttentionCost | None = None) -> DenseProfile:
    """The :class:`DenseProfile` of :func:`dense_points`' timings; ``attention``: the cost
    of attention computed on the dense worker itself (hybrid and single-tier plans).
    Its ``local_factor`` is what makes such a layer's price (the dense half alone plus
    ``attention``'s cost) the run-shaped layer :func:`local_layer_points` measured."""
    local_factor = 1.0
    if attention is not None and points.get("local_layer"):
        ratios = [local / (alone + attention.seconds(kv_bytes, flops))
                  for _, kv_bytes, flops, local, alone in points["local_layer"]]
        local_factor = max(1.0, sum(ratios) / len(ratios))
    return DenseProfile(
        device=points["device"], dtype=points["dtype"], threads=points["threads"],
        layer_s=Curve(tuple(map(tuple, points["layer_s"]))), head_s=Curve(tuple(map(tuple, points["head_s"]))),
        step_s=points["step_s"], step_per_seq_s=points["step_per_seq_s"],
        cold_factor=points.get("cold_factor", 1.0), local_factor=local_factor, attention=attention,
        idle_excess=tuple(map(tuple, points["idle_excess"])) if points.get("idle_excess") else None,
        idle_ref_s=points.get("idle_ref_s", 0.0),
    )


def local_profile(model: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                  *, quick: bool = False) -> Profile:
    """A profile of this process, for the in-process engine: it runs where it is
    called, not on a dense worker, so a cluster's profile (measured on the workers'
    compute streams, in their processes) need not tell its speed.  Layer and head
    curves, attention through the KV cache and the driver's cost, measured here on
    random weights of ``model``'s shape; no attention tier, no round trips, no cold
    factor (the engine runs its steps back to back)."""
    t0 = time.time()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    points = dense_points(dataclasses.asdict(model), dtype, device, TOKENS_QUICK if quick else TOKENS, ROWS,
                          attention_shapes(model))
    attention = AttentionCost.fit([tuple(p) for p in points["attention"]])
    return Profile(
        name=f"here-{device.type}",
        source=(f"measured in this process on {time.strftime('%Y-%m-%d %H:%M')} in {time.time() - t0:.1f} s "
                f"({device.type}, {points['threads']} threads); random weights of {model.name}'s shape"),
        dense=dense_profile(points, attention),
        attention=AttentionProfile(cost=attention, threads=points["threads"]),
        model=model,
    )
