"""The Glinthawk page of the Dask dashboard and glinthawk's numbers in Dask's metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dask
import pytest
from distributed.utils_test import async_poll_for, gen_cluster, gen_test

from glinthawk_dask.engine.request import Request
from glinthawk_dask.runtime import AttentionWorkerPlugin, DaskEngine, DenseWorkerPlugin, GlinthawkSchedulerPlugin
from glinthawk_dask.runtime.compute import Timeline
from glinthawk_dask.sampling import SamplingParams
from helpers import count_scheduler_messages

MODEL = "random:tiny-gqa"
DENSE = ("127.0.0.1", 1, {"resources": {"GPU": 1}})
ATTN = ("127.0.0.1", 1, {"resources": {"KV": 2**28}})

DASHBOARD = {"dashboard": True, "dashboard_address": "127.0.0.1:0"}


def _requests(n: int, max_tokens: int) -> list[Request]:
    return [Request(f"r{i}", [1 + i % 50] * (3 + i % 7), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            for i in range(n)]


async def _setup(c):
    await c.register_plugin(GlinthawkSchedulerPlugin())
    await c.register_plugin(DenseWorkerPlugin())
    await c.register_plugin(AttentionWorkerPlugin())


async def _get(url: str) -> tuple[int, str]:
    from tornado.httpclient import AsyncHTTPClient

    response = await AsyncHTTPClient().fetch(url, raise_error=False)
    return response.code, response.body.decode()


async def _generate_while_the_page_looks(engine: DaskEngine, requests: list[Request], page, look: Callable,
                                         every: float, timeout: float = 90.0) -> list:
    """Run ``requests`` on ``engine`` while the scheduler polls the workers and ``page``
    refreshes every ``every`` seconds, calling ``look(page)`` after each refresh; the
    completions.  Fails if the run takes more than ``timeout`` seconds."""
    metrics = page.metrics

    async def consume():
        return [comp async for comp in engine.agenerate(requests)]

    run = asyncio.create_task(consume())
    deadline = time.monotonic() + timeout
    while not run.done():
        if time.monotonic() > deadline:
            run.cancel()
            pytest.fail(f"the run of {len(requests)} requests did not finish within {timeout} s "
                        f"({metrics.n_polls} polls; runs seen: {sorted(metrics.runs)})")
        await metrics.poll()
        page.update()
        look(page)
        await asyncio.sleep(every)
    return await run


def test_timeline_read_hands_out_only_what_is_new():
    tl = Timeline(maxlen=5)
    for i in range(3):
        tl.record("dense", i, i + 0.5, micro_batch=i)
    events, cursor, dropped = tl.read(0)
    assert [e[3] for e in events] == [0, 1, 2] and cursor == 3 and dropped == 0
    assert tl.read(cursor) == ([], 3, 0)
    for i in range(3, 10):
        tl.record("attention", i, i + 0.25)
    events, cursor2, dropped = tl.read(cursor, limit=2)  # 7 new, 5 kept, 2 taken
    assert [e[1] for e in events] == [8, 9] and cursor2 == 10 and dropped == 5
    assert tl.read(99)[1] == 10  # a cursor from before a restart starts over
    assert tl.totals() == {"dense": (1.5, 3), "attention": (1.75, 7)}


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120, scheduler_kwargs=DASHBOARD)
async def test_page_shows_kv_of_both_tiers_and_where_a_hybrid_run_attends(c, s, a, b):
    from glinthawk_dask.runtime.dashboard import GlinthawkPage

    await _setup(c)
    metrics = s.plugins["glinthawk"].metrics
    page = GlinthawkPage(metrics)
    engine = DaskEngine(c, MODEL, mode="hybrid", micro_batch_size=4, n_micro_batches=3, local_micro_batches=1)
    seen: dict = {"workers": set(), "texts": set(), "dense_used": 0}

    def look(page):
        kv = page.kv_source.data
        for worker, used in zip(kv["worker"], kv["used"]):
            seen["workers"].add(worker)
            if worker.startswith("dense"):
                seen["dense_used"] = max(seen["dense_used"], used)
        seen["texts"].update(page.rows_source.data["text"])

    assert len(await _generate_while_the_page_looks(engine, _requests(16, 40), page, look, every=0.1)) == 16
    assert {w.split()[0] for w in seen["workers"]} == {"dense", "attention"}, seen
    assert seen["dense_used"] > 0
    assert any("attention of 1 of 3 micro-batches on the dense worker" in t for t in seen["texts"]), seen


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120, scheduler_kwargs=DASHBOARD)
async def test_page_gets_intervals_kv_and_rates_during_a_run(c, s, a, b):
    from glinthawk_dask.runtime.dashboard import GlinthawkPage

    await _setup(c)
    metrics = s.plugins["glinthawk"].metrics
    await asyncio.sleep(0.3)
    assert metrics.n_polls == 0  # nobody looks: nothing is pulled

    counts = count_scheduler_messages(s)  # messages the scheduler handles while the page pulls

    page = GlinthawkPage(metrics)
    engine = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=4)
    seen = {"allocated": 0, "used": 0, "rows": set()}

    def look(page):
        kv = page.kv_source.data
        if kv["allocated"]:
            seen["allocated"] = max(seen["allocated"], max(kv["allocated"]))
            seen["used"] = max(seen["used"], max(kv["used"]))
        seen["rows"].update(page.rows_source.data["label"])

    assert len(await _generate_while_the_page_looks(engine, _requests(16, 40), page, look, every=0.15)) == 16
    assert metrics.n_polls >= 3
    assert sum(v for k, v in counts.items() if k != "heartbeat_worker") <= 6, counts
    rates = page.rate_source.data
    kinds = set(page.stream_source.data["kind"])
    assert {"dense", "attention"} <= kinds, kinds
    assert max(rates["generated"]) > 0 and max(rates["in_flight"]) >= 1, rates
    assert page.kv_source.data["budget"] == [2**28]
    assert 0 < seen["used"] <= seen["allocated"] <= 2**28, seen
    assert f"run {engine.last_summary.run_id}" in seen["rows"]
    # after the run: it stays listed, finished, and nothing is in flight any more
    await metrics.poll()
    page.update()
    assert f"run {engine.last_summary.run_id}" in page.rows_source.data["label"]
    assert any(t.endswith("finished") for t in page.rows_source.data["text"]), page.rows_source.data
    assert page.rate_source.data["in_flight"][-1] == 0
    assert "busy over the last minute: attention" in page.summary.text
    run_id = engine.last_summary.run_id  # its KV taken and given back, newest first
    changes = [line.split(" ", 1)[1] for line in page.kv_changes.text.removesuffix("</small>").split("<br>")[1:]]
    held = changes[1].removeprefix(f"{run_id} placed with ").removesuffix(" of KV (two-tier, 4+4+4+4 slots)")
    assert changes == [f"{run_id} gave back {held} of KV (it ended)", changes[1]] and held.endswith("KiB"), changes
    lanes = {metrics.labels[k] for k in metrics.lanes}
    assert lanes == {f"dense {a.address}", f"attention {b.address}"}
    stream = page.stream_source.data
    assert all(l < r for l, r in zip(stream["left"], stream["right"]))

    # the page is served by the scheduler's dashboard and linked in its navigation
    base = f"http://127.0.0.1:{s.http_server.port}"
    code, html = await _get(base + "/glinthawk")
    assert code == 200 and "Bokeh.embed.embed_items" in html and 'href="glinthawk"' in html
    code, html = await _get(base + "/status")
    assert code == 200 and 'href="glinthawk"' in html

    # compute time reaches Dask's metrics on the heartbeats
    for w, tier in ((a, "dense"), (b, "attention")):
        w.plugins[f"glinthawk-{tier}"]._digests.flush()
        await w.heartbeat()
        assert s.cumulative_worker_metrics[("glinthawk", tier, tier, "seconds")] > 0
        assert s.cumulative_worker_metrics[("glinthawk", tier, tier, "count")] > 0
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return
    code, text = await _get(base + "/metrics")
    assert 'dask_glinthawk_compute_seconds_total{kind="dense",tier="dense"}' in text, text[-2000:]
    # the KV the runs share: none now, the run's taking and giving back counted
    for line in ('dask_glinthawk_runs{state="open"} 0.0', 'dask_glinthawk_runs{state="waiting"} 0.0',
                 'dask_glinthawk_kv_bytes{tier="attention",what="reserved"} 0.0',
                 'dask_glinthawk_kv_bytes{tier="attention",what="budget"} 2.68435456e+08',
                 'dask_glinthawk_kv_changes_total{kind="placed"} 1.0',
                 'dask_glinthawk_kv_changes_total{kind="freed"} 1.0'):
        assert line in text.splitlines(), (line, [x for x in text.splitlines() if "glinthawk" in x])


@gen_test(timeout=60)
async def test_each_scheduler_exports_its_own_metrics_and_a_closed_ones_are_gone():
    """Two schedulers in one process, as in tests: ``/metrics`` (the process-wide
    registry) shows the newest open scheduler's numbers, once; when it closes, the other
    one's come back; when both are closed, nothing of glinthawk is left in the registry."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from distributed import Scheduler

    from glinthawk_dask.runtime.dashboard import prometheus

    key = ("glinthawk", "dense", "dense", "seconds")
    series = 'dask_glinthawk_compute_seconds_total{kind="dense",tier="dense"}'

    async def scrape(s) -> str:
        code, text = await _get(f"http://127.0.0.1:{s.http_server.port}/metrics")
        assert code == 200, text
        return text

    async with Scheduler(dashboard=True, dashboard_address="127.0.0.1:0") as s1:
        await s1.register_scheduler_plugin(GlinthawkSchedulerPlugin(), idempotent=True)
        s1.cumulative_worker_metrics[key] = 1.5
        assert f"{series} 1.5" in await scrape(s1)
        async with Scheduler(dashboard=True, dashboard_address="127.0.0.1:0") as s2:
            await s2.register_scheduler_plugin(GlinthawkSchedulerPlugin(), idempotent=True)
            s2.cumulative_worker_metrics[key] = 2.5
            text = await scrape(s1)
            assert f"{series} 2.5" in text and f"{series} 1.5" not in text, text
            assert text.count(series) == 1, text
            assert [c.server for c in prometheus._open] == [s1, s2]
        assert [c.server for c in prometheus._open] == [s1]  # s2 closed: its collector is gone
        text = await scrape(s1)
        assert f"{series} 1.5" in text and f"{series} 2.5" not in text, text
    assert prometheus._open == [] and prometheus._registered is None
    assert "glinthawk" not in prometheus_client.generate_latest().decode()


