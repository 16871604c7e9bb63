"""Hybrid runs and the dense worker's KV budget: micro-batches whose KV stays on the
dense worker next to micro-batches on attention workers, token-identical to the
in-process engine."""

from __future__ import annotations

import pytest
from distributed.utils_test import gen_cluster

from glinthawk_dask.errors import GlinthawkError
from glinthawk_dask.model import from_name
from glinthawk_dask.runtime import DaskEngine
from glinthawk_dask.runtime.placement import PlacementError, make_plan
from test_two_tier import ATTN, DENSE, MODEL, _check, _requests, _setup

CFG = from_name("tiny-gqa")
PER_TOKEN_LAYER = CFG.kv_bytes_per_token(4, 1)


def _slot_bytes(max_seq_len: int) -> int:
    return PER_TOKEN_LAYER * CFG.n_layers * max_seq_len


# -- placement ---------------------------------------------------------------------------


def test_hybrid_plan_puts_local_micro_batches_first():
    plan = make_plan(mode="hybrid", dense=["d"], attention={"a1": 1 << 40, "a2": 1 << 40}, n_layers=4,
                     kv_bytes_per_token_layer=100, max_seq_len=10, micro_batch_size=8, n_micro_batches=5,
                     dense_kv_budget={"d": 4 * 100 * 10 * 6}, local_micro_batches=2)
    assert plan.local == [True, True, False, False, False]
    assert plan.sizes == [3, 3, 8, 8, 8]  # 6 slots of dense KV: 3 per local micro-batch
    assert plan.attention[0] == ["", "", "a1", "a2", "a1"]
    assert plan.slot_base[0] == [0, 3, 0, 0, 8]  # dense cache; a1, a2, a1 after its first
    assert plan.n_slots[0] == {"a1": 16, "a2": 8}
    assert plan.dense_kv == {"d": 4 * 100 * 10 * 6}


def test_single_tier_shrinks_to_the_dense_budget_and_says_when_nothing_fits():
    plan = make_plan(mode="single-tier", dense=["d"], attention={}, n_layers=2, kv_bytes_per_token_layer=10,
                     max_seq_len=10, micro_batch_size=16, n_micro_batches=2, dense_kv_budget={"d": 2 * 10 * 10 * 7})
    assert plan.sizes == [3, 3] and plan.local == [True, True] and plan.micro_batch_size == 3
    with pytest.raises(PlacementError, match="dense workers.*--dense-kv-budget"):
        make_plan(mode="single-tier", dense=["d"], attention={}, n_layers=2, kv_bytes_per_token_layer=10,
                  max_seq_len=10, micro_batch_size=16, n_micro_batches=2, dense_kv_budget={"d": 100})


def test_hybrid_with_every_micro_batch_remote_or_local_is_two_tier_or_single_tier():
    kw = dict(dense=["d"], attention={"a": 1 << 40}, n_layers=2, kv_bytes_per_token_layer=10, max_seq_len=10,
              micro_batch_size=4, n_micro_batches=3)
    remote, two = make_plan(mode="hybrid", local_micro_batches=0, **kw), make_plan(mode="two-tier", **kw)
    assert (remote.attention, remote.slot_base, remote.n_slots, remote.sizes) == \
           (two.attention, two.slot_base, two.n_slots, two.sizes)
    local = make_plan(mode="hybrid", local_micro_batches=3, **{**kw, "attention": {}})
    assert local.local == [True] * 3 and local.n_slots == [{}]


def test_a_run_takes_the_attention_workers_other_runs_hold_least():
    kw = dict(mode="two-tier", dense=["d"], n_layers=2, kv_bytes_per_token_layer=10, max_seq_len=10)
    slot = 2 * 10 * 10
    # a1 holds another run's 45 slots: one micro-batch of 64 goes whole to a2, not shrunk on a1
    one = make_plan(attention={"a1": 19 * slot, "a2": 64 * slot}, micro_batch_size=64, n_micro_batches=1, **kw)
    assert one.attention[0] == ["a2"] and one.sizes == [64]
    # two slices: the roomiest workers dealt first, each slice's micro-batches on its own
    two = make_plan(attention={"a1": slot, "a2": 9 * slot, "a3": 8 * slot, "a4": 9 * slot}, micro_batch_size=8,
                    n_micro_batches=1, n_slices=2, **{**kw, "dense": ["d0", "d1"]})
    assert two.attention == [["a2"], ["a4"]] and two.sizes == [8]
    # equal room: the address order, as before
    assert make_plan(attention={"b": slot * 8, "a": slot * 8}, micro_batch_size=4, n_micro_batches=2,
                     **kw).attention[0] == ["a", "b"]


