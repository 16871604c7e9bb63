"""Smoke test of the benchmark scripts: they run at a tiny size and print their numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_inprocess_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    # Batch 2, 4 new tokens, no prefill-estimate runs: well under a minute with model loads.
    cmd = [sys.executable, str(BENCHMARKS / "bench_inprocess.py"),
           "--batch", "2", "--new-tokens", "4", "--no-prefill", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout

    assert "torch.get_num_threads()" in text
    rows = {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(in-process|hf-transformers)\s+2\s+4\s+8\s+[\d.]+\s+([\d.]+)$", text, re.MULTILINE)}
    assert set(rows) == {"in-process", "hf-transformers"}, text
    assert all(v > 0 for v in rows.values())
    assert re.search(r"^ratio in-process / HF \(tokens/s\): [\d.]+x$", text, re.MULTILINE), text

    report = json.loads(out.read_text())
    for name in ("in-process", "hf-transformers"):
        assert report["results"][name]["generated_tokens"] == 8
    assert report["ratio_inprocess_over_hf"] > 0


def _tiny_spec(tmp_path, name: str, topology: str) -> None:
    """``spec.yaml`` of three prompts (``in.jsonl``) of 4 tokens each, in ``tmp_path``."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Count to {i}:"}) + "\n"
                                               for i in range(3)))
    (tmp_path / "spec.yaml").write_text(
        f"name: {name}\nmodel: smollm2-135m-instruct\ninput: {{urls: in.jsonl}}\n"
        f"sampling: {{max_tokens: 4, ignore_eos: true}}\ntopology: {topology}\noutput: {{url: unused.zarr}}\n")


def test_bench_quickstart_runs_a_spec_and_its_requests_in_process(tmp_path):
    """The quickstart benchmark at a tiny size, on a spec that runs in-process: the same
    requests through the pipeline, the in-process engine and the pipeline's LLM alone."""
    _tiny_spec(tmp_path, "tiny", "{mode: in-process, max_seq_len: 64}")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_quickstart.py"), "--spec", str(tmp_path / "spec.yaml"),
           "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == 3 and report["rows"] == 3 and report["same_tokens"] == 3
    assert {k: [r["tokens"] for r in v] for k, v in report["runs"].items()} == {
        "in-process alone": [12], "in-process": [12], "pipeline": [12], "engine": [12]}
    assert report["ratio"] > 0 and "tiny pipeline >= 0.7x in-process (the lower ratio)" in proc.stdout
    assert not (tmp_path / "unused.zarr").exists()  # the benchmark writes its own output elsewhere


