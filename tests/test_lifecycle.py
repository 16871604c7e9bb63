"""Runs tied to their client: a client that leaves or stops renewing its lease has its
runs closed everywhere; permanent errors fail a run at once; `glinthawk status` shows
what a cluster holds; several clients share one cluster."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import dask
import pytest
from distributed import Client
from distributed.comm.core import CommClosedError
from distributed.utils_test import gen_cluster

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask import config as gh_config
from glinthawk_dask.errors import GlinthawkError, ModelLoadError
from glinthawk_dask.model import from_name
from glinthawk_dask.runtime import DaskEngine, cluster_status
from glinthawk_dask.runtime.faults import AttentionLost, StaleRunError, Unplaceable, WorkerFailure, is_worker_failure
from helpers import glinthawk_cluster
from test_two_tier import ATTN, DENSE, MODEL, _requests, _setup


@pytest.mark.parametrize("error,recoverable", [
    (CommClosedError("in <TCP ...>: Stream is closed"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (OSError("Timed out trying to connect to tcp://10.0.0.1:1234 after 30 s"), True),
    (OSError(errno.EHOSTUNREACH, "No route to host"), True),
    (asyncio.TimeoutError(), True),
    (TimeoutError("peer did not answer"), True),
    (StaleRunError("run gh-1 is not open"), True),
    (AttentionLost("tcp://a:1", 0, 1, "gone"), True),
    (WorkerFailure("lost"), True),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/models/x.gguf"), False),
    (PermissionError(errno.EACCES, "Permission denied", "/models/x.gguf"), False),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (ModelLoadError("no model at /models/x.gguf"), False),
    (Unplaceable("no attention workers"), False),
    (MemoryError("KV cache does not fit"), False),
    (ValueError("bad"), False),
    (KeyError("x"), False),
])
def test_worker_failures_are_told_from_permanent_errors(error, recoverable):
    assert is_worker_failure(error) is recoverable


async def _run_state(s, workers):
    dense = [w.plugins["glinthawk-dense"].service for w in workers
             if w.plugins.get("glinthawk-dense") and w.plugins["glinthawk-dense"].service]
    attention = [w.plugins["glinthawk-attention"].service for w in workers
                 if w.plugins.get("glinthawk-attention") and w.plugins["glinthawk-attention"].service]
    return (s.plugins["glinthawk"].runs, [d.runs for d in dense], [a.runs for a in attention])


async def _until(predicate, timeout: float) -> float:
    t0 = time.time()
    while not await predicate():
        if time.time() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.time() - t0


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_a_client_that_leaves_has_its_runs_closed_everywhere(c, s, a, b):
    await _setup(c)
    other = await Client(s.address, asynchronous=True)
    engine = DaskEngine(other, MODEL, micro_batch_size=2, n_micro_batches=2)
    stream = engine.agenerate(_requests(12, seed=21))
    await stream.__anext__()  # the run is open and going
    runs, dense, attention = await _run_state(s, [a, b])
    assert len(runs) == 1 and all(dense) and all(attention)
    info = await cluster_status(c)
    (run,) = info["runs"]
    assert run["client"] == other.id and run["kv_reserved"]["attention"] > 0
    from glinthawk_dask.cli.cluster import status_text

    text = status_text(info)  # `glinthawk status`
    assert "open runs: 1" in text and f"  {run['run_id']} by client {other.id}: two-tier" in text, text
    assert "lost" not in text
    assert "dense workers: 1" in text and "KV budget sized by each run (no --kv-bytes" in text, text
    run["lost_workers"] = ["tcp://10.0.0.9:4000"]
    line = next(x for x in status_text(info).splitlines() if x.startswith(f"  {run['run_id']} by client"))
    assert line.endswith("; lost tcp://10.0.0.9:4000"), status_text(info)
    at = time.strftime("%H:%M:%S", time.localtime(info["kv_events"][0]["time"]))
    assert status_text(info).endswith(f"last KV changes between runs:\n  {at} {run['run_id']} placed with 480.0 KiB "
                                      "of KV (two-tier, 2+2 slots)"), status_text(info)
    await other.close()

    async def gone():
        runs, dense, attention = await _run_state(s, [a, b])
        return not runs and not any(dense) and not any(attention)

    assert await _until(gone, 5.0) < 5.0
    info = await cluster_status(c)
    assert not info["runs"] and all(w["kv_reserved"] == 0 and w["kv_allocated"] == 0
                                      for w in info["workers"]["attention"])


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_a_run_whose_lease_expires_is_closed_and_its_client_told(c, s, a, b):
    await _setup(c)
    with dask.config.set({"glinthawk.engine.lease": 1.0}):
        engine = DaskEngine(c, MODEL, micro_batch_size=2, n_micro_batches=1)
        run = await engine._open(_requests(4, seed=22), None)  # opened, then never renewed

        async def closed():  # the scheduler forgets the run first, then closes it on the workers
            return (run.id not in s.plugins["glinthawk"].runs and not a.plugins["glinthawk-dense"].service.runs
                    and not b.plugins["glinthawk-attention"].service.runs)

        assert await _until(closed, 4.0) < 4.0
        with pytest.raises(GlinthawkError, match="closed the run: its client .* stopped renewing its 1 s lease"):
            await engine._renew(run)


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_a_long_run_renews_its_lease(c, s, a, b):
    """Runs that outlive their lease many times go on as long as their client polls."""
    await _setup(c)
    with dask.config.set({"glinthawk.engine.lease": 0.5, "glinthawk.engine.poll-interval": 0.1}):
        engine = DaskEngine(c, MODEL, micro_batch_size=1, n_micro_batches=1, latency=0.004)
        out = [comp async for comp in engine.agenerate(_requests(4, seed=23))]
    assert len(out) == 4 and engine.last_summary.seconds > 4 * 0.5


@gen_cluster(client=True, nthreads=[DENSE, DENSE, ATTN], timeout=120)
async def test_a_missing_model_file_during_recovery_fails_at_once_naming_it(c, s, a, b, attn):
    """The dense worker is lost, and its replacement cannot load the model: the run fails
    with the loader's message (not after the 300 s recovery timeout)."""
    import tempfile
    from pathlib import Path

    from conftest import build_hf_dir

    import tqdm

    from glinthawk_dask.model.resolve import embedded_gguf_path
    from glinthawk_dask.tokenizer import Tokenizer

    tqdm.tqdm.monitor_interval = 0  # (writing the checkpoint shows a bar: no monitor thread to outlive the test)
    await _setup(c)
    root = Path(tempfile.mkdtemp())
    try:
        model_dir, _ = build_hf_dir(from_name("tiny-gqa"), root / "tiny")
        Tokenizer.from_gguf(embedded_gguf_path()).hf.save_pretrained(str(model_dir))  # any tokenizer will do
        engine = DaskEngine(c, str(model_dir), micro_batch_size=2, n_micro_batches=2, n_slices=1)
        stream = engine.agenerate(_requests(16, seed=24))
        await stream.__anext__()
        victim = a if a.address == min(a.address, b.address) else b  # the plan's one slice runs there
        shutil.rmtree(model_dir)
        await victim.close()
        t0 = time.time()  # (the worker is gone: the client notices at its next poll)
        with pytest.raises(GlinthawkError) as info:
            async for _ in stream:
                pass
        took = time.time() - t0
        assert str(model_dir) in str(info.value), info.value
        assert took < 2.0 + float(gh_config.get("engine.poll-interval")), took
    finally:
        shutil.rmtree(root, ignore_errors=True)


