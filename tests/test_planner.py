"""The planner: profiles, the simulator against closed-form cases, plan and profile commands."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile

import dask

import pytest
from click.testing import CliRunner
from distributed.utils_test import gen_cluster, gen_test

from glinthawk_dask.cli import main
from glinthawk_dask.model.config import ModelConfig
from glinthawk_dask.planner.plan import Prices, best, candidates, sweep
from glinthawk_dask.planner.profile import (
    AttentionCost, Curve, Profile, ProfileError, fit_cold, idle_excess_at, load_profile, shipped_profiles,
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
    # decode shapes alone (FLOPs proportional to KV bytes) cannot split the two slopes:
    # all of it goes to the KV read, the same costs, whatever the machine's LAPACK
    decode = [(b, 2.0 * b, true.seconds(b, 2.0 * b)) for b in (1e5, 1e6, 1e7, 5e7)]
    fit = AttentionCost.fit(decode)
    assert fit.gflops == math.inf and fit.overhead_s == pytest.approx(1e-4, rel=1e-6)
    assert all(fit.seconds(b, f) == pytest.approx(s, rel=1e-6) for b, f, s in decode)


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


def test_a_scaled_profile_prices_each_tiers_compute_by_its_factor():
    p = load_profile("vm-2core")
    m, elem = p.model, 4
    q = Profile.from_json(json.loads(json.dumps(p.scaled(dense=2.0, attention=3.0).to_json())))
    for t in (1, 16, 64, 300):
        assert q.dense_layer_s(m, t, elem) == pytest.approx(2.0 * p.dense_layer_s(m, t, elem))
    assert q.head_s(m, 16, elem) == pytest.approx(2.0 * p.head_s(m, 16, elem))
    assert q.dense.step_s == pytest.approx(2.0 * p.dense.step_s) and q.msg_cpu(1e5) == pytest.approx(2 * p.msg_cpu(1e5))
    for work in [(1e6, 2e6), (5e7, 1e8)]:
        assert q.attention.cost.seconds(*work) == pytest.approx(3.0 * p.attention.cost.seconds(*work))
        assert q.dense.attention.seconds(*work) == pytest.approx(2.0 * p.dense.attention.seconds(*work))
    assert q.net_s(1e5) == p.net_s(1e5) and q.slowdowns(2) == p.slowdowns(2)  # the network and contention kept
    # a roofline (another model's shapes) scales too
    h = load_profile("h200")
    big = ModelConfig.from_name("llama-3-8b")
    assert h.scaled(dense=1.5).dense_layer_s(big, 64, 2) == pytest.approx(1.5 * h.dense_layer_s(big, 64, 2))


@pytest.mark.parametrize("name", ["vm-2core", "t4", "h200"])
def test_shipped_profiles_load_and_plan(name):
    assert name in shipped_profiles()
    prof = load_profile(name)
    assert prof.source and prof.name == name  # `plan` says which profile it used by this name
    model = ModelConfig.from_name("llama-2-7b" if name != "vm-2core" else "smollm2-135m-instruct")
    pred = simulate(prof, model, Workload.uniform(32, 64, 16),
                    RunConfig(micro_batch_size=16, micro_batches=2, attention=2,
                              dtype_bytes=4 if prof.dense.dtype == "float32" else 2))
    assert pred.feasible and pred.tokens_per_s > 0, pred.reason


# -- the simulator against closed forms ------------------------------------------------------------


def test_local_profile_measures_this_process_for_the_in_process_engine():
    """The in-process engine's profile, measured where it runs: a layer curve at the
    quick points, no attention tier, and a prediction that follows the curve."""
    import torch

    from glinthawk_dask.planner.microbench import local_profile

    model = ModelConfig.from_name("tiny-gqa")
    prof = local_profile(model, torch.float32, quick=True)
    assert prof.model == model and prof.dense.device == "cpu" and prof.dense.threads == torch.get_num_threads()
    assert [x for x, _ in prof.dense.layer_s.points] == [1, 16, 64, 256]
    assert all(t > 0 for _, t in prof.dense.layer_s.points + prof.dense.head_s.points)
    assert prof.rtt_s == 0 and not prof.shared_host and prof.dense.cold_factor == 1.0
    # a layer with its attention, as the engine runs it, against the two measured alone
    assert 1.0 <= prof.dense.local_factor < 3.0
    assert Profile.from_json(json.loads(json.dumps(prof.to_json()))).dense.layer_s(16) == prof.dense.layer_s(16)
    pred = simulate(prof, model, Workload.uniform(4, 8, 4), RunConfig(mode="in-process", micro_batch_size=4))
    assert pred.feasible and pred.generated_tokens == 16
    step = model.n_layers * prof.dense_layer_s(model, 4, 4)  # a decode step is at least its layers
    assert pred.seconds >= 3 * step


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


def test_a_local_layer_costs_the_profiles_local_factor_more_and_a_remote_one_does_not():
    """Attention computed where the dense half runs (single-tier, in-process) prices a
    layer at (dense + attention) x local_factor; a two-tier layer is not touched."""
    d, head, step, att, rtt, f = 1e-3, 2e-3, 1e-4, 5e-4, 2e-4, 1.25
    base = _profile(d=d, head=head, step=step, att=att, rtt=rtt)
    prof = dataclasses.replace(base, dense=dataclasses.replace(base.dense, local_factor=f))
    assert Profile.from_json(json.loads(json.dumps(prof.to_json()))).dense.local_factor == f
    new, w = 8, Workload.uniform(1, 1, 8)
    for mode in ("single-tier", "in-process"):
        pred = simulate(prof, MODEL, w, RunConfig(mode=mode, micro_batch_size=1))
        assert pred.seconds == pytest.approx(new * (L * (d + att) * f + head + step), rel=1e-9), mode
    two = RunConfig(micro_batch_size=1, micro_batches=1)
    assert simulate(prof, MODEL, w, two).seconds == pytest.approx(simulate(base, MODEL, w, two).seconds, rel=1e-12)


def test_cold_jobs_cost_the_factor_and_the_seconds_of_the_profile():
    """A dense job after the worker waited (every job one micro-batch deep) costs
    job x cold_factor + cold_s: cold_s once per such job, and the two terms add."""
    d, att, rtt, c, extra = 1e-3, 5e-4, 2e-4, 1.5, 3e-4
    base = _profile(d=d, att=att, rtt=rtt)

    def seconds(factor: float, cold_s: float) -> float:
        prof = dataclasses.replace(base, dense=dataclasses.replace(base.dense, cold_factor=factor, cold_s=cold_s))
        return simulate(prof, MODEL, Workload.uniform(1, 1, 8), RunConfig(micro_batch_size=1, micro_batches=1)).seconds

    plain = seconds(1.0, 0.0)
    n_cold = (seconds(1.0, extra) - plain) / extra  # jobs that paid cold_s
    assert n_cold == pytest.approx(round(n_cold), abs=1e-6) and round(n_cold) >= 8 * (L - 1)
    share = seconds(c, 0.0) - plain  # what the factor alone added to those jobs
    assert share >= (c - 1) * d * 8 * (L - 1)  # at least the middle layers' jobs, d each
    assert seconds(c, extra) - plain == pytest.approx(share + n_cold * extra, rel=1e-9)
    prof = dataclasses.replace(base, dense=dataclasses.replace(base.dense, cold_s=extra))
    assert Profile.from_json(json.loads(json.dumps(prof.to_json()))).dense.cold_s == extra


def test_a_dense_job_after_a_longer_wait_pays_the_profiles_idle_excess():
    """One micro-batch deep with 20 ms of latency each way, every dense job after a round
    trip waits 40 ms and more: it pays the idle excess there beyond the excess at the
    gap the cold cost was measured after.  A job after a short wait (the hop from the
    head back to the first layer) pays nothing more."""
    d, att, rtt, lat = 1e-3, 5e-4, 2e-4, 0.02
    base = _profile(d=d, att=att, rtt=rtt)
    curve = ((0.002, 1e-4), (0.01, 1e-3), (0.03, 4e-3))  # held at 4 ms past 30 ms
    prof = dataclasses.replace(base, dense=dataclasses.replace(base.dense, idle_excess=curve, idle_ref_s=0.002))
    assert prof.dense.idle_extra(0.05) == pytest.approx(4e-3 - 1e-4)
    assert prof.dense.idle_extra(0.006) == pytest.approx(5.5e-4 - 1e-4) and prof.dense.idle_extra(0.001) == 0.0
    assert idle_excess_at(curve, 0.001) == pytest.approx(5e-5)  # from 0 at no gap
    w, cfg = Workload.uniform(1, 1, 8), RunConfig(micro_batch_size=1, micro_batches=1, latency=lat)
    plain, idle = simulate(base, MODEL, w, cfg).seconds, simulate(prof, MODEL, w, cfg).seconds
    # per step: every layer's job after its round trip (L of them), none after the hop
    assert idle - plain == pytest.approx(8 * L * (4e-3 - 1e-4), rel=1e-6)
    # no latency: the round trips (0.7 ms) are shorter than the cold cost's gap
    cfg0 = dataclasses.replace(cfg, latency=0.0)
    assert simulate(prof, MODEL, w, cfg0).seconds == pytest.approx(simulate(base, MODEL, w, cfg0).seconds, rel=1e-12)
    # compiled, the same
    from glinthawk_dask.planner import rounds

    if rounds.compile_kernel():
        assert simulate(prof, MODEL, w, cfg).seconds == pytest.approx(idle, rel=1e-12)
    q = Profile.from_json(json.loads(json.dumps(prof.scaled(dense=2.0).to_json())))
    assert q.dense.idle_excess == tuple((g, 2 * e) for g, e in curve) and q.dense.idle_ref_s == 0.002
    bad = {**prof.to_json()}
    bad["dense"] = {**bad["dense"], "idle_excess": [[0.0, 1e-3]]}
    with pytest.raises(ProfileError, match="idle_excess gaps must be above 0"):
        Profile.from_json(bad)


def test_idle_points_time_a_dense_layer_after_each_gap():
    import torch

    from glinthawk_dask.planner.microbench import idle_points

    pts = idle_points(dataclasses.asdict(MODEL), torch.float32, torch.device("cpu"), tokens=4,
                      gaps=[0.003, 0.001], repeats=2, rounds=2)
    assert [g for g, _ in pts] == [0.001, 0.003]
    assert 0.0 <= pts[0][1] <= pts[1][1] < 0.5  # rising, seconds


@pytest.mark.parametrize("points, want", [
    ([(2e-3, 1.2e-3), (4e-3, 1.6e-3)], (1.2, 8e-4)),  # seconds and a share: both recovered
    ([(2e-3, 1.0e-3), (4e-3, 0.8e-3)], (1.0, 9e-4)),  # shrinking with the job: a constant, their mean
    ([(2e-3, 0.2e-3), (4e-3, 1.0e-3)], (1.175, 0.0)),  # growing faster than the job: a factor, the mean share
    ([(3e-3, 1.5e-3)], (1.5, 0.0)),  # one point: a factor
    ([(2e-3, -1e-4), (4e-3, -2e-4)], (1.0, 0.0)),  # faster than alone: no cold cost
    ([], (1.0, 0.0)),
])
def test_fit_cold_splits_the_excess_into_seconds_and_a_share(points, want):
    factor, seconds = fit_cold(points)
    assert factor == pytest.approx(want[0], abs=1e-9) and seconds == pytest.approx(want[1], abs=1e-12)


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


def test_contention_factors_are_medians_of_repeated_measurements():
    from glinthawk_dask.runtime.profiler import median_factors

    # one outlying measurement (a quiet moment of the machine) does not set the factor
    assert median_factors([(1.5, 1.1), (1.16, 1.0), (1.6, 1.3), (1.45, 1.05), (1.7, 1.2)]) == (1.5, 1.1)
    assert median_factors([(0.9, 0.8), (0.95, 0.7), (1.2, 0.9)]) == (1.0, 1.0)  # never below 1
    assert median_factors([(1.3, 1.2)]) == (1.3, 1.2)


def test_a_pipeline_three_deep_takes_the_profiles_three_deep_slowdown():
    w = Workload.uniform(12, 4, 16)
    base = _profile(shared=True, fd=1.5)
    deeper = dataclasses.replace(base, dense_slowdown_3=3.0)

    def run(prof, depth):
        return simulate(prof, MODEL, w, RunConfig(micro_batch_size=12 // depth, micro_batches=depth, attention=depth))

    assert run(deeper, 2).seconds == run(base, 2).seconds  # two deep: the two-deep factor
    assert run(deeper, 3).seconds > 1.3 * run(base, 3).seconds
    assert base.slowdowns(3) == (1.5, 1.0) and deeper.slowdowns(3) == (3.0, 1.0) and deeper.slowdowns(2) == (1.5, 1.0)
    assert dataclasses.replace(deeper, shared_host=False).slowdowns(3) == (1.0, 1.0)
    assert Profile.from_json(json.loads(json.dumps(deeper.to_json()))).slowdowns(3) == (3.0, 1.0)


def test_continuous_batching_admits_as_slots_free_and_counts_every_token():
    prof = _profile()
    outs = (3, 9, 5, 1, 7, 2)
    w = Workload((4, 2, 8, 1, 3, 5), outs)
    pred = simulate(prof, MODEL, w, RunConfig(micro_batch_size=2, micro_batches=1))
    assert pred.generated_tokens == sum(outs)
    # two slots: at least as many steps as the longest pair needs, fewer than one request at a time
    assert max(outs) <= pred.steps < sum(outs) + len(outs)


def test_prompts_chunked_one_token_a_step_are_prefill_not_decode():
    prof = _profile()
    w = Workload((3,) * 6, (4,) * 6)
    # one slot, one token a step: each request takes its 3 prompt tokens (the last one
    # samples) and 3 more decode steps, one request after another
    one = simulate(prof, MODEL, w, RunConfig(micro_batch_size=1, micro_batches=1, max_step_tokens=1))
    assert one.feasible and one.generated_tokens == 24 and one.steps == 6 * (3 + 4 - 1)
    # a step budget below the micro-batch is raised to it, as runs raise it
    six = simulate(prof, MODEL, w, RunConfig(micro_batch_size=6, micro_batches=1, max_step_tokens=1))
    assert six.feasible and six.config.max_step_tokens == 6 and six.generated_tokens == 24


@pytest.mark.parametrize("seed", range(8))
def test_a_simulated_micro_batch_takes_the_batch_schedulers_steps(seed):
    """The simulator keeps a micro-batch as sums (it costs a step by its prompt chunks,
    not its sequences); step by step it plans what the runtime's batch scheduler plans:
    the same shape, the same prompt chunks in the same slots, the same tokens sampled,
    and decode steps taken many at a time come out as the scheduler's one at a time."""
    import random

    from glinthawk_dask.engine.request import Request
    from glinthawk_dask.engine.scheduler import BatchScheduler
    from glinthawk_dask.planner.simulate import _Batch
    from glinthawk_dask.sampling import SamplingParams

    rng = random.Random(seed)
    size = rng.choice([1, 3, 8])
    budget = max(size, rng.choice([1, 5, 16, 64]))
    seq_len = 96
    reqs = [(rng.choice([1, 2, 3, 9, 40, 80]), rng.choice([1, 2, 7, 30])) for _ in range(40)]
    sched = BatchScheduler(n_micro_batches=1, micro_batch_size=size, max_step_tokens=budget, max_seq_len=seq_len)
    for i, (p, o) in enumerate(reqs):
        sched.add(Request(str(i), [7] * p, SamplingParams(max_tokens=o, ignore_eos=True)))
    batch, waiting = _Batch(size), [(p, min(o, seq_len - p)) for p, o in reversed(reqs)]
    fast_forwards = 0
    while sched.has_work():
        while len(batch) < size and waiting:
            batch.admit(*waiting.pop())
        (tokens, kv_read, units, rows, seqs), chunks = batch.plan(budget)
        repeat = 1
        if not chunks and (not waiting or len(batch) == size):  # as the simulator fast-forwards
            repeat = batch.ends[0][0] - batch.steps
            fast_forwards += repeat > 1
        sampled = 0
        for j in range(repeat):
            step = sched.schedule(0)
            ends = [s + c for s, c in zip(step.starts, step.counts)]
            assert (step.n_tokens, sum(ends), sum(c * e for c, e in zip(step.counts, ends)), len(step.sample_seqs),
                    len(step.seqs)) == (tokens, kv_read + j * seqs, units + j * seqs, rows, seqs)
            prompt_part = list(zip(step.seqs, step.counts))[len(step.seqs) - len(chunks):]
            assert [(sq.slot, c) for sq, c in prompt_part] == [(e[0], c) for e, c in chunks]
            sampled += len(step.sample_seqs)
            sched.update(step, [5] * len(step.sample_seqs))
        assert batch.advance(chunks, repeat) == sampled
    assert not batch and not waiting and fast_forwards > 0

