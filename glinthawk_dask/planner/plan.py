"""Choose a plan: sweep configurations through the simulator and rank them.

:func:`sweep` evaluates every combination of mode, dense workers, attention workers per
dense worker, micro-batch size and depth (and, for hybrid runs, how many of the
micro-batches are local) that the cluster (or the ``--dense`` / ``--attention`` limits)
allows; :func:`best` picks the fastest (or the cheapest per
token when prices are given and ``by="cost"``).  :func:`format_table` and
:func:`options_of` turn predictions into what a user reads and types.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..model.config import ModelConfig
from .profile import Profile
from .rounds import compile_kernel, kernel_compiled
from .simulate import Prediction, RunConfig, Workload, simulate

__all__ = [
    "Prices",
    "candidates",
    "sweep",
    "sweep_threads",
    "sweep_hybrid",
    "mixes_pay",
    "best",
    "format_table",
    "options_of",
    "spec_fields",
    "plan_text",
    "size_text",
]


@dataclass(frozen=True)
class Prices:
    """$/hour of one dense worker and one attention worker (None: not priced)."""

    dense: float | None = None
    attention: float | None = None

    @classmethod
    def parse(cls, text: str | None, profile: Profile | None = None) -> "Prices":
        """``dense=X,attention=Y``; missing ones come from the profile."""
        out = {"dense": profile.dense.price_per_hour if profile else None,
               "attention": profile.attention.price_per_hour if profile else None}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in out or not value:
                raise ValueError(f"--prices takes dense=X,attention=Y ($/hour), not {text!r}")
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"--prices: {value!r} is not a number") from None
        return cls(**out)


def _sizes(limit: int, max_depth: int) -> list[int]:
    """Powers of two up to ``limit`` and ``limit`` itself, none so small that the
    deepest pipeline of them would hold less than half the requests at once."""
    smallest = max(1, limit // (2 * max_depth))
    sizes = {limit}
    s = 1
    while s < limit:
        if s >= smallest:
            sizes.add(s)
        s *= 2
    return sorted(sizes)


def candidates(
    n_requests: int,
    *,
    modes: Sequence[str] = ("two-tier", "single-tier"),
    dense: int | Sequence[int] = 1,
    attention: int | Sequence[int] = 1,
    micro_batch_size: int | None = None,
    micro_batches: int | None = None,
    max_depth: int = 8,
    max_seq_len: int | None = None,
    latency: float = 0.0,
    dtype_bytes: int = 4,
    max_step_tokens: int = 512,
    dense_kv_budget: float | None = None,
    local_micro_batches: int | None = None,
    mixes: bool = True,
) -> list[RunConfig]:
    """Every configuration worth simulating; fixed knobs stay fixed.  ``dense`` and
    ``attention`` are counts to use (a number: all of 1..n); a plan uses no more
    attention workers per dense worker than it has remote micro-batches.  Hybrid plans
    take every number of local micro-batches, 0 to all (``local_micro_batches``: that
    many, at most all), their slots shrunk to ``dense_kv_budget`` (bytes of KV per dense
    worker, which every configuration carries; None: the profile's).  Hybrid plans with
    none local (two-tier) or all local (single-tier) are left to those modes when they are
    swept too; with ``mixes=False`` (see :func:`mixes_pay`) hybrid plans are only those two."""
    dense_opts = range(1, dense + 1) if isinstance(dense, int) else list(dense)
    attn_opts = range(1, attention + 1) if isinstance(attention, int) else list(attention)
    sizes = [micro_batch_size] if micro_batch_size else _sizes(n_requests, max_depth)
    out: list[RunConfig] = []
    seen: set[RunConfig] = set()
    for mode in modes:
        for d in dense_opts:
            for a in (attn_opts if mode in ("two-tier", "hybrid") else [1]):
                for b in sizes:
                    most = max(1, math.ceil(n_requests / b))
                    depths = [micro_batches] if micro_batches else range(1, min(max_depth, most) + 1)
                    for m in depths:
                        if mode != "hybrid":
                            locals_ = [0]
                        elif local_micro_batches is not None:
                            locals_ = [min(local_micro_batches, m)]
                        else:  # none local is two-tier, all local single-tier: not twice
                            locals_ = [lm for lm in range(m + 1) if (mixes or lm in (0, m))
                                       and not (lm == 0 and "two-tier" in modes)
                                       and not (lm == m and "single-tier" in modes)]
                        for lm in locals_:
                            remote = m - lm if mode == "hybrid" else m
                            cfg = RunConfig(mode=mode, micro_batch_size=b, micro_batches=m, dense=d,
                                            attention=max(1, min(a, remote)), max_seq_len=max_seq_len,
                                            latency=latency, dtype_bytes=dtype_bytes,
                                            max_step_tokens=max_step_tokens, local_micro_batches=lm,
                                            dense_kv_budget=dense_kv_budget)
                            if cfg not in seen:
                                seen.add(cfg)
                                out.append(cfg)
    return out


# A sweep that has run this long compiles the rounds' events (about a second, six the
# first time on a machine, on the 2-core VM) and runs the rest of its rounds several
# times faster; quicker sweeps (auto plans' are) stay in Python.
COMPILE_AFTER_S = 2.0


def sweep_threads() -> int:
    """Threads a compiled sweep runs in unless told: the cores, at most 8 (beyond, the
    parts that hold the GIL, steps and stage costs, leave them idle)."""
    return min(8, os.cpu_count() or 1)


def sweep(profile: Profile, model: ModelConfig, workload: Workload, configs: Iterable[RunConfig],
          cache: dict | None = None, progress: Callable[[], None] | None = None,
          compile_after_s: float | None = COMPILE_AFTER_S, threads: int | None = None) -> list[Prediction]:
    """Predictions for ``configs``, fastest first (infeasible ones last); ``cache`` keeps
    simulated rounds across sweeps of one profile, model and workload; ``progress`` is
    called after each configuration.  After ``compile_after_s`` seconds (None: never)
    the rest is simulated with the compiled kernel (:func:`~.rounds.compile_kernel`),
    which gives the same predictions.  With the kernel compiled, configurations run in
    ``threads`` threads (default: the cores, at most 8), grouped by the rounds they share;
    the kernel runs without the GIL.  The predictions and their order are the same with
    any number of threads."""
    cache = {} if cache is None else cache
    configs = list(configs)
    preds: list[Prediction | None] = [None] * len(configs)
    threads = threads or sweep_threads()
    tick = _locked(progress) if progress is not None else None
    t0 = time.perf_counter()
    compiling = compile_after_s is not None  # still to compile once the sweep runs that long
    i = 0
    while i < len(configs) and not (threads > 1 and kernel_compiled()):
        if compiling and time.perf_counter() - t0 > compile_after_s:
            compiling = False
            compile_kernel()
            continue
        preds[i] = simulate(profile, model, workload, configs[i], cache)
        i += 1
        if tick is not None:
            tick()
    groups: dict[tuple, list[int]] = {}
    for k in range(i, len(configs)):
        groups.setdefault(_round_group(configs[k]), []).append(k)

    stop = threading.Event()  # set when the sweep fails or is interrupted (Ctrl-C): the threads end soon

    def run(group: list[int]) -> None:
        try:
            for k in group:
                if stop.is_set():
                    return
                preds[k] = simulate(profile, model, workload, configs[k], cache)
                if tick is not None:
                    tick()
        except BaseException:
            stop.set()  # at once, not when the main thread next wakes: under load that is late
            raise

    if groups:
        with ThreadPoolExecutor(min(threads, len(groups)), thread_name_prefix="glinthawk-sweep") as pool:
            try:
                pending = {pool.submit(run, g) for g in groups.values()}
                while pending:  # woken often, so that Ctrl-C is handled at once
                    done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                    for f in done:
                        f.result()  # the first failure, as soon as it happens
            except BaseException:
                stop.set()  # each thread ends after the configuration it is on
                raise
    return sorted(preds, key=lambda p: (not p.feasible, -p.tokens_per_s))


def _round_group(c: RunConfig) -> tuple:
    """What decides the rounds a configuration simulates, besides its shapes: configurations
    alike in it share rounds, so one thread takes them all (single-tier rounds are
    local: no attention workers or latency).  With at least as many attention workers as
    remote micro-batches each has its own worker, so more workers give the same rounds
    (as :func:`~glinthawk_dask.planner.simulate.simulate` keys them)."""
    remote = None if c.mode == "single-tier" else (min(c.attention, max(1, c.micro_batches - c.n_local)), c.latency)
    return c.dense, c.mode == "in-process", c.dtype_bytes, remote


def _locked(callback: Callable[[], None]) -> Callable[[], None]:
    lock = threading.Lock()

    def call() -> None:
        with lock:
            callback()

    return call


def sweep_hybrid(profile: Profile, model: ModelConfig, workload: Workload, *, top: int = 3,
                 **kwargs) -> list[Prediction]:
    """Hybrid plans in two stages, a few times faster than every split of every plan:
    single-tier and two-tier plans first (``kwargs`` as for :func:`candidates`), then,
    for the ``top`` sizes and depths among them, every split of that depth and of one or
    two micro-batches more (local ones added beside the remote ones).  Both extremes are
    hybrid plans too, so the best is never slower than the better of single-tier and
    two-tier, as predicted.  Hybrid predictions, fastest first.

    When the tiers share a host's cores (``profile.shared_host``), splits are not
    tried: only the extremes.  Mixing pays by filling the dense worker's idle time
    between attention round trips, and on a shared host that time is not idle, the
    attention workers compute on the same cores (measured on the 2-core VM: 8 local +
    64 remote sequences predicted 390 tok/s, 154 measured, against 212 for all 64
    remote; the profile's contention factors come from steady loads and miss it)."""
    kwargs.pop("modes", None)
    cache: dict = {}
    if not mixes_pay(profile):
        return sweep(profile, model, workload, candidates(workload.n, modes=("hybrid",), mixes=False, **kwargs),
                     cache)
    first = sweep(profile, model, workload, candidates(workload.n, modes=("two-tier", "single-tier"), **kwargs),
                  cache)
    shapes: list[tuple[int, int]] = []
    for p in first:
        key = (p.config.micro_batch_size, p.config.micro_batches)
        if p.feasible and key not in shapes:
            shapes.append(key)
        if len(shapes) == top:
            break
    max_depth = kwargs.get("max_depth", 8)
    depths = {(b, d) for b, m in shapes
              for d in ([m] if kwargs.get("micro_batches") else range(m, min(m + 2, max_depth) + 1))}
    configs = [c for b, d in sorted(depths) for c in candidates(
        workload.n, **{**kwargs, "modes": ("hybrid",), "micro_batch_size": b, "micro_batches": d})]
    return sweep(profile, model, workload, configs, cache)


def mixes_pay(profile: Profile) -> bool:
    """Whether hybrid plans that mix local and remote micro-batches are worth simulating
    on ``profile``'s hardware: not where the tiers share a host's cores (see
    :func:`sweep_hybrid`)."""
    return not profile.shared_host


def best(preds: Sequence[Prediction], prices: Prices | None = None, by: str = "speed") -> Prediction | None:
    """The fastest feasible prediction, or the cheapest per token (``by="cost"``).

    Among plans within 2% of the best speed, the one with fewer workers and fewer
    micro-batches wins: the simulator is not that exact, and smaller plans leave room."""
    ok = [p for p in preds if p.feasible and p.tokens_per_s > 0]
    if not ok:
        return None
    if by == "cost" and prices is not None:
        costed = [(p.cost_per_million(prices.dense, prices.attention), p) for p in ok]
        costed = [(c, p) for c, p in costed if c is not None]
        if costed:
            return min(costed, key=lambda cp: cp[0])[1]
    top = max(p.tokens_per_s for p in ok)
    near = [p for p in ok if p.tokens_per_s >= 0.98 * top]
    return min(near, key=lambda p: (p.config.dense * (1 + p.config.attention), p.micro_batches, -p.tokens_per_s))


def options_of(p: Prediction) -> str:
    """The CLI options that run this plan."""
    c = p.config
    opts = [f"--mode {c.mode}", f"--micro-batch-size {p.micro_batch_size}", f"--micro-batches {p.micro_batches}"]
    if c.mode == "hybrid":
        opts.append(f"--local-micro-batches {p.local_micro_batches}")
    if c.dense > 1:
        opts.append(f"--slices {c.dense}")
    if c.max_seq_len:
        opts.append(f"--max-seq-len {c.max_seq_len}")
    if _budgeted(p):
        opts.append(f"--dense-kv-budget {size_text(c.dense_kv_budget)}")
    return " ".join(opts)


def spec_fields(p: Prediction) -> dict:
    """The pipeline spec fields (``topology:`` section) that run this plan."""
    c = p.config
    out = {"mode": c.mode, "micro_batch_size": p.micro_batch_size, "micro_batches": p.micro_batches}
    if c.mode == "hybrid":
        out["local_micro_batches"] = p.local_micro_batches
    if c.dense > 1:
        out["dense_workers"] = c.dense
    if c.mode != "single-tier":  # the embedded cluster's attention workers, for every slice
        out["attention_workers"] = c.dense * c.attention
    if c.max_seq_len:
        out["max_seq_len"] = c.max_seq_len
    if _budgeted(p):
        out["dense_kv_budget"] = int(c.dense_kv_budget)
    return out


def _budgeted(p: Prediction) -> bool:
    """Whether the plan was made under a dense KV budget the run must be given too."""
    return p.config.dense_kv_budget is not None and p.config.mode in ("single-tier", "hybrid")


def size_text(nbytes: float) -> str:
    """Bytes as ``--kv-bytes``-style options take them: ``180MB``, ``4GiB`` when exact,
    else a plain number."""
    n = int(nbytes)
    for unit, scale in (("GiB", 2**30), ("GB", 10**9), ("MiB", 2**20), ("MB", 10**6), ("KiB", 2**10), ("kB", 10**3)):
        if n and n == nbytes and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def plan_text(p: Prediction) -> str:
    """Micro-batch size x micro-batches, and for hybrid plans how many are local, of
    how many slots: ``16x4 (2 local x8)``."""
    text = f"{p.micro_batch_size}x{p.micro_batches}"
    if p.config.mode == "hybrid":
        text += f" ({p.local_micro_batches} local x{p.local_batch_size})" if p.local_micro_batches else " (0 local)"
    return text


def format_table(preds: Sequence[Prediction], prices: Prices | None = None, limit: int = 10) -> str:
    """The best predictions as a readable table (a plan that places as another one
    already shown, e.g. two micro-batch sizes a dense KV budget shrinks alike, once)."""
    priced = prices is not None and prices.dense is not None
    head = ["mode", "dense", "attn/dense", "plan", "tok/s", "dense %", "attn %", "KV/attn GiB", "KV/dense GiB",
            "bottleneck"] + (["$/M tok"] if priced else [])
    rows: list[list[str]] = []
    shown: set = set()
    for p in preds:
        if len(rows) >= limit:
            break
        if not p.feasible:
            continue
        c = p.config
        remote = p.remote
        row = [c.mode, str(c.dense), str(c.attention) if remote else "-", plan_text(p), f"{p.tokens_per_s:.1f}",
               f"{100 * p.dense_util:.0f}", f"{100 * p.attention_util:.0f}" if remote else "-",
               f"{p.kv_bytes_attention / 2**30:.2f}" if remote else "-",
               f"{p.kv_bytes_dense / 2**30:.2f}" if p.local_micro_batches else "-", p.bottleneck]
        if priced:
            cost = p.cost_per_million(prices.dense, prices.attention)
            row.append("-" if cost is None else f"{cost:.2f}")
        if tuple(row) in shown:
            continue
        shown.add(tuple(row))
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