_WAIT_REQUESTS = _requests(6, seed=25)
_PER_SEQ = from_name("tiny-gqa").kv_bytes_per_token(4) * max(
    len(r.prompt_token_ids) + r.params.max_tokens for r in _WAIT_REQUESTS)


@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 3 * _PER_SEQ + 100}})],
             timeout=120)
async def test_a_run_waits_for_kv_that_another_run_holds(c, s, a, b):
    """A run holds all of the only attention worker's KV: a second run waits until it
    closes, then completes."""
    await _setup(c)
    reqs = _WAIT_REQUESTS
    first = DaskEngine(c, MODEL, micro_batch_size=3, n_micro_batches=1)
    hold = await first._open(reqs, None)
    assert hold.plan.sizes == [3]
    second = DaskEngine(c, MODEL, micro_batch_size=2, n_micro_batches=1)
    task = asyncio.create_task(_collect(second, reqs))
    await asyncio.sleep(1.0)
    assert not task.done()  # waiting to be placed
    await first._close(hold)
    got = await asyncio.wait_for(task, 60)
    assert len(got) == 6
    assert s.plugins["glinthawk"].runs == {}


async def _collect(engine, reqs):
    return [comp async for comp in engine.agenerate(reqs)]


# -- process clusters ------------------------------------------------------------------------

ROWS = [{"id": f"p{i}", "prompt_token_ids": [(7 * i + j) % 250 + 1 for j in range(3 + i % 5)],
         "max_tokens": 24 + (i % 3), "ignore_eos": True} for i in range(12)]


@pytest.fixture(scope="module")
def process_cluster():
    """`glinthawk cluster` (1 dense, 2 attention worker processes) for this module."""
    with glinthawk_cluster() as address:
        yield address


