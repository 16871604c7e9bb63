"""Detached pipelines: `run --detach`, `attach`, `cancel`, `status`, and the driver's worker dying."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
import zarr

from distributed import Client

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask.cli.cluster import status_text
from glinthawk_dask.errors import GlinthawkError
from glinthawk_dask.pipeline.detached import detached_pipelines, submit_detached
from glinthawk_dask.pipeline.spec import load_spec
from glinthawk_dask.runtime.cluster import cluster_status
from glinthawk_dask.pipeline.sink import read_output
from glinthawk_dask.runtime.pipelines import PipelineRegistry
from helpers import glinthawk_cluster, story_rows

MODEL = "smollm2-135m-instruct"
ROWS = story_rows(24, chat=(4, 3), commas=5)
MAX_TOKENS = 24


def glinthawk(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glinthawk_dask", *args], capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def cluster():
    """`glinthawk cluster` (1 dense, 2 attention worker processes) for this module."""
    with glinthawk_cluster() as address:
        try:
            yield address
        finally:
            for client in _clients.values():
                client.close()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    with LLM(MODEL, mode="in-process") as llm:
        return {c.id: c.completion_token_ids for c in llm.generate(ROWS, SamplingParams(max_tokens=MAX_TOKENS))}


def _spec(tmp_path: Path, name: str, out: str, rows: list[dict] = ROWS) -> Path:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": name, "model": MODEL, "input": {"urls": str(src)},
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0},
        "topology": {"mode": "two-tier", "micro_batch_size": 4, "micro_batches": 2, "max_seq_len": 256},
        "output": {"url": out, "chunk_rows": 2},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


_clients: dict[str, Client] = {}


def _records(address: str) -> dict[str, dict]:
    """The cluster's detached pipelines by name (as `glinthawk status --json` lists them)."""
    if address not in _clients:
        _clients[address] = Client(address)
    return {p["name"]: p for p in detached_pipelines(_clients[address])}


