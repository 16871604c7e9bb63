"""The cluster commands (scheduler, worker, cluster), inspect, bench, TLS, and deploy/local.

User-error paths run in-process through CliRunner; the servers run as real processes on
loopback, and every test that starts one asserts that its processes are gone at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask.config
import psutil
import pytest
import yaml
import zarr
from click.testing import CliRunner
from distributed import Client

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask.cli import main
from glinthawk_dask.pipeline.run import run_pipeline
from glinthawk_dask.pipeline.sink import read_output
from glinthawk_dask.pipeline.spec import parse_spec
from glinthawk_dask.runtime.tls import make_certs, security

REPO = Path(__file__).resolve().parent.parent
MODEL = "random:tiny-gqa"
MAX_TOKENS = 4
ROWS = [{"id": f"p{i}", "prompt_token_ids": [(7 * i + j) % 300 + 1 for j in range(3 + 5 * i)]} for i in range(6)]
ADDRESS = re.compile(r"scheduler at ((?:tcp|tls)://\S+)")


def _env(**extra: str) -> dict[str, str]:
    """This environment without Dask TLS settings, for the scripts and commands."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM__")}
    return {**env, "PYTHON": sys.executable, **extra}


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == errors, result.output  # no usage block
    for f in fragments:
        assert f in errors[0], result.output


def _spec(tmp_path: Path, out: Path, mode: str = "two-tier") -> dict:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "name": "cli-e2e", "model": MODEL, "input": {"urls": str(src)},
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
        "topology": {"mode": mode, "micro_batch_size": 4, "max_seq_len": 64},
        "output": {"url": str(out), "chunk_rows": 4},
    }


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    llm = LLM(MODEL, mode="in-process")
    return {c.id: c.completion_token_ids
            for c in llm.generate(ROWS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))}


def _tree(pids) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return procs


def _assert_gone(procs: list[psutil.Process], timeout: float = 20) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, [p.cmdline() for p in alive if p.is_running()]


# -- help and user errors (in-process) -----------------------------------------------------


@pytest.mark.parametrize("command", ["worker", "scheduler", "dask-scheduler", "cluster", "inspect", "bench",
                                     "generate", "run", "export", "profile", "plan"])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output, result.output


def test_worker_help_lists_the_deployment_flags():
    out = CliRunner().invoke(main, ["worker", "--help"]).output
    for flag in ("--tier [dense|attention]", "--kv-bytes", "--nthreads", "--memory-limit", "--name",
                 "--dashboard-address", "--dashboard / --no-dashboard", "--nanny / --no-nanny", "--death-timeout",
                 "--tls-ca-file", "--tls-cert", "--tls-key"):
        assert flag in out, flag


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["worker", "tcp://127.0.0.1:9", "--tier", "gpu"], ["--tier", "gpu"]),
        (["worker", "tcp://127.0.0.1:9"], ["--tier"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "attention", "--kv-bytes", "12XB"], ["--kv-bytes", "12XB"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "attention", "--kv-bytes", "0"], ["--kv-bytes"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--kv-bytes", "0"], ["--kv-bytes must be at least 1"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--memory-limit", "lots"], ["--memory-limit", "lots"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--memory-limit", "-1"], ["--memory-limit"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--death-timeout", "soon"], ["--death-timeout"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--nthreads", "0"], ["--nthreads"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--host", "127.0.0.1", "--interface", "lo"],
         ["--interface"]),
        (["worker", "foo://127.0.0.1:9", "--tier", "dense"], ["foo://127.0.0.1:9"]),
        (["worker", "tcp://127.0.0.1", "--tier", "dense"], ["missing port"]),
        (["worker", "tls://127.0.0.1:9", "--tier", "dense"], ["uses TLS", "--tls-ca-file"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--tls-ca-file", __file__], ["--tls-cert", "--tls-key"]),
        (["worker", "tcp://127.0.0.1:9", "--tier", "dense", "--tls-key", "/nonexistent.pem"], ["/nonexistent.pem"]),
        (["scheduler", "--port", "70000"], ["--port"]),
        (["cluster", "--dense", "0"], ["--dense"]),
        (["bench", "--max-tokens", "0"], ["--max-tokens"]),
        (["bench", "--mode", "hybrid", "--dense-kv-budget", "lots"], ["--dense-kv-budget", "lots"]),
        (["bench", "--mode", "two-tier", "--dense-kv-budget", "1GB"], ["single-tier or hybrid"]),
        (["bench", "--mode", "single-tier", "--local-micro-batches", "1"], ["--mode hybrid"]),
        (["generate", "--model", MODEL, "--prompt", "x", "--mode", "in-process", "--dense-kv-budget", "1GB"],
         ["single-tier or hybrid"]),
        (["bench", "--model", "random:tiny-gqa", "--prompt-tokens", "250", "--max-tokens", "10",
          "--mode", "in-process"], ["context of 256"]),
        (["generate", "--model", MODEL, "--prompt", "x", "--tls-ca-file", __file__, "--tls-cert", __file__,
          "--tls-key", __file__], ["--scheduler"]),
    ],
)
def test_user_errors_are_one_line(args, fragments):
    _assert_one_line_error(CliRunner().invoke(main, args), *fragments)