def test_kv_that_does_not_fit_is_infeasible_with_a_reason():
    prof = dataclasses.replace(_profile(), attention=dataclasses.replace(_profile().attention, kv_bytes=1e3))
    pred = simulate(prof, MODEL, Workload.uniform(4, 8, 8), RunConfig(micro_batch_size=4))
    assert not pred.feasible and "KV" in pred.reason


def test_kv_left_by_other_runs_caps_each_plan_by_the_workers_it_takes():
    w = Workload.uniform(16, 8, 8)
    slot = _kv_slot(w.max_len)
    prof = _profile()
    prof = dataclasses.replace(prof, attention=dataclasses.replace(prof.attention, kv_free=(12 * slot, 4 * slot)))
    fits = {(b, m, a): simulate(prof, MODEL, w, RunConfig(micro_batch_size=b, micro_batches=m, attention=a)).feasible
            for b, m, a in [(12, 1, 1), (4, 2, 2), (8, 2, 2), (16, 1, 1)]}
    # one worker: the roomiest (12 slots); two: the second has 4
    assert fits == {(12, 1, 1): True, (4, 2, 2): True, (8, 2, 2): False, (16, 1, 1): False}
    assert prof.attention.kv_cap(5) == 4 * slot and prof.to_json() == _profile().to_json()  # not kept in files