def test_bench_detached_alternates_client_and_detached_runs(tmp_path):
    """The detached benchmark at a tiny size: one round, each way, on its own cluster."""
    _tiny_spec(tmp_path, "tiny-detached", "{mode: two-tier, micro_batch_size: 4, micro_batches: 1, max_seq_len: 64}")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_detached.py"), "--spec", str(tmp_path / "spec.yaml"),
           "--rounds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [(r["kind"], r["tokens"], r["plan"]) for r in report["runs"]] == [("client", 12, "3 x 1"),
                                                                             ("detached", 12, "3 x 1")]
    assert report["same_rows"] == report["rows"] == 3
    assert re.search(r"^median tok/s: client [\d.]+, detached [\d.]+; ratio detached / client [\d.]+x$",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert not (tmp_path / "unused.zarr").exists()  # the benchmark writes its own outputs elsewhere


def test_bench_two_tier_takes_a_dtype_for_every_engine():
    """``--dtype``: float32 by default; bfloat16 skips HF generate (its reference run
    loads the model in float32); other names are refused."""
    code = (
        "import bench_two_tier as bt\n"
        "a, b = bt.parse_args([]), bt.parse_args(['--dtype', 'bfloat16', '--parts', '1'])\n"
        "print(a.dtype, a.skip_hf, b.dtype, b.skip_hf)\n"
        "bt.parse_args(['--dtype', 'float64'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=BENCHMARKS, check=False)
    assert proc.stdout.split() == ["float32", "False", "bfloat16", "True"], proc.stdout + proc.stderr
    assert proc.returncode == 2 and "invalid choice: 'float64'" in proc.stderr


def test_bench_transport_runs_every_path_and_reads_its_targets(tmp_path):
    """The transport benchmark at a tiny size: the floor, rpc and the data plane at 64 KB
    with 4 in flight, with and without the GIL-holding thread (the stream also beside a
    process busy the same way), and the targets read from those rows (numbers, not
    verdicts: this machine's speed is not under test)."""
    out = tmp_path / "transport.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_transport.py"), "--payloads", "64", "--in-flight", "4",
           "--seconds", "0.1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout

    rows = json.loads(out.read_text())["rows"]
    seen = {(r["dtype"], r["gil_thread"], r["in_flight"], r["path"]) for r in rows}
    for dtype in ("float32", "bfloat16"):
        assert (dtype, False, 1, "floor") in seen
        for gil in (False, True):
            assert {(dtype, gil, 4, "rpc"), (dtype, gil, 4, "stream")} <= seen
    beside_a_process = {(r["dtype"], r["path"]) for r in rows if r["cpu_process"]}
    assert beside_a_process == {("float32", "stream"), ("bfloat16", "stream")}
    for r in rows:
        assert r["round_trips"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["cpu_us_per_round_trip"] > 0
        # a round trip is two messages on the dense side: the request and its reply
        assert r["cpu_us_per_message"] == pytest.approx(r["cpu_us_per_round_trip"] / 2)
    assert re.search(r"^CPU of the serving thread <= 50 us/message: [\d.]+ us \([\d.]+ us a round trip of two\) "
                     r"(PASS|SHORT)$", text, re.MULTILINE), text
    assert re.search(r"^p99 round trip <= 1 ms with the GIL-holding thread: [\d.]+ ms (PASS|SHORT)$", text,
                     re.MULTILINE)
    assert re.search(r"^>= 3x fewer CPU us/message than rpc: [\d.]+x (PASS|SHORT)$", text, re.MULTILINE)
    assert re.search(r"^\(the p99 with nothing beside it: [\d.]+ ms; beside a process busy the same half of the "
                     r"time, .*: [\d.]+ ms\)$", text, re.MULTILINE), text
    assert re.search(r"^\(the floor, .*: [\d.]+ us of CPU a round trip; the stream spends -?[\d.]+ us above it\)$",
                     text, re.MULTILINE), text


def test_bench_housekeeping_switches_a_live_cluster_both_ways(tmp_path):
    """The housekeeping benchmark at a tiny size: the idle cluster and one round under
    each set of intervals, the tokens of every two-tier run the in-process engine's."""
    out = tmp_path / "housekeeping.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_housekeeping.py"), "--model", "random:tiny-gqa",
           "--prompts", "2", "--new-tokens", "3", "--rounds", "1", "--idle-seconds", "0.3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["tables"]["quiet"]["profile"] is None and report["tables"]["quiet"]["tick"] == 1000
    assert report["tables"]["dask"]["tick"] == 20 and report["tables"]["dask"]["profile"] == 10
    assert [len(report["idle"][k]) for k in ("quiet", "dask")] == [2, 2]
    assert sorted(r["housekeeping"] for r in report["rounds"]) == ["dask", "quiet"]
    assert all(r["two_tier_tokens_per_s"] > 0 and r["in_process_tokens_per_s"] > 0 for r in report["rounds"])
    assert report["identical"] is True
    assert re.search(r"^two-tier faster with quiet housekeeping in [01] of 1 rounds", proc.stdout, re.MULTILINE)


def test_bench_layer_cycle_splits_a_round_trip(tmp_path):
    """The layer-cycle benchmark at a tiny size: every part of a layer's cycle measured,
    one glue figure for each request whose attention and next job were found."""
    out = tmp_path / "cycle.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_layer_cycle.py"), "--model", "random:tiny-gqa",
           "--batch", "2", "--prompt-tokens", "3", "--new-tokens", "3", "--rounds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rounds"]
    m = row["medians_ms"]
    assert row["tokens_per_s"] > 0
    assert all(m[k] > 0 for k in ("math", "alone", "send", "to attention", "attention", "to next", "glue")), m
    assert row["samples"]["send"] == row["samples"]["glue"] > 0
    assert re.search(r"^\s+0\s+[\d.]+\s+\d+%", proc.stdout, re.MULTILINE)