def test_inspect_errors_are_one_line(tmp_path):
    _assert_one_line_error(CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.zarr")]),
                           "no glinthawk output", "missing.zarr")
    plain = tmp_path / "notes.txt"
    plain.write_text("not zarr")
    _assert_one_line_error(CliRunner().invoke(main, ["inspect", str(plain)]), "not a glinthawk output")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.bin").write_bytes(b"\0" * 10)
    _assert_one_line_error(CliRunner().invoke(main, ["inspect", str(junk)]), "not a glinthawk output")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    _assert_one_line_error(CliRunner().invoke(main, ["inspect", str(tmp_path / "other.zarr")]),
                           "not a glinthawk output")


@pytest.mark.parametrize("command", [["bench"], ["generate", "--prompt", "x"], ["profile", "--out", "p.json"],
                                     ["run", "pipelines/quickstart.yaml"]])
def test_a_refused_scheduler_fails_at_once(command):
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, [*command, "--scheduler", "tcp://127.0.0.1:9"])
    _assert_one_line_error(result, "cannot reach", "tcp://127.0.0.1:9", "refused")
    assert time.perf_counter() - t0 < 2.0  # not Dask's 30 s connect timeout


@pytest.mark.parametrize("args, fragment", [
    (["bench", "--max-tokens", "-1"], "--max-tokens"),
    (["generate", "--input", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["plan"], "--profile"),
    (["no-such-command"], "no-such-command"),
])
def test_usage_mistakes_are_one_line_without_the_usage_block(args, fragment):
    result = CliRunner().invoke(main, args)
    _assert_one_line_error(result, fragment)
    assert "--help" in result.output  # the line says where the usage is


def test_unreachable_or_tls_scheduler_is_one_line_for_clients(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("DASK_DISTRIBUTED__COMM__TLS")]:
        monkeypatch.delenv(var)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(tmp_path, tmp_path / "out.zarr")))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(main, ["run", str(spec), "-q", "--scheduler", "tcp://127.0.0.1:9"])
        _assert_one_line_error(result, "cannot reach", "tcp://127.0.0.1:9")
        result = CliRunner().invoke(main, ["run", str(spec), "-q", "--scheduler", "tls://127.0.0.1:9"])
        _assert_one_line_error(result, "uses TLS", "--tls-cert")
        result = CliRunner().invoke(main, ["bench", "--model", MODEL, "--scheduler", "tcp://127.0.0.1:9"])
        _assert_one_line_error(result, "cannot reach")
        files = make_certs(tmp_path / "certs")
        result = CliRunner().invoke(main, ["run", str(spec), "-q", "--tls-ca-file", files.ca_file,
                                           "--tls-cert", files.cert, "--tls-key", files.key])
        _assert_one_line_error(result, "--scheduler")


def test_scheduler_on_a_taken_port_is_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                           "--dashboard-address", ":0"])
    _assert_one_line_error(result, "cannot start the scheduler", str(port))