def test_a_plan_is_predicted_again_on_the_lengths_its_rows_stopped_at():
    from glinthawk_dask.engine.request import Request
    from glinthawk_dask.runtime.autoplan import PlanCheck
    from glinthawk_dask.sampling import SamplingParams

    prof, w = _profile(), Workload.uniform(8, 6, 32)
    reqs = [Request(f"r{i}", [1] * 6, SamplingParams(max_tokens=32)) for i in range(8)]
    chosen = simulate(prof, MODEL, w, RunConfig(micro_batch_size=8))
    check = PlanCheck(prof, MODEL, chosen, reqs, w)
    for i in range(7):
        check.record(f"r{i}", 4 + i)
    check.record("not-sampled", 1)
    assert check.predicted_for_lengths() is None  # r7 has not finished
    check.record("r7", 2)
    again = simulate(prof, MODEL, Workload((6,) * 8, (4, 5, 6, 7, 8, 9, 10, 2)), chosen.config)
    assert check.predicted_for_lengths() == again.tokens_per_s < chosen.tokens_per_s  # emptier steps
    for i in range(8):  # every row ran (nearly) to its budget: nothing to add to the prediction
        check.record(f"r{i}", 31)
    assert check.predicted_for_lengths() is None


def test_sweep_and_best_prefer_the_fastest_and_the_cheapest():
    prof = _profile(d=4e-3, att=1e-4, rtt=1e-4)
    w = Workload.uniform(16, 4, 8)
    configs = candidates(16, dense=1, attention=2, max_depth=4)
    done = []
    preds = sweep(prof, MODEL, w, configs, progress=lambda: done.append(1))
    assert len(preds) == len(configs) == len(done)  # progress after each configuration
    fast = best(preds)
    assert fast.tokens_per_s == max(p.tokens_per_s for p in preds if p.feasible)
    cheap = best(preds, Prices(dense=1.0, attention=100.0), by="cost")
    assert cheap.config.mode == "single-tier"  # attention workers priced out


def test_a_sweeps_shared_steps_and_rounds_predict_what_each_configuration_alone_does():
    """A sweep simulates the steps of each micro-batch layout once, whatever the workers, the
    latency and the mode, and each round once per workers and latency: every prediction
    equals that configuration's simulated with nothing shared, on prompts that are chunked
    and outputs that end at different steps."""
    prof = load_profile("vm-2core")
    w = Workload(tuple([3, 40, 7, 90, 1, 12] * 4), tuple([5, 1, 9, 3, 12, 2] * 4))
    configs = [RunConfig(mode=mode, micro_batch_size=size, micro_batches=depth, dense=dense, attention=attn,
                         latency=latency, max_step_tokens=16,
                         local_micro_batches=1 if mode == "hybrid" and depth > 1 else 0)
               for mode in ("two-tier", "single-tier", "hybrid") for size in (4, 8) for depth in (1, 2)
               for dense in (1, 2) for attn in (1, 2) for latency in (0.0, 0.01)]
    cache: dict = {}
    shared = [simulate(prof, MODEL, w, c, cache) for c in configs]
    alone = [simulate(prof, MODEL, w, c) for c in configs]
    fields = ("seconds", "steps", "generated_tokens", "dense_util", "attention_util", "bottleneck", "config")
    assert [[getattr(p, f) for f in fields] for p in shared] == [[getattr(p, f) for f in fields] for p in alone]
    traces = [k for k in cache if k[0] == "steps"]
    assert 0 < len(traces) < len(configs) / 4  # steps shared across workers, latency and modes
    assert len({p.seconds for p in shared}) > len(traces)  # yet each configuration costs its own rounds


def test_compiled_rounds_give_the_python_rounds_bit_for_bit(monkeypatch):
    """Long sweeps compile the rounds' events with Numba: every field of every round
    equals the Python loop's, for local, remote and mixed rounds, one to three slices,
    latency, contention (the vm-2core profile shares cores) and the in-process engine."""
    import importlib
    import random

    from glinthawk_dask.planner.workload import MicroBatchShape

    rounds = importlib.import_module("glinthawk_dask.planner.rounds")
    monkeypatch.setattr(rounds, "_compiled", None)
    rng = random.Random(0)
    profs = [load_profile("vm-2core"), load_profile("h200"), _profile(shared=True, fd=1.7)]
    cases = []
    for _ in range(150):
        mode = rng.choice(["two-tier", "single-tier", "in-process", "hybrid"])
        m = rng.randint(1, 5)
        cfg = RunConfig(mode=mode, micro_batches=m, dense=rng.choice([1, 2, 3]), attention=rng.choice([1, 2, 3]),
                        latency=rng.choice([0.0, 1e-3, 0.05]),
                        local_micro_batches=rng.randint(0, m) if mode == "hybrid" else 0)
        shapes = []
        for _ in range(m):
            tok = rng.choice([1, 4, 16, 300])
            shapes.append(MicroBatchShape(tok, tok * rng.randint(1, 300), tok * rng.randint(1, 3000),
                                          rng.randint(1, tok), rng.randint(1, tok)))
        cases.append((rng.choice(profs), cfg, shapes, rng.choice([1, 3, 5, 8, 30])))
    python = [rounds.round_period(p, MODEL, c, s, n) for p, c, s, n in cases]
    assert rounds.compile_kernel() and rounds._compiled is not None
    assert [rounds.round_period(p, MODEL, c, s, n) for p, c, s, n in cases] == python


def test_a_long_sweep_compiles_its_rounds_and_predicts_the_same(monkeypatch):
    import importlib

    rounds = importlib.import_module("glinthawk_dask.planner.rounds")
    monkeypatch.setattr(rounds, "_compiled", None)
    prof = load_profile("vm-2core")
    w = Workload.uniform(24, 20, 12)
    configs = candidates(24, dense=2, attention=2, max_depth=3)
    python = sweep(prof, MODEL, w, configs, compile_after_s=None)
    assert rounds._compiled is None  # None: never compiled
    compiled = sweep(prof, MODEL, w, configs, compile_after_s=0.0)  # compiled after the first configuration
    assert rounds._compiled is not None
    assert [(p.config, p.seconds, p.dense_util, p.attention_util) for p in compiled] == \
        [(p.config, p.seconds, p.dense_util, p.attention_util) for p in python]


def test_a_compiled_sweep_in_threads_predicts_what_one_thread_does():
    """Once the rounds are compiled (they release the GIL), a sweep runs its configurations in
    threads, grouped by the rounds they share: the same predictions in the same order, every
    configuration reported once, from the sweep's threads."""
    import importlib
    import threading

    rounds = importlib.import_module("glinthawk_dask.planner.rounds")
    assert rounds.compile_kernel()
    prof = load_profile("vm-2core")
    w = Workload(tuple([3, 40, 7, 90, 1, 12] * 5), tuple([5, 1, 9, 3, 12, 2] * 5))
    configs = candidates(30, dense=2, attention=2, max_depth=3, latency=0.01)
    one = sweep(prof, MODEL, w, configs, threads=1)
    names: list[str] = []
    many = sweep(prof, MODEL, w, configs, threads=3, progress=lambda: names.append(threading.current_thread().name))
    fields = ("config", "seconds", "steps", "dense_util", "attention_util", "feasible")
    assert [[getattr(p, f) for f in fields] for p in many] == [[getattr(p, f) for f in fields] for p in one]
    assert len(names) == len(configs) and all(n.startswith("glinthawk-sweep") for n in names)


