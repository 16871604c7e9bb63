"""The scheduler's KV ledger: where each run is placed and the KV bytes it holds.

:class:`KVLedger` is the placement half of
:class:`~.plugins.GlinthawkSchedulerPlugin`: it places a run (``glinthawk_plan``), a
micro-batch moved off a lost attention worker (``glinthawk_replace``) and the
micro-batches a run grows by once other runs free KV (``glinthawk_grow``, after asking
``glinthawk_kv_room``).  It takes back what a grown run's drained micro-batches held,
and those a run gave up for runs waiting for KV (``glinthawk_yield``), as their caches
close (``glinthawk_release``); a micro-batch resized in place holds what its new size
takes (``glinthawk_resize``).  Every reservation is in bytes per worker; a run's whole
reservation goes when it closes.  Each change between runs (a run placed, waiting,
growing, giving KV back) is announced to the clients (:mod:`.kv_signals`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .. import config
from .kv_signals import announce, run_name
from .messages import Plan
from .placement import PlacementError, kv_budget_bytes, make_plan

__all__ = ["DENSE_KV", "KVLedger", "held_bytes", "total_memory"]

logger = logging.getLogger(__name__)

# A dense worker's KV budget in bytes, when it sets one (`glinthawk worker --tier dense --kv-bytes`).
DENSE_KV = "DENSE_KV"


def held_bytes(run: dict) -> int:
    """The KV bytes a run's record holds, on both tiers."""
    return sum(run.get("kv", {}).values()) + sum(run.get("dense_kv", {}).values())