def test_worker_that_cannot_reach_its_scheduler_exits_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "glinthawk_dask", "worker", "tcp://127.0.0.1:9", "--tier", "attention",
         "--death-timeout", "2s"],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "tcp://127.0.0.1:9" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_tls_files_and_security(tmp_path):
    files = make_certs(tmp_path)
    assert all(Path(f).read_text().startswith("-----BEGIN") for f in (files.ca_file, files.cert, files.key))
    assert oct(os.stat(files.key).st_mode & 0o777) == "0o600"
    sec = security("worker", files.ca_file, files.cert, files.key)
    assert sec.require_encryption and sec.tls_worker_cert == files.cert
    assert security("client") is None


def test_preload_gives_a_plain_dask_scheduler_the_control_plane():
    import asyncio

    from distributed import Scheduler

    async def check() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0",
                             preload=["glinthawk_dask.runtime.preload"]) as s:
            assert "glinthawk" in s.plugins and "glinthawk_registry" in s.handlers

    asyncio.run(check())


@pytest.mark.parametrize("script", ["deploy/local/start-cluster.sh", "deploy/local/stop-cluster.sh",
                                    "deploy/tls/make-certs.sh"])
def test_scripts_have_help_and_refuse_bad_options(script, tmp_path):
    path = str(REPO / script)
    shown = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30, env=_env())
    assert shown.returncode == 0 and "--" in shown.stdout
    if script.endswith("make-certs.sh"):
        made = subprocess.run([path, str(tmp_path / "certs")], capture_output=True, text=True, timeout=60, env=_env())
        assert made.returncode == 0 and sorted(p.name for p in (tmp_path / "certs").iterdir()) == \
            ["ca.pem", "cert.pem", "key.pem"]
        return
    bad = subprocess.run([path, "--run-dir", str(tmp_path), "--bogus", "1"], capture_output=True, text=True,
                         timeout=30, env=_env())
    assert bad.returncode == 1 and "unknown option --bogus" in bad.stderr


# -- inspect and bench ------------------------------------------------------------------------


