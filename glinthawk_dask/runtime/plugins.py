"""The Dask plugins: worker-resident tier state, and the control plane on the scheduler.

A WorkerPlugin per tier, ``DenseWorkerPlugin`` and ``AttentionWorkerPlugin``, is
registered once per cluster with ``Client.register_plugin`` (so restarted and new
workers get it too).  In ``setup`` each looks at the worker's resources (``GPU`` for
the dense tier, ``KV`` for the attention tier) and, where they match, holds the tier's
state and registers its rpc handlers.  ``GlinthawkSchedulerPlugin`` keeps
the registry of tier workers, places runs (layer slices, micro-batches, KV slots) and
records worker loss.  Neither carries activations: those go worker to worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from .. import config
from ..heap import steady_heap
from . import dashboard
from .attention_service import AttentionService
from .compute import one_torch_thread
from .dense_service import DenseService
from .pipelines import PipelineRegistry
from .placement import PlacementError, kv_budget_bytes, make_plan
from .worker_process import leave_interrupts_to_the_nanny, one_line_heartbeat_failures

# A dense worker's KV budget in bytes, when it sets one (`glinthawk worker --tier dense --kv-bytes`).
DENSE_KV = "DENSE_KV"

logger = logging.getLogger(__name__)

__all__ = ["DenseWorkerPlugin", "AttentionWorkerPlugin", "GlinthawkSchedulerPlugin", "worker_tiers"]


def _total_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover
        return 8 * 2**30


def worker_tiers(resources: dict[str, float]) -> set[str]:
    tiers = set()
    if resources.get("GPU", 0) > 0:
        tiers.add("dense")
    if resources.get("KV", 0) > 0:
        tiers.add("attention")
    return tiers


class _TierPlugin(WorkerPlugin):
    """Hosts one tier's service on the workers that carry the tier's resource (and
    nothing on the others), with its rpc handlers and a timeline handler."""

    tier = ""
    idempotent = True

    def make_service(self, worker: Any, resources: dict[str, float]) -> Any:
        raise NotImplementedError

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.service = None
        self._handlers: dict[str, Any] = {}
        self._digests: dashboard.TierDigests | None = None
        resources = dict(worker.state.total_resources)
        if self.tier not in worker_tiers(resources):
            return
        one_torch_thread()  # the loop's torch work (caches it allocates, say): the stream computes
        steady_heap()
        leave_interrupts_to_the_nanny(worker)
        one_line_heartbeat_failures()
        self.service = self.make_service(worker, resources)
        self._handlers = {**self.service.handlers(), f"glinthawk_{self.tier}_timeline": self.timeline,
                          f"glinthawk_{self.tier}_metrics": self.metrics}
        worker.handlers.update(self._handlers)
        self.service.dataplane.register()
        self._digests = dashboard.TierDigests(worker, self.tier, self.service.stream.timeline)
        logger.info("glinthawk %s tier on %s", self.tier, worker.address)

    def teardown(self, worker: Any) -> None:
        for name in self._handlers:
            worker.handlers.pop(name, None)
        if self._digests is not None:
            self._digests.stop()
        if self.service is not None:
            self.service.dataplane.unregister()
            self.service.close()

    def timeline(self, since: float = 0.0) -> dict:
        """Compute intervals ``(kind, start, stop, micro_batch, layer)`` since ``since``."""
        return {"address": self.worker.address, "events": self.service.stream.timeline.events(since),
                "now": time.time()}

    def metrics(self, cursor: int = 0, limit: int = dashboard.MAX_EVENTS_PER_PULL) -> dict:
        """For the dashboard: intervals recorded after ``cursor``, and the tier's gauges."""
        return dashboard.worker_metrics(self.tier, self.service, cursor, limit)


def dense_threads() -> int:
    """Torch threads of a dense worker's compute stream (``glinthawk.dense.threads``, or
    every core)."""
    return int(config.get("dense.threads") or os.cpu_count())


class DenseWorkerPlugin(_TierPlugin):
    """Tier 1 on ``GPU`` workers: layer slices (weights cached) and their runs."""

    name = "glinthawk-dense"
    tier = "dense"

    def make_service(self, worker: Any, resources: dict[str, float]) -> DenseService:
        return DenseService(worker, threads=dense_threads())