def test_the_worker_side_loads_neither_bokeh_nor_the_page():
    code = ("import sys; import glinthawk_dask.runtime.plugins; "
            "from glinthawk_dask.runtime.dashboard import TierDigests, worker_metrics, MAX_EVENTS_PER_PULL; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'bokeh' or m.endswith('dashboard.page')); "
            "assert not loaded, loaded")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=60, scheduler_kwargs=DASHBOARD)
async def test_pulls_only_while_a_page_looks_and_progress_is_rate_limited(c, s, a, b):
    from glinthawk_dask.pipeline.run import Progress
    from glinthawk_dask.runtime.dashboard import GlinthawkPage, ProgressReporter

    await _setup(c)
    metrics = s.plugins["glinthawk"].metrics
    metrics.interval = 0.05
    page = GlinthawkPage(metrics)
    page.update()  # a page refresh: polling starts ...
    await asyncio.sleep(0.5)
    polls = metrics.n_polls
    assert polls >= 2
    await asyncio.sleep(0.5)  # ... and stops a few intervals after the last refresh
    assert metrics.n_polls <= polls + 1

    calls = []
    handler = s.handlers["glinthawk_progress"]
    s.handlers["glinthawk_progress"] = lambda **kw: (calls.append(kw), handler(**kw))[1]
    reporter = ProgressReporter(c, "my-pipeline", interval=10.0)
    for i in range(200):
        reporter(Progress(rows_done=i, shards_read=1, shards_total=4, generated_tokens=3 * i, seconds=1.0,
                          rows_total=800, recoveries=[{"kind": "moved micro-batch"}] if i > 100 else []))
    reporter.close()
    await async_poll_for(lambda: len(calls) >= 2, 10.0, period=0.01, fail_func=lambda: pytest.fail(
        f"after 10 s the scheduler got {len(calls)} progress report(s), not 2 (the first one, then the last one "
        f"on close): {calls}"))
    assert len(calls) == 2 and calls[-1]["progress"]["rows_done"] == 199 and calls[-1]["progress"]["done"]
    page.update()
    assert page.rows_source.data["label"] == ["pipeline my-pipeline"]
    assert "199/~800 rows" in page.rows_source.data["text"][0]  # estimated while shards are unread
    assert "1 lost worker recovered" in page.rows_source.data["text"][0]
    # a running pipeline's bar is its share of the rows, not of the shards read
    handler(name="one-file", progress={"rows_done": 50, "rows_total": 200, "rows_total_exact": True,
                                       "shards_read": 1, "shards_total": 1, "done": False, "eta_seconds": 4000.0})
    page.update()
    i = page.rows_source.data["label"].index("pipeline one-file")
    assert page.rows_source.data["fraction"][i] == pytest.approx(0.25)
    assert "50/200 rows" in page.rows_source.data["text"][i]
    assert page.rows_source.data["text"][i].endswith(", ETA 67 min")  # as the CLI says it


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=60, scheduler_kwargs=DASHBOARD)
async def test_detached_pipelines_show_their_state_on_the_page(c, s, a, b):
    from glinthawk_dask.runtime.dashboard import GlinthawkPage

    await _setup(c)
    plugin = s.plugins["glinthawk"]
    page = GlinthawkPage(plugin.metrics)
    registry = plugin.pipelines
    for name in ("going", "broken"):
        registry.put(name, {"output": f"/data/{name}.zarr"}, new=True)
        registry.put(name, {"state": "starting"})
    registry.put("going", {"state": "starting"})  # Dask ran its driver again
    registry.put("going", {"state": "running", "attempt": 2})
    plugin.metrics.report_progress(name="going", progress={"rows_done": 5, "rows_total": 10, "rows_total_exact": True,
                                                           "shards_read": 1, "shards_total": 1, "done": False})
    registry.put("broken", {"state": "failed", "error": "the output was started with a different spec"})
    page.update()
    texts = dict(zip(page.rows_source.data["label"], page.rows_source.data["text"]))
    assert texts["pipeline going"].startswith("5/10 rows") and texts["pipeline going"].endswith(
        "; detached, running (attempt 2)"), texts
    assert texts["pipeline broken"] == "detached, failed: the output was started with a different spec", texts