def test_inspect_summarizes_a_pipeline_output(tmp_path):
    out = tmp_path / "out.zarr"
    spec = _spec(tmp_path, out, mode="in-process")
    with open(spec["input"]["urls"], "a") as f:  # two error rows: no tokenizer, beyond the KV slot
        f.write(json.dumps({"id": "text", "prompt": "random models have no tokenizer"}) + "\n")
        f.write(json.dumps({"id": "long", "prompt_token_ids": [5] * 80}) + "\n")
    report = run_pipeline(parse_spec(spec))
    assert report.rows_done == 8 and report.errors == 2

    result = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["rows"] == 8 and info["errors"] == 2
    assert info["model"] == MODEL and info["spec_name"] == "cli-e2e"
    assert info["fingerprint"] == read_output(str(out)).attrs["fingerprint"] and info["version"]
    assert info["completion_tokens"] == 6 * MAX_TOKENS
    assert info["prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in ROWS)
    assert info["finish_reasons"] == {"length": 6, "error": 2}
    assert sorted(e.split(":")[0] for e in info["error_examples"]) == ["long", "text"]
    assert any("no tokenizer" in e for e in info["error_examples"])
    assert info["mean_time_to_first_token"] > 0 and info["mean_time_per_token"] > 0
    assert info["inputs_complete"]  # the run read every shard
    assert info["recoveries"] == 0 and info["last_recovery"] is None
    assert info["last_plan"] is None  # in process: no cluster plan

    text = CliRunner().invoke(main, ["inspect", str(out)])
    assert text.exit_code == 0, text.output
    for fragment in ("cli-e2e", MODEL, "8 (2 errors)", "length 6", f"{6 * MAX_TOKENS} completion",
                     "error        long:", "to the first token (the wait for a KV slot included", "throughput", "inputs       every row committed",
                     "recoveries   none", f"writer       last opened to write by pid "):
        assert fragment in text.output, text.output
    assert "last plan" not in text.output


def test_a_run_s_plan_in_words():
    from glinthawk_dask.cli.pipeline import plan_text

    plan = {"mode": "two-tier", "micro_batch_size": 64, "micro_batches": 2, "sizes": [64, 64], "local": 0,
            "planned": True, "predicted_tokens_per_s": 312.46, "profile_seconds": 0.0, "tokens_per_s": 298.01}
    assert plan_text(plan) == ("two-tier, 64 x 2 micro-batches, chosen by the planner: predicted 312.5 tok/s, "
                               "ran at 298.0")
    assert plan_text({**plan, "profile_seconds": 13.24}).endswith(" (the cluster profiled first, in 13.2 s)")
    assert plan_text({**plan, "mode": "hybrid", "local": 1}).startswith(
        "hybrid, 64 x 2 micro-batches (1 of them on the dense worker), chosen by the planner")
    assert plan_text({**plan, "planned": False}) == "two-tier, 64 x 2 micro-batches, as the spec sets them"
    assert plan_text({**plan, "runs_beside": 2}).endswith(  # the prediction is for the cluster alone
        "predicted 312.5 tok/s for the cluster alone, ran at 298.0 while 2 other runs shared it")
    assert plan_text({**plan, "planned_on_rows": 256}).startswith(  # a resumed run's plan
        "two-tier, 64 x 2 micro-batches, chosen by the planner for rows as long as 256 committed before: predicted")
    assert plan_text({**plan, "predicted_for_lengths": 201.04}).endswith(  # rows stopped before max_tokens
        "predicted 312.5 tok/s (201.0 for the lengths the rows stopped at), ran at 298.0")
    grew = [{"from": "8 x 1", "to": "32 x 2", "after_s": 41.26, "predicted": 250.0},
            {"from": "32 x 2", "to": "64 x 2", "after_s": 90.0, "predicted": 312.46}]
    assert plan_text({**plan, "grew": grew}) == (  # grown into KV other runs freed
        "two-tier, 64 x 2 micro-batches, chosen by the planner: predicted 312.5 tok/s, ran at 298.0; it started as "
        "8 x 1, grew to 32 x 2 after 41.3 s, grew to 64 x 2 after 90.0 s as other runs freed KV")
    yielded = [{"from": "64 x 2", "to": "64 x 1", "after_s": 120.04}]
    assert plan_text({**plan, "planned": False, "grew": grew[1:], "yielded": yielded}) == (
        "two-tier, 64 x 2 micro-batches, as the spec sets them; it started as 32 x 2, grew to 64 x 2 after 90.0 s, "
        "gave up KV for runs waiting for it after 120.0 s, keeping 64 x 1")
    assert plan_text({**plan, "planned": False, "grew": grew[1:]}) == (
        "two-tier, 64 x 2 micro-batches, as the spec sets them; it started as 32 x 2, grew to 64 x 2 after 90.0 s "
        "as other runs freed KV")


def test_export_writes_to_a_destination_in_the_format_its_name_says(tmp_path):
    """`glinthawk export OUT DEST` (or `-o DEST`): the format from DEST's name unless
    --to says it; contradictions are one-line errors."""
    import pyarrow.parquet as pq

    out = tmp_path / "out.zarr"
    report = run_pipeline(parse_spec(_spec(tmp_path, out, mode="in-process")))
    rows = report.rows_done
    result = CliRunner().invoke(main, ["export", str(out), str(tmp_path / "rows.parquet")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "rows.parquet").num_rows == rows
    result = CliRunner().invoke(main, ["export", str(out), "-o", str(tmp_path / "rows.jsonl")])
    assert result.exit_code == 0 and f"{rows} rows written" in result.output, result.output
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == rows
    result = CliRunner().invoke(main, ["export", str(out), "--to", "parquet"])  # next to OUT
    assert result.exit_code == 0 and pq.read_table(tmp_path / "out.parquet").num_rows == rows, result.output
    _assert_one_line_error(CliRunner().invoke(main, ["export", str(out), str(tmp_path / "a.jsonl"), "-o",
                                                     str(tmp_path / "b.jsonl")]), "two destinations")
    # an existing file (next to OUT, the default is often the very input) is left alone unless --overwrite
    (tmp_path / "out.jsonl").write_text('{"id": "input", "prompt": "mine"}\n')
    _assert_one_line_error(CliRunner().invoke(main, ["export", str(out)]), "out.jsonl exists: name another")
    assert (tmp_path / "out.jsonl").read_text() == '{"id": "input", "prompt": "mine"}\n'
    result = CliRunner().invoke(main, ["export", str(out), "--overwrite"])
    assert result.exit_code == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == rows, result.output
    result = CliRunner().invoke(main, ["export", str(out), "-"])  # standard output
    assert result.exit_code == 0 and result.stdout == (tmp_path / "out.jsonl").read_text(), result.stderr
    assert result.stderr == f"{rows} rows written to standard output\n"
    _assert_one_line_error(CliRunner().invoke(main, ["export", str(out), str(tmp_path / "c.parquet"), "--to",
                                                     "jsonl"]), "named as parquet")


def test_bench_prints_tokens_per_second():
    result = CliRunner().invoke(main, ["bench", "--model", MODEL, "--mode", "in-process", "--prompts", "3",
                                       "--prompt-tokens", "5", "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.output.strip().splitlines()[-1])
    assert numbers["generated_tokens"] == 12 and numbers["tokens_per_s"] > 0 and numbers["mode"] == "in-process"


# -- real processes ---------------------------------------------------------------------------


async def _workers_and_registry(address: str, run=None) -> tuple:
    """The workers' resources, the glinthawk registry and `run` on every worker, from a client on
    this thread's own loop (a blocking Client starts a loop thread and gives it 10 s, which a busy
    2-core machine can miss)."""
    async with Client(address, timeout=30, asynchronous=True) as client:
        info = await client.scheduler.identity()
        resources = sorted(json.dumps(w["resources"]) for w in info["workers"].values())
        registry = await client.scheduler.glinthawk_registry()
        return (resources, registry) + ((await client.run(run),) if run is not None else ())


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_start_cluster_run_and_stop_on_loopback(tmp_path, reference, tls):
    """deploy/local/start-cluster.sh (scheduler, 1 dense + 2 attention workers) -> glinthawk run
    --scheduler -> the output equals the in-process engine -> stop-cluster.sh -> nothing left."""
    run_dir, certs = tmp_path / "run", tmp_path / "certs"
    start = [str(REPO / "deploy/local/start-cluster.sh"), "--dense", "1", "--attention", "2",
             "--run-dir", str(run_dir), "--port", "0", "--dashboard-address", ":0", "--timeout", "120"]
    env = {k: v for k, v in _env().items() if k != "OMP_WAIT_POLICY"}
    started = subprocess.run(start + (["--tls", str(certs)] if tls else []), capture_output=True, text=True,
                             timeout=240, env=env)
    pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]
    procs = _tree(pids)
    try:
        assert started.returncode == 0, started.stderr
        address = started.stdout.strip().splitlines()[-1]
        assert address == (run_dir / "scheduler-address").read_text().strip()
        assert address.startswith("tls://" if tls else "tcp://") and len(pids) == 4
        tls_args = []
        tls_config = {}
        if tls:
            tls_args = ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "cert.pem"),
                        "--tls-key", str(certs / "key.pem")]
            tls_config = {"distributed.comm.tls.ca-file": str(certs / "ca.pem"),
                          "distributed.comm.tls.client.cert": str(certs / "cert.pem"),
                          "distributed.comm.tls.client.key": str(certs / "key.pem"),
                          "distributed.comm.require-encryption": True}
            assert "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT" in (run_dir / "cluster.env").read_text()
            # a plain-TCP client is refused, and so is a client without certificates
            with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
                with pytest.raises((OSError, TimeoutError)):
                    Client(address.replace("tls://", "tcp://"), timeout=3)
                with pytest.raises(TypeError, match="TLS"):
                    Client(address, timeout=3)

        def environment_at_start() -> dict[str, str]:  # a closure, so that it travels by value
            with open("/proc/self/environ", "rb") as f:
                pairs = [p.split(b"=", 1) for p in f.read().split(b"\0") if b"=" in p]
            return {k.decode(): v.decode() for k, v in pairs}

        # the workers carry their tiers' resources; the scheduler has the control plane already
        with dask.config.set(tls_config):
            resources, registry, at_start = asyncio.run(_workers_and_registry(address, environment_at_start))
        assert resources == ['{"GPU": 1}', '{"KV": 1}', '{"KV": 1}']
        assert len(registry["dense"]) == 1 and len(registry["attention"]) == 2
        # each worker process started with its tier's environment (OpenMP reads it as torch
        # loads: set inside the process, it would come too late)
        for tier, addresses in registry.items():
            for a in addresses:
                assert at_start[a].get("OMP_WAIT_POLICY") == ("PASSIVE" if tier == "attention" else None), tier

        out = tmp_path / "out.zarr"
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(_spec(tmp_path, out)))
        run = subprocess.run([sys.executable, "-m", "glinthawk_dask", "run", str(spec), "-q",
                              "--scheduler", address, *tls_args],
                             capture_output=True, text=True, timeout=180, env=_env())
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
        table = read_output(str(out))
        got = {r["id"]: r["completion_token_ids"] for r in table.records()}
        assert got == reference
        # the same spec detached: its driver, a process a worker starts, connects as the worker does
        detached = tmp_path / "detached.zarr"
        spec.write_text(yaml.safe_dump(_spec(tmp_path, detached)))
        run = subprocess.run([sys.executable, "-m", "glinthawk_dask", "run", str(spec), "--detach",
                              "--scheduler", address, *tls_args], capture_output=True, text=True, timeout=180,
                             env=_env())
        assert run.returncode == 0, run.stderr  # (returns as it generates, or, for 24 tokens, maybe once done)
        assert "cli-e2e: running on the cluster" in run.stderr or "cli-e2e: 6 rows written" in run.stderr
        attach = subprocess.run([sys.executable, "-m", "glinthawk_dask", "attach", "cli-e2e", "-q",
                                 "--scheduler", address, *tls_args], capture_output=True, text=True, timeout=180,
                                env=_env())
        assert attach.returncode == 0 and "cli-e2e: 6 rows written (0 errors" in attach.stderr, attach.stderr
        assert {r["id"]: r["completion_token_ids"] for r in read_output(str(detached)).records()} == reference
        # the same cluster profiled: both tiers' KV memory as its scheduler places runs
        prof_path = tmp_path / "profile.json"
        prof = subprocess.run([sys.executable, "-m", "glinthawk_dask", "profile", "--model", "random:tiny-gqa",
                               "--quick", "--out", str(prof_path), "--scheduler", address, *tls_args],
                              capture_output=True, text=True, timeout=180, env=_env())
        assert prof.returncode == 0, prof.stderr
        assert prof.stdout.count("GiB KV free per worker") == 2, prof.stdout
        assert "a dense job after the worker idled: +" in prof.stdout and "after 50 ms" in prof.stdout
        doc = json.loads(prof_path.read_text())
        assert doc["dense"]["kv_bytes"] > 0 and doc["attention"]["kv_bytes"] > 0
    finally:
        stopped = subprocess.run([str(REPO / "deploy/local/stop-cluster.sh"), "--run-dir", str(run_dir)],
                                 capture_output=True, text=True, timeout=120, env=_env())
    assert stopped.returncode == 0, stopped.stderr
    assert not list(run_dir.glob("*.pid"))
    _assert_gone(procs)


