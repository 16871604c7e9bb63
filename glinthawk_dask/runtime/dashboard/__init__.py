"""The Glinthawk page of the Dask dashboard, and glinthawk's numbers in Dask's metrics.

Per-layer work is not made of Dask tasks (see the design), so the task stream cannot
show it.  This package shows it instead, without adding a message per step anywhere.
One module per process it runs in:

* **Workers** (:mod:`.worker`: :func:`worker_metrics`, served by each tier plugin as
  the rpc handler ``glinthawk_{tier}_metrics``) hand out, on request, the compute
  intervals recorded since the caller's cursor (:meth:`~..compute.Timeline.read`),
  plus the tier's gauges: KV bytes (attention) and each run's driver counters (first
  dense slice).
* **The scheduler** (:mod:`.poller`: :class:`PipelineMetrics`, owned by the scheduler
  plugin) pulls those every ``interval`` seconds, one rpc per tier worker, but only
  while a page is open (each page refresh extends a short lease); nothing is pulled
  otherwise.  Pipelines report their progress through the scheduler handler
  ``glinthawk_progress``, at most once per second (:mod:`.progress`:
  :class:`ProgressReporter`, in the client).
* **The page** (:mod:`.page`: :func:`glinthawk_doc`, at ``/glinthawk`` on the
  scheduler's dashboard, linked in its navigation) reads what the scheduler holds,
  once per second: the pipeline stream (dense and attention intervals per worker,
  coloured by micro-batch), tokens/s, micro-batches in flight, KV bytes per attention
  worker and rows done per run.
* **Dask's metrics**: each tier worker adds its compute seconds and interval counts
  to ``Worker.digest_metric`` under ``("glinthawk", tier, kind, "seconds"|"count")``
  about once a second (:class:`TierDigests`).  Heartbeats, which exist anyway, carry
  them to ``Scheduler.cumulative_worker_metrics``; :mod:`.prometheus`
  (:func:`register_prometheus`, for as long as the scheduler plugin runs) exports them
  on the scheduler's ``/metrics`` as ``dask_glinthawk_compute_seconds_total`` and
  ``dask_glinthawk_compute_intervals_total`` (labels ``tier``, ``kind``).
  Dask's fine performance metrics page and spans only attribute ``execute``
  metrics of tasks (a span needs task groups), so these metrics do not appear there.

Every public name is importable from this package; each is loaded from its module on
first use, so a worker that imports :func:`worker_metrics` loads neither Bokeh nor
the page.  Bokeh is imported only where the page is built: without it the rest works
and the page is simply not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PAGE", "GlinthawkPage", "PipelineMetrics", "ProgressReporter", "TierDigests", "glinthawk_doc", "install_page",
    "page_link", "register_prometheus", "uninstall_page", "unregister_prometheus", "worker_metrics",
]

# Shared by the parts above, which run in different processes.

#: Route of the page on the scheduler's dashboard
PAGE = "/glinthawk"
#: Seconds between pulls while a page is open (and between a worker's digests, and
#: between a pipeline's progress reports)
INTERVAL = 1.0
#: Intervals one worker hands out per pull (the newest ones)
MAX_EVENTS_PER_PULL = 4000

# name -> module that defines it (loaded on first use)
_LAZY = {
    "worker_metrics": "worker", "TierDigests": "worker",
    "PipelineMetrics": "poller",
    "GlinthawkPage": "page", "glinthawk_doc": "page", "install_page": "page", "uninstall_page": "page",
    "page_link": "page",
    "register_prometheus": "prometheus", "unregister_prometheus": "prometheus",
    "ProgressReporter": "progress",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