def test_bench_plans_measures_plans_beside_the_auto_one(tmp_path):
    """The plans benchmark at a tiny size: every plan and the auto one measured against
    in-process, each with the planner's prediction, greedy tokens the same."""
    out = tmp_path / "plans.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_plans.py"), "--batch", "4", "--new-tokens", "2",
           "--plans", "2x1,2x2", "--rounds", "1", "--json", str(out)]
    env = {**os.environ, "DASK_GLINTHAWK__PLANNER__PROFILE_CACHE": str(tmp_path / "profiles")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [r["plan"] for r in report["runs"]] == ["in-process", "auto", "2x1", "2x2"]
    assert all(r["tokens_per_s"] > 0 for r in report["runs"])
    plans = {r["plan"]: r for r in report["runs"][1:]}
    assert (plans["2x1"]["size"], plans["2x1"]["depth"], plans["2x2"]["size"], plans["2x2"]["depth"]) == (2, 1, 2, 2)
    assert all(r["identical"] == 4 and r["predicted_tokens_per_s"] > 0 and r["ratio"] > 0 for r in plans.values())
    summary = report["summary"]
    assert summary["fastest_plan"] in ("2x1", "2x2") and summary["auto_over_fastest"] > 0
    assert summary["auto_plan"] == f"{plans['auto']['size']}x{plans['auto']['depth']}"
    assert re.search(r"^auto planned \d+x\d+: [\d.]+x the fastest plan measured \(2x[12]\)", proc.stdout,
                     re.MULTILINE), proc.stdout


def test_bench_spin_runs_two_clusters_with_their_own_openmp_spin(tmp_path):
    """The spin benchmark at a tiny size: three clusters whose workers started with the
    spin counts (and attention threads, and threads to try) asked, each measured against
    in-process, tokens checked, the picks of the one that tries reported."""
    out = tmp_path / "spin.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_spin.py"), "--model", "random:tiny-gqa", "--batch", "2",
           "--prompt-tokens", "3", "--new-tokens", "12", "--rounds", "2", "--spins", "300000,1000:2,1000:1:2",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    assert got["identical"] is True and len(got["rounds"]) == 2
    tries = "spin 1000, runs try 2 threads"
    assert set(got["median_ratio"]) == {"spin 300000", "spin 1000, attention on 2 threads", tries}
    assert sum(got["wins"].values()) == 2
    # a run of 12 tokens one deep times 4 decode steps on each count, then keeps one
    assert got["thread_picks"]["spin 300000"] == [] and len(got["thread_picks"][tries]) >= 2
    assert {p["threads"] for p in got["thread_picks"][tries]} <= {1, 2}
    assert re.search(rf"^{tries}: attention threads picked \d+ times: ", proc.stdout, re.MULTILINE)
    for row in got["rounds"]:
        assert all(row[k]["tokens_per_s"] > 0 and 0 < row[k]["machine_cpu_busy"] <= 1 for k in row)
    assert re.search(r"^spin 1000, attention on 2 threads: median ratio to in-process [\d.]+x, machine CPU \d+%",
                     proc.stdout, re.MULTILINE)


def test_bench_attention_kernel_compares_both_kernels_in_both_engines(tmp_path):
    """The kernel benchmark at a tiny size: the kernel alone on 1 and 2 threads, then one
    cluster and in-process switched between the kernels live, tokens checked per kernel."""
    out = tmp_path / "kernel.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_attention_kernel.py"), "--model", "random:tiny-gqa", "--batch", "2",
           "--prompt-tokens", "5", "--new-tokens", "8", "--rounds", "2", "--shapes", "4x16", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    assert [(r["sequences"], r["context"], r["threads"]) for r in got["kernel"]] == [(4, 16, 1), (4, 16, 2)]
    assert all(r["torch_us"] > 0 and r["compiled_us"] > 0 for r in got["kernel"])
    engines = got["engines"]
    assert engines["identical"] is True and len(engines["rounds"]) == 2
    for row in engines["rounds"]:
        assert set(row) == {"compiled", "torch"}
        assert all(v["two_tier_tokens_per_s"] > 0 and v["in_process_tokens_per_s"] > 0 for v in row.values())
    assert re.search(r"^two-tier: compiled / torch by round [\d.]+x, [\d.]+x$", proc.stdout, re.MULTILINE)