def _lines(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_cluster_command_serves_until_sigint():
    proc = subprocess.Popen([sys.executable, "-m", "glinthawk_dask", "cluster", "--dashboard-address", ":0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    procs = [psutil.Process(proc.pid)]
    try:
        stdout, lines = _lines(proc.stdout), []
        deadline = time.monotonic() + 180
        address = None
        while address is None and time.monotonic() < deadline:
            try:
                line = stdout.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, f"glinthawk cluster exited: {proc.wait()} {proc.stderr.read()}"
            lines.append(line)
            m = ADDRESS.search(line)
            address = m.group(1) if m else None
        assert address, lines
        line = stdout.get(timeout=30)
        assert line.startswith("dashboard at http"), line
        resources, registry = asyncio.run(_workers_and_registry(address))
        assert resources == ['{"GPU": 1}', '{"KV": 1}', '{"KV": 1}']
        assert len(registry["dense"]) == 1 and len(registry["attention"]) == 2
        procs = _tree([proc.pid])
        assert len(procs) >= 4  # this command and three worker processes
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, proc.stderr.read()
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_gone(procs)


def test_a_time_left_as_people_read_it():
    from glinthawk_dask.engine.progress import eta_text

    assert [eta_text(s) for s in (0.4, 45, 89.6, 90, 719, 5369, 5400, 11_100, 200_000)] == [
        "0 s", "45 s", "90 s", "2 min", "12 min", "89 min", "1 h 30 min", "3 h 05 min", "55 h 33 min"]


def test_run_progress_line_counts_the_input_rows():
    from glinthawk_dask.cli.pipeline import run_text
    from glinthawk_dask.pipeline.run import Progress

    p = Progress(rows_done=300, errors=1, generated_tokens=1200, shards_read=2, shards_total=8, seconds=10.0,
                 rows_total=4000, tokens_left=14400)
    assert run_text(p) == "300/~4000 rows, 1 errors, 120.0 tok/s, shards 2/8, ETA 2 min"  # estimated
    p.shards_read, p.rows_total_exact = 8, True
    assert run_text(p).startswith("300/4000 rows, ")
    assert run_text(Progress(shards_total=8)) == "0 rows, 0 errors, 0.0 tok/s, shards 0/8"  # nothing read yet


def test_generate_progress_line_and_quiet(capsys, tmp_path):
    from glinthawk_dask.cli.generate import _progress_text
    from glinthawk_dask.cli.options import ProgressLine
    from glinthawk_dask.engine.progress import GenerationProgress

    show = ProgressLine(_progress_text, every=0.0)
    show(GenerationProgress(rows_done=3, rows_total=40, errors=1, generated_tokens=512, expected_tokens=5120,
                            seconds=12.0, tokens_per_s=42.5, eta_seconds=108.0))
    assert capsys.readouterr().err.strip() == "3/40 rows, 1 errors, 512 tokens, 42.5 tok/s, ETA 2 min"
    progress = re.compile(r"^\d+/2 rows, 0 errors, \d+ tokens, [\d.]+ tok/s")
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt_token_ids": [1, 2, 3]}\n{"prompt_token_ids": [4]}\n')
    with dask.config.set({"glinthawk.cli.progress-interval": 0}):
        for quiet in (False, True):
            result = CliRunner().invoke(main, ["generate", "--model", MODEL, "--mode", "in-process",
                                               "--max-tokens", "3", "--input", str(src),
                                               *(["--quiet"] if quiet else [])])
            assert result.exit_code == 0, result.output
            assert sum(1 for line in result.output.splitlines() if line.startswith("{")) == 2
            lines = [line for line in result.output.splitlines() if progress.match(line)]
            assert (not lines) if quiet else lines[-1].startswith("2/2 rows"), result.output


def test_only_distributed_s_cancel_before_start_is_dropped_from_the_logs():
    """distributed's ``sync`` logs a NameError from its ``cancel`` callback when a Ctrl-C
    lands before the coroutine started: the CLI drops that record, and no other."""
    import logging
    import sys

    from glinthawk_dask.cli._group import _SyncCancelBeforeStart

    def record_of(filename: str, name: str) -> logging.LogRecord:
        scope: dict = {}
        exec(compile(f"def {name}():\n    return future\n", filename, "exec"), scope)
        try:
            scope[name]()
        except NameError:
            exc_info = sys.exc_info()
        return logging.LogRecord("tornado.application", logging.ERROR, filename, 1, "Exception in callback",
                                 (), exc_info)

    keep = _SyncCancelBeforeStart().filter
    assert not keep(record_of("/site-packages/distributed/utils.py", "cancel"))
    assert keep(record_of("/site-packages/distributed/utils.py", "other"))
    assert keep(record_of("/work/mine/utils.py", "cancel"))
    assert keep(logging.LogRecord("tornado.application", logging.ERROR, "x", 1, "no exception", (), None))
