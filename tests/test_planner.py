"""The planner: profiles, the simulator against closed-form cases, plan and profile commands."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import dask

import pytest
from click.testing import CliRunner
from distributed.utils_test import gen_cluster

from glinthawk_dask.cli import main
from glinthawk_dask.model.config import ModelConfig
from glinthawk_dask.planner.plan import Prices, best, candidates, sweep
from glinthawk_dask.planner.profile import (
    AttentionCost, Curve, Profile, ProfileError, load_profile, shipped_profiles,
)
from glinthawk_dask.planner.simulate import RunConfig, Workload, simulate

MODEL = ModelConfig.from_name("tiny-gqa")
L = MODEL.n_layers


def _profile(*, d=1e-3, head=2e-3, step=1e-4, att=5e-4, rtt=2e-4, shared=False, fd=1.0) -> Profile:
    """Constant costs: a dense layer d, the head, the driver's step, attention, round trip."""
    return Profile.from_json({
        "glinthawk_profile": 1, "name": "hand", "source": "test", "model": dataclasses.asdict(MODEL),
        "dense": {"layer_s": [[1, d], [4096, d]], "head_s": [[1, head], [4096, head]], "step_s": step,
                  "attention": {"overhead_s": att, "kv_GBps": None, "gflops": None}},
        "attention": {"overhead_s": att, "kv_GBps": None, "gflops": None, "kv_bytes": 1e12},
        "network": {"rtt_s": rtt, "GBps": None, "msg_cpu_s": 0.0},
        "host": {"shared": shared, "dense_slowdown": fd, "attention_slowdown": 1.0},
    })


# -- profiles ---------------------------------------------------------------------------------


def test_curve_interpolates_clamps_and_extends():
    c = Curve(((1, 1.0), (3, 3.0), (5, 4.0)))
    assert c(0) == 1.0 and c(2) == pytest.approx(2.0) and c(4) == pytest.approx(3.5)
    assert c(7) == pytest.approx(5.0)  # along the last segment


def test_attention_fit_recovers_its_coefficients():
    true = AttentionCost(overhead_s=1e-4, kv_GBps=10.0, gflops=50.0)
    pts = [(b, f, true.seconds(b, f)) for b, f in [(1e5, 1e6), (1e7, 1e6), (1e6, 1e9), (5e6, 3e8)]]
    fit = AttentionCost.fit(pts)
    assert fit.overhead_s == pytest.approx(1e-4, rel=1e-6)
    assert fit.kv_GBps == pytest.approx(10.0, rel=1e-6) and fit.gflops == pytest.approx(50.0, rel=1e-6)


