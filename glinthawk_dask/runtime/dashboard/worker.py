"""Worker side: what a tier worker reports to the scheduler when asked, and its compute
time added to Dask's worker metrics.

Runs on the tier workers (the plugins serve :func:`worker_metrics` as the rpc handler
``glinthawk_{tier}_metrics`` and start a :class:`TierDigests` in ``setup``).  Imports
neither Bokeh nor the scheduler side.
"""

from __future__ import annotations

import time
from typing import Any

from . import INTERVAL, MAX_EVENTS_PER_PULL

__all__ = ["TierDigests", "worker_metrics"]


def worker_metrics(tier: str, service: Any, cursor: int = 0, limit: int = MAX_EVENTS_PER_PULL) -> dict:
    """What one tier worker reports to the scheduler when asked: compute intervals
    ``(kind, start, stop, micro_batch, layer)`` after ``cursor`` and its gauges."""
    events, cursor, dropped = service.stream.timeline.read(int(cursor), int(limit))
    now = time.time()
    out: dict[str, Any] = {"tier": tier, "now": now, "events": events, "cursor": cursor, "dropped": dropped}
    if tier == "attention":
        info = service.info()
        out["kv"] = {
            "budget": int(info.get("kv_budget", 0)),
            "allocated": int(info.get("kv_allocated", 0)),
            "used": int(sum(r.get("used_bytes", 0) for r in info.get("runs", {}).values())),
            "runs": len(info.get("runs", {})),
        }
    else:
        out["runs"] = {
            run_id: _driver_stats(run.driver, now)
            for run_id, run in list(service.runs.items())
            if getattr(run, "driver", None) is not None
        }
        caches = [run.cache for run in list(service.runs.values()) if getattr(run, "cache", None) is not None]
        budget = int(service.worker.state.total_resources.get("DENSE_KV", 0))
        if caches or budget:  # KV of single-tier and hybrid runs' local micro-batches
            allocated = sum(c.capacity_bytes for c in caches)
            out["kv"] = {"budget": budget or allocated, "allocated": allocated,
                         "used": sum(c.used_bytes for c in caches), "runs": len(caches)}
    return out


def _retired(driver: Any) -> set:
    """The micro-batches a grown run retired (they admit nothing more)."""
    return getattr(getattr(driver, "sched", None), "retired", set())


def _driver_stats(driver: Any, now: float) -> dict:
    return {
        "n_submitted": driver.n_submitted,
        "n_done": driver.n_done,
        "n_steps": driver.n_steps,
        "n_tokens": driver.n_tokens,
        "n_generated": getattr(driver, "n_generated", 0),
        "n_in_flight": getattr(driver, "n_in_flight", 0),
        "n_micro_batches": driver.run.spec.n_micro_batches - len(_retired(driver)),
        "n_local": sum(driver.run.spec.local),  # micro-batches whose attention runs on the dense worker
        "age": now - getattr(driver, "t0", now),
        "error": driver.error,
    }


class TierDigests:
    """Adds a tier's compute time to Dask's worker metrics about once per ``interval``:
    ``worker.digest_metric(("glinthawk", tier, kind, "seconds" | "count"), delta)``."""

    def __init__(self, worker: Any, tier: str, timeline: Any, interval: float = INTERVAL) -> None:
        from tornado.ioloop import PeriodicCallback

        self.worker = worker
        self.tier = tier
        self.timeline = timeline
        self._last: dict[str, tuple[float, int]] = {}
        self._callback = PeriodicCallback(self.flush, interval * 1000)
        self._callback.start()

    def flush(self) -> None:
        for kind, (seconds, count) in self.timeline.totals().items():
            last_seconds, last_count = self._last.get(kind, (0.0, 0))
            if count > last_count:
                self.worker.digest_metric(("glinthawk", self.tier, kind, "seconds"), seconds - last_seconds)
                self.worker.digest_metric(("glinthawk", self.tier, kind, "count"), count - last_count)
                self._last[kind] = (seconds, count)

    def stop(self) -> None:
        self._callback.stop()
        self.flush()