def _chromium() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    return browser, shutil.which("chromedriver")


# Counts the rows of the page's data sources that feed glyph renderers, by name.
_SOURCES_JS = """
const docs = (window.Bokeh && window.Bokeh.documents) || [];
if (!docs.length) return null;
const out = {};
for (const m of docs[0].all_models) {
  if (m.data_source === undefined || m.glyph === undefined) continue;  // glyph renderers only
  const src = m.data_source;
  if (!src.name || !src.name.startsWith('glinthawk-')) continue;
  const col = (k) => {
    const v = src.data instanceof Map ? src.data.get(k) : src.data[k];
    return v ? Array.from(v) : [];
  };
  out[src.name] = {n: src.get_length() || 0, kind: [...new Set(col('kind'))],
                   generated: Math.max(0, ...col('generated')), budget: Math.max(0, ...col('budget')),
                   label: col('label'), text: col('text')};
}
for (const m of docs[0].all_models) {  // the ranges and texts the page sets
  if (m.name === 'glinthawk-rates-y') out.rates_y_end = m.end;
  if (m.name === 'glinthawk-stream-legend') out.stream_legend = m.text;
}
return out;
"""


def _page_data_once(driver, ready: Callable[[dict], bool], timeout: float) -> dict | None:
    """The page's data (:data:`_SOURCES_JS`) once ``ready(data)`` holds, or as last seen
    after ``timeout`` seconds (the caller's assertions then say what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        data = driver.execute_script(_SOURCES_JS)
        if (data and ready(data)) or time.monotonic() > deadline:
            return data
        time.sleep(0.5)


def _every_plot_has_data(data: dict) -> bool:
    return (data.get("glinthawk-stream", {}).get("n", 0) > 0 and data.get("glinthawk-rates", {}).get("generated", 0) > 0
            and data.get("glinthawk-kv", {}).get("budget", 0) > 0
            and len(data.get("glinthawk-rows", {}).get("label", [])) >= 2)


def _finished_runs(data: dict) -> list[str]:
    """Texts of the runs the page lists as finished."""
    rows = data.get("glinthawk-rows", {})
    return [t for label, t in zip(rows.get("label", []), rows.get("text", []))
            if label.startswith("run ") and "finished" in t]


@pytest.mark.timeout(240)
def test_page_in_a_browser(tmp_path):
    """A real process cluster, a pipeline then a long generation, and headless Chromium
    on ``/glinthawk``: the plots get data, the stream has its legend; once the generation
    ends, its run stays listed as finished and the tokens/s axis shrinks to what the
    (4 s) window shows; a screenshot is saved."""
    browser, chromedriver = _chromium()
    if not browser or not chromedriver:
        pytest.skip("chromium and chromedriver are not installed (bash .ci/browser installs them)")
    from dask.utils import key_split
    from distributed import Client, get_task_stream
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from glinthawk_dask import LLM
    from glinthawk_dask.engine.engine import EngineConfig
    from glinthawk_dask.pipeline.run import run_pipeline
    from glinthawk_dask.pipeline.spec import parse_spec
    from glinthawk_dask.runtime.cluster import local_cluster
    from glinthawk_dask.runtime.dashboard import ProgressReporter, page_link

    for i in range(2):
        rows = [{"id": f"s{i}-{j}", "prompt_token_ids": [1 + j, 2, 3]} for j in range(4)]
        (tmp_path / f"shard{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = parse_spec({
        "name": "dashboard-test", "model": MODEL, "input": {"urls": [str(tmp_path / "shard*.jsonl")]},
        "sampling": {"max_tokens": 4, "ignore_eos": True},
        "topology": {"mode": "two-tier", "micro_batch_size": 4, "max_seq_len": 64},
        "output": {"url": str(tmp_path / "out.zarr")},
    })

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        options.add_argument(arg)

    with dask.config.set({"glinthawk.dashboard.window": 4}), local_cluster(n_attention=1) as cluster, \
            Client(cluster) as client:
        # a small pipeline first: its read-shard tasks are ordinary Dask tasks
        reporter = ProgressReporter(client, spec.name)
        with get_task_stream(client) as stream:
            report = run_pipeline(spec, client=client, progress=reporter)
        reporter.close()
        assert report.rows_done == 8
        prefixes = {key_split(t["key"]) for t in stream.data}
        assert "glinthawk-read-shard-dashboard-test" in prefixes, prefixes

        # then a long generation in the background, stopped once the page has seen it
        llm = LLM(MODEL, client=client, engine_config=EngineConfig(micro_batch_size=8))
        stop, failures = threading.Event(), []

        def generate() -> None:
            try:
                with contextlib.closing(llm.engine.generate(_requests(512, 64))) as completions:
                    for _ in completions:
                        if stop.is_set():
                            break  # closing the generator closes the run
            except Exception as e:  # pragma: no cover - reported below
                failures.append(e)

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        try:
            url = page_link(client)
            driver.get(url)
            sources = _page_data_once(driver, _every_plot_has_data, timeout=60)
            assert sources, f"no Bokeh document on {url}"
            peak = sources["glinthawk-rates"]["generated"]
            stop.set()  # the generation ends: its run must stay listed, finished, and the axis shrink
            worker.join(timeout=60)
            assert not worker.is_alive(), "the generation did not stop within 60 s of closing its generator"
            after = _page_data_once(driver, lambda d: bool(_finished_runs(d))
                                    and d.get("rates_y_end", peak) < min(peak, 5.0), timeout=30)
            assert after, f"the Bokeh document on {url} went away"
            finished = _finished_runs(after)
            time.sleep(1.0)  # let the canvases draw
            shots = [tmp_path / "glinthawk-page.png"]
            if os.environ.get("GLINTHAWK_ARTIFACTS"):
                shots.append(Path(os.environ["GLINTHAWK_ARTIFACTS"]) / "glinthawk-page.png")
                shots[-1].parent.mkdir(parents=True, exist_ok=True)
            for shot in shots:
                driver.save_screenshot(str(shot))
            assert {"dense", "attention"} <= set(sources["glinthawk-stream"]["kind"]), sources
            assert sources["glinthawk-rates"]["generated"] > 0, sources
            assert sources["glinthawk-kv"]["budget"] > 0, sources
            assert "pipeline dashboard-test" in sources["glinthawk-rows"]["label"], sources
            assert "micro-batch" in sources["stream_legend"] and "#bbbbbb" in sources["stream_legend"], sources
            assert finished, after  # the generate run, finished, still listed
            assert after["rates_y_end"] < min(peak, 5.0), (peak, after)  # the spike left the window
            assert driver.find_element(By.LINK_TEXT, "Glinthawk").get_attribute("href").endswith("/glinthawk")
            assert shots[0].stat().st_size > 10_000
        finally:
            stop.set()
            driver.quit()
            worker.join(timeout=60)
        assert not failures, failures


class _Scheduler:
    workers: dict = {}

    def get_events(self, topic: str) -> tuple:
        return ()


def test_page_y_ranges_follow_the_window_and_a_finished_run_stays_listed():
    from glinthawk_dask.runtime.dashboard import GlinthawkPage, PipelineMetrics

    m = PipelineMetrics(_Scheduler(), lambda: {})
    page = GlinthawkPage(m, follow_ms=20_000)
    t0 = time.time() * 1000 - 60_000
    # a prefill spike, then a minute of steady decoding
    m.samples.extend([(t0, 700.0, 2000.0, 2)] + [(t0 + 1000 * i, 30.0 + i % 3, 35.0, 2) for i in range(1, 61)])
    page.update()
    assert 32 * 1.1 - 1e-9 <= page.rates.y_range.end < 50  # the spike left the window: so did the range
    assert page.in_flight.y_range.end < 4
    m.samples.extend([(t0 + 61_000, 650.0, 900.0, 8)])  # a new spike in the window stretches it again
    page.update()
    assert page.rates.y_range.end >= 900 and page.in_flight.y_range.end >= 8
    # a run that ended is listed, marked finished, until a newer run starts
    m.finished["gh-old"] = {"n_done": 5, "n_submitted": 5, "n_local": 0, "n_micro_batches": 2, "error": None,
                            "finished_at": time.time()}
    page.update()
    assert "run gh-old" in page.rows_source.data["label"]
    assert any("finished" in t for t in page.rows_source.data["text"])
    assert page.rates.legend[0] in page.rates.right  # beside the plot, not over the lines
    assert "micro-batch" in page.stream_legend.text and "#bbbbbb" in page.stream_legend.text
    assert page.rates.yaxis[0].axis_label == "tokens/s" and page.kv.xaxis[0].axis_label == "KV bytes"
    assert "waiting" not in page.summary.text
    m.waiting = lambda: [{"run_id": "gh-new", "client": "c", "model": "m", "waited_s": 3.0}]
    page.update()  # runs waiting for KV the open runs hold are counted beside them
    assert "0 run(s) open, 1 waiting for KV the open runs hold" in page.summary.text


def test_utilisation_per_tier_over_the_last_minute():
    from glinthawk_dask.runtime.dashboard import PipelineMetrics

    m = PipelineMetrics(_Scheduler(), lambda: {})
    m.lanes = {("d", "dense"): 0, ("a1", "attention"): 1, ("a2", "attention"): 2}
    now = time.time() * 1000
    rows = []
    for i in range(60):  # a minute: dense busy 600 of every 1000 ms, each attention worker 100
        t = now - 60_000 + 1000 * i
        rows += [(t, t + 600, 0, "dense", 0, 0), (t, t + 100, 1, "attention", 0, 0), (t, t + 100, 2, "attention", 1, 0)]
    m.intervals.extend(rows)
    util = m.utilisation(60.0)
    assert util["dense"] == pytest.approx(0.6, abs=0.02) and util["attention"] == pytest.approx(0.1, abs=0.02)