def test_a_threaded_sweep_stops_at_the_first_failure(monkeypatch):
    """A configuration that fails in one of the sweep's threads ends the sweep with its error
    at once: the other threads finish the configuration they are on and take no more."""
    import importlib
    import threading

    rounds = importlib.import_module("glinthawk_dask.planner.rounds")
    plan_module = importlib.import_module("glinthawk_dask.planner.plan")
    assert rounds.compile_kernel()
    configs = candidates(30, dense=2, attention=2, max_depth=3, latency=0.01)
    real, calls, lock = plan_module.simulate, [], threading.Lock()

    def simulate_or_fail(profile, model, workload, config, cache):
        with lock:
            calls.append(config)
            if len(calls) == 5:
                raise RuntimeError("simulated failure")
        return real(profile, model, workload, config, cache)

    monkeypatch.setattr(plan_module, "simulate", simulate_or_fail)
    w = Workload.uniform(30, 20, 12)
    with pytest.raises(RuntimeError, match="simulated failure"):
        sweep(load_profile("vm-2core"), MODEL, w, configs, threads=3)
    assert len(calls) <= 5 + 2  # the failure, then at most one more configuration in each other thread
    assert not [t for t in threading.enumerate() if t.name.startswith("glinthawk-sweep")]


# -- hybrid runs: some micro-batches local, the rest two-tier ---------------------------------------


def _kv_profile(*, worker_GBps=0.02, dense_GBps=2.0) -> Profile:
    """Attention that costs by KV read: slow on the attention workers, fast on the dense one
    (whose KV memory a budget then limits)."""
    return Profile.from_json({
        "glinthawk_profile": 1, "name": "kv", "source": "test", "model": dataclasses.asdict(MODEL),
        "dense": {"layer_s": [[1, 1e-3], [4096, 1e-3]], "head_s": [[1, 2e-3], [4096, 2e-3]], "step_s": 1e-4,
                  "attention": {"overhead_s": 1e-4, "kv_GBps": dense_GBps, "gflops": None}},
        "attention": {"overhead_s": 1e-4, "kv_GBps": worker_GBps, "gflops": None, "kv_bytes": 1e12},
        "network": {"rtt_s": 2e-4, "GBps": None, "msg_cpu_s": 0.0},
        "host": {"shared": False},
    })


def _kv_slot(seq_len: int, elem: int = 4) -> int:
    """KV bytes of one slot of ``seq_len`` tokens on a single slice of MODEL."""
    return MODEL.kv_size * 2 * elem * L * seq_len


def _fastest(preds):
    return max(p.tokens_per_s for p in preds if p.feasible)


@pytest.mark.parametrize("prof", [_profile(), _profile(shared=True, fd=1.5), _kv_profile()], ids=["hand", "shared",
                                                                                                 "kv"])