def _status(address: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "glinthawk_dask", "status", "--scheduler", address, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _reference() -> dict:
    llm = LLM(MODEL, mode="in-process")
    return {c.id: c.completion_token_ids for c in llm.generate(ROWS, SamplingParams())}


CLIENT = textwrap.dedent("""
    import json, sys, threading
    from distributed import Client
    from glinthawk_dask import LLM, SamplingParams
    address, rows, runs, forever = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    client = Client(address)
    out, errors = {}, []
    def one(k):
        llm = LLM("random:tiny-gqa", client=client, micro_batch_size=2, n_micro_batches=2)
        mine = [dict(r, id=f"{r['id']}-{k}") for r in rows]
        while True:
            for c in llm.generate(mine, SamplingParams()):
                out[c.id] = c.completion_token_ids
            if not forever:
                return
    threads = [threading.Thread(target=one, args=(k,)) for k in range(runs)]
    print("started", flush=True)
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps(out), flush=True)
""")


def test_sigkill_a_client_mid_run_frees_its_run_and_kv(process_cluster):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, process_cluster, json.dumps(ROWS), "1", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        deadline = time.time() + 60
        while not _status(process_cluster)["runs"]:
            assert time.time() < deadline, "the client's run never opened"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    t0 = time.time()
    lease = float(gh_config.get("engine.lease"))
    while True:
        info = _status(process_cluster)
        reserved = [w["kv_reserved"] for tier in info["workers"].values() for w in tier]
        if not info["runs"] and not any(reserved):
            break
        assert time.time() - t0 < 2 * lease, info
        time.sleep(0.5)
    assert all(w["kv_allocated"] == 0 for tier in info["workers"].values() for w in tier), info
    # the next run gets the cluster's whole KV
    client = Client(process_cluster)
    try:
        llm = LLM(MODEL, client=client, micro_batch_size=4, n_micro_batches=2)
        got = {c.id: c.completion_token_ids for c in llm.generate(ROWS, SamplingParams())}
        assert llm.engine.last_summary.plan["sizes"] == [4, 4]
    finally:
        client.close()
    assert got == _reference()


def test_eight_runs_from_four_client_processes_share_the_cluster(process_cluster):
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, process_cluster, json.dumps(ROWS), "2", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    ref = _reference()
    for out in outs:
        assert len(out) == 2 * len(ROWS)
        for key, tokens in out.items():
            assert tokens == ref[key.rsplit("-", 1)[0]], key
    info = _status(process_cluster)
    assert not info["runs"]
    assert all(w["kv_reserved"] == 0 for tier in info["workers"].values() for w in tier), info


def test_a_scheduler_that_goes_away_is_a_clear_error_not_a_hang():
    """SIGKILL the process of the scheduler (a `glinthawk cluster`) mid-run: the client's
    next lease renewal fails, and generate raises an error that says so."""
    proc = subprocess.Popen([sys.executable, "-m", "glinthawk_dask", "cluster", "--dashboard-address", ":0",
                             "--attention", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # (its worker processes go with its group)
    try:
        address = proc.stdout.readline().split()[-1]
        with dask.config.set({"glinthawk.engine.lease": 3.0, "distributed.comm.timeouts.connect": "3s"}):
            client = Client(address)
            try:
                llm = LLM(MODEL, client=client, micro_batch_size=2, n_micro_batches=1, latency=0.002)
                rows = [dict(r, max_tokens=200) for r in ROWS]
                stream = llm.engine.generate(list(llm.make_requests(rows, SamplingParams())))
                next(stream)
                os.kill(proc.pid, signal.SIGKILL)
                t0 = time.time()
                with pytest.raises(GlinthawkError, match="lost the Dask scheduler"):
                    for _ in stream:
                        pass
                took = time.time() - t0
            finally:
                client.close(timeout=5)
        assert took < 3.0 / 3 + 3.0 + float(gh_config.get("engine.peer-timeout")), took
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_a_worker_heartbeat_that_fails_as_the_cluster_closes_is_one_line(caplog):
    """Distributed logs a failed heartbeat with the closed connection's traceback; a
    local cluster closing at the end of a command can race into it.  Tier workers log it
    in one line that keeps the error (and other records keep theirs)."""
    import logging

    from glinthawk_dask.runtime.worker_process import one_line_heartbeat_failures

    one_line_heartbeat_failures()
    one_line_heartbeat_failures()  # once per process, however many plugins set up
    log = logging.getLogger("distributed.worker")
    assert sum(type(f).__name__ == "OneLineHeartbeatFailure" for f in log.filters) == 1
    with caplog.at_level(logging.ERROR, logger="distributed.worker"):
        try:
            raise CommClosedError(
                "in <TCP (closed) ConnectionPool.heartbeat_worker local=tcp://127.0.0.1:1>: Stream is closed")
        except OSError:
            log.exception("Failed to communicate with scheduler during heartbeat.")
        try:
            raise ValueError("something else")
        except ValueError:
            log.exception("Unexpected exception during heartbeat. Closing worker.")
    heartbeat, other = caplog.records
    assert heartbeat.exc_info is None and "Traceback" not in caplog.text.split("Unexpected")[0]
    assert heartbeat.getMessage() == ("Failed to communicate with scheduler during heartbeat (CommClosedError: in "
                                      "<TCP (closed) ConnectionPool.heartbeat_worker local=tcp://127.0.0.1:1>: "
                                      "Stream is closed)")
    assert other.exc_info is not None  # only that message loses its traceback