class AttentionWorkerPlugin(_TierPlugin):
    """Tier 2 on ``KV`` workers: KV caches within a byte budget, attention on request."""

    name = "glinthawk-attention"
    tier = "attention"

    def make_service(self, worker: Any, resources: dict[str, float]) -> AttentionService:
        budget = kv_budget_bytes(
            resources.get("KV", 0), worker.memory_manager.memory_limit,
            config.get("attention.kv-memory-fraction"), _total_memory(),
        )
        # a worker that is also dense computes attention on the dense tier's thread count
        if "dense" in worker_tiers(resources):
            return AttentionService(worker, budget, threads=dense_threads())
        try_threads = config.get("attention.try-threads")
        return AttentionService(worker, budget, threads=int(config.get("attention.threads")),
                                try_threads=int(try_threads) if try_threads else None)


class GlinthawkSchedulerPlugin(SchedulerPlugin):
    """Control plane: tier registry, run placement, KV accounting, worker loss."""

    name = "glinthawk"
    idempotent = True

    def __init__(self) -> None:
        self.tiers: dict[str, set[str]] = {}
        self.runs: dict[str, dict] = {}
        self.lost: list[tuple[float, str]] = []
        self.profiles: dict[str, dict] = {}  # measured profiles by cluster and model (see planner)
        self.closed: dict[str, str] = {}  # runs the scheduler closed itself, and why
        self.waiting: dict[str, dict] = {}  # runs asking again to be placed, for KV other runs hold

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers["glinthawk_plan"] = self.plan
        scheduler.handlers["glinthawk_run_closed"] = self.run_closed
        scheduler.handlers["glinthawk_registry"] = self.registry
        scheduler.handlers["glinthawk_replace"] = self.replace
        scheduler.handlers["glinthawk_cluster_info"] = self.cluster_info
        scheduler.handlers["glinthawk_profile_get"] = self.profile_get
        scheduler.handlers["glinthawk_profile_put"] = self.profile_put
        scheduler.handlers["glinthawk_renew"] = self.renew
        scheduler.handlers["glinthawk_status"] = self.status
        self._leases = asyncio.create_task(self._watch_leases())
        self.metrics = dashboard.PipelineMetrics(scheduler, lambda: self.tiers, waiting=self.waiting_runs,
                                                 detached=lambda: self.pipelines.records)
        scheduler.handlers["glinthawk_progress"] = self.metrics.report_progress
        self.pipelines = PipelineRegistry(scheduler, self.metrics.pipelines.get)
        self._page = dashboard.install_page(scheduler)
        dashboard.register_prometheus(scheduler)
        for addr, ws in scheduler.workers.items():
            self.add_worker(scheduler, addr)

    async def close(self) -> None:
        if getattr(self, "_leases", None) is not None:
            self._leases.cancel()
        if hasattr(self, "metrics"):
            await self.metrics.close()
            dashboard.uninstall_page(self.scheduler, self._page)
            dashboard.unregister_prometheus(self.scheduler)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is not None:
            self.tiers[worker] = worker_tiers(ws.resources)

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client left (closed, or its process died): close the runs it opened."""
        self.waiting = {r: w for r, w in self.waiting.items() if w["client"] != client}
        for run_id in [r for r, run in self.runs.items() if run.get("client") == client]:
            asyncio.ensure_future(self.close_run_everywhere(run_id, f"its client {client} left"))

    async def _watch_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for run_id in [r for r, run in self.runs.items() if run.get("lease_until", now + 1) < now]:
                await self.close_run_everywhere(run_id, f"its client {self.runs[run_id].get('client')} "
                                                        f"stopped renewing its {self.runs[run_id]['lease']:.0f} s lease")

    async def close_run_everywhere(self, run_id: str, why: str) -> None:
        """Close a run on every worker that may hold part of it (its slices and drivers,
        its KV caches, moved micro-batches' caches included) and return its reservation."""
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        logger.warning("glinthawk closes run %s: %s", run_id, why)
        self.closed[run_id] = why
        while len(self.closed) > 1000:  # (the oldest go first)
            self.closed.pop(next(iter(self.closed)))
        reg = self.registry()
        calls = [self.scheduler.rpc(a).glinthawk_slice_close(run_id=run_id) for a in run["plan"]["dense"]
                 if a in reg["dense"]]
        calls += [self.scheduler.rpc(a).glinthawk_kv_close(run_id=run_id) for a in reg["attention"]]
        await asyncio.gather(*(asyncio.wait_for(c, 10.0) for c in calls), return_exceptions=True)

    def renew(self, run_id: str, generated: int = 0) -> dict:
        """The client of ``run_id`` is alive: extend the run's lease."""
        run = self.runs.get(run_id)
        if run is None:
            why = self.closed.get(run_id, "it is not open")
            return {"error": f"the scheduler closed the run: {why}"}
        run["lease_until"] = time.time() + run["lease"]
        run["generated"] = int(generated)
        return {"ok": True}

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.tiers.pop(worker, None)
        self.lost.append((time.time(), worker))
        for run_id, run in self.runs.items():
            if worker in run["workers"]:
                run["lost"].append(worker)
                logger.warning("glinthawk run %s lost worker %s", run_id, worker)

    # -- handlers ------------------------------------------------------------------
    def registry(self) -> dict:
        return {
            "dense": sorted(a for a, t in self.tiers.items() if "dense" in t),
            "attention": sorted(a for a, t in self.tiers.items() if "attention" in t),
            "runs": {k: {"lost": v["lost"]} for k, v in self.runs.items()},
        }

    async def cluster_info(self, weight_bytes: int = 0) -> dict:
        """The tier workers with their hosts, KV budgets and free KV bytes (what a profile
        and a plan need); a dense worker's free KV is what it has left with
        ``weight_bytes`` of weights loaded."""
        reg = self.registry()
        workers = reg["dense"] + reg["attention"]
        return {
            "dense": reg["dense"], "attention": reg["attention"],
            "hosts": {a: self.scheduler.workers[a].host for a in workers if a in self.scheduler.workers},
            "kv_free": {a: self._kv_free(a) for a in reg["attention"] if a in self.scheduler.workers},
            "kv_budget": {a: self._attention_budget(a) for a in reg["attention"] if a in self.scheduler.workers},
            "dense_kv_free": {a: await self._kv_free_dense(a, weight_bytes) for a in reg["dense"]
                              if a in self.scheduler.workers},
        }

    def profile_get(self, key: str) -> dict | None:
        """A profile measured earlier for this cluster and model, or None."""
        return self.profiles.get(key)

    def profile_put(self, key: str, profile: dict) -> None:
        self.profiles[key] = profile

    def _attention_budget(self, addr: str) -> int:
        """The KV bytes attention worker ``addr`` offers in all (its ``KV`` resource, or a
        share of its memory limit)."""
        ws = self.scheduler.workers[addr]
        return kv_budget_bytes(ws.resources.get("KV", 0), ws.memory_limit, config.get("attention.kv-memory-fraction"),
                               _total_memory())

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
    ) -> dict:
        """Place a run and reserve its KV bytes; errors come back as ``{"error": ...}``.

        ``dense_kv_budget`` caps the KV the run may keep on each dense worker (within
        the worker's own budget); the weight sizes let a GPU dense worker tell what its
        device memory leaves for KV once the slice is loaded.  The run belongs to
        ``client``: it is closed when that client leaves or stops renewing its ``lease``
        (seconds).  An error says ``"wait": True`` when the run would fit a cluster that
        other runs did not share; a run that will ask again for up to ``wait_s`` seconds
        is listed as waiting meanwhile."""
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
                self.waiting.setdefault(run_id, {"client": client, "model": model, "since": now})["until"] = min(
                    now + wait_s, now + 15.0)  # (it asks again within 5 s, or gave up)
            return {"error": self._held_by_others() if wait else str(e), "wait": wait}
        self.waiting.pop(run_id, None)
        kv = plan.attention_kv()
        workers = set(plan.dense) | set(kv)
        lease = float(lease or config.get("engine.lease"))
        self.runs[run_id] = {"kv": kv, "dense_kv": dict(plan.dense_kv), "workers": workers, "lost": [],
                             "plan": plan.to_wire(),
                             "client": client, "lease": lease, "lease_until": time.time() + lease,
                             "t0": time.time(), "model": model, "generated": 0, "beside": set(self.runs)}
        for other_id in self.runs[run_id]["beside"]:  # runs that shared the cluster for a while, both ways
            self.runs[other_id].setdefault("beside", set()).add(run_id)
        return {"plan": self.runs[run_id]["plan"]}

    def replace(self, run_id: str, lost: str, slice_index: int, n_slots: int, n_layers: int,
                max_seq_len: int) -> dict:
        """An attention worker for a micro-batch of ``run_id`` whose worker ``lost`` did not
        answer: the live one with the most free KV that fits it (KV reserved), or an error
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
            budget = int((ws.memory_limit or _total_memory()) * config.get("attention.kv-memory-fraction"))
        return int(budget) - self._dense_reserved(addr)

    def _dense_reserved(self, addr: str) -> int:
        return sum(r.get("dense_kv", {}).get(addr, 0) for r in self.runs.values())

    def _held_by_others(self) -> str:
        """Why a run that would fit the cluster alone does not fit now: the runs holding KV."""
        held = sorted(((sum(r["kv"].values()) + sum(r.get("dense_kv", {}).values()), run_id, r.get("client"))
                       for run_id, r in self.runs.items()), reverse=True)
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

    async def status(self) -> dict:
        """What the cluster holds: tier workers with their budgets and reserved and used
        KV, the open runs with their client, age, plan and tokens done, and the runs
        waiting to be placed for KV the open runs hold; the detached pipelines."""
        reg = self.registry()
        now = time.time()

        async def ask(addr: str, op: str) -> dict | None:
            try:
                return await asyncio.wait_for(getattr(self.scheduler.rpc(addr), op)(), 5.0)
            except Exception:
                return None

        dense_info = await asyncio.gather(*(ask(a, "glinthawk_dense_kv_info") for a in reg["dense"]))
        attn_info = await asyncio.gather(*(ask(a, "glinthawk_kv_info") for a in reg["attention"]))
        workers: dict[str, list] = {"dense": [], "attention": []}
        for tier, addrs, infos in (("dense", reg["dense"], dense_info), ("attention", reg["attention"], attn_info)):
            for a, info in zip(addrs, infos):
                ws = self.scheduler.workers.get(a)
                if ws is None:
                    continue
                if tier == "dense":
                    budget = self.dense_kv_budget(a)
                    reserved = self._dense_reserved(a)
                else:
                    budget = self._attention_budget(a)
                    reserved = self._attention_reserved(a)
                used = None if info is None else int(info.get("kv_used", sum(
                    r.get("used_bytes", 0) for r in info.get("runs", {}).values())))
                workers[tier].append({
                    "address": a, "name": str(ws.name), "host": ws.host, "nthreads": ws.nthreads,
                    "memory_limit": ws.memory_limit, "resources": dict(ws.resources), "kv_budget": budget,
                    "kv_reserved": reserved, "kv_allocated": None if info is None else int(info.get("kv_allocated", 0)),
                    "kv_used": used,
                })
        runs = []
        for run_id, r in self.runs.items():
            plan = r["plan"]
            runs.append({
                "run_id": run_id, "client": r.get("client"), "model": r.get("model", ""),
                "age_s": now - r.get("t0", now), "lease_left_s": r.get("lease_until", now) - now,
                "mode": plan["mode"], "micro_batches": plan["n_micro_batches"], "sizes": plan.get("sizes", []),
                "local_micro_batches": sum(plan.get("local", [])), "max_seq_len": plan["max_seq_len"],
                "dense": plan["dense"], "kv_reserved": {"dense": sum(r.get("dense_kv", {}).values()),
                                                        "attention": sum(r["kv"].values())},
                "generated_tokens": r.get("generated", 0), "lost_workers": list(r["lost"]),
            })
        return {"scheduler": self.scheduler.address, "time": now, "workers": workers, "runs": runs,
                "waiting": self.waiting_runs(), "pipelines": self.pipelines.list()}

    def waiting_runs(self) -> list[dict]:
        """The runs still asking to be placed: id, client, model and seconds waited."""
        now = time.time()
        self.waiting = {r: w for r, w in self.waiting.items() if now < w["until"]}
        return [{"run_id": r, "client": w["client"], "model": w["model"], "waited_s": now - w["since"]}
                for r, w in self.waiting.items()]

    def run_closed(self, run_id: str) -> dict:
        """Free a closed run's placement (or forget a run that stopped waiting for one);
        the other runs placed while it was open."""
        self.waiting.pop(run_id, None)
        run = self.runs.pop(run_id, None) or {}
        return {"beside": sorted(run.get("beside", ()))}
