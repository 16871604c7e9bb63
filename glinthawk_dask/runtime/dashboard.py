"""The Glinthawk page of the Dask dashboard, and glinthawk's numbers in Dask's metrics.

Per-layer work is not made of Dask tasks (see the design), so the task stream cannot
show it.  This module shows it instead, without adding a message per step anywhere:

* **Workers** (:func:`worker_metrics`, served by each tier plugin as the rpc handler
  ``glinthawk_{tier}_metrics``) hand out, on request, the compute intervals recorded
  since the caller's cursor (:meth:`~.compute.Timeline.read`), plus the tier's gauges:
  KV bytes (attention) and each run's driver counters (first dense slice).
* **The scheduler** (:class:`PipelineMetrics`, owned by the scheduler plugin) pulls
  those every ``interval`` seconds, one rpc per tier worker, but only while a page is
  open (each page refresh extends a short lease); nothing is pulled otherwise.
  Pipelines report their progress through the scheduler handler
  ``glinthawk_progress``, at most once per second (:class:`ProgressReporter`).
* **The page** (:func:`glinthawk_doc`, at ``/glinthawk`` on the scheduler's dashboard,
  linked in its navigation) reads what the scheduler holds, once per second: the
  pipeline stream (dense and attention intervals per worker, coloured by
  micro-batch), tokens/s, micro-batches in flight, KV bytes per attention worker and
  rows done per run.
* **Dask's metrics**: each tier worker adds its compute seconds and interval counts
  to ``Worker.digest_metric`` under ``("glinthawk", tier, kind, "seconds"|"count")``
  about once a second (:class:`TierDigests`).  Heartbeats, which exist anyway, carry
  them to ``Scheduler.cumulative_worker_metrics``; :func:`register_prometheus` exports
  them on the scheduler's ``/metrics`` as ``dask_glinthawk_compute_seconds_total``
  and ``dask_glinthawk_compute_intervals_total`` (labels ``tier``, ``kind``).
  Dask's fine performance metrics page and spans only attribute ``execute``
  metrics of tasks (a span needs task groups), so these metrics do not appear there.

Bokeh is imported only where the page is built: without it the rest works and the
page is simply not installed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import weakref
from typing import Any, Callable

__all__ = [
    "PAGE", "PipelineMetrics", "ProgressReporter", "TierDigests", "GlinthawkPage", "glinthawk_doc",
    "install_page", "uninstall_page", "page_link", "register_prometheus", "worker_metrics",
]

logger = logging.getLogger(__name__)

#: Route of the page on the scheduler's dashboard
PAGE = "/glinthawk"
#: Seconds between pulls while a page is open
INTERVAL = 1.0
#: Intervals one worker hands out per pull (the newest ones)
MAX_EVENTS_PER_PULL = 4000
#: A page refresh keeps the scheduler pulling for this many intervals
LEASE = 3
#: Seconds a finished run stays on the page (unless a newer run starts first)
FINISHED_KEEP = 600.0


# -- worker side --------------------------------------------------------------------


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


def _driver_stats(driver: Any, now: float) -> dict:
    return {
        "n_submitted": driver.n_submitted,
        "n_done": driver.n_done,
        "n_steps": driver.n_steps,
        "n_tokens": driver.n_tokens,
        "n_generated": getattr(driver, "n_generated", 0),
        "n_in_flight": getattr(driver, "n_in_flight", 0),
        "n_micro_batches": driver.run.spec.n_micro_batches,
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


# -- scheduler side -----------------------------------------------------------------


class _Ring:
    """The newest ``maxlen`` rows of a stream, with a running count as a cursor."""

    def __init__(self, maxlen: int) -> None:
        self.rows: collections.deque = collections.deque(maxlen=maxlen)
        self.count = 0

    def extend(self, rows: list) -> None:
        self.rows.extend(rows)
        self.count += len(rows)

    def since(self, cursor: int, limit: int | None = None) -> tuple[list, int]:
        """Rows added after ``cursor`` (the newest ``limit`` of them) and the new cursor."""
        new = min(max(self.count - cursor, 0), len(self.rows))
        if limit is not None:
            new = min(new, limit)
        return list(itertools.islice(self.rows, len(self.rows) - new, None)), self.count


class PipelineMetrics:
    """The scheduler's view of the pipeline, pulled from the tier workers.

    ``tiers()`` gives ``{address: {"dense", "attention"}}`` (the scheduler plugin's
    registry).  :meth:`poll` asks every tier worker once for what is new; :meth:`watch`
    (called by every page refresh) keeps a background loop polling every ``interval``
    seconds for a few more intervals.  With no page open nothing is polled.
    """

    def __init__(self, scheduler: Any, tiers: Callable[[], dict[str, set[str]]], interval: float = INTERVAL,
                 max_intervals: int = 20_000, max_samples: int = 3_600) -> None:
        self.scheduler = scheduler
        self.tiers = tiers
        self.interval = interval
        #: (left_ms, right_ms, lane, kind, micro_batch, layer), scheduler clock
        self.intervals = _Ring(max_intervals)
        #: (t_ms, generated tokens/s, processed tokens/s, micro-batches in flight)
        self.samples = _Ring(max_samples)
        self.lanes: dict[tuple[str, str], int] = {}  # (address, tier) -> row of the stream
        self.labels: dict[tuple[str, str], str] = {}
        # (worker, tier) -> {"budget", "allocated", "used", "runs"}: attention workers, and
        # dense workers holding local micro-batches' KV
        self.kv: dict[tuple[str, str], dict] = {}
        self.runs: dict[str, dict] = {}  # run id -> driver counters (first dense slice)
        # runs that ended, kept (marked finished) until a newer run starts or FINISHED_KEEP passes
        self.finished: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}  # pipeline name -> last reported progress
        self.dropped = 0  # intervals that workers did not hand out (more than a pull takes)
        self.n_polls = 0
        self._cursors: dict[tuple[str, str], int] = {}
        self._baseline: dict[tuple[str, str], tuple[int, int]] = {}  # (worker, run) -> generated, tokens
        self._last_poll = 0.0
        self._watch_until = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._closed = False

    # -- pulling -----------------------------------------------------------------------
    def watch(self) -> None:
        """Keep polling for the next few intervals (a page is looking)."""
        self._watch_until = time.time() + LEASE * self.interval
        if self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            self._task = asyncio.get_running_loop().create_task(self._watching())
        except RuntimeError:  # no running loop: nothing to schedule on
            self._task = None

    async def _watching(self) -> None:
        while not self._closed and time.time() < self._watch_until:
            try:
                await self.poll()
            except Exception:  # pragma: no cover - a page must never take the scheduler down
                logger.exception("glinthawk dashboard poll failed")
            await asyncio.sleep(self.interval)

    async def poll(self, timeout: float = 5.0) -> None:
        """Ask every tier worker for its new intervals and gauges (one rpc each)."""
        async with self._lock:
            targets = [(addr, tier) for addr, tiers in sorted(self.tiers().items()) for tier in sorted(tiers)]
            replies = await asyncio.gather(*[self._ask(a, t, timeout) for a, t in targets])
            now = time.time()
            runs: dict[str, dict] = {}
            kv: dict[tuple[str, str], dict] = {}
            rows = []
            # rates need the previous poll, and a recent one (not one before a pause)
            continued = bool(self._last_poll) and now - self._last_poll < (LEASE + 2) * self.interval
            generated = processed = 0.0
            in_flight = 0
            baseline: dict[tuple[str, str], tuple[int, int]] = {}
            for (addr, tier), reply in zip(targets, replies):
                if reply is None:
                    continue
                lane = self._lane(addr, tier)
                self._cursors[addr, tier] = reply["cursor"]
                self.dropped += reply.get("dropped", 0)
                delay = self._time_delay(addr)
                for kind, start, stop, mb, layer in reply["events"]:
                    rows.append(((start + delay) * 1000, (stop + delay) * 1000, lane, kind, mb, layer))
                if "kv" in reply:
                    kv[addr, tier] = reply["kv"]
                for run_id, st in reply.get("runs", {}).items():
                    runs[run_id] = {**st, "worker": addr}
                    in_flight += st["n_in_flight"]
                    key = (addr, run_id)
                    now_counts = (st["n_generated"], st["n_tokens"])
                    before = self._baseline.get(key) if continued else now_counts
                    if before is None:  # started since the last poll: all of it is new
                        before = (0, 0) if st["age"] <= now - self._last_poll else now_counts
                    generated += now_counts[0] - before[0]
                    processed += now_counts[1] - before[1]
                    baseline[key] = now_counts
            rows.sort()
            self.intervals.extend(rows)
            self.kv = kv
            for run_id, st in self.runs.items():
                if run_id not in runs:
                    self.finished[run_id] = {**st, "finished_at": now}
            self.runs = runs
            started = [now - st["age"] for st in runs.values()]
            self.finished = {r: st for r, st in self.finished.items()
                             if now - st["finished_at"] < FINISHED_KEEP and r not in runs
                             and not any(t > st["finished_at"] for t in started)}
            while len(self.finished) > 3:
                self.finished.pop(next(iter(self.finished)))
            self._baseline = baseline
            if continued:
                dt = max(now - self._last_poll, 1e-6)
                self.samples.extend([(now * 1000, generated / dt, processed / dt, in_flight)])
            elif not runs:  # after a pause with nothing open: draw the end, not the last value
                self.samples.extend([(now * 1000, 0.0, 0.0, 0)])
            self._last_poll = now
            self.n_polls += 1

    async def _ask(self, addr: str, tier: str, timeout: float) -> dict | None:
        try:
            call = getattr(self.scheduler.rpc(addr), f"glinthawk_{tier}_metrics")
            return await asyncio.wait_for(call(cursor=self._cursors.get((addr, tier), 0),
                                               limit=MAX_EVENTS_PER_PULL), timeout)
        except Exception as e:  # a worker leaving, or one without the handler
            logger.debug("glinthawk dashboard: no metrics from %s %s: %s", tier, addr, e)
            return None

    def _lane(self, addr: str, tier: str) -> int:
        key = (addr, tier)
        if key not in self.lanes:
            self.lanes[key] = len(self.lanes)
            ws = self.scheduler.workers.get(addr)
            name = ws.name if ws is not None and isinstance(ws.name, str) and ws.name != addr else addr
            self.labels[key] = name if name.startswith(tier) else f"{tier} {name}"
        return self.lanes[key]

    def utilisation(self, window_s: float = 60.0) -> dict[str, float]:
        """Each tier's busy share over the last ``window_s`` seconds (or since the page
        began pulling, if later): compute time of its workers / (window x workers)."""
        if not self.intervals.rows:
            return {}
        now_ms = time.time() * 1000
        start = max(now_ms - window_s * 1000, self.intervals.rows[0][0])
        span = now_ms - start
        if span <= 0:
            return {}
        tier_of = {lane: key[1] for key, lane in self.lanes.items()}
        busy: dict[str, float] = {}
        for left, right, lane, kind, _, _ in self.intervals.rows:
            if right > start and kind != "calibrate":
                tier = tier_of.get(lane, "")
                busy[tier] = busy.get(tier, 0.0) + min(right, now_ms) - max(left, start)
        workers = {t: sum(1 for k in self.lanes if k[1] == t) for t in ("dense", "attention")}
        return {t: min(1.0, busy.get(t, 0.0) / (span * n)) for t, n in workers.items() if n}

    def _time_delay(self, addr: str) -> float:
        ws = self.scheduler.workers.get(addr)
        return getattr(ws, "time_delay", 0.0) if ws is not None else 0.0

    # -- pipelines -----------------------------------------------------------------------
    def report_progress(self, name: str, progress: dict) -> None:
        """Scheduler handler ``glinthawk_progress``: a pipeline's latest progress."""
        self.pipelines.pop(name, None)
        self.pipelines[name] = {**progress, "t": time.time()}
        while len(self.pipelines) > 5:
            self.pipelines.pop(next(iter(self.pipelines)))

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class ProgressReporter:
    """A ``progress`` callback for pipeline runs that shows them on the Glinthawk page.

    Sends the latest :class:`~glinthawk_dask.pipeline.run.Progress` to the scheduler
    (handler ``glinthawk_progress``) at most once per ``interval`` seconds, and the
    last one on :meth:`close`.  Failures are logged once and otherwise ignored.
    """

    def __init__(self, client: Any, name: str, interval: float = INTERVAL) -> None:
        self.client = client
        self.name = name
        self.interval = interval
        self._sent = float("-inf")
        self._pending: Any = None
        self._broken = False

    def __call__(self, progress: Any) -> None:
        self._pending = progress
        if time.monotonic() - self._sent >= self.interval:
            self._send(done=False)

    def close(self) -> None:
        if self._pending is not None:
            self._send(done=True)

    def _send(self, done: bool) -> None:
        if self._broken or self.client is None or self._pending is None:
            return
        p = self._pending
        fields = {k: v for k, v in vars(p).items() if isinstance(v, (int, float, str)) or v is None}
        fields["tokens_per_s"] = getattr(p, "tokens_per_s", 0.0)
        fields["eta_seconds"] = getattr(p, "eta_seconds", None)
        fields["done"] = done
        self._sent = time.monotonic()
        try:
            if getattr(self.client, "asynchronous", False):
                asyncio.ensure_future(self._asend(fields))
            else:
                self.client.sync(self.client.scheduler.glinthawk_progress, name=self.name, progress=fields)
        except Exception as e:
            self._failed(e)

    async def _asend(self, fields: dict) -> None:
        try:
            await self.client.scheduler.glinthawk_progress(name=self.name, progress=fields)
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self._broken = True
        logger.info("glinthawk: cannot report pipeline progress to the scheduler (%s)", e)