# -- runs ----------------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[DENSE, ATTN, ATTN], timeout=120)
async def test_hybrid_run_is_token_identical_and_reports_where_attention_ran(c, s, *workers):
    await _setup(c)
    engine = await _check(c, _requests(30, seed=11), mode="hybrid", micro_batch_size=3, n_micro_batches=4,
                          local_micro_batches=2, max_step_tokens=40)
    summary = engine.last_summary
    where = summary.attention_of()
    assert where[:2] == ["dense", "dense"] and all(w.startswith("tcp://") for w in where[2:])
    assert summary.local_micro_batches == 2
    kv = summary.kv_bytes
    seq = summary.plan["max_seq_len"]
    assert kv["dense"] == 6 * _slot_bytes(seq) and kv["attention"] == 6 * _slot_bytes(seq)
    # the caches were freed when the run closed
    for w in workers:
        plugin = w.plugins.get("glinthawk-dense")
        if plugin is not None and plugin.service is not None:
            assert not plugin.service.runs


@gen_cluster(client=True, nthreads=[DENSE], timeout=120)
async def test_single_tier_honours_a_dense_kv_budget(c, s, a):
    """A budget of 3 sequences: 20 requests wait for slots and all complete identically."""
    await _setup(c)
    requests = _requests(20, seed=12)
    seq = max(len(r.prompt_token_ids) + r.params.max_tokens for r in requests)
    engine = await _check(c, requests, mode="single-tier", micro_batch_size=8, n_micro_batches=1,
                          dense_kv_budget=3 * _slot_bytes(seq) + 5)
    summary = engine.last_summary
    assert summary.plan["sizes"] == [3]
    assert summary.kv_bytes == {"dense": 3 * _slot_bytes(seq), "attention": 0}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, {"resources": {"GPU": 1, "DENSE_KV": 2 * 10**5}})],
             timeout=120)
async def test_a_dense_worker_kv_resource_is_its_budget(c, s, a):
    await _setup(c)
    requests = _requests(6, seed=13)
    seq = max(len(r.prompt_token_ids) + r.params.max_tokens for r in requests)
    engine = await _check(c, requests, mode="single-tier", micro_batch_size=8, n_micro_batches=1)
    assert engine.last_summary.plan["sizes"] == [min(8, 2 * 10**5 // _slot_bytes(seq))]
    # the run returned its reservation when it closed
    info = await c.scheduler.glinthawk_cluster_info()
    assert info["dense_kv_free"] == {a.address: 2 * 10**5}


@gen_cluster(client=True, nthreads=[DENSE], timeout=120)
async def test_a_dense_budget_below_one_sequence_is_a_clear_error(c, s, a):
    await _setup(c)
    engine = DaskEngine(c, MODEL, mode="single-tier", micro_batch_size=4, n_micro_batches=1, dense_kv_budget=1000)
    with pytest.raises(GlinthawkError, match="not one sequence of .* fits the KV budget of the dense workers"):
        async for _ in engine.agenerate(_requests(3)):
            pass


@gen_cluster(client=True, nthreads=[DENSE], timeout=120)
async def test_hybrid_without_attention_workers_keeps_every_micro_batch_local(c, s, a):
    await _setup(c)
    engine = await _check(c, _requests(12, seed=14), mode="hybrid", micro_batch_size=3, n_micro_batches=2)
    assert engine.last_summary.attention_of() == ["dense", "dense"]


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=180)
async def test_hybrid_split_is_planned_from_the_clusters_profile(c, s, a, b):
    """No split given: the planner simulates every one on the measured profile; the run
    takes the one it predicts fastest, within the dense budget."""
    await _setup(c)
    requests = _requests(24, seed=15)
    seq = max(len(r.prompt_token_ids) + r.params.max_tokens for r in requests)
    budget = 5 * _slot_bytes(seq)
    engine = await _check(c, requests, mode="hybrid", micro_batch_size=4, n_micro_batches=3,
                          dense_kv_budget=budget)
    chosen, summary = engine.last_prediction, engine.last_summary
    assert chosen is not None and chosen.config.mode == "hybrid"
    assert summary.local_micro_batches == chosen.local_micro_batches
    assert summary.kv_bytes["dense"] <= budget
    assert sum(w == "dense" for w in summary.attention_of()) == chosen.local_micro_batches


def test_a_missing_tier_names_the_command_that_starts_it():
    kw = dict(n_layers=2, kv_bytes_per_token_layer=10, max_seq_len=8, micro_batch_size=2, n_micro_batches=1)
    with pytest.raises(PlacementError, match=r"no dense workers: start one with `glinthawk worker --tier dense "):
        make_plan(mode="two-tier", dense=[], attention={"a": 1 << 20}, **kw)
    with pytest.raises(PlacementError, match=r"the cluster has 0: start them with `glinthawk worker --tier attention "):
        make_plan(mode="two-tier", dense=["d"], attention={}, **kw)
