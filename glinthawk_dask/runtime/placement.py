"""Where a run goes: layer slices on dense workers, micro-batches on attention workers,
and how many KV slots fit.  Pure functions, used by the scheduler plugin.
"""

from __future__ import annotations

import math

from .messages import Plan

__all__ = ["MODES", "PlacementError", "kv_budget_bytes", "split_layers", "make_plan"]

# A KV resource at or below this is a tag ("this worker is an attention worker"), and the
# budget is a fraction of the worker's memory limit; above it, it is the budget in bytes.
KV_TAG_MAX = 1024


class PlacementError(RuntimeError):
    """The cluster cannot host the run as asked (message says what to change)."""


def kv_budget_bytes(kv_resource: float, memory_limit: int | None, fraction: float, fallback: int) -> int:
    """KV bytes an attention worker may hold."""
    if kv_resource > KV_TAG_MAX:
        budget = int(kv_resource)
        if memory_limit:
            budget = min(budget, int(memory_limit * fraction))
        return budget
    return int((memory_limit or fallback) * fraction)


def split_layers(n_layers: int, n_slices: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal layer ranges."""
    if not 1 <= n_slices <= n_layers:
        raise PlacementError(f"cannot split {n_layers} layers into {n_slices} slices")
    bounds = [round(i * n_layers / n_slices) for i in range(n_slices + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n_slices)]


MODES = ("two-tier", "single-tier", "hybrid")


def make_plan(
    *,
    mode: str,
    dense: list[str],
    attention: dict[str, int],
    n_layers: int,
    kv_bytes_per_token_layer: int,
    max_seq_len: int,
    micro_batch_size: int,
    n_micro_batches: int,
    n_slices: int | None = None,
    dense_kv_budget: dict[str, int | None] | None = None,
    local_micro_batches: int = 0,
    local_batch_size: int | None = None,
) -> Plan:
    """Place a run.

    ``attention`` maps attention workers to their free KV bytes, ``dense_kv_budget``
    dense workers to theirs (None or missing: no limit).  Single-tier runs keep every
    micro-batch local, two-tier runs none, hybrid runs their first
    ``local_micro_batches`` (of ``local_batch_size`` slots, default the micro-batch
    size).  Attention workers are dealt round-robin to slices, the roomiest first (the
    ones other runs hold least), and remote micro-batches round-robin to a slice's
    attention workers, so a run that needs fewer workers than there are takes the
    roomiest.  Micro-batch sizes shrink, if needed,
    until every worker's slots fit its budget: requests then wait for slots instead of
    overrunning memory.
    """
    if mode not in MODES:
        raise PlacementError(f"unknown mode {mode!r}; use {', '.join(MODES)}")
    if not dense:
        raise PlacementError("no dense workers: start one with `glinthawk worker --tier dense SCHEDULER` "
                             "(a plain Dask worker: --resources GPU=1)")
    k = n_slices or len(dense)
    if k > len(dense):
        raise PlacementError(f"{k} slices need {k} dense workers, the cluster has {len(dense)}")
    slices = split_layers(n_layers, k)
    plan = Plan(mode=mode, slices=[list(s) for s in slices], dense=sorted(dense)[:k], max_seq_len=max_seq_len,
                n_micro_batches=n_micro_batches, kv_bytes_per_token_layer=kv_bytes_per_token_layer)
    per_slot = [(b - a) * kv_bytes_per_token_layer * max_seq_len for a, b in slices]
    n_local = {"single-tier": n_micro_batches, "two-tier": 0}.get(mode, max(0, min(local_micro_batches,
                                                                                    n_micro_batches)))
    n_remote = n_micro_batches - n_local

    local_size = 0
    if n_local:
        budgets = dense_kv_budget or {}
        fit = min((budgets[addr] // (per_slot[s] * n_local) if budgets.get(addr) is not None else 1 << 40)
                  for s, addr in enumerate(plan.dense))
        asked = micro_batch_size if mode == "single-tier" else min(local_batch_size or micro_batch_size,
                                                                     micro_batch_size)
        local_size = _fit(asked, fit, "dense", max_seq_len)
        plan.dense_kv = {addr: per_slot[s] * local_size * n_local for s, addr in enumerate(plan.dense)}
    plan.micro_batch_size = local_size if mode == "single-tier" else micro_batch_size

    groups: list[list[str]] = []
    if n_remote:
        workers = sorted(attention, key=lambda a: (-attention[a], a))
        if len(workers) < k:
            raise PlacementError(
                f"{mode} mode needs at least one attention worker per slice ({k}); the cluster has "
                f"{len(workers)}: start them with `glinthawk worker --tier attention SCHEDULER` (a plain Dask "
                "worker: --resources KV=<bytes>), or run single-tier (--mode single-tier: the KV on the dense workers)"
            )
        groups = [workers[s::k] for s in range(k)]
        fit = micro_batch_size
        for s, group in enumerate(groups):
            mbs_per_worker = math.ceil(n_remote / len(group))
            for addr in group[: min(len(group), n_remote)]:
                fit = min(fit, attention[addr] // (per_slot[s] * mbs_per_worker))
        plan.micro_batch_size = _fit(micro_batch_size, fit, "attention", max_seq_len)
    plan.local = [True] * n_local + [False] * n_remote
    plan.sizes = [local_size] * n_local + [plan.micro_batch_size] * n_remote
    for s in range(k):
        addrs, bases, slots = [], [], {}
        for mb in range(n_micro_batches):
            if mb < n_local:
                addrs.append("")
                bases.append(mb * local_size)
                continue
            addr = groups[s][(mb - n_local) % len(groups[s])]
            addrs.append(addr)
            bases.append(slots.get(addr, 0))
            slots[addr] = slots.get(addr, 0) + plan.micro_batch_size
        plan.attention.append(addrs)
        plan.slot_base.append(bases)
        plan.n_slots.append(slots)
    return plan


def _fit(asked: int, fit: int, tier: str, max_seq_len: int) -> int:
    if fit < 1:
        raise PlacementError(
            f"not one sequence of {max_seq_len} tokens fits the KV budget of the {tier} workers: "
            "lower max_seq_len or the number of micro-batches, or give the workers more memory"
            + (" (--dense-kv-budget, or --kv-bytes on the dense workers)" if tier == "dense" else "")
        )
    return min(asked, fit)