@pytest.mark.parametrize("size, depth, attention", [(4, 1, 1), (4, 3, 1), (4, 3, 2), (2, 4, 2), (8, 2, 2)])
def test_hybrid_with_none_or_all_local_is_two_tier_or_single_tier(prof, size, depth, attention):
    w = Workload((4, 2, 8, 1, 3, 5, 6, 2), (3, 9, 5, 1, 7, 2, 4, 6))
    common = {"micro_batch_size": size, "micro_batches": depth, "latency": 1e-3}
    two = simulate(prof, MODEL, w, RunConfig(mode="two-tier", attention=attention, **common))
    single = simulate(prof, MODEL, w, RunConfig(mode="single-tier", **common))
    none = simulate(prof, MODEL, w, RunConfig(mode="hybrid", attention=attention, local_micro_batches=0, **common))
    every = simulate(prof, MODEL, w, RunConfig(mode="hybrid", attention=attention, local_micro_batches=depth,
                                               **common))
    assert none.feasible and every.feasible and two.feasible and single.feasible
    assert none.tokens_per_s == pytest.approx(two.tokens_per_s, rel=1e-12) and none.steps == two.steps
    assert every.tokens_per_s == pytest.approx(single.tokens_per_s, rel=1e-12) and every.steps == single.steps
    assert none.local_micro_batches == 0 and none.kv_bytes_dense == 0
    assert none.kv_bytes_attention == two.kv_bytes_attention and none.bottleneck == two.bottleneck
    assert every.local_micro_batches == every.micro_batches == single.micro_batches
    assert every.local_batch_size == single.micro_batch_size and every.kv_bytes_attention == 0
    assert every.kv_bytes_dense == single.kv_bytes_dense and every.bottleneck == "dense"
    # a real split lies in between in its memory: local KV on the dense worker, the rest remote
    if depth > 1:
        mid = simulate(prof, MODEL, w, RunConfig(mode="hybrid", attention=attention, local_micro_batches=1, **common))
        assert mid.feasible and mid.local_micro_batches == 1 and mid.generated_tokens == sum(w.output_lens)
        slot = _kv_slot(w.max_len)
        assert mid.kv_bytes_dense == mid.local_batch_size * slot
        remote = mid.micro_batches - 1  # (eight requests may not need them all)
        assert mid.kv_bytes_attention == -(-remote // attention) * mid.micro_batch_size * slot


def test_a_dense_budget_shrinks_single_tier_and_hybrid_beats_both_tiers():
    prof = _kv_profile()
    w = Workload.uniform(32, 8, 16)
    budget = 8 * _kv_slot(w.max_len)  # eight slots of KV on the dense worker
    single = simulate(prof, MODEL, w, RunConfig(mode="single-tier", micro_batch_size=32, micro_batches=1,
                                                dense_kv_budget=budget))
    assert single.feasible and single.micro_batch_size == 8 and single.kv_bytes_dense <= budget
    two_mbs = simulate(prof, MODEL, w, RunConfig(mode="single-tier", micro_batch_size=16, micro_batches=2,
                                                 dense_kv_budget=budget))
    assert two_mbs.micro_batch_size == 4 and two_mbs.micro_batches == 2
    # the profile's own dense KV memory binds the same way, the smaller of the two
    tight = dataclasses.replace(prof, dense=dataclasses.replace(prof.dense, kv_bytes=2 * _kv_slot(w.max_len)))
    assert simulate(tight, MODEL, w, RunConfig(mode="single-tier", micro_batch_size=32,
                                               dense_kv_budget=budget)).micro_batch_size == 2
    # hybrid: local micro-batches share the budget, remote ones keep their size
    hyb = simulate(prof, MODEL, w, RunConfig(mode="hybrid", micro_batch_size=16, micro_batches=3,
                                             local_micro_batches=2, dense_kv_budget=budget))
    assert (hyb.local_micro_batches, hyb.local_batch_size, hyb.micro_batch_size, hyb.micro_batches) == (2, 4, 16, 3)
    assert hyb.kv_bytes_dense == 8 * _kv_slot(w.max_len) and hyb.kv_bytes_attention == 16 * _kv_slot(w.max_len)

    for attention in (1, 2):
        by_mode = {mode: sweep(prof, MODEL, w, candidates(32, modes=(mode,), attention=attention, max_depth=4,
                                                          dense_kv_budget=budget))
                   for mode in ("single-tier", "two-tier", "hybrid")}
        for preds in by_mode.values():
            assert all(p.config.dense_kv_budget == budget for p in preds)
            assert all(p.kv_bytes_dense <= budget for p in preds if p.feasible)
        others = max(_fastest(by_mode["single-tier"]), _fastest(by_mode["two-tier"]))
        chosen = best(by_mode["hybrid"])
        assert _fastest(by_mode["hybrid"]) >= others * (1 - 1e-9)
        assert chosen.tokens_per_s >= best(by_mode["single-tier"]).tokens_per_s
        assert chosen.tokens_per_s >= best(by_mode["two-tier"]).tokens_per_s
        # here the split is what wins: a local micro-batch in the dense worker's idle time
        assert chosen.tokens_per_s > 1.05 * others
        assert 0 < chosen.local_micro_batches < chosen.micro_batches and chosen.bottleneck in ("dense", "attention",
                                                                                             "round trip")


def test_hybrid_all_local_under_a_budget_steps_as_the_single_tier_run_it_is():
    # A micro-batch size past the step budget, its local micro-batch shrunk to 8 slots:
    # the run places one micro-batch of 8, and its steps hold 8 tokens, as single-tier's
    # (runs raise the budget to their largest placed micro-batch, not to the size asked)
    prof = _kv_profile()
    w = Workload.uniform(32, 8, 16)
    common = {"micro_batch_size": 32, "micro_batches": 1, "max_step_tokens": 4,
              "dense_kv_budget": 8 * _kv_slot(w.max_len)}
    single = simulate(prof, MODEL, w, RunConfig(mode="single-tier", **common))
    every = simulate(prof, MODEL, w, RunConfig(mode="hybrid", attention=2, local_micro_batches=1, **common))
    assert single.feasible and every.feasible and every.local_batch_size == single.micro_batch_size == 8
    assert every.config.max_step_tokens == single.config.max_step_tokens == 8
    assert every.steps == single.steps and every.tokens_per_s == pytest.approx(single.tokens_per_s, rel=1e-12)
    # with a remote micro-batch beside it, the remote one's 32 slots set the budget
    mixed = simulate(prof, MODEL, w, RunConfig(mode="hybrid", attention=2, **{**common, "micro_batches": 2},
                                               local_micro_batches=1))
    assert mixed.feasible and mixed.micro_batches == 2 and mixed.config.max_step_tokens == 32


@pytest.mark.parametrize("prof", [_profile(), _kv_profile(), _profile(d=4e-3, att=1e-4, rtt=1e-4)],
                         ids=["hand", "kv", "dense-heavy"])
def test_without_a_budget_the_best_hybrid_is_the_better_tier(prof):
    w = Workload.uniform(32, 8, 16)
    fastest = {mode: _fastest(sweep(prof, MODEL, w, candidates(32, modes=(mode,), attention=2, max_depth=4)))
               for mode in ("single-tier", "two-tier", "hybrid")}
    assert fastest["hybrid"] == pytest.approx(max(fastest["single-tier"], fastest["two-tier"]), rel=1e-9)


def test_hybrid_candidates_enumerate_the_local_split():
    cs = candidates(16, modes=("hybrid",), attention=2, micro_batch_size=4, dense_kv_budget=1e6)
    assert {c.mode for c in cs} == {"hybrid"} and all(c.dense_kv_budget == 1e6 for c in cs)
    for depth in range(1, 5):
        splits = sorted({c.local_micro_batches for c in cs if c.micro_batches == depth})
        assert splits == list(range(depth + 1))
    # no more attention workers than remote micro-batches (none remote: one, unused)
    assert all(c.attention <= max(1, c.micro_batches - c.local_micro_batches) for c in cs)
    fixed = candidates(16, modes=("hybrid",), micro_batch_size=4, local_micro_batches=2)
    assert {c.local_micro_batches for c in fixed} == {1, 2}  # at most all of a depth's micro-batches
    # swept with both tiers, the hybrid extremes are left to them
    both = candidates(16, modes=("two-tier", "single-tier", "hybrid"), micro_batch_size=4)
    assert all(0 < c.local_micro_batches < c.micro_batches for c in both if c.mode == "hybrid")
    # the existing call still works, two-tier and single-tier only
    assert {c.mode for c in candidates(16)} == {"two-tier", "single-tier"}


def test_a_dense_budget_below_one_slot_is_infeasible_with_a_reason():
    prof = _profile()
    w = Workload.uniform(8, 4, 4)
    slot = _kv_slot(w.max_len)
    for cfg in (RunConfig(mode="single-tier", micro_batch_size=4, micro_batches=2, dense_kv_budget=slot - 1),
                RunConfig(mode="hybrid", micro_batch_size=4, micro_batches=2, local_micro_batches=1,
                          dense_kv_budget=slot / 2),
                RunConfig(mode="hybrid", micro_batch_size=4, micro_batches=2, local_micro_batches=2,
                          dense_kv_budget=1.5 * slot)):  # one slot each for two: not there
        pred = simulate(prof, MODEL, w, cfg)
        assert not pred.feasible, cfg
        assert f"not one sequence of {w.max_len} tokens fits the dense KV budget" in pred.reason
    # with none local the dense budget does not matter; exactly one slot each fits
    assert simulate(prof, MODEL, w, RunConfig(mode="hybrid", micro_batch_size=4, micro_batches=2,
                                              dense_kv_budget=0)).feasible
    ok = simulate(prof, MODEL, w, RunConfig(mode="hybrid", micro_batch_size=4, micro_batches=2,
                                            local_micro_batches=2, dense_kv_budget=2 * slot))
    assert ok.feasible and ok.local_batch_size == 1 and ok.kv_bytes_dense == 2 * slot


def test_hybrid_placement_drops_empty_micro_batches_and_prices_attention_only_when_used():
    prof = _profile()
    w = Workload.uniform(4, 2, 4)
    pred = simulate(prof, MODEL, w, RunConfig(mode="hybrid", micro_batch_size=8, micro_batches=3,
                                              local_micro_batches=2))
    assert (pred.micro_batches, pred.local_micro_batches, pred.local_batch_size) == (1, 1, 4)
    assert pred.kv_bytes_attention == 0 and pred.bottleneck == "dense"
    assert pred.cost_per_million(1.0, None) is not None  # no attention workers to pay
    small = simulate(prof, MODEL, w, RunConfig(mode="hybrid", micro_batch_size=4, micro_batches=3,
                                               local_micro_batches=1, local_batch_size=2))
    assert (small.micro_batches, small.local_micro_batches, small.local_batch_size) == (2, 1, 2)
    assert small.generated_tokens == 16 and small.kv_bytes_attention == 4 * _kv_slot(w.max_len)
    assert small.cost_per_million(1.0, None) is None
    assert small.cost_per_million(1.0, 1.0) > pred.cost_per_million(1.0, 1.0) * 0  # priced with both tiers
    with pytest.raises(ValueError, match="local micro-batches"):
        RunConfig(mode="hybrid", micro_batches=2, local_micro_batches=3)
    with pytest.raises(ValueError, match="local batch size"):
        RunConfig(mode="hybrid", micro_batch_size=4, local_batch_size=5)
    with pytest.raises(ValueError, match="dense KV budget"):
        RunConfig(mode="single-tier", dense_kv_budget=-1)


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


def test_plan_does_not_import_torch():
    """Planning needs a model's shape only: the default GGUF's and a synthetic model's configs are read without
    torch (whose import alone takes seconds), in a fresh interpreter."""
    code = (
        "import sys\n"
        "from glinthawk_dask.cli import main\n"
        "for model in ('smollm2-135m-instruct', 'random:llama-2-7b'):\n"
        "    main(['plan', '--model', model, '--profile', 'vm-2core', '--requests', '4', '--output-tokens', '4',\n"
        "          '--json'], standalone_mode=False)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('"best"') == 2, done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False", "plan imported torch"


def test_plan_samples_prompt_lengths_from_a_dataset(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": "word " * n}) + "\n" for n in (3, 10, 30)))
    result = CliRunner().invoke(main, ["plan", "--profile", "vm-2core", "--requests", "16", "--output-tokens", "8",
                                       "--prompts-from", str(src), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert "all 3 rows" in doc["workload"] and doc["requests"] == 16
    # without --requests, a dataset read whole is the run's requests
    result = CliRunner().invoke(main, ["plan", "--profile", "vm-2core", "--output-tokens", "8", "--prompts-from",
                                       str(src), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["requests"] == 3


def test_plan_takes_prompt_and_completion_lengths_from_a_pilot_run_s_output(tmp_path):
    from glinthawk_dask.pipeline.sink import ZarrSink

    out = str(tmp_path / "pilot.zarr")
    with ZarrSink.open(out, fingerprint="f", model="m", spec={}, sampling={}) as sink:
        sink.append([{"id": f"r{i}", "prompt": "p", "completion": "c", "completion_token_ids": [7] * (5 * i),
                      "finish_reason": "length", "error": None, "prompt_tokens": 20 + i} for i in range(1, 4)]
                    + [{"id": "bad", "prompt": None, "completion": "", "completion_token_ids": [],
                        "finish_reason": "error", "error": "too long"}])
    result = CliRunner().invoke(main, ["plan", "--profile", "vm-2core", "--requests", "30", "--lengths-from", out,
                                       "--mode", "two-tier", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["workload"] == f"prompt and completion lengths from 3 rows of {out}" and doc["requests"] == 30
    best = doc["best"]  # every request generates 5, 10 or 15 tokens: the plan's tokens are a mix of those
    generated = round(best["tokens_per_s"] * best["seconds"])
    assert generated % 5 == 0 and 5 * 30 < generated < 15 * 30, best
    both = CliRunner().invoke(main, ["plan", "--profile", "vm-2core", "--lengths-from", out, "--prompts-from", out])
    assert both.exit_code == 1 and "not both" in both.output and "Traceback" not in both.output


def test_plan_hybrid_with_a_dense_budget_prints_the_split_and_its_options():
    args = ["plan", "--model", "random:llama-2-7b", "--profile", "h200", "--requests", "64", "--prompt-tokens", "64",
            "--output-tokens", "16", "--attention", "2", "--mode", "hybrid", "--dense-kv-budget", "200MB"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dense KV budget 200MB" in out and " local x" in out  # the plan column: 16x4 (2 local x2)
    best_line = next(ln for ln in out.splitlines() if ln.startswith("best:"))
    assert "local micro-batch" in best_line and "remote of" in best_line
    cli = next(ln for ln in out.splitlines() if ln.strip().startswith("CLI:"))
    assert "--mode hybrid" in cli and "--local-micro-batches" in cli and "--dense-kv-budget 200MB" in cli
    spec = next(ln for ln in out.splitlines() if ln.strip().startswith("spec:"))
    assert "mode: hybrid" in spec and "local_micro_batches:" in spec and "dense_kv_budget: 200000000" in spec

    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    chosen = doc["best"]
    assert chosen["mode"] == "hybrid" and chosen["dense_kv_budget"] == 200e6
    assert 0 < chosen["local_micro_batches"] < chosen["micro_batches"] and chosen["local_batch_size"] >= 1
    assert 0 < chosen["kv_bytes_dense"] <= 200e6 and chosen["kv_bytes_attention"] > 0
    assert f"--local-micro-batches {chosen['local_micro_batches']}" in chosen["options"]
    assert chosen["spec"]["dense_kv_budget"] == 200_000_000
    assert all(p["mode"] == "hybrid" for p in doc["predictions"])


@pytest.mark.parametrize("extra", [
    ["--attention", "2", "--mode", "two-tier", "--dense", "2"],
    ["--attention", "2", "--mode", "hybrid", "--dense-kv-budget", "200MB"],
    ["--mode", "single-tier"],
])
def test_the_spec_fields_plan_prints_run_as_a_pipeline_topology(tmp_path, extra):
    """What `plan` prints under "spec: topology:" (and as JSON) is a pipeline spec's
    topology section that a spec takes as it is, workers included."""
    import yaml

    from glinthawk_dask.pipeline.spec import load_spec

    args = ["plan", "--model", "random:llama-2-7b", "--profile", "h200", "--requests", "64", "--prompt-tokens", "64",
            "--output-tokens", "16", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    line = next(ln.strip() for ln in result.output.splitlines() if ln.strip().startswith("spec:"))
    assert line.startswith("spec: topology: mode: ")
    fields = json.loads(CliRunner().invoke(main, args + ["--json"]).output)["best"]["spec"]
    assert line == "spec: topology: " + ", ".join(f"{k}: {v}" for k, v in fields.items())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "planned", "model": "random:llama-2-7b",
                                    "input": {"urls": "prompts.jsonl", "format": "jsonl"},
                                    "output": {"url": "out.zarr"}, "topology": fields}))
    topo = load_spec(path).topology
    for key, value in fields.items():
        assert getattr(topo, key) == value, key
    if fields["mode"] != "single-tier":
        assert fields["attention_workers"] == 2 * fields.get("dense_workers", 1)


def test_plan_considers_hybrid_by_default():
    result = CliRunner().invoke(main, ["plan", "--model", "random:llama-2-7b", "--profile", "h200", "--requests", "32",
                                       "--prompt-tokens", "32", "--output-tokens", "8", "--json", "--top", "1000"])
    assert result.exit_code == 0, result.output
    assert {p["mode"] for p in json.loads(result.output)["predictions"]} == {"two-tier", "single-tier", "hybrid"}


@pytest.mark.parametrize("args, fragment", [
    (["plan", "--profile", "vm-2core", "--dense-kv-budget", "lots"], "--dense-kv-budget 'lots' is not a size"),
    (["plan", "--profile", "vm-2core", "--requests", "16", "--mode", "single-tier", "--dense-kv-budget", "1kB"],
     "fits the dense KV budget"),
])
def test_plan_dense_budget_errors_are_one_line(args, fragment):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert lines[-1].startswith("Error:") and fragment in lines[-1], result.output
    assert not any(ln.startswith("Traceback") for ln in lines)


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


# a dense and an attention worker in this process, with glinthawk's plugins (see _tiers)
TIER_CLUSTER = dict(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1}}),
                                           ("127.0.0.1", 1, {"resources": {"KV": 2**28}})], timeout=120)


async def _tiers(c) -> None:
    from glinthawk_dask.runtime.plugins import AttentionWorkerPlugin, DenseWorkerPlugin, GlinthawkSchedulerPlugin

    await c.register_plugin(GlinthawkSchedulerPlugin())
    await c.register_plugin(DenseWorkerPlugin())
    await c.register_plugin(AttentionWorkerPlugin())


@gen_cluster(**TIER_CLUSTER)
async def test_profile_measures_a_cluster_and_auto_plans_use_it(c, s, a, b):
    from glinthawk_dask.engine.request import Request
    from glinthawk_dask.runtime.client import DaskEngine
    from glinthawk_dask.runtime.profiler import cluster_profile, measure_profile
    from glinthawk_dask.sampling import SamplingParams

    await _tiers(c)
    prof = await measure_profile(c, MODEL, model="random:tiny-gqa", quick=True)
    assert prof.shared_host and prof.attention.kv_bytes > 0 and prof.rtt_s > 0
    # contention measured in chains two and three deep, as a run's pipeline
    assert prof.dense_slowdown >= 1.0 and prof.dense_slowdown_3 >= 1.0 and prof.attention_slowdown_3 >= 1.0
    info = await c.scheduler.glinthawk_cluster_info()
    # the dense tier's KV memory, as placement gives it (a CPU worker: its KV budget)
    assert prof.dense.kv_bytes == min(info["dense_kv_free"].values()) > 0
    assert prof.dense.kv_budget(10**6) == prof.dense.kv_bytes
    chains = await c.rpc(info["dense"][0]).glinthawk_profile_alternate(
        address=info["attention"] * 2, config=dataclasses.asdict(MODEL), tokens=4, n=4)
    assert chains["job"] >= chains["alternating"] > 0 and chains["alone"] > 0
    assert chains["cycle"] > 0 and chains["attention"] > 0  # the attention worker's own seconds, in its reply
    # what longer waits add to a dense job, counted from the chains' own wait
    assert [g for g, _ in prof.dense.idle_excess] == [0.002, 0.005, 0.02, 0.05]
    assert all(e >= 0 for _, e in prof.dense.idle_excess) and 0 < prof.dense.idle_ref_s < 1.0
    assert "rounds" not in chains
    repeated = await c.rpc(info["dense"][0]).glinthawk_profile_alternate(
        address=info["attention"] * 2, config=dataclasses.asdict(MODEL), tokens=4, n=4, repeats=3)
    assert len(repeated["rounds"]) == 3 and repeated["job"] == repeated["rounds"][0]["job"]
    assert all(r["job"] > 0 and r["alone"] > 0 and r["attention"] > 0 for r in repeated["rounds"])
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
    # micro-batches larger than the step token budget (an auto plan's, or given): each
    # step still holds a whole micro-batch's decode tokens, as in-process
    for size in ("auto", 6):
        small_steps = DaskEngine(c, "random:tiny-gqa", micro_batch_size=size, n_micro_batches=1, max_step_tokens=1)
        out = [x async for x in small_steps.agenerate(reqs)]
        assert len(out) == 6 and all(len(x.completion_token_ids) == 4 for x in out)
        assert small_steps.last_summary.micro_batch_size > 1


@gen_cluster(**TIER_CLUSTER)
async def test_a_kept_profile_is_checked_against_the_workers_once_it_is_old(c, s, a, b):
    import time

    from glinthawk_dask.planner import microbench
    from glinthawk_dask.runtime.profiler import cluster_profile, drift_scale, profile_key

    await _tiers(c)
    info = await c.scheduler.glinthawk_cluster_info()
    key = profile_key("random:tiny-gqa", "float32", info)
    base = Profile.from_json({**_profile(d=1e-3, att=5e-4).to_json(), "measured_at": time.time() - 3600})
    # the workers' probes (the workers run in this process) find each tier this many times its measured costs
    speed = {"dense": 1.0, "attention": 1.0}
    real_attention = microbench.attention_points

    def dense_points(config, dtype, device, tokens, repeats=2, rounds=microbench.ROUNDS, layers=None):
        if speed["dense"] is None:
            raise RuntimeError("the dense worker's probe failed")
        return [[t, speed["dense"] * base.dense_layer_s(MODEL, t, 4)] for t in tokens]

    def attention_points(config, dtype, device, shapes, repeats=5, max_bytes=None):
        return [[kv, flops, speed["attention"] * base.attention.cost.seconds(kv, flops)]
                for kv, flops, _ in real_attention(config, dtype, device, shapes, repeats=1, max_bytes=max_bytes)]

    async def kept(profile: Profile, **found: float) -> Profile:
        speed.update(found)
        await c.scheduler.glinthawk_profile_put(key=key, profile=profile.to_json())
        got, seconds = await cluster_profile(c, MODEL, model="random:tiny-gqa", dtype="float32")
        assert seconds == 0.0  # kept, not measured
        return got

    def costs(p: Profile) -> tuple[float, float]:
        return p.dense_layer_s(MODEL, 16, 4), p.attention.cost.seconds(1e4, 1e4)

    d0, a0 = costs(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(microbench, "dense_layer_points", dense_points)
        mp.setattr(microbench, "attention_points", attention_points)
        with dask.config.set({"glinthawk.planner.profile-probe-after": None}):
            assert (await kept(base, dense=1.5)).to_json() == base.to_json()  # never checked
        recent = Profile.from_json({**base.to_json(), "measured_at": time.time()})
        assert (await kept(recent)).to_json() == recent.to_json()  # measured minutes ago: trusted
        with tempfile.TemporaryDirectory() as cache, dask.config.set({"glinthawk.planner.profile-cache": cache}):
            checked = await kept(base, dense=1.5, attention=0.6)
            on_disk = [json.loads(open(os.path.join(cache, f)).read()) for f in os.listdir(cache)]
        assert costs(checked) == (pytest.approx(1.5 * d0), pytest.approx(0.6 * a0))
        assert checked.extra["scale"] == {"dense": 1.5, "attention": 0.6} and checked.rtt_s == base.rtt_s
        assert [d["probed_at"] for d in on_disk] == [checked.extra["probed_at"]]  # a new local cluster reads it
        # kept on the scheduler as checked, and not checked again soon
        again, _ = await cluster_profile(c, MODEL, model="random:tiny-gqa", dtype="float32")
        assert again.to_json() == checked.to_json()
        with dask.config.set({"glinthawk.planner.profile-probe-after": 0}):
            # within 15% of the scale it has: kept, so that noise does not move it
            assert costs(await kept(checked, dense=1.6, attention=0.65)) == costs(checked)
            # a busy moment (over 2x the measured costs) is not taken, nor counted as a check
            busy = await kept(checked, dense=6.9, attention=0.6)
            assert costs(busy) == costs(checked) and busy.extra["probe"]["dense"] == pytest.approx(6.9)
            assert busy.extra["probed_at"] == checked.extra["probed_at"] and busy.extra["busy_at"] > 0
            # the scale is against the measured costs, never compounded
            faster = await kept(busy, dense=0.8, attention=1.0)
            # a check that fails plans from the profile as kept
            assert (await kept(faster, dense=None)).to_json() == faster.to_json()
        assert costs(faster) == (pytest.approx(0.8 * d0), pytest.approx(a0))
        assert faster.extra["scale"] == {"dense": 0.8, "attention": 1.0} and "busy_at" not in faster.extra
        # a check that caught the workers busy is tried again at a plan a minute later, not sooner
        old = {**base.to_json(), "probed_at": time.time() - 3600}
        just_busy = Profile.from_json({**old, "busy_at": time.time() - 5})
        assert (await kept(just_busy, dense=1.5)).to_json() == just_busy.to_json()
        minute_ago = Profile.from_json({**old, "busy_at": time.time() - 61})
        assert costs(await kept(minute_ago, dense=1.5, attention=1.0)) == (pytest.approx(1.5 * d0), pytest.approx(a0))
    assert [drift_scale(r) for r in (0.88, 1.0, 1.14, 1.16, 0.85, 1.9, 2.1, 0.45)] == [
        1.0, 1.0, 1.0, 1.16, 0.85, 1.9, 1.0, 1.0]
    assert drift_scale(1.6, was=1.5) == 1.5 and drift_scale(0.8, was=1.5) == 0.8


@gen_cluster(**TIER_CLUSTER)
async def test_measurements_wait_for_the_attention_workers_to_load_their_kernel(c, s, a, b):
    import asyncio
    import threading

    from glinthawk_dask.model import cpu_attention
    from glinthawk_dask.runtime.profiler import _settled

    loaded = threading.Event()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_attention, "warm", lambda: loaded.wait(30))  # a kernel still loading as the worker starts
        try:
            await _tiers(c)
            info = await c.scheduler.glinthawk_cluster_info()
            ready = c.rpc(info["attention"][0]).glinthawk_attention_ready
            assert await ready(timeout=0.05) is False
            waiting = asyncio.ensure_future(_settled(c, info))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # a profile or a check would measure beside the load
            loaded.set()
            await asyncio.wait_for(waiting, 5)
            assert await ready(timeout=0.05) is True
        finally:
            loaded.set()


@gen_test()
async def test_the_wait_for_the_kernel_is_bounded_by_a_worker_that_does_not_answer():
    import socket
    import time
    import types

    from distributed.core import ConnectionPool

    from glinthawk_dask.runtime.profiler import _settled

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    pool = await ConnectionPool()
    try:
        t0 = time.monotonic()
        await _settled(types.SimpleNamespace(rpc=pool), {"attention": [f"tcp://127.0.0.1:{silent.getsockname()[1]}"]},
                       timeout=0.3)
        assert time.monotonic() - t0 < 5.0
    finally:
        await pool.close()
        silent.close()


def test_a_profile_kept_on_disk_ages_from_when_it_was_measured(tmp_path):
    import time

    from glinthawk_dask import config as glinthawk_config
    from glinthawk_dask.runtime.profiler import _read_kept

    path = tmp_path / "kept.json"
    day = glinthawk_config.get("planner.profile-max-age")
    _profile().save(path)  # an earlier version's file: no measured_at, measured when written
    assert abs(_read_kept(path).extra["measured_at"] - time.time()) < 60
    Profile.from_json({**_profile().to_json(), "measured_at": time.time() - day / 2}).save(path)
    assert _read_kept(path) is not None
    # rewritten a minute ago by a check, but measured over a day ago: measured again
    Profile.from_json({**_profile().to_json(), "measured_at": time.time() - day - 60}).save(path)
    assert _read_kept(path) is None
    path.write_text("{torn")
    assert _read_kept(path) is None


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


@pytest.mark.parametrize("name", ["vm-2core", "h200"])
@pytest.mark.parametrize("slots", [None, 8])
def test_two_stage_hybrid_sweep_finds_what_the_full_sweep_finds(name, slots):
    """Auto plans of hybrid runs sweep every split only for the best sizes and depths of
    single-tier and two-tier: at or above the better of those, and here at or near the full sweep's best."""
    from glinthawk_dask.model import from_name
    from glinthawk_dask.planner.plan import sweep_hybrid

    prof = load_profile(name)
    model = from_name("llama-2-7b" if name == "h200" else "smollm2-135m-instruct")
    w = Workload.uniform(64, 32, 64)
    slot = model.kv_bytes_per_token(4 if name == "vm-2core" else 2) * 128
    kw = dict(dense=[1], attention=[2], max_depth=8, max_seq_len=128, dtype_bytes=4 if name == "vm-2core" else 2,
              dense_kv_budget=None if slots is None else slots * slot)
    fast = best(sweep_hybrid(prof, model, w, **kw))
    full = best(sweep(prof, model, w, candidates(64, modes=("hybrid",), **kw)))
    extremes = best(sweep(prof, model, w, candidates(64, modes=("single-tier", "two-tier"), **kw)))
    assert fast.config.mode == "hybrid"
    assert fast.tokens_per_s >= extremes.tokens_per_s * (1 - 1e-9)
    if prof.shared_host:  # the tiers share cores: no splits, only the better extreme
        assert fast.local_micro_batches in (0, fast.micro_batches)
        assert fast.tokens_per_s == pytest.approx(extremes.tokens_per_s, rel=1e-9)
    else:
        assert fast.tokens_per_s >= full.tokens_per_s * 0.98  # (it also tries local micro-batches beyond n / size)


def test_local_layer_points_time_the_layer_with_its_attention_and_without():
    """The run-shaped local layer: for each shape its tokens, the KV bytes and FLOPs the
    attention cost model takes, and the layer timed with and without its attention."""
    import torch

    from glinthawk_dask.planner.microbench import local_layer_points

    cfg = dataclasses.asdict(MODEL)
    points = local_layer_points(cfg, torch.float32, torch.device("cpu"), [[4, 16, 1], [8, 24, 1]], passes=2)
    assert [p[0] for p in points] == [4, 8]
    for (tokens, kv_bytes, flops, local, alone), (b, ctx, new) in zip(points, [[4, 16, 1], [8, 24, 1]]):
        assert kv_bytes == b * (ctx + new) * MODEL.kv_size * 2 * 4
        assert flops == 4.0 * b * new * (ctx + new) * MODEL.q_size
        assert local > 0 and alone > 0


def test_dense_timings_go_on_through_the_layers_where_the_last_left_off(monkeypatch):
    """A run reads every layer's weights once a step; timings that started at the first
    layer each time read the same few, which stayed in the CPU's caches.  Each timing
    takes the next layers of the cycle, wrapping around, so a profile's timings read
    all of them in turn."""
    import torch

    from glinthawk_dask.planner import microbench

    cycle = microbench.LayerCycle(range(5))
    assert cycle.take(3) == [(0, 1), (1, 2), (2, 3)]
    assert cycle.take(3) == [(3, 4), (4, 0), (0, 1)]
    assert cycle.cursor == 1

    model = MODEL.replace(n_layers=8)
    cfg, layers = microbench._layers(model, torch.float32, torch.device("cpu"))
    assert isinstance(layers, microbench.LayerCycle) and len(layers) == 8  # tiny layers: all of them
    seen = []
    real = microbench.post_pre_attention

    def spy(c, a, b, *args):
        seen.append(tuple(next(i for i, layer in enumerate(layers) if layer is x) for x in (a, b)))
        return real(c, a, b, *args)

    monkeypatch.setattr(microbench, "post_pre_attention", spy)
    monkeypatch.setattr(microbench, "_layers", lambda *_: (cfg, layers))
    microbench.dense_layer_points(dataclasses.asdict(model), torch.float32, torch.device("cpu"), [1, 2],
                                  repeats=2, rounds=len(layers))
    # every timing (4 layers: 2 to warm up, 2 timed) starts where the one before ended
    assert seen[:10] == [(i % len(layers), (i + 1) % len(layers)) for i in range(10)]
    assert {a for a, _ in seen} == set(range(len(layers)))


def test_the_dense_sides_attention_is_timed_on_one_thread_as_its_caches_compute(monkeypatch):
    """In-process, single-tier and hybrid caches attend on one thread (``KVCache``'s
    default); a dense worker's profile times their attention so, whatever its torch
    threads, and an attention worker's on its stream's threads."""
    import torch

    from glinthawk_dask.model.kv_cache import KVCache
    from glinthawk_dask.planner import microbench

    asked = []
    monkeypatch.setattr(microbench, "attention_points",
                        lambda *args, **kwargs: asked.append(kwargs.get("threads", "unset")) or [])
    monkeypatch.setattr(microbench, "local_layer_points", lambda *args, **kwargs: [])
    microbench.dense_points(dataclasses.asdict(MODEL), torch.float32, torch.device("cpu"), shapes=[[4, 16, 1]])
    assert asked == [1]
    assert KVCache(MODEL, 1, 4).threads == 1


def test_attention_points_time_a_runs_pass_over_its_layers_within_the_memory_given(monkeypatch):
    """An attention point is a layer of a pass over as many layers' caches as a run's
    step reads (the model's, fewer where one layer more than the last-level cache holds
    or the bytes the worker can spare), so that each layer's KV is as cold as in a run; the
    step's first layer checks the layout and advances the lengths, the others append at
    the same positions.  The slots are longer than the contexts, as a run's are."""
    import torch

    from glinthawk_dask.model import kv_cache
    from glinthawk_dask.planner import microbench

    cfg = dataclasses.asdict(MODEL)
    layer_bytes = 4 * 17 * MODEL.kv_size * 2 * 4  # 4 sequences of 16 + 1 positions, k and v, fp32
    made: list[tuple[int, int]] = []  # (layers, calls of attend) of each cache timed
    real = kv_cache.KVCache

    class Counted(real):
        def __init__(self, c, *args, **kwargs):
            super().__init__(c, *args, **kwargs)
            assert self.max_seq_len == microbench.slot_length(17) == 26  # slots longer than the contexts, as a run's
            made.append((c.n_layers, 0))

        def attend(self, layer, q, k, v, batch):
            assert self.lengths[0] == (16 if layer == 0 else 17)  # reset before each pass, advanced by its first layer
            made[-1] = (made[-1][0], made[-1][1] + 1)
            return super().attend(layer, q, k, v, batch)

    monkeypatch.setattr(microbench, "KVCache", Counted)
    cpu = torch.device("cpu")
    monkeypatch.setattr(microbench, "last_level_cache_bytes", lambda device: 10**12)
    (kv_bytes, flops, seconds), = microbench.attention_points(cfg, torch.float32, cpu, [[4, 16, 1]], repeats=3)
    assert made == [(MODEL.n_layers, 4 * MODEL.n_layers)]  # the model's layers, a first pass and three timed
    assert kv_bytes == layer_bytes and flops == 4.0 * 4 * 17 * MODEL.q_size and seconds > 0
    made.clear()
    slot_bytes = layer_bytes * 26 // 17  # what a layer's slots take
    microbench.attention_points(cfg, torch.float32, cpu, [[4, 16, 1]], repeats=1, max_bytes=2 * slot_bytes + 1)
    assert made == [(2, 4)]  # as many layers as the bytes given hold
    made.clear()
    microbench.attention_points(cfg, torch.float32, cpu, [[4, 16, 1]], repeats=1, max_bytes=2 * slot_bytes - 1)
    assert made == [(1, 2)]
    made.clear()
    microbench.attention_points(cfg, torch.float32, cpu, [[4, 16, 1]], repeats=1, max_bytes=0)
    assert made == [(1, 2)]  # never fewer than one
    made.clear()
    monkeypatch.setattr(microbench, "last_level_cache_bytes", lambda device: layer_bytes)
    microbench.attention_points(cfg, torch.float32, cpu, [[4, 16, 1]], repeats=1)
    assert made == [(2, 4)]  # one layer more than the cache holds: a cycle through them misses it


def test_profile_curves_leave_out_the_bursts_a_stall_hit():
    """A stall inside one of a profile's bursts does not price the point: each point is
    the mean over rounds without their highest and lowest sixth, so up to four stalled
    rounds of the 24 move it no more than the machine's ordinary swings do."""
    from glinthawk_dask.planner import microbench

    assert microbench.trimmed_mean([1.0, 2.0, 3.0]) == 2.0  # fewer than six: nothing cut
    assert microbench.trimmed_mean([5.0] + [1.0] * 10 + [0.0]) == 1.0

    calls: dict[int, int] = {}

    def measure(tokens: int) -> float:  # 2 ms a layer at 16 tokens, 5 ms at 64; four stalled bursts at 64
        calls[tokens] = calls.get(tokens, 0) + 1
        stalled = tokens == 64 and calls[tokens] in (3, 9, 15, 21)
        return 0.45 if stalled else {16: 0.002, 64: 0.005}[tokens] * (1.1 if calls[tokens] % 2 else 0.9)

    seconds = microbench._over_rounds([16, 64], measure, microbench.ROUNDS)
    assert calls == {16: microbench.ROUNDS, 64: microbench.ROUNDS}
    assert seconds[0] == pytest.approx(0.002, rel=0.1)
    assert seconds[1] == pytest.approx(0.005, rel=0.1)  # the plain mean: 79 ms