def test_replay_planner_predicts_kept_runs_again(tmp_path):
    """Kept runs of bench_planner are predicted again from their own profiles: a run the
    current simulator predicted gives the same numbers, a bracketed one the mean of its
    two sides, one kept before profiles were recorded is skipped; errors are counted."""
    import dataclasses

    from glinthawk_dask.model.config import from_name
    from glinthawk_dask.planner.profile import load_profile
    from glinthawk_dask.planner.simulate import RunConfig, Workload, simulate

    model = from_name("smollm2-135m-instruct")
    fast = load_profile("vm-2core")
    slow = dataclasses.replace(fast, rtt_s=fast.rtt_s + 0.002)  # a slower network: fewer tok/s
    runs = []
    for i, (mode, size, depth, attention, latency, new) in enumerate(
            [("in-process", 8, 1, 1, 0.0, 6), ("two-tier", 4, 2, 2, 0.0, 6), ("two-tier", 2, 4, 3, 0.01, 3)]):
        cfg = RunConfig(mode=mode, micro_batch_size=size, micro_batches=depth, attention=attention, latency=latency)
        predicted = simulate(fast, model, Workload.uniform(8, 5, new), cfg).tokens_per_s
        # measured: the first within 15% of the prediction, the others not
        runs.append({"label": f"run {i}", "mode": mode, "micro_batch_size": size, "micro_batches": depth,
                     "attention_workers": attention, "latency_ms": latency * 1e3, "prompts": 8,
                     "prompt_tokens": 5, "new_tokens": new, "profile": fast.to_json(),
                     "predicted_tokens_per_s": predicted,
                     "measured_tokens_per_s": predicted * (1.1 if i == 0 else 2.0)})
    bracketed = dict(runs[1], profile_after=slow.to_json())
    (tmp_path / "planner-a.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "planner-b.json").write_text(json.dumps({"runs": [bracketed]}))
    (tmp_path / "planner-old.json").write_text(json.dumps({"runs": [{k: v for k, v in runs[0].items()
                                                                     if k != "profile"}]}))
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "replay_planner.py"), *(
        str(tmp_path / f"planner-{n}.json") for n in ("a", "b", "old")), "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    assert [r["file"] for r in got["runs"]] == ["planner-a.json", "planner-b.json"]
    assert "planner-old.json: skipped" in proc.stdout
    for c in got["runs"][0]["configurations"]:
        assert c["predicted_now"] == pytest.approx(c["predicted_then"], rel=1e-9)
    assert got["runs"][0]["within"] == 1 and got["within"] == 1 and got["configurations"] == 4
    both = got["runs"][1]["configurations"][0]["predicted_now"]
    wl, cfg = Workload.uniform(8, 5, 6), RunConfig(micro_batch_size=4, micro_batches=2, attention=2)
    assert both == pytest.approx((simulate(fast, model, wl, cfg).tokens_per_s
                                  + simulate(slow, model, wl, cfg).tokens_per_s) / 2, rel=1e-9)
    assert both < runs[1]["predicted_tokens_per_s"]
    assert re.search(r"^all runs: 1 of 4 configurations within 15%", proc.stdout, re.MULTILINE)


def test_replay_planner_predicts_both_engines_of_a_kept_two_tier_run(tmp_path):
    """A kept bench_two_tier.py part 1 run: its plan and the in-process engine predicted
    again from the run's profile, their ratio beside the measured ones, each engine's
    level error apart; runs of the other parts only are passed over."""
    from glinthawk_dask.model.config import from_name
    from glinthawk_dask.planner.profile import load_profile
    from glinthawk_dask.planner.simulate import RunConfig, Workload, simulate

    model, profile = from_name("smollm2-135m-instruct"), load_profile("vm-2core")
    wl = Workload.uniform(16, 10, 48)
    two = simulate(profile, model, wl, RunConfig(micro_batch_size=16, micro_batches=1, attention=2,
                                                 max_step_tokens=160)).tokens_per_s
    one = simulate(profile, model, wl, RunConfig(mode="in-process", micro_batch_size=16,
                                                 max_step_tokens=160)).tokens_per_s
    run = {"profile": profile.to_json(), "throughput": {
        "batch": 16, "new_tokens": 48, "prompt_tokens": 160, "ratio_two_tier_over_inprocess": 0.7,
        "two_tier_plan": {"micro_batch_size": 16, "n_micro_batches": 1, "max_step_tokens": 160},
        "alternating": {"first_ratio": 0.7, "ratio": 0.8},
        "results": {"two-tier": {"tokens_per_s": two / 2}, "in-process": {"tokens_per_s": one}}}}
    (tmp_path / "two-tier-a.json").write_text(json.dumps(run))
    (tmp_path / "two-tier-latency.json").write_text(json.dumps({"latency": {"runs": []}}))
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "replay_planner.py"), str(tmp_path / "two-tier-a.json"),
                           str(tmp_path / "two-tier-latency.json"), "--json", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (pair,) = json.loads(out.read_text())["pairs"]
    assert pair["file"] == "two-tier-a.json" and pair["plan"] == "16 x 1"
    assert pair["predicted_ratio"] == pytest.approx(two / one, rel=1e-9)
    assert pair["two_tier_error"] == pytest.approx(1.0) and pair["in_process_error"] == pytest.approx(0.0, abs=1e-9)
    assert (pair["first_ratio"], pair["rounds_ratio"]) == (0.7, 0.8)
    assert re.search(r"plan 16 x 1, 1 runs: predicted [\d.]+x on average, measured 0.70x", proc.stdout)


