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
import collections
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
from .kv_signals import recent
from .pipelines import PipelineRegistry
from .ledger import KVLedger, held_bytes, total_memory
from .placement import kv_budget_bytes
from .worker_process import leave_interrupts_to_the_nanny, one_line_heartbeat_failures

logger = logging.getLogger(__name__)

__all__ = ["DenseWorkerPlugin", "AttentionWorkerPlugin", "GlinthawkSchedulerPlugin", "worker_tiers"]


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
            config.get("attention.kv-memory-fraction"), total_memory(),
        )
        # a worker that is also dense computes attention on the dense tier's thread count
        if "dense" in worker_tiers(resources):
            return AttentionService(worker, budget, threads=dense_threads())
        try_threads = config.get("attention.try-threads")
        return AttentionService(worker, budget, threads=int(config.get("attention.threads")),
                                try_threads=int(try_threads) if try_threads else None)


class GlinthawkSchedulerPlugin(KVLedger, SchedulerPlugin):
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
        self.kv_changes: collections.Counter = collections.Counter()  # announcements by kind (for Prometheus)

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(self.ledger_handlers())
        scheduler.handlers["glinthawk_run_closed"] = self.run_closed
        scheduler.handlers["glinthawk_registry"] = self.registry
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
        self._announce("freed", run_id, held_bytes(run), f"closed: {why}", run=run)
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

    async def status(self) -> dict:
        """What the cluster holds: tier workers with their budgets and reserved and used
        KV, the open runs with their client, age, plan and tokens done, and the runs
        waiting to be placed for KV the open runs hold; the detached pipelines; the last
        KV changes between runs (see :mod:`.kv_signals`)."""
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
                    "kv_used": used, "kv_out": None if info is None else info.get("kv_out"),
                })
        runs = []
        for run_id, r in self.runs.items():
            plan = r["plan"]
            live = [n for m, n in enumerate(plan.get("sizes", [])) if m not in plan.get("retired", ())]
            runs.append({
                "run_id": run_id, "client": r.get("client"), "model": r.get("model", ""),
                "age_s": now - r.get("t0", now), "lease_left_s": r.get("lease_until", now) - now,
                "mode": plan["mode"], "micro_batches": len(live) or plan["n_micro_batches"], "sizes": live,
                "local_micro_batches": sum(plan.get("local", [])), "max_seq_len": plan["max_seq_len"],
                "dense": plan["dense"], "kv_reserved": {"dense": sum(r.get("dense_kv", {}).values()),
                                                        "attention": sum(r["kv"].values())},
                "generated_tokens": r.get("generated", 0), "lost_workers": list(r["lost"]),
                "grown": r.get("grown", 0), "yielded": r.get("yielded", 0),
                "shrunk_slots": r.get("shrunk_slots", 0), "label": r.get("label", ""),
            })
        return {"scheduler": self.scheduler.address, "time": now, "workers": workers, "runs": runs,
                "waiting": self.waiting_runs(), "pipelines": self.pipelines.list(),
                "kv_events": recent(self.scheduler, 8)}

    def waiting_runs(self) -> list[dict]:
        """The runs still asking to be placed: id, client, model and seconds waited."""
        now = time.time()
        self.waiting = {r: w for r, w in self.waiting.items() if now < w["until"]}
        return [{"run_id": r, "client": w["client"], "model": w["model"], "waited_s": now - w["since"],
                 "label": w.get("label", "")} for r, w in self.waiting.items()]

    def run_closed(self, run_id: str) -> dict:
        """Free a closed run's placement (or forget a run that stopped waiting for one);
        the other runs placed while it was open."""
        self.waiting.pop(run_id, None)
        run = self.runs.pop(run_id, None) or {}
        if run:
            self._announce("freed", run_id, held_bytes(run), "it ended", run=run)
        return {"beside": sorted(run.get("beside", ()))}