def test_profile_json_round_trip_and_errors(tmp_path):
    p = _profile()
    path = tmp_path / "p.json"
    p.save(path)
    q = load_profile(str(path))
    assert q.to_json() == p.to_json()
    path.write_text(json.dumps({**p.to_json(), "glinthawk_profile": 99}))
    with pytest.raises(ProfileError, match="version 99"):
        load_profile(str(path))
    with pytest.raises(ProfileError, match="no profile file"):
        load_profile(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("name", ["vm-2core", "t4", "h200"])
def test_shipped_profiles_load_and_plan(name):
    assert name in shipped_profiles()
    prof = load_profile(name)
    assert prof.source
    model = ModelConfig.from_name("llama-2-7b" if name != "vm-2core" else "smollm2-135m-instruct")
    pred = simulate(prof, model, Workload.uniform(32, 64, 16),
                    RunConfig(micro_batch_size=16, micro_batches=2, attention=2,
                              dtype_bytes=4 if prof.dense.dtype == "float32" else 2))
    assert pred.feasible and pred.tokens_per_s > 0, pred.reason


# -- the simulator against closed forms ------------------------------------------------------------


def test_one_micro_batch_no_latency_is_the_sum_of_its_stages():
    d, head, step, att, rtt = 1e-3, 2e-3, 1e-4, 5e-4, 2e-4
    prof = _profile(d=d, head=head, step=step, att=att, rtt=rtt)
    new = 8
    pred = simulate(prof, MODEL, Workload.uniform(1, 1, new), RunConfig(micro_batch_size=1, micro_batches=1))
    per_step = L * d + head + step + L * (att + rtt)
    assert pred.generated_tokens == new
    assert pred.seconds == pytest.approx(new * per_step, rel=1e-9)
    single = simulate(prof, MODEL, Workload.uniform(1, 1, new), RunConfig(mode="single-tier", micro_batch_size=1))
    assert single.seconds == pytest.approx(new * (L * (d + att) + head + step), rel=1e-9)


def test_dense_bound_depth_runs_at_the_dense_tier_rate():
    d, head, step = 4e-3, 1e-3, 1e-4  # attention and round trip far shorter than a dense step
    prof = _profile(d=d, head=head, step=step, att=1e-5, rtt=1e-5)
    m, new = 4, 64
    pred = simulate(prof, MODEL, Workload.uniform(m, 1, new), RunConfig(micro_batch_size=1, micro_batches=m,
                                                                       attention=m))
    dense_per_round = m * (L * d + head + step)
    assert pred.seconds == pytest.approx(new * dense_per_round, rel=0.02)
    assert pred.dense_util > 0.97 and pred.bottleneck == "dense"


def test_attention_bound_depth_runs_at_the_attention_worker_rate():
    att = 5e-3
    prof = _profile(d=1e-4, head=1e-4, step=1e-5, att=att, rtt=1e-5)
    m, new = 4, 64
    pred = simulate(prof, MODEL, Workload.uniform(m, 1, new), RunConfig(micro_batch_size=1, micro_batches=m,
                                                                       attention=1))
    assert pred.seconds == pytest.approx(new * m * L * att, rel=0.03)
    assert pred.bottleneck == "attention"


def test_latency_bound_pipeline_is_one_round_trip_per_layer():
    lat = 0.01
    prof = _profile(d=1e-4, head=1e-4, step=0.0, att=1e-4, rtt=0.0)
    m, new = 4, 16
    pred = simulate(prof, MODEL, Workload.uniform(m, 1, new),
                    RunConfig(micro_batch_size=1, micro_batches=m, attention=m, latency=lat))
    per_step = L * (1e-4 + 1e-4 + 2 * lat) + 1e-4
    assert pred.seconds == pytest.approx(new * per_step, rel=0.01)
    assert pred.bottleneck == "round trip"


def test_contention_on_a_shared_host_slows_overlapping_dense_work():
    alone = simulate(_profile(shared=False), MODEL, Workload.uniform(8, 4, 16),
                     RunConfig(micro_batch_size=4, micro_batches=2, attention=2))
    shared = simulate(_profile(shared=True, fd=2.0), MODEL, Workload.uniform(8, 4, 16),
                      RunConfig(micro_batch_size=4, micro_batches=2, attention=2))
    assert shared.seconds > 1.2 * alone.seconds


def test_continuous_batching_admits_as_slots_free_and_counts_every_token():
    prof = _profile()
    outs = (3, 9, 5, 1, 7, 2)
    w = Workload((4, 2, 8, 1, 3, 5), outs)
    pred = simulate(prof, MODEL, w, RunConfig(micro_batch_size=2, micro_batches=1))
    assert pred.generated_tokens == sum(outs)
    # two slots: at least as many steps as the longest pair needs, fewer than one request at a time
    assert max(outs) <= pred.steps < sum(outs) + len(outs)


def test_kv_that_does_not_fit_is_infeasible_with_a_reason():
    prof = dataclasses.replace(_profile(), attention=dataclasses.replace(_profile().attention, kv_bytes=1e3))
    pred = simulate(prof, MODEL, Workload.uniform(4, 8, 8), RunConfig(micro_batch_size=4))
    assert not pred.feasible and "KV" in pred.reason


def test_sweep_and_best_prefer_the_fastest_and_the_cheapest():
    prof = _profile(d=4e-3, att=1e-4, rtt=1e-4)
    w = Workload.uniform(16, 4, 8)
    preds = sweep(prof, MODEL, w, candidates(16, dense=1, attention=2, max_depth=4))
    fast = best(preds)
    assert fast.tokens_per_s == max(p.tokens_per_s for p in preds if p.feasible)
    cheap = best(preds, Prices(dense=1.0, attention=100.0), by="cost")
    assert cheap.config.mode == "single-tier"  # attention workers priced out


# -- commands ------------------------------------------------------------------------------------


def test_plan_command_prints_a_table_and_json():
    result = CliRunner().invoke(main, ["plan", "--model", "random:llama-2-7b", "--profile", "h200", "--requests",
                                       "64", "--prompt-tokens", "64", "--output-tokens", "16", "--attention", "2"])
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output and "best:" in result.output and "--micro-batch-size" in result.output
    result = CliRunner().invoke(main, ["plan", "--model", "random:llama-2-7b", "--profile", "t4", "--requests", "64",
                                       "--json", "--by", "cost", "--latency", "10"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["best"]["cost_per_million_tokens"] > 0 and doc["best"]["feasible"]


def test_plan_samples_prompt_lengths_from_a_dataset(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": "word " * n}) + "\n" for n in (3, 10, 30)))
    result = CliRunner().invoke(main, ["plan", "--profile", "vm-2core", "--requests", "16", "--output-tokens", "8",
                                       "--prompts-from", str(src), "--json"])
    assert result.exit_code == 0, result.output
    assert "3 rows" in json.loads(result.output)["workload"]


@pytest.mark.parametrize("args, fragment", [
    (["plan", "--profile", "no-such-profile"], "no profile file"),
    (["plan", "--profile", "h200", "--prices", "dense=abc"], "--prices"),
    (["plan", "--profile", "vm-2core", "--by", "cost"], "needs prices"),
])
def test_plan_errors_are_one_line(args, fragment):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}}),
                                    ("127.0.0.1", 1, {"resources": {"KV": 2**28}})], timeout=120)
