"""The page: served by the scheduler's dashboard at ``/glinthawk``, one Bokeh document
per browser session, over the scheduler's :class:`~.poller.PipelineMetrics`.

Bokeh is imported inside the functions that build the page, so :func:`page_link`
(used by clients) and :func:`install_page` (where Bokeh is missing: no page) work
without it.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any

from ...engine.progress import eta_part, lost_workers, rows_of
from ..kv_signals import event_text, recent
from . import MAX_EVENTS_PER_PULL, PAGE
from .poller import FINISHED_KEEP

if TYPE_CHECKING:
    from .poller import PipelineMetrics

__all__ = ["GlinthawkPage", "glinthawk_doc", "install_page", "page_link", "uninstall_page"]


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
    """Take the page that :func:`install_page` returned (``app``) off ``scheduler``'s
    dashboard and its navigation."""
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

        from ... import config

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
        self.rows.xaxis.axis_label = ("share of the rows (runs: of those submitted so far; pipelines: of the "
                                      "input's, estimated until every shard is read)")

        self.summary = Div(text="<b>Glinthawk</b>: waiting for the first numbers", name="glinthawk-summary",
                           **sizing)
        self.kv_changes = Div(text="", name="glinthawk-kv-changes", **sizing)  # (runs placed, waiting, giving back)
        self.root = column(self.summary, self.stream, self.stream_legend, row(self.rates, self.in_flight, **sizing),
                           row(self.kv, self.rows, **sizing), self.kv_changes, **sizing)

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
        detached = m.detached()
        for name, p in m.pipelines.items():
            labels_.append(f"pipeline {name}")
            total, rows = p.get("shards_total") or 0, p.get("rows_total")
            fractions.append(1.0 if p.get("done") else (min(1.0, p.get("rows_done", 0) / rows) if rows else 0.0))
            done = rows_of(p.get("rows_done", 0), rows, bool(p.get("rows_total_exact")))
            texts.append(f"{done} rows ({p.get('errors', 0)} errors, {p.get('skipped', 0)} already done), "
                         f"shards {p.get('shards_read', 0)}/{total}, "
                         f"{p.get('tokens_per_s', 0.0):.0f} tok/s" + _lost(p.get("recoveries", 0))
                         + (", finished" if p.get("done") else eta_part(p.get("eta_seconds")))
                         + _detached(detached.get(name)))
        now = time.time()
        for name, record in detached.items():  # detached ones that never reported progress (yet)
            if name not in m.pipelines and now - record.get("ended", now) < FINISHED_KEEP:
                labels_.append(f"pipeline {name}")
                fractions.append(0.0)
                texts.append(_detached(record).removeprefix("; "))
        if list(self.rows.y_range.factors) != labels_:
            self.rows.y_range.factors = labels_
        self.rows_source.data = {"label": labels_, "fraction": fractions, "text": texts}

        last = m.samples.rows[-1] if m.samples.rows else None
        waiting = len(m.waiting())
        parts = [f"<b>Glinthawk</b>: {len(m.runs)} run(s) open"
                 + (f", {waiting} waiting for KV the open runs hold" if waiting else "")]
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
        changes = recent(m.scheduler, 6)
        self.kv_changes.text = "" if not changes else (
            "<small><b>Last KV changes between runs</b> (<code>Client.get_events(\"glinthawk-kv\")</code> has "
            "them all):<br>" + "<br>".join(html.escape(event_text(e)) for e in reversed(changes)) + "</small>")

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


def _detached(record: dict | None) -> str:
    """A detached pipeline's state, after its progress (nothing for one run by a client)."""
    if record is None:
        return ""
    attempt = f" (attempt {record['attempts']})" if record.get("attempts", 0) > 1 else ""
    error = f": {record['error']}" if record.get("error") and record["state"] in ("failed", "lost") else ""
    return f"; detached, {record['state']}{attempt}{error}"


def _lost(n: int) -> str:
    """A pipeline's lost workers, as its progress line shows them."""
    return f", {lost_workers(n)} recovered" if n else ""