def test_bench_plan_sweep_times_python_and_compiled_rounds(tmp_path):
    """The sweep benchmark times one case four ways and checks that they predict the same."""
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_plan_sweep.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (case,) = json.loads(out.read_text())["cases"]
    assert case["configurations"] > 50 and case["same"] is True
    assert min(case["python_s"], case["compiled_s"], case["threaded_s"], case["default_s"]) > 0
    assert case["threads"] >= 1
    assert "the same predictions every way: yes" in proc.stdout and "machine busy" in proc.stdout


def test_bench_growth_runs_alone_beside_and_growing(tmp_path):
    """The growth benchmark at a tiny size: the run beside another run's KV keeps its
    plan without growth and grows into the KV once released, tokens the same as alone."""
    out = tmp_path / "growth.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_growth.py"), "--batch", "24", "--new-tokens", "8",
           "--free-slots", "2", "--release-after", "0.5", "--rounds", "1", "--json", str(out)]
    env = {**os.environ, "DASK_GLINTHAWK__PLANNER__PROFILE_CACHE": str(tmp_path / "profiles"),
           "DASK_GLINTHAWK__ENGINE__GROW_EVERY": "0.2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    runs = {r["kind"]: r for r in report["runs"]}
    assert list(runs) == ["alone", "beside", "grows"] and all(r["identical"] == 24 for r in runs.values())
    assert runs["beside"]["grew"] == [] and runs["beside"]["held_slots"] > 0
    assert [g["from"] for g in runs["grows"]["grew"]] == [runs["grows"]["plan"]]
    assert int(runs["grows"]["plan"].split(" x ")[0]) <= 2  # within the two free slots
    assert report["summary"]["grows_over_beside"] > 0 and report["summary"]["identical"] == 24
    assert re.search(r"^medians: alone [\d.]+ tok/s, beside \(no growth\) [\d.]+, grows [\d.]+: growing [\d.]+x",
                     proc.stdout, re.MULTILINE), proc.stdout


def test_bench_shrink_runs_a_waiting_run_beside_one_micro_batch_holding_every_slot(tmp_path):
    """The shrink benchmark at a tiny size: B waits for A's every slot; kept, B is placed
    once A ends; shrunk, A gives it slots first and grows back; tokens the same as alone."""
    out = tmp_path / "shrink.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_shrink.py"), "--batch-a", "40", "--new-tokens-a", "24",
           "--batch-b", "6", "--new-tokens-b", "6", "--max-seq-len", "4096", "--b-after", "0.2", "--rounds", "1",
           "--json", str(out)]
    env = {**os.environ, "DASK_GLINTHAWK__PLANNER__PROFILE_CACHE": str(tmp_path / "profiles"),
           "DASK_GLINTHAWK__ENGINE__GROW_EVERY": "0.2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    runs = {r["kind"]: r for r in report["runs"]}
    assert list(runs) == ["keeps", "shrinks"] and report["summary"]["identical"]
    keeps, shrinks = runs["keeps"], runs["shrinks"]
    assert keeps["a_changes"] == [] and keeps["b_placed_s"] >= keeps["a_end_s"] - 0.5  # (placed once A closed)
    assert shrinks["a_changes"][0].startswith("yielded to ") and shrinks["b_placed_s"] < shrinks["a_end_s"]
    assert re.search(r"^medians: B's last token [\d.]+ s after A started when A keeps its slots, [\d.]+ s when it "
                     r"shrinks \([\d.]+x\)", proc.stdout, re.MULTILINE), proc.stdout