async def test_profile_measures_a_cluster_and_auto_plans_use_it(c, s, a, b):
    from glinthawk_dask.engine.request import Request
    from glinthawk_dask.runtime.client import DaskEngine
    from glinthawk_dask.runtime.profiler import cluster_profile, measure_profile
    from glinthawk_dask.runtime.plugins import AttentionWorkerPlugin, DenseWorkerPlugin, GlinthawkSchedulerPlugin
    from glinthawk_dask.sampling import SamplingParams

    await c.register_plugin(GlinthawkSchedulerPlugin())
    await c.register_plugin(DenseWorkerPlugin())
    await c.register_plugin(AttentionWorkerPlugin())
    prof = await measure_profile(c, MODEL, model="random:tiny-gqa", quick=True)
    assert prof.shared_host and prof.attention.kv_bytes > 0 and prof.rtt_s > 0
    assert prof.dense.layer_s(64) >= prof.dense.layer_s(1) > 0 and prof.dense.head_s(1) > 0
    assert Profile.from_json(json.loads(json.dumps(prof.to_json()))).to_json() == prof.to_json()
    with tempfile.TemporaryDirectory() as cache, dask.config.set({"glinthawk.planner.profile-cache": cache}):
        kept, seconds = await cluster_profile(c, MODEL, model="random:tiny-gqa", dtype="float32")
        again, seconds_again = await cluster_profile(c, MODEL, model="random:tiny-gqa", dtype="float32")
        assert seconds > 0 and seconds_again == 0.0 and again.to_json() == kept.to_json()
        assert len(os.listdir(cache)) == 1  # kept on disk for the next cluster of this shape on this machine
        s.plugins["glinthawk"].profiles.clear()  # a new scheduler: the disk has it
        from_disk, seconds_disk = await cluster_profile(c, MODEL, model="random:tiny-gqa", dtype="float32")
        assert seconds_disk == 0.0 and from_disk.to_json() == kept.to_json()

    engine = DaskEngine(c, "random:tiny-gqa", micro_batch_size="auto", n_micro_batches="auto")
    reqs = [Request(f"r{i}", [1 + i, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(6)]
    out = [x async for x in engine.agenerate(reqs)]
    assert len(out) == 6 and all(len(x.completion_token_ids) == 4 for x in out)
    summary = engine.last_summary
    assert summary.predicted_tokens_per_s and summary.predicted_tokens_per_s > 0
    assert summary.micro_batch_size * summary.n_micro_batches >= 1


# -- the shipped profiles and the paper's comparison ------------------------------------------------

BENCH = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"


def test_shipped_hardware_profiles_are_rebuilt_from_their_inputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_profiles", BENCH / "make_profiles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, doc in (("h200", mod.h200()), ("t4", mod.t4())):
        assert Profile.from_json(doc).to_json() == load_profile(name).to_json(), name


def test_paper_cluster_script_prints_both_ratios(tmp_path):
    import subprocess
    import sys

    inputs = json.loads((BENCH / "inputs" / "paper-cluster.json").read_text())
    inputs.update(dense_workers=[12], micro_batch_sizes=[32], max_micro_batches=12,
                  workloads={"short": {"requests": 64, "prompt_tokens": 64, "output_tokens": 16}})
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(inputs))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCH / "paper_cluster.py"), "--inputs", str(path), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "two-tier / single-tier: throughput" in proc.stdout and "(paper 5.9x)" in proc.stdout
    row = json.loads(out.read_text())["results"][0]
    assert row["throughput_ratio"] > 0 and row["cost_ratio"] > 0