def _wait(address: str, name: str, ok, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while True:
        record = _records(address).get(name)
        if record is not None and ok(record):
            return record
        assert time.time() < deadline, record
        time.sleep(0.5)


def _committed(url: str) -> int:
    try:
        return len(read_output(url))
    except Exception:  # (not created yet)
        return 0


def _table(url: str) -> dict[str, list[int]]:
    out = {}
    for r in read_output(url).records():
        assert r["id"] not in out, f"{r['id']} written twice"
        assert r["finish_reason"] in ("stop", "length"), r
        out[r["id"]] = r["completion_token_ids"]
    return out


def test_a_detached_run_goes_on_without_its_client(cluster, reference, tmp_path):
    out = tmp_path / "out.zarr"
    spec = _spec(tmp_path, "alone", "out.zarr")
    # a relative output path is this working directory's, written by a worker on this machine
    proc = subprocess.run([sys.executable, "-m", "glinthawk_dask", "run", str(spec), "--scheduler", cluster,
                           "--detach"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "alone: running on the cluster (its driver on worker tcp://" in proc.stderr, proc.stderr
    assert f"writing {out}" in proc.stderr and f"glinthawk attach alone --scheduler {cluster}" in proc.stderr
    # the command has ended; the run goes on, and its driver is a process of its own
    record = _records(cluster)["alone"]
    assert record["state"] in ("running", "finished") and record["attempts"] == 1, record
    assert record["pid"] != os.getpid() and record["output"] == str(out)
    # attach follows it to the end and says what it did, as `run` does
    att = glinthawk("attach", "alone", "--scheduler", cluster)
    assert att.returncode == 0, att.stderr
    assert re.search(r"alone: 24 rows written \(0 errors, 0 already done\), \d+ tokens in", att.stderr), att.stderr
    assert "\n  plan two-tier, 4 x 2 micro-batches, as the spec sets them" in att.stderr
    assert _table(str(out)) == reference
    status = glinthawk("status", "--scheduler", cluster)
    assert re.search(r"\n  alone: finished \d+ s ago, 24 rows written \(0 errors\); output " + re.escape(str(out)),
                     status.stdout), status.stdout
    # its runs, named for it in the KV changes: the model's load, then the run
    assert re.search(r"\n  [\d:]{8} gh-\w+ \(pipeline alone, loading the model\) placed with [\d.]+ KiB of KV.*"
                     r"\n  [\d:]{8} gh-\w+ \(pipeline alone\) placed with [\d.]+ MiB of KV \(two-tier, 4\+4 slots\)",
                     status.stdout, re.S), status.stdout
    assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
    # at once again, from Python (the first run's task may still be ending): nothing left to do
    first = load_spec(spec)
    pipe = submit_detached(first.replace(output=dataclasses.replace(first.output, url=str(out))), _clients[cluster])
    again = pipe.wait(timeout=120, poll=0.2)
    assert again["state"] == "finished" and again["attempts"] == 1 and pipe.report().complete, again


def test_cancel_stops_a_detached_run_and_a_rerun_resumes(cluster, reference, tmp_path):
    out = str(tmp_path / "out.zarr")
    rows = ROWS
    spec = _spec(tmp_path, "stopped", out, rows=rows)
    # the command waits for the run to generate, up to glinthawk.cli.detach-wait seconds
    proc = glinthawk("run", str(spec), "--scheduler", cluster, "--detach",
                     env={"DASK_GLINTHAWK__CLI__DETACH_WAIT": "0.5"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"stopped: still (submitted|starting) on the cluster after 0\.5 s \(loading the model, or waiting "
                     r"for KV other runs hold", proc.stderr), proc.stderr
    record = _wait(cluster, "stopped", lambda r: r["state"] not in ("submitted", "starting") and (
        (r.get("progress") or {}).get("rows_done", 0) >= 2 or r["state"] != "running"))
    assert record["state"] == "running", record
    # a second run of the same name is refused while it runs
    with pytest.raises(GlinthawkError, match="a pipeline named 'stopped' is already running on this cluster"):
        submit_detached(load_spec(spec), _clients[cluster])
    cancel = glinthawk("cancel", "stopped", "--scheduler", cluster)
    assert cancel.returncode == 0, cancel.stderr
    assert "stopped: cancel sent; waiting for it to commit its finished rows and stop" in cancel.stderr
    assert "\n  cancelled: the rows finished before it are committed; running the spec again resumes" in cancel.stderr
    record = _records(cluster)["stopped"]
    assert record["state"] == "cancelled" and record["report"]["cancelled"], record
    done = _table(out)
    assert 2 <= len(done) == record["report"]["rows_in_output"] < len(rows)
    expected = reference
    assert done == {k: expected[k] for k in done}
    assert "already ended (cancelled): nothing to cancel" in glinthawk("cancel", "stopped", "--scheduler",
                                                                        cluster).stderr
    # run again: the name is free once ended, and the run resumes where the cancel left it
    assert glinthawk("run", str(spec), "--scheduler", cluster, "--detach").returncode == 0
    att = glinthawk("attach", "stopped", "--scheduler", cluster)
    assert att.returncode == 0 and f"(0 errors, {len(done)} already done)" in att.stderr, att.stderr
    assert _table(out) == expected


def test_a_detached_run_outlives_the_workers_it_runs_on(cluster, reference, tmp_path):
    """SIGKILL, mid-run, an attention worker that does not run the driver: the run moves
    its micro-batch and goes on, and `attach` prints the loss as `run` would.  Then SIGKILL
    the worker whose task runs the driver: Dask runs the task again under another worker
    of this host (the one killed first is back at a new port by then: the task is bound to
    the host, not to addresses), the new driver resumes the output, and every row is in
    it once and right; the first driver process, orphaned, stops."""
    out = str(tmp_path / "out.zarr")
    rows = ROWS + [dict(r, id=f"{r['id']}b") for r in ROWS]  # (long enough to outlast both kills)
    spec = _spec(tmp_path, "survivor", out, rows=rows)
    assert glinthawk("run", str(spec), "--scheduler", cluster, "--detach").returncode == 0
    attach = subprocess.Popen([sys.executable, "-m", "glinthawk_dask", "attach", "survivor", "--scheduler", cluster],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = _wait(cluster, "survivor", lambda r: (r.get("progress") or {}).get("rows_done", 0) >= 1
                   or r["state"] != "running")
    assert record["state"] == "running", record
    driver = psutil.Process(record["pid"])
    worker = driver.parent()  # the worker process the record names (its nanny starts another)
    pids = _clients[cluster].run(os.getpid)  # worker address -> its process
    assert pids[record["worker"]] == worker.pid
    registry = _clients[cluster].sync(_clients[cluster].scheduler.glinthawk_registry)
    other = next(a for a in registry["attention"] if a != record["worker"])  # (the driver's may be the dense one)
    psutil.Process(pids[other]).kill()
    record = _wait(cluster, "survivor", lambda r: r.get("recoveries") or r["state"] != "running")
    assert record["state"] == "running" and len(record["recoveries"]) == 1, record
    status = status_text(cluster_status(_clients[cluster]))  # what `glinthawk status` prints
    assert re.search(r"\n  survivor: running on worker \S+, \d+/\d+ rows, .*, 1 lost worker recovered; output ",
                     status), status
    deadline = time.time() + 120
    while _committed(out) < 2:  # (rows committed, not only finished, before the driver goes)
        assert time.time() < deadline and _records(cluster)["survivor"]["state"] == "running"
        time.sleep(0.2)
    worker.kill()
    driver.wait(30)  # the orphaned driver stops within a few seconds
    final = _wait(cluster, "survivor", lambda r: r["state"] not in ("submitted", "starting", "running"), 300)
    assert final["state"] == "finished" and final["attempts"] == 2, final
    assert _table(out) == {**reference, **{f"{k}b": v for k, v in reference.items()}}
    assert final["report"]["skipped"] >= 1  # the second attempt resumed from rows the first committed
    _, err = attach.communicate(timeout=60)
    assert attach.returncode == 0, err
    assert re.search(r"^glinthawk: lost attention worker tcp://\S+ .*micro-batch \d+ moved to tcp://", err,
                     re.MULTILINE), err
    end = re.search(r"^survivor: (\d+) rows written \(0 errors, (\d+) already done\)", err, re.MULTILINE)
    assert end and int(end[1]) + int(end[2]) == len(rows) and int(end[2]) == final["report"]["skipped"], err


def test_status_follows_the_kv_changes_between_runs_as_they_happen(cluster):
    """`glinthawk status --follow` prints the status, then each KV change the scheduler
    pushes (a run placed, ended) as it comes, until Ctrl-C."""
    import queue
    import signal
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "glinthawk_dask", "status", "--scheduler", cluster, "--follow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def read_until(pattern: str, timeout: float = 60) -> list[str]:
        seen, deadline = [], time.time() + timeout
        while not seen or not re.search(pattern, seen[-1]):
            try:
                seen.append(lines.get(timeout=max(0.0, deadline - time.time())))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s: {seen}") from None
        return seen

    try:
        read_until(r"^following KV changes between runs \(Ctrl-C stops\):$")
        with LLM(MODEL, scheduler=cluster, micro_batch_size=2, n_micro_batches=1) as llm:
            llm.label = "followed"
            llm.generate(ROWS[:2], SamplingParams(max_tokens=2))
        got = read_until(r"\(followed\) gave back .* of KV \(it ended\)$")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert re.search(r"^  [\d:]{8} gh-\w+ \(followed\) placed with [\d.]+ [KM]iB of KV \(two-tier, 2 slots\)$",
                     "".join(got), re.M), got
    assert proc.returncode == 0 and err == "", err


def test_detach_refuses_what_a_worker_cannot_write_and_a_missing_scheduler(cluster, tmp_path):
    spec = _spec(tmp_path, "refused", "memory://out.zarr")
    proc = glinthawk("run", str(spec), "--scheduler", cluster, "--detach")
    assert proc.returncode == 1 and "lives in the memory of the process that writes it" in proc.stderr
    proc = glinthawk("run", str(spec), "--detach")
    assert proc.returncode == 2 and "--detach needs --scheduler ADDRESS" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = glinthawk("attach", "nobody", "--scheduler", cluster)
    assert missing.returncode == 1 and "no detached pipeline named 'nobody'" in missing.stderr
    # a mistake the driver meets (another spec's output) ends the detached run: the command says so
    other = _spec(tmp_path, "other", str(tmp_path / "o.zarr"), rows=ROWS[:2])
    assert glinthawk("run", str(other), "--scheduler", cluster, "--detach").returncode == 0
    glinthawk("attach", "other", "--scheduler", cluster)
    clash = _spec(tmp_path, "clash", str(tmp_path / "o.zarr"), rows=ROWS[:3])
    proc = glinthawk("run", str(clash), "--scheduler", cluster, "--detach")
    assert proc.returncode == 1 and "Error: clash failed: " in proc.stderr and "different spec" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the scheduler's record ------------------------------------------------------------------


class _Scheduler:
    def __init__(self) -> None:
        self.handlers: dict = {}
        self.tasks: dict = {}


def test_the_registry_counts_attempts_refuses_twins_and_finds_lost_drivers(monkeypatch):
    s = _Scheduler()
    progress = {"p": {"rows_done": 7}}
    reg = PipelineRegistry(s, progress.get)
    assert set(s.handlers) == {"glinthawk_pipeline_put", "glinthawk_pipelines"}
    assert reg.put("p", {"key": "k", "output": "o"}, new=True)["state"] == "submitted"
    assert reg.list()[0]["state"] == "submitted"  # its task has not reached the scheduler yet: not lost
    s.tasks["k"] = object()
    assert reg.put("p", {"state": "starting"})["attempts"] == 1
    assert "refused" in reg.put("p", {"key": "k2"}, new=True)
    assert reg.put("p", {"state": "running"}, key="k")["state"] == "running"
    # an earlier run's driver of the same name, still ending, does not touch this record
    assert reg.put("p", {"state": "failed"}, key="k0")["stale"] and reg.records["p"]["state"] == "running"
    assert reg.list("p")[0]["progress"] == {"rows_done": 7}
    assert reg.put("p", {"state": "starting"})["attempts"] == 2  # Dask ran it again
    del s.tasks["k"]
    lost = reg.list("p")[0]
    assert lost["state"] == "lost" and "died 2 time(s)" in lost["error"] and "(7 rows in its last report)" in \
        lost["error"]
    # a driver rerun after its record ended stops on the answer; a new run of the name may start
    assert reg.put("p", {"state": "starting"})["state"] == "lost"
    assert reg.put("p", {"key": "k3"}, new=True)["state"] == "submitted"
    # a submitted record whose task never reached the scheduler is lost after a grace period
    import glinthawk_dask.runtime.pipelines as mod

    monkeypatch.setattr(mod, "SUBMIT_GRACE", 0.0)
    assert reg.list("p")[0]["state"] == "lost"
    for i in range(mod.KEEP_ENDED + 5):
        reg.put(f"x{i}", {}, new=True)
        reg.put(f"x{i}", {"state": "finished"})
    assert len(reg.records) == mod.KEEP_ENDED + 1  # trimmed as x24 was submitted: 20 ended and x24
    assert "x24" in reg.records and "x3" not in reg.records and "x4" in reg.records



def test_status_lines_of_detached_pipelines():
    from glinthawk_dask.cli.detached import pipeline_line

    lost = [{"kind": "moved micro-batch"}]
    running = {"name": "a", "state": "running", "attempts": 2, "worker": "tcp://w:1", "output": "/o.zarr",
               "recoveries": lost, "progress": {"rows_done": 5, "rows_total": 10, "rows_total_exact": True,
                                                "errors": 0, "tokens_per_s": 12.0, "shards_read": 1,
                                                "shards_total": 1, "eta_seconds": 30.0}}
    assert pipeline_line(running, 100.0) == (
        "  a: running (attempt 2: the workers of the ones before died) on worker tcp://w:1, 5/10 rows, 0 errors, "
        "12.0 tok/s, shards 1/1, ETA 30 s, 1 lost worker recovered; output /o.zarr")
    # an ended run keeps its age, rows and lost workers together
    finished = {"name": "b", "state": "finished", "attempts": 1, "ended": 40.0, "output": "/p.zarr",
                "recoveries": lost, "report": {"rows_done": 24, "errors": 1}}
    assert pipeline_line(finished, 100.0) == (
        "  b: finished 60 s ago, 24 rows written (1 errors), 1 lost worker recovered; output /p.zarr")
    failed = {"name": "c", "state": "failed", "attempts": 1, "ended": 99.0, "output": "/q.zarr", "error": "boom"}
    assert pipeline_line(failed, 100.0) == "  c: failed 1 s ago: boom; output /q.zarr"
