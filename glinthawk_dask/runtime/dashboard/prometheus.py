"""Dask's metrics on Prometheus: glinthawk's compute time on the scheduler's ``/metrics``.

Tier workers digest their compute time into Dask's worker metrics (see
:class:`~.worker.TierDigests`); heartbeats carry it to the scheduler's
``cumulative_worker_metrics``.  A :class:`GlinthawkCollector` exports one scheduler's
share of those as ``{namespace}_glinthawk_compute_seconds_total`` and
``{namespace}_glinthawk_compute_intervals_total`` (labels ``tier``, ``kind``); and, from
the scheduler plugin's KV ledger, ``{namespace}_glinthawk_runs`` (``state``: open,
waiting), ``{namespace}_glinthawk_kv_bytes`` (``tier``, ``what``: reserved, budget) and
``{namespace}_glinthawk_kv_changes_total`` (``kind``: placed, wanted, grew, freed).

The scheduler plugin registers its scheduler's collector when it starts
(:func:`register_prometheus`) and unregisters it when it closes
(:func:`unregister_prometheus`).  ``/metrics`` serves the process-wide
``prometheus_client.REGISTRY``, where two collectors of the same metrics cannot
both be.  So, where several schedulers run in one process (as in tests), each has its
own collector, the newest open scheduler's is the one in the registry, and a closed
scheduler's collector is never left behind.  (distributed's own collectors there,
``distributed.http.scheduler.prometheus``, are registered once and pointed at the
scheduler whose ``/metrics`` is being served: scraping an older scheduler while a
newer one is open gives its ``dask_*`` metrics beside the newer one's glinthawk ones.)
"""

from __future__ import annotations

import weakref
from typing import Any

from distributed.http.prometheus import PrometheusCollector

__all__ = ["GlinthawkCollector", "register_prometheus", "unregister_prometheus"]


class GlinthawkCollector(PrometheusCollector):
    """Exports the glinthawk digests of one scheduler (held weakly: a scheduler that
    went away without closing its plugin exports nothing)."""

    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self.subsystem = "glinthawk"

    @property
    def server(self) -> Any:
        return self._server()

    @server.setter
    def server(self, server: Any) -> None:
        self._server = weakref.ref(server)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        seconds = CounterMetricFamily(self.build_name("compute"), "Compute time of glinthawk's tier workers",
                                      labels=["tier", "kind"], unit="seconds")
        counts = CounterMetricFamily(self.build_name("compute_intervals"),
                                     "Compute jobs run by glinthawk's tier workers", labels=["tier", "kind"])
        for key, value in list(getattr(self.server, "cumulative_worker_metrics", {}).items()):
            if isinstance(key, tuple) and len(key) == 4 and key[0] == "glinthawk":
                _, tier, kind, unit = key
                (seconds if unit == "seconds" else counts).add_metric([str(tier), str(kind)], value)
        yield seconds
        yield counts
        yield from self._kv()

    def _kv(self):
        """The KV the runs share, from the scheduler plugin's ledger (no worker is asked)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        plugin = getattr(self.server, "plugins", {}).get("glinthawk")
        if plugin is None or not hasattr(plugin, "kv_changes"):
            return
        room = plugin.kv_room()
        runs = GaugeMetricFamily(self.build_name("runs"), "glinthawk runs open, and waiting for KV the open "
                                 "runs hold", labels=["state"])
        runs.add_metric(["open"], room["runs"])
        runs.add_metric(["waiting"], room["waiting"])
        kv = GaugeMetricFamily(self.build_name("kv"), "KV bytes the open runs reserve, by tier; and the attention "
                               "tier's budget", labels=["tier", "what"], unit="bytes")
        kv.add_metric(["attention", "reserved"], sum(sum(r["kv"].values()) for r in plugin.runs.values()))
        kv.add_metric(["dense", "reserved"], sum(sum(r.get("dense_kv", {}).values()) for r in plugin.runs.values()))
        kv.add_metric(["attention", "budget"], room["budget"])
        changes = CounterMetricFamily(self.build_name("kv_changes"), "KV changes between runs (placed, wanted, "
                                      "grew, freed; see Client.get_events('glinthawk-kv'))", labels=["kind"])
        for kind, n in sorted(plugin.kv_changes.items()):
            changes.add_metric([kind], n)
        yield runs
        yield kv
        yield changes


# Collectors of the open schedulers, oldest first (the newest is the one registered)
_open: list[GlinthawkCollector] = []
# The collector in prometheus_client.REGISTRY, if any
_registered: GlinthawkCollector | None = None


def register_prometheus(scheduler: Any) -> bool:
    """Export glinthawk's compute metrics on ``scheduler``'s ``/metrics`` until
    :func:`unregister_prometheus` (when ``prometheus_client`` is installed); returns
    whether it could."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    if not any(c.server is scheduler for c in _open):
        _open.append(GlinthawkCollector(scheduler))
    _register_newest()
    return True


def unregister_prometheus(scheduler: Any) -> None:
    """Stop exporting ``scheduler``'s metrics (the scheduler plugin closes): its
    collector leaves the registry, and the newest other open scheduler's takes its place."""
    _open[:] = [c for c in _open if c.server is not scheduler]
    if _registered is not None:
        _register_newest()


def _register_newest() -> None:
    """Put the newest open scheduler's collector, and only it, in the registry."""
    global _registered
    import prometheus_client

    _open[:] = [c for c in _open if c.server is not None]
    newest = _open[-1] if _open else None
    if newest is _registered:
        return
    if _registered is not None:
        prometheus_client.REGISTRY.unregister(_registered)
        _registered = None
    if newest is not None:
        prometheus_client.REGISTRY.register(newest)
        _registered = newest
