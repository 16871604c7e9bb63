"""The embedded default: real worker processes, the CLI's modes, an existing scheduler."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import psutil
import pytest

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask.errors import GenerationInterrupted

MODEL = "random:tiny-gqa"
ROWS = [{"id": f"p{i}", "prompt_token_ids": [(7 * i + j) % 300 + 1 for j in range(3 + 11 * i)],
         "max_tokens": 3 + 4 * (i % 3)} for i in range(9)]


def _children() -> set[int]:
    """Live descendant processes, less multiprocessing's own helpers (which stay for good)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" not in cmd and "forkserver" not in cmd:
            out.add(p.pid)
    return out


@pytest.fixture(scope="module")
def reference():
    llm = LLM(MODEL, mode="in-process")
    return {c.id: c.completion_token_ids for c in llm.generate(ROWS, SamplingParams(ignore_eos=True))}


def test_llm_starts_and_stops_the_local_cluster(reference):
    before = _children()
    with LLM(MODEL) as llm:
        assert llm.mode == "two-tier"
        info = llm.client.run(lambda dask_worker: (
            dict(dask_worker.state.total_resources),
            dask_worker.memory_manager.memory_spill_fraction,
            dask_worker.memory_manager.memory_pause_fraction,
        ))
        tiers = sorted("dense" if "GPU" in r else "attention" for r, _, _ in info.values())
        assert tiers == ["attention", "attention", "dense"]
        for resources, spill, pause in info.values():
            assert spill is False and 0.85 <= pause < 1  # KV is unmanaged memory: no spilling
        assert len(_children() - before) >= 3  # worker processes
        got = {c.id: c.completion_token_ids for c in llm.generate(ROWS, SamplingParams(ignore_eos=True))}
        assert got == reference
        summary = llm.last_summary
        assert summary.mode == "two-tier" and len(summary.plan["dense"]) == 1

        def interrupt(p):  # a Ctrl-C (a notebook's interrupt) once a few rows are done
            if p.rows_done >= 3:
                raise KeyboardInterrupt

        with pytest.raises(GenerationInterrupted) as stopped:
            llm.generate(ROWS, SamplingParams(ignore_eos=True), progress=interrupt)
        done = stopped.value.completions
        assert stopped.value.total == len(ROWS) and 3 <= len(done) < len(ROWS)
        assert [c.id for c in done] == [r["id"] for r in ROWS if r["id"] in {c.id for c in done}]  # input order
        assert all(c.completion_token_ids == reference[c.id] for c in done)
        assert llm.cluster_status()["runs"] == ()  # the run closed, its KV freed
        again = {c.id: c.completion_token_ids for c in llm.generate(ROWS, SamplingParams(ignore_eos=True))}
        assert again == reference
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # glinthawk.heap: steady
            assert set(llm.client.run(lambda: sys.modules["glinthawk_dask.heap"]._pinned).values()) == {True}
    gone = psutil.wait_procs([psutil.Process(p) for p in _children() - before if psutil.pid_exists(p)], timeout=30)
    assert not gone[1], "worker processes outlived LLM.close()"