def total_memory() -> int:
    """This machine's memory in bytes (8 GiB when it cannot be read)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover
        return 8 * 2**30


class KVLedger:
    """The placement handlers of the scheduler plugin (a mixin: the plugin holds
    ``scheduler``, ``runs``, ``waiting`` and ``registry()``)."""

    scheduler: Any
    runs: dict[str, dict]
    waiting: dict[str, dict]
    kv_changes: Any  # a collections.Counter of announcements by kind

    def ledger_handlers(self) -> dict[str, Any]:
        """The scheduler handlers of the ledger."""
        return {"glinthawk_plan": self.plan, "glinthawk_replace": self.replace, "glinthawk_grow": self.grow,
                "glinthawk_release": self.release, "glinthawk_kv_room": self.kv_room,
                "glinthawk_yield": self.yield_micro_batches, "glinthawk_resize": self.resize}

    def _announce(self, kind: str, run_id: str, nbytes: int = 0, detail: str = "", run: dict | None = None) -> None:
        """Announce a KV change of ``run_id`` (its ``run`` record, if no longer open) to
        the clients (:func:`~.kv_signals.announce`), with the run's label."""
        run = run or self.runs.get(run_id) or self.waiting.get(run_id) or {}
        announce(self.scheduler, kind, run_id, nbytes, detail, label=run.get("label", ""))
        self.kv_changes[kind] += 1

    def _attention_budget(self, addr: str) -> int:
        """The KV bytes attention worker ``addr`` offers in all (its ``KV`` resource, or a
        share of its memory limit)."""
        ws = self.scheduler.workers[addr]
        return kv_budget_bytes(ws.resources.get("KV", 0), ws.memory_limit, config.get("attention.kv-memory-fraction"),
                               total_memory())

    def _attention_reserved(self, addr: str) -> int:
        """The KV bytes open runs reserved on attention worker ``addr``."""
        return sum(r["kv"].get(addr, 0) for r in self.runs.values())

    def _kv_free(self, addr: str) -> int:
        return self._attention_budget(addr) - self._attention_reserved(addr)

    async def plan(
        self,
        run_id: str,
        mode: str,
        n_layers: int,
        kv_bytes_per_token_layer: int,
        max_seq_len: int,
        micro_batch_size: int,
        n_micro_batches: int,
        n_slices: int | None = None,
        dense_kv_budget: int | None = None,
        local_micro_batches: int = 0,
        local_batch_size: int | None = None,
        layer_weight_bytes: int = 0,
        ends_weight_bytes: int = 0,
        client: str | None = None,
        lease: float | None = None,
        model: str = "",
        wait_s: float = 0.0,
        label: str = "",
    ) -> dict:
        """Place a run and reserve its KV bytes; errors come back as ``{"error": ...}``.

        ``dense_kv_budget`` caps the KV the run may keep on each dense worker (within
        the worker's own budget); the weight sizes let a GPU dense worker tell what its
        device memory leaves for KV once the slice is loaded.  The run belongs to
        ``client``: it is closed when that client leaves or stops renewing its ``lease``
        (seconds); ``label`` says what it is for (a pipeline's name), beside its id in
        ``glinthawk status`` and the KV changes.  An error says ``"wait": True`` when the
        run would fit a cluster that other runs did not share; a run that will ask again
        for up to ``wait_s`` seconds is listed as waiting meanwhile."""
        reg = self.registry()
        dense_budget: dict[str, int | None] = {}
        if mode != "two-tier":
            k = min(n_slices or len(reg["dense"]), len(reg["dense"])) or 1
            layers = -(-n_layers // k)
            weights = layers * layer_weight_bytes + ends_weight_bytes
            for a in reg["dense"]:
                free = await self._kv_free_dense(a, weights)
                if dense_kv_budget is not None:
                    free = int(dense_kv_budget) if free is None else min(free, int(dense_kv_budget))
                dense_budget[a] = free
        try:
            plan = make_plan(
                mode=mode,
                dense=reg["dense"],
                attention={a: self._kv_free(a) for a in reg["attention"]},
                n_layers=n_layers,
                kv_bytes_per_token_layer=kv_bytes_per_token_layer,
                max_seq_len=max_seq_len,
                micro_batch_size=micro_batch_size,
                n_micro_batches=n_micro_batches,
                n_slices=n_slices,
                dense_kv_budget=dense_budget,
                local_micro_batches=local_micro_batches,
                local_batch_size=local_batch_size,
            )
        except PlacementError as e:
            wait = bool(self.runs) and self._fits_alone(
                mode=mode, dense=reg["dense"], n_layers=n_layers, kv_bytes_per_token_layer=kv_bytes_per_token_layer,
                max_seq_len=max_seq_len, micro_batch_size=micro_batch_size, n_micro_batches=n_micro_batches,
                n_slices=n_slices, local_micro_batches=local_micro_batches, local_batch_size=local_batch_size,
                dense_kv_budget={a: None if b is None else b + self._dense_reserved(a) for a, b in
                                 dense_budget.items()})
            now = time.time()
            if wait and wait_s > 0:  # shown by `glinthawk status` while it keeps asking
                if run_id not in self.waiting:  # (the runs above their share give some up at once)
                    self.waiting[run_id] = {"client": client, "model": model, "since": now, "label": label}
                    self._announce("wanted", run_id, detail="held by " + ", ".join(
                        run_name(r, other.get("label", "")) for r, other in self.runs.items()))
                self.waiting[run_id]["until"] = min(now + wait_s, now + 15.0)  # (it asks again within a second)
            return {"error": self._held_by_others() if wait else str(e), "wait": wait}
        self.waiting.pop(run_id, None)
        kv = plan.attention_kv()
        workers = set(plan.dense) | set(kv)
        lease = float(lease or config.get("engine.lease"))
        self.runs[run_id] = {"kv": kv, "dense_kv": dict(plan.dense_kv), "workers": workers, "lost": [],
                             "plan": plan.to_wire(),
                             "client": client, "lease": lease, "lease_until": time.time() + lease,
                             "t0": time.time(), "model": model, "generated": 0, "beside": set(self.runs),
                             "label": label}
        for other_id in self.runs[run_id]["beside"]:  # runs that shared the cluster for a while, both ways
            self.runs[other_id].setdefault("beside", set()).add(run_id)
        self._announce("placed", run_id, held_bytes(self.runs[run_id]),
                       f"{plan.mode}, {'+'.join(map(str, plan.sizes))} slots")
        return {"plan": self.runs[run_id]["plan"], "kv_free": self.kv_free()}  # (and the KV left beside it)

    def replace(self, run_id: str, lost: str, slice_index: int, n_slots: int, n_layers: int,
                max_seq_len: int, micro_batch: int | None = None, kv_run: str | None = None) -> dict:
        """An attention worker for a micro-batch of ``run_id`` whose worker ``lost`` did not
        answer: the live one with the most free KV that fits it (KV reserved, and the run's
        plan says micro-batch ``micro_batch`` is there, in cache ``kv_run``), or an error
        saying why there is none."""
        run = self.runs.get(run_id)
        if run is None:
            return {"error": f"run {run_id} is not placed"}
        if lost not in run["lost"]:
            run["lost"].append(lost)
        plan = run["plan"]
        per_token_layer = plan.get("kv_bytes_per_token_layer", 0)
        need = n_slots * n_layers * per_token_layer * max_seq_len
        free = {a: self._kv_free(a) for a in self.registry()["attention"] if a not in run["lost"]}
        fits = [a for a, f in free.items() if f >= need]
        if not fits:
            what = "no attention worker is left" if not free else f"none has {need / 2**20:.0f} MiB of KV free"
            return {"error": what}
        addr = max(fits, key=free.__getitem__)
        run["kv"][addr] = run["kv"].get(addr, 0) + need
        run["workers"].add(addr)
        if micro_batch is not None and plan.get("attention"):
            run["plan"] = Plan.from_wire(plan).moved(slice_index, micro_batch, addr, kv_run or "").to_wire()
        self._announce("grew", run_id, need, f"a micro-batch moved to {addr} off {lost}, which did not answer")
        return {"address": addr}

    def dense_kv_budget(self, addr: str) -> int | None:
        """The KV bytes a dense worker offers (its ``DENSE_KV`` resource), or None when
        it sets none."""
        ws = self.scheduler.workers[addr]
        budget = ws.resources.get(DENSE_KV, 0)
        return int(budget) if budget > 0 else None

    async def _kv_free_dense(self, addr: str, weight_bytes: int) -> int | None:
        """KV bytes a dense worker can still take: its ``DENSE_KV`` budget; else, on a
        GPU, the device memory left after the slice's weights and a workspace margin; else
        a share of its memory limit.  Less what open runs reserved there."""
        budget = self.dense_kv_budget(addr)
        if budget is None:
            try:
                budget = await asyncio.wait_for(
                    self.scheduler.rpc(addr).glinthawk_dense_capacity(weight_bytes=weight_bytes), 10.0)
            except Exception as e:  # an old or busy worker: fall back to its memory limit
                logger.warning("glinthawk could not ask dense worker %s for its KV capacity: %s", addr, e)
                budget = None
        if budget is None:
            ws = self.scheduler.workers[addr]
            budget = int((ws.memory_limit or total_memory()) * config.get("attention.kv-memory-fraction"))
        return int(budget) - self._dense_reserved(addr)

    def _dense_reserved(self, addr: str) -> int:
        return sum(r.get("dense_kv", {}).get(addr, 0) for r in self.runs.values())

    def _held_by_others(self) -> str:
        """Why a run that would fit the cluster alone does not fit now: the runs holding KV."""
        held = sorted(((held_bytes(r), run_id, r.get("client")) for run_id, r in self.runs.items()), reverse=True)
        runs = ", ".join(f"{run_id} of {client} with {size / 2**30:.1f} GiB" for size, run_id, client in held[:3])
        return (f"the KV it needs is held by {len(held)} other run{'s' if len(held) > 1 else ''}: "
                f"{runs}{', ...' if len(held) > 3 else ''} (`glinthawk status` lists them)")

    def _fits_alone(self, **kwargs: Any) -> bool:
        """Whether a run that does not fit now would fit the cluster's KV with no other run."""
        reg = self.registry()
        budgets = {a: self._attention_budget(a) for a in reg["attention"]}
        try:
            make_plan(attention=budgets, **kwargs)
            return True
        except PlacementError:
            return False

    def kv_free(self) -> int:
        """The attention KV bytes no run holds, on every attention worker together."""
        return sum(self._kv_free(a) for a in self.registry()["attention"] if a in self.scheduler.workers)

    def kv_room(self) -> dict:
        """What a run that may grow or give KV back polls (no worker is asked): the
        attention KV bytes ``free`` and in all (``budget``), the ``runs`` open and the
        runs ``waiting`` to be placed for KV the open runs hold."""
        attention = [a for a in self.registry()["attention"] if a in self.scheduler.workers]
        return {"free": sum(self._kv_free(a) for a in attention),
                "budget": sum(self._attention_budget(a) for a in attention),
                "runs": len(self.runs), "waiting": len(self.waiting_runs())}

    def yield_micro_batches(self, run_id: str, micro_batches: list[int]) -> None:
        """Run ``run_id`` retires ``micro_batches`` for runs waiting for KV: its record
        says so at once; their KV comes back as their caches close (``glinthawk_release``)."""
        run = self.runs.get(run_id)
        if run is not None:
            run["plan"]["retired"] = sorted(set(run["plan"].get("retired", ())) | set(micro_batches))
            run["yielded"] = run.get("yielded", 0) + len(micro_batches)

    def grow(self, run_id: str, micro_batch_size: int, n_micro_batches: int, keep: bool = False) -> dict:
        """Place ``n_micro_batches`` more remote micro-batches of ``micro_batch_size``
        slots for two-tier run ``run_id``, on its slices, in the KV free now (its own held
        KV not counted: its micro-batches keep it, beside the new ones with ``keep``, else
        until they drain).  The new
        micro-batches' :class:`~.messages.Plan` and the cache each slice's go in
        (``{"plan": ..., "kv_runs": [...]}``, KV reserved), or an error when they do not
        fit whole."""
        run = self.runs.get(run_id)
        if run is None:
            return {"error": f"run {run_id} is not placed"}
        old = run["plan"]
        if old["mode"] != "two-tier":
            return {"error": f"a {old['mode']} run does not grow"}
        attention = {a: self._kv_free(a) for a in self.registry()["attention"] if a not in run["lost"]}
        try:
            plan = make_plan(mode="two-tier", dense=list(old["dense"]), attention=attention,
                             n_layers=old["slices"][-1][1], kv_bytes_per_token_layer=old["kv_bytes_per_token_layer"],
                             max_seq_len=old["max_seq_len"], micro_batch_size=micro_batch_size,
                             n_micro_batches=n_micro_batches, n_slices=len(old["dense"]))
        except PlacementError as e:
            return {"error": str(e)}
        if plan.micro_batch_size < micro_batch_size or plan.slices != old["slices"]:
            return {"error": f"{n_micro_batches} x {micro_batch_size} slots do not fit the KV free now"}
        for addr, nbytes in plan.attention_kv().items():
            run["kv"][addr] = run["kv"].get(addr, 0) + nbytes
            run["workers"].add(addr)
        self._announce("grew", run_id, sum(plan.attention_kv().values()),
                       f"{n_micro_batches} more micro-batch(es) of {micro_batch_size} slots")
        run["grown"] = run.get("grown", 0) + 1
        kv_runs = [f"{run_id}/g{run['grown']}s{s}" for s in range(len(plan.slices))]  # a cache per slice
        run["plan"] = Plan.from_wire(old).grown(plan, kv_runs, keep).to_wire()
        return {"plan": plan.to_wire(), "kv_runs": kv_runs}

    def release(self, run_id: str, address: str, nbytes: int) -> None:
        """Return ``nbytes`` of KV that run ``run_id`` held on attention worker ``address``
        (a cache of drained micro-batches, closed)."""
        run = self.runs.get(run_id)
        if run is not None and address in run["kv"]:
            run["kv"][address] = max(0, run["kv"][address] - int(nbytes))
            self._announce("freed", run_id, nbytes, "the cache of micro-batches it retired closed")

    def resize(self, run_id: str, micro_batch: int, n_slots: int) -> dict:
        """Hold ``n_slots`` slots of remote micro-batch ``micro_batch`` of run ``run_id``
        from now on, on each slice's attention worker: more are reserved if they are free
        there (else ``{"error": ...}``, nothing reserved), fewer given back.  The same
        size again changes nothing (a run reserves before its caches grow, and its driver
        confirms once they have)."""
        run = self.runs.get(run_id)
        if run is None:
            return {"error": f"run {run_id} is not placed"}
        plan = Plan.from_wire(run["plan"])
        resized = plan.resized(micro_batch, int(n_slots))
        before, after = plan.attention_kv(), resized.attention_kv()
        delta = {a: after.get(a, 0) - before.get(a, 0) for a in set(before) | set(after)}
        short = [a for a, d in delta.items() if d > 0 and (a in run["lost"] or a not in self.scheduler.workers
                                                           or d > self._kv_free(a))]
        if short:
            return {"error": f"{n_slots} slots of micro-batch {micro_batch} do not fit the KV free on "
                             f"{', '.join(sorted(short))}"}
        for addr, d in delta.items():
            run["kv"][addr] = max(0, run["kv"].get(addr, 0) + d)
        run["plan"] = resized.to_wire()
        old = plan.sizes[micro_batch]
        change = f"micro-batch {micro_batch} from {old} to {n_slots} slots"
        if n_slots > old:
            run["grown"] = run.get("grown", 0) + 1
            self._announce("grew", run_id, sum(d for d in delta.values() if d > 0), change)
        elif n_slots < old:  # (for runs waiting for KV)
            run["shrunk_slots"] = run.get("shrunk_slots", 0) + old - int(n_slots)
            self._announce("freed", run_id, -sum(d for d in delta.values() if d < 0), change)
        return {"plan": run["plan"]}
