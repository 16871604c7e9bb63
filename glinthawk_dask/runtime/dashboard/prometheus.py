"""Dask's metrics on Prometheus: glinthawk's compute time on the scheduler's ``/metrics``.

Tier workers digest their compute time into Dask's worker metrics (see
:class:`~.worker.TierDigests`); heartbeats carry it to the scheduler's
``cumulative_worker_metrics``, which this collector exports as
``{namespace}_glinthawk_compute_seconds_total`` and
``{namespace}_glinthawk_compute_intervals_total`` (labels ``tier``, ``kind``).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

__all__ = ["register_prometheus"]

_prometheus: Any = None


class _PrometheusCollector:
    """Exports glinthawk's digests of the newest scheduler of this process."""

    def __init__(self) -> None:
        self.scheduler: Callable[[], Any] = lambda: None

    def collect(self):
        import dask.config
        from prometheus_client.core import CounterMetricFamily

        namespace = dask.config.get("distributed.dashboard.prometheus.namespace", default="dask")
        prefix = f"{namespace}_glinthawk" if namespace else "glinthawk"
        seconds = CounterMetricFamily(f"{prefix}_compute", "Compute time of glinthawk's tier workers",
                                      labels=["tier", "kind"], unit="seconds")
        counts = CounterMetricFamily(f"{prefix}_compute_intervals", "Compute jobs run by glinthawk's tier workers",
                                     labels=["tier", "kind"])
        scheduler = self.scheduler()
        for key, value in list(getattr(scheduler, "cumulative_worker_metrics", {}).items()):
            if isinstance(key, tuple) and len(key) == 4 and key[0] == "glinthawk":
                _, tier, kind, unit = key
                (seconds if unit == "seconds" else counts).add_metric([str(tier), str(kind)], value)
        yield seconds
        yield counts


def register_prometheus(scheduler: Any) -> bool:
    """Export glinthawk's compute metrics on ``scheduler``'s ``/metrics`` (when
    ``prometheus_client`` is installed); returns whether it could."""
    global _prometheus
    try:
        import prometheus_client
    except ImportError:
        return False
    if _prometheus is None:
        collector = _PrometheusCollector()
        prometheus_client.REGISTRY.register(collector)
        _prometheus = collector
    _prometheus.scheduler = weakref.ref(scheduler)
    return True