def _cli(*args, input_rows=ROWS):
    stdin = "".join(json.dumps(r) + "\n" for r in input_rows)
    proc = subprocess.run(
        [sys.executable, "-m", "glinthawk_dask", "generate", "--model", MODEL, "--input", "-", *args],
        input=stdin, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return {r["id"]: r["completion_token_ids"] for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("mode", ["two-tier", "single-tier", "in-process"])
def test_cli_modes_agree(mode, reference):
    rows = [dict(r, ignore_eos=True) for r in ROWS]
    assert _cli("--mode", mode, "--micro-batch-size", "2", input_rows=rows) == reference


def test_cli_ctrl_c_writes_the_rows_that_finished(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the process group, the embedded cluster's workers
    included) mid-run: the finished rows are written in input order, one line says how
    many, no tracebacks, exit code 130, no process left."""
    import os
    import signal
    import time

    rows = [{"id": f"q{i}", "prompt_token_ids": [(5 * i + j) % 300 + 1 for j in range(4)], "max_tokens": 6 + 3 * i,
             "ignore_eos": True} for i in range(40)]  # each row longer than the last: they finish in input order
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "DASK_GLINTHAWK__CLI__PROGRESS_INTERVAL": "0.05"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "glinthawk_dask", "generate", "--model", MODEL, "--input", str(src),
         "--micro-batch-size", "4", "--micro-batches", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seen, deadline = "", time.monotonic() + 240
    while time.monotonic() < deadline:  # the progress lines: interrupt once 3 rows are done
        line = proc.stderr.readline()
        assert line, f"generate ended before the interrupt: {seen}"
        seen += line
        if line.split("/")[0].isdigit() and int(line.split("/")[0]) >= 3:
            break
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    written = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 130, err
    assert f"Interrupted: {len(written)} of 40 rows written to stdout" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert 3 <= len(written) < 40
    assert [r["id"] for r in written] == [r["id"] for r in rows][:len(written)]
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"processes outlived the interrupted command: {alive}"


def test_cli_on_an_existing_scheduler(reference):
    import dask
    from distributed import Client

    from glinthawk_dask.runtime.cluster import QUIET_HOUSEKEEPING, local_cluster

    rows = [dict(r, ignore_eos=True) for r in ROWS]
    with local_cluster(n_attention=1) as cluster, Client(cluster) as client:
        assert _cli("--scheduler", cluster.scheduler_address, input_rows=rows) == reference
        # the CLI leaves a cluster it did not start running
        assert len(client.scheduler_info()["workers"]) == 2
        # Dask's housekeeping runs quietly in the embedded cluster's worker processes
        # and its scheduler (they share this machine's cores with the tiers' compute)
        quiet = QUIET_HOUSEKEEPING
        on_workers = client.run(lambda: {k: dask.config.get(k) for k in quiet})
        assert len(on_workers) == 2 and all(v == quiet for v in on_workers.values())
        assert client.run_on_scheduler(lambda dask_scheduler: {
            "tick": dask_scheduler.periodic_callbacks["tick"].callback_time}) == {"tick": 1000}
        workers = client.run(lambda dask_worker: dask_worker.periodic_callbacks["tick"].callback_time)
        assert set(workers.values()) == {1000}


def test_local_cluster_housekeeping_is_dask_s_own_when_asked_and_checked():
    import dask

    from glinthawk_dask.errors import GlinthawkError
    from glinthawk_dask.runtime.cluster import local_cluster

    with dask.config.set({"glinthawk.housekeeping": "often"}):
        with pytest.raises(GlinthawkError, match="glinthawk.housekeeping is 'often': use quiet or dask"):
            local_cluster(n_attention=1)
    with dask.config.set({"glinthawk.housekeeping": "dask"}), \
            local_cluster(n_attention=1, asynchronous=False) as cluster:
        from distributed import Client

        with Client(cluster) as client:
            assert set(client.run(lambda: dask.config.get("distributed.worker.profile.enabled")).values()) == {True}
            ticks = client.run(lambda dask_worker: dask_worker.periodic_callbacks["tick"].callback_time)
            assert set(ticks.values()) == {20}


def test_embedded_clusters_keep_dask_s_logs_quiet_until_the_last_one_closes():
    """Two embedded clusters in one process: closing the first leaves the second quiet
    (Dask's own silence_logs restored INFO there); closing both restores the level."""
    import logging

    from glinthawk_dask.runtime.cluster import local_cluster

    console = logging.StreamHandler()  # as Dask's own logging config installs outside pytest
    logging.getLogger("distributed").addHandler(console)
    try:
        first = local_cluster(n_attention=0, n_dense=0)
        second = local_cluster(n_attention=0, n_dense=0)
        try:
            assert console.level == logging.WARNING
            first.close()
            assert console.level == logging.WARNING
            first.close()  # closing twice releases once
            assert console.level == logging.WARNING
        finally:
            first.close()
            second.close()
        assert console.level == logging.NOTSET
    finally:
        logging.getLogger("distributed").removeHandler(console)


def test_cli_unreachable_scheduler_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "glinthawk_dask", "generate", "--model", MODEL, "--prompt", "x",
         "--scheduler", "tcp://127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "127.0.0.1:9" in proc.stderr


def test_tier_workers_run_the_configured_housekeeping():
    """`glinthawk worker` and the embedded cluster hand a tier worker its housekeeping
    with its memory thresholds: quiet by default, Dask's own when asked."""
    import dask

    from glinthawk_dask.runtime.cluster import QUIET_HOUSEKEEPING, tier_worker_options

    for tier in ("dense", "attention"):
        opts = tier_worker_options(tier)
        assert {k: opts["config"][k] for k in QUIET_HOUSEKEEPING} == QUIET_HOUSEKEEPING
        assert "distributed.worker.memory.spill" in opts["config"]
        with dask.config.set({"glinthawk.housekeeping": "dask"}):
            assert not set(QUIET_HOUSEKEEPING) & set(tier_worker_options(tier)["config"])


def test_local_cluster_gives_attention_more_threads_and_a_shorter_openmp_spin_when_asked():
    """glinthawk.local-cluster.attention-threads and attention-try-threads ("auto": the
    cores) reach the attention workers' config and openmp-spin every worker's environment
    before it spawns; this process's environment stays as it was, and without them the
    workers keep the defaults."""
    import os

    import dask
    from distributed import Client

    from glinthawk_dask.runtime.cluster import local_cluster

    def settings(dask_worker=None):
        from glinthawk_dask import config

        return (os.environ.get("GOMP_SPINCOUNT"), config.get("attention.threads"),
                config.get("attention.try-threads"), "KV" in dask_worker.state.total_resources)

    if "GOMP_SPINCOUNT" in os.environ:
        pytest.skip("GOMP_SPINCOUNT is set in this environment, and it wins over the config")
    asked = {"glinthawk.local-cluster.attention-threads": 2, "glinthawk.local-cluster.openmp-spin": 10000,
             "glinthawk.local-cluster.attention-try-threads": "auto"}
    with dask.config.set(asked):
        with local_cluster(n_attention=1) as cluster, Client(cluster) as client:
            got = sorted(client.run(settings).values(), key=lambda x: x[3])
    assert got == [("10000", 1, None, False), ("10000", 2, os.cpu_count(), True)]
    assert "GOMP_SPINCOUNT" not in os.environ
    with local_cluster(n_attention=1) as cluster, Client(cluster) as client:
        assert sorted(client.run(settings).values(), key=lambda x: x[3]) == [(None, 1, None, False),
                                                                              (None, 1, None, True)]