# -- Dask's metrics on Prometheus -------------------------------------------------------

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


# -- the page ---------------------------------------------------------------------------


def install_page(scheduler: Any) -> Any | None:
    """Serve the page at ``/glinthawk`` from ``scheduler``'s dashboard and link it in
    the navigation.  Returns the Bokeh application to pass to :func:`uninstall_page`,
    or None where the scheduler has no dashboard (or the page is already there)."""
    http = getattr(scheduler, "http_application", None)
    if http is None:
        return None
    try:
        from bokeh.server.server import BokehTornado
        from distributed.dashboard.core import BokehApplication
        from distributed.dashboard.scheduler import template_variables
        from tornado.ioloop import IOLoop
    except ImportError:
        return None
    dashboards = [a for a in http.applications if isinstance(a, BokehTornado)]
    if not dashboards or any(PAGE in a.app_paths for a in dashboards):
        return None
    variables = template_variables(scheduler)  # shared by the dashboard's pages
    if PAGE.strip("/") not in variables["pages"]:
        variables["pages"].append(PAGE.strip("/"))
    app = BokehApplication({PAGE: glinthawk_doc}, scheduler, prefix=dashboards[0].prefix,
                           template_variables=variables)
    http.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    return app


def uninstall_page(scheduler: Any, app: Any) -> None:
    if app is None:
        return
    http = getattr(scheduler, "http_application", None)
    if http is not None and app in http.applications:
        http.applications.remove(app)
    try:
        from distributed.dashboard.scheduler import template_variables

        pages = template_variables(scheduler)["pages"]
        if PAGE.strip("/") in pages:
            pages.remove(PAGE.strip("/"))
    except ImportError:  # pragma: no cover
        pass
    app.stop(wait=False)


def page_link(client: Any) -> str | None:
    """The page's URL on ``client``'s dashboard (None without a dashboard)."""
    link = getattr(client, "dashboard_link", None)
    if not link:
        return None
    base = link.rsplit("/", 1)[0] if link.rstrip("/").endswith("status") else link.rstrip("/")
    return base + PAGE


_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f")


def _bytes(n: float) -> str:
    from dask.utils import format_bytes

    return format_bytes(int(n))


class GlinthawkPage:
    """The page's Bokeh models and their refresh (:meth:`update`), over a
    :class:`PipelineMetrics`; usable without a server, as distributed's components are."""

    def __init__(self, metrics: PipelineMetrics, n_rectangles: int = 10_000, follow_ms: int | None = None,
                 **kwargs: Any) -> None:
        from bokeh.layouts import column, row
        from bokeh.models import ColumnDataSource, DataRange1d, Div, FactorRange, HoverTool, LabelSet, Range1d
        from bokeh.plotting import figure

        from .. import config

        if follow_ms is None:
            follow_ms = int(float(config.get("dashboard.window")) * 1000)
        self.metrics = metrics
        self.follow_ms = follow_ms
        self.n_rectangles = n_rectangles
        self._seen_intervals = 0
        self._seen_samples = 0
        self._lanes: dict[int, str] = {}
        sizing = {"sizing_mode": kwargs.get("sizing_mode", "stretch_width")}

        self.stream_source = ColumnDataSource(
            {k: [] for k in ("left", "right", "bottom", "top", "color", "lane", "kind", "micro_batch", "layer",
                             "duration")},
            name="glinthawk-stream",
        )
        x_range = DataRange1d(follow="end", follow_interval=follow_ms, range_padding=0)
        self.stream = figure(title="Pipeline stream: dense and attention compute per worker (colour: micro-batch)",
                             x_axis_type="datetime", x_range=x_range, height=260, tools="xpan,xwheel_zoom,reset",
                             min_border_bottom=30, name="glinthawk-stream", **sizing)
        self.stream.quad(left="left", right="right", bottom="bottom", top="top", fill_color="color",
                         line_color="color", fill_alpha=0.8, source=self.stream_source)
        self.stream.add_tools(HoverTool(tooltips=[("worker", "@lane"), ("kind", "@kind"),
                                                  ("micro-batch", "@micro_batch"), ("layer", "@layer"),
                                                  ("duration", "@duration{0.000} ms")]))
        self.stream.yaxis.minor_tick_line_color = None
        self.stream.ygrid.grid_line_color = None
        self.stream.xaxis.axis_label = "time (scheduler clock)"
        swatches = "".join(f'<span style="background:{c};display:inline-block;width:12px;height:10px;'
                           f'margin:0 1px"></span>' for c in _PALETTE)
        self.stream_legend = Div(
            text=(f"<small>Each bar is one compute job of a worker's stream. Colour: the micro-batch "
                  f"(0, 1, 2, ... cycling through {swatches}); grey "
                  '<span style="background:#bbbbbb;display:inline-block;width:12px;height:10px"></span>: '
                  "profiling the cluster for a plan. Dense lanes: a layer's dense math (or, for micro-batches "
                  "whose KV is on the dense worker, a whole step with attention); attention lanes: one "
                  "layer's attention for a micro-batch.</small>"),
            name="glinthawk-stream-legend", **sizing)

        self.rate_source = ColumnDataSource({k: [] for k in ("t", "generated", "processed", "in_flight")},
                                            name="glinthawk-rates")
        # y ranges are set by update() from the samples in the visible window (a range over
        # the whole buffer stays stretched by a prefill spike long after it scrolled away)
        self.rates = figure(title="Tokens/s (generated; processed incl. prefill)", x_axis_type="datetime",
                            x_range=x_range, y_range=Range1d(0, 1, name="glinthawk-rates-y"), height=200,
                            tools="xpan,xwheel_zoom,reset", name="glinthawk-rates", **sizing)
        self.rates.line("t", "generated", source=self.rate_source, line_width=2, legend_label="generated")
        self.rates.line("t", "processed", source=self.rate_source, line_width=1, line_dash="dashed",
                        color="#ff7f0e", legend_label="processed")
        legend = self.rates.legend[0]
        self.rates.legend.location = "top_left"
        self.rates.add_layout(legend, "right")  # beside the plot: it never covers the lines
        self.rates.yaxis.axis_label = "tokens/s"
        self.rates.xaxis.axis_label = "time"
        self.in_flight = figure(title="Micro-batches in flight", x_axis_type="datetime", x_range=x_range,
                                y_range=Range1d(0, 1, name="glinthawk-in-flight-y"), height=200,
                                tools="xpan,xwheel_zoom,reset", name="glinthawk-in-flight", **sizing)
        self.in_flight.step("t", "in_flight", source=self.rate_source, mode="after", line_width=2,
                            color="#2ca02c")
        self.in_flight.yaxis.axis_label = "micro-batches"
        self.in_flight.xaxis.axis_label = "time"

        self.kv_source = ColumnDataSource({k: [] for k in ("worker", "budget", "allocated", "used", "text")},
                                          name="glinthawk-kv")
        self.kv = figure(title="KV memory per worker, both tiers (used / allocated / budget)", y_range=FactorRange(),
                         x_range=DataRange1d(start=0), height=200, tools="", name="glinthawk-kv", **sizing)
        self.kv.hbar(y="worker", left=0, right="budget", height=0.7, color="#dddddd", source=self.kv_source)
        self.kv.hbar(y="worker", left=0, right="allocated", height=0.7, color="#9ecae1", source=self.kv_source)
        self.kv.hbar(y="worker", left=0, right="used", height=0.7, color="#08519c", source=self.kv_source)
        self.kv.add_layout(LabelSet(x=0, y="worker", text="text", x_offset=4, y_offset=-6, text_font_size="10px",
                                    source=self.kv_source, **_LABEL_STYLE))
        self.kv.xaxis.formatter = _bytes_formatter()
        self.kv.xaxis.axis_label = "KV bytes"

        self.rows_source = ColumnDataSource({k: [] for k in ("label", "fraction", "text")}, name="glinthawk-rows")
        self.rows = figure(title="Rows done", y_range=FactorRange(), x_range=Range1d(0, 1), height=200, tools="",
                           name="glinthawk-rows", **sizing)
        self.rows.hbar(y="label", left=0, right=1, height=0.7, color="#eeeeee", source=self.rows_source)
        self.rows.hbar(y="label", left=0, right="fraction", height=0.7, color="#31a354", source=self.rows_source)
        self.rows.add_layout(LabelSet(x=0, y="label", text="text", x_offset=4, y_offset=-6, text_font_size="10px",
                                      source=self.rows_source, **_LABEL_STYLE))
        self.rows.xaxis.axis_label = "share of the rows (runs: of those submitted so far; pipelines: of the shards)"

        self.summary = Div(text="<b>Glinthawk</b>: waiting for the first numbers", name="glinthawk-summary",
                           **sizing)
        self.root = column(self.summary, self.stream, self.stream_legend, row(self.rates, self.in_flight, **sizing),
                           row(self.kv, self.rows, **sizing), **sizing)

    def update(self) -> None:
        """Take what the scheduler pulled since the last refresh into the plots."""
        from bokeh.models import FixedTicker

        m = self.metrics
        m.watch()
        rows, self._seen_intervals = m.intervals.since(self._seen_intervals, self.n_rectangles)
        labels = {lane: m.labels[key] for key, lane in m.lanes.items()}
        if labels != self._lanes:
            self._lanes = labels
            self.stream.yaxis.ticker = FixedTicker(ticks=sorted(labels))
            self.stream.yaxis.major_label_overrides = {lane: text for lane, text in labels.items()}
        if rows:
            self.stream_source.stream({
                "left": [r[0] for r in rows], "right": [r[1] for r in rows],
                "bottom": [r[2] - 0.4 for r in rows], "top": [r[2] + 0.4 for r in rows],
                "color": [_PALETTE[r[4] % len(_PALETTE)] if r[3] != "calibrate" else "#bbbbbb" for r in rows],
                "lane": [labels.get(r[2], "") for r in rows], "kind": [r[3] for r in rows],
                "micro_batch": [r[4] for r in rows], "layer": [r[5] for r in rows],
                "duration": [r[1] - r[0] for r in rows],
            }, rollover=self.n_rectangles)

        samples, self._seen_samples = m.samples.since(self._seen_samples)
        if samples:
            self.rate_source.stream({
                "t": [s[0] for s in samples], "generated": [s[1] for s in samples],
                "processed": [s[2] for s in samples], "in_flight": [s[3] for s in samples],
            }, rollover=m.samples.rows.maxlen)

        self._follow_y()

        kv = sorted(m.kv.items(), key=lambda item: (item[0][1] != "dense", item[0][0]))
        kv_labels = [m.labels.get(key, key[0]) for key, _ in kv]
        if list(self.kv.y_range.factors) != kv_labels:
            self.kv.y_range.factors = kv_labels
        self.kv_source.data = {
            "worker": kv_labels,
            "budget": [d["budget"] for _, d in kv],
            "allocated": [d["allocated"] for _, d in kv],
            "used": [d["used"] for _, d in kv],
            "text": [f"{_bytes(d['used'])} used, {_bytes(d['allocated'])} allocated of {_bytes(d['budget'])}"
                     for _, d in kv],
        }

        labels_, fractions, texts = [], [], []
        runs = [(r, st, False) for r, st in sorted(m.runs.items())]
        runs += [(r, st, True) for r, st in m.finished.items()]
        for run_id, st, finished in runs:
            labels_.append(f"run {run_id}")
            fractions.append(st["n_done"] / st["n_submitted"] if st["n_submitted"] else 0.0)
            n_local, n_mb = st.get("n_local", 0), st.get("n_micro_batches", 0)
            where = (f"; attention of {n_local} of {n_mb} micro-batches on the dense worker"
                     if 0 < n_local < n_mb else "; attention on the dense worker" if n_local else "")
            texts.append(f"{st['n_done']} of {st['n_submitted']} rows submitted so far done{where}"
                         + (", finished" if finished else "")
                         + (f"  error: {st['error']}" if st.get("error") else ""))
        for name, p in m.pipelines.items():
            labels_.append(f"pipeline {name}")
            total = p.get("shards_total") or 0
            fractions.append(1.0 if p.get("done") else (p.get("shards_read", 0) / total if total else 0.0))
            texts.append(f"{p.get('rows_done', 0)} rows ({p.get('errors', 0)} errors, {p.get('skipped', 0)} "
                         f"already done), shards {p.get('shards_read', 0)}/{total}, "
                         f"{p.get('tokens_per_s', 0.0):.0f} tok/s" + (", finished" if p.get("done") else ""))
        if list(self.rows.y_range.factors) != labels_:
            self.rows.y_range.factors = labels_
        self.rows_source.data = {"label": labels_, "fraction": fractions, "text": texts}

        last = m.samples.rows[-1] if m.samples.rows else None
        parts = [f"<b>Glinthawk</b>: {len(m.runs)} run(s) open"]
        if last is not None:
            parts.append(f"{last[1]:.0f} generated tok/s, {last[2]:.0f} processed tok/s, "
                         f"{last[3]} micro-batch(es) in flight")
        n_dense = sum(1 for (_, t) in m.lanes if t == "dense")
        parts.append(f"{n_dense} dense, {sum(1 for (_, t) in m.kv if t == 'attention')} attention worker(s)")
        util = m.utilisation(60.0)
        if util:
            parts.append("busy over the last minute: " + ", ".join(f"{t} {u:.0%}" for t, u in sorted(util.items())))
        if m.dropped:
            parts.append(f"{m.dropped} intervals not shown (more than {MAX_EVENTS_PER_PULL} per pull)")
        self.summary.text = "; ".join(parts)


    def _follow_y(self) -> None:
        """Fit the rate and in-flight y ranges to the samples of the visible window."""
        rows = self.metrics.samples.rows
        if not rows:
            return
        since = rows[-1][0] - self.follow_ms
        visible = [r for r in rows if r[0] >= since]
        top = max(max(r[1], r[2]) for r in visible)
        self.rates.y_range.end = max(1.0, top * 1.1)
        self.in_flight.y_range.end = max(1.0, max(r[3] for r in visible) * 1.1 + 0.5)


#: Labels over bars: dark text on a light box, readable on the darkest bar
_LABEL_STYLE = {"text_color": "#222222", "background_fill_color": "#ffffff", "background_fill_alpha": 0.75}


def _bytes_formatter():
    from bokeh.models import CustomJSTickFormatter

    return CustomJSTickFormatter(code="""
        const units = ['B', 'kiB', 'MiB', 'GiB', 'TiB'];
        let v = tick, i = 0;
        while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
        return (Math.round(v * 10) / 10) + ' ' + units[i];
    """)


def glinthawk_doc(scheduler: Any, extra: dict, doc: Any) -> None:
    """Bokeh document of the page (one per browser session)."""
    from bokeh.models import Div
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    doc.title = "Dask: Glinthawk"
    plugin = scheduler.plugins.get("glinthawk")
    metrics = getattr(plugin, "metrics", None)
    if metrics is None:
        doc.add_root(Div(text="The glinthawk scheduler plugin is not registered on this scheduler."))
    else:
        page = GlinthawkPage(metrics, sizing_mode="stretch_width")
        page.update()
        add_periodic_callback(doc, page, int(metrics.interval * 1000))
        doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME
