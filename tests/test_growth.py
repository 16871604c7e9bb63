"""A two-tier run placed beside other runs grows into the KV they free (runtime/growth.py)."""

from __future__ import annotations

import dataclasses

import dask
from distributed.utils_test import gen_cluster

from glinthawk_dask.cli.cluster import status_text
from glinthawk_dask.engine.request import Request
from glinthawk_dask.engine.scheduler import BatchScheduler
from glinthawk_dask.model import from_name
from glinthawk_dask.runtime import DaskEngine
from glinthawk_dask.runtime.messages import Plan
from glinthawk_dask.sampling import SamplingParams
from test_two_tier import DENSE, MODEL, _reference, _setup

_LAYER_SLOT = from_name("tiny-gqa").kv_bytes_per_token(4, 1) * 64  # one KV slot of 64 positions, one layer
FAST = {"glinthawk.engine.grow-every": 0.05, "glinthawk.engine.grow-gain": 1.25}


def _rows(n: int, prefix: str) -> list[Request]:
    out = []
    for i in range(n):
        params = SamplingParams(max_tokens=6 + i % 7, ignore_eos=True)
        if i % 4 == 3:
            params = params.replace(temperature=0.8, top_p=0.9, seed=i)
        out.append(Request(f"{prefix}{i}", [i % 50 + 1] * (8 + i % 5), params))
    return out


def test_a_retired_micro_batch_admits_nothing_and_drains():
    sched = BatchScheduler(n_micro_batches=1, micro_batch_size=1, max_step_tokens=16, max_seq_len=32)
    for r in _rows(3, "r"):
        sched.add(r)
    step = sched.schedule(0)
    assert [s.id for s in step.admitted] == ["r0"]
    assert sched.add_micro_batches([2]) == [1] and sched.bases == [0, 1] and sched.n_slots == 3
    sched.retire(0)
    assert not sched.drained(0)  # r0 runs to its end
    assert sorted(s.slot for s in sched.schedule(1).admitted) == [1, 2]
    while 0 in [s.micro_batch for s in step.seqs]:
        sched.update(step, [5] * len(step.sample_seqs))
        step = sched.schedule(0) or step
        if sched.drained(0):
            break
    assert sched.drained(0) and sched.schedule(0) is None and not sched.drained(1)


def test_a_grown_plan_appends_micro_batches_and_retires_its_own():
    old = Plan(mode="two-tier", slices=[[0, 2], [2, 3]], dense=["d0", "d1"], attention=[["a", "a"], ["b", "b"]],
               slot_base=[[0, 1], [0, 1]], n_slots=[{"a": 2}, {"b": 2}], micro_batch_size=1, n_micro_batches=2,
               max_seq_len=64, local=[False, False], sizes=[1, 1], kv_bytes_per_token_layer=8)
    new = Plan(mode="two-tier", slices=[[0, 2], [2, 3]], dense=["d0", "d1"], attention=[["b", "b"], ["a", "a"]],
               slot_base=[[0, 2], [0, 2]], n_slots=[{"b": 4}, {"a": 4}], micro_batch_size=2, n_micro_batches=2,
               max_seq_len=64, local=[False, False], sizes=[2, 2], kv_bytes_per_token_layer=8)
    grown = Plan.from_wire(old.grown(new, ["r/g1s0", "r/g1s1"]).to_wire())
    assert grown.sizes == [1, 1, 2, 2] and grown.live_sizes() == [2, 2] and grown.retired == [0, 1]
    assert grown.attention == [["a", "a", "b", "b"], ["b", "b", "a", "a"]]
    assert grown.kv_runs == [["", "", "r/g1s0", "r/g1s0"], ["", "", "r/g1s1", "r/g1s1"]]
    assert grown.n_slots == [{"a": 2, "b": 4}, {"b": 2, "a": 4}] and grown.n_micro_batches == 4
    assert grown.attention_kv() == new.attention_kv() == {"b": 4 * 2 * 8 * 64, "a": 4 * 1 * 8 * 64}  # live ones


async def _run_beside_other(c, reqs: list[Request], gain: float = 1.25, **kw):
    """Run ``reqs`` (tokens checked) while the placement "gh-other" holds KV, closing it
    once the first completion is in; the run's summary."""
    with dask.config.set({**FAST, "glinthawk.engine.grow-gain": gain}):
        engine = DaskEngine(c, MODEL, **kw)
        got = {}
        async for comp in engine.agenerate(reqs, max_seq_len=64):
            got[comp.id] = comp.completion_token_ids
            if len(got) == 1:
                await c.scheduler.glinthawk_run_closed(run_id="gh-other")
    assert got == _reference(reqs)
    return engine.last_summary


async def one_then_another(first, first_reqs, second, second_reqs, settings: dict, on_second=None) -> None:
    """Run ``first``'s requests and, once it has a completion (placed, and generating),
    ``second``'s beside it (``await on_second()`` after the second's first completion),
    under the dask config ``settings``; both runs' tokens are the in-process engine's."""
    import asyncio

    got_first, got_second = {}, {}

    async def consume(engine, reqs, got, then=None):
        async for comp in engine.agenerate(reqs, max_seq_len=64):
            got[comp.id] = comp.completion_token_ids
            if then is not None and len(got) == 1:
                await then()

    with dask.config.set(settings):
        running = asyncio.ensure_future(consume(first, first_reqs, got_first))
        while not got_first:
            await asyncio.sleep(0.01)
        await consume(second, second_reqs, got_second, on_second)
        await running
    assert got_first == _reference(first_reqs) and got_second == _reference(second_reqs)


async def _scheduler_kv(c) -> dict:
    """Every open run's reserved attention KV, by run."""
    return await c.run_on_scheduler(lambda dask_scheduler: {
        run_id: dict(r["kv"]) for run_id, r in dask_scheduler.plugins["glinthawk"].runs.items()})


async def _caches(worker) -> dict:
    return {k: r.cache.n_slots for k, r in worker.plugins["glinthawk-attention"].service.runs.items()}


@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 12 * 3 * _LAYER_SLOT}})],
             timeout=120)
async def test_a_shrunk_run_grows_to_the_plan_it_asked_once_another_run_ends(c, s, a, b):
    """A run asking 4 x 2 beside one holding 8 of 12 slots is placed as 2 x 2; once that run
    ends it grows to 4 x 2: its first micro-batches take nothing more, drain, and their
    cache closes with its KV given back; every token is the in-process engine's."""
    await _setup(c)
    holder_reqs, reqs = _rows(12, "h"), _rows(40, "r")
    with dask.config.set(FAST):
        holder = DaskEngine(c, MODEL, micro_batch_size=8, n_micro_batches=1)
        held = holder.agenerate(holder_reqs, max_seq_len=64)
        got_held = {}
        first = await held.__anext__()  # placed: 8 slots, held open
        got_held[first.id] = first.completion_token_ids
        engine = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=2)
        got, during = {}, None
        async for comp in engine.agenerate(reqs, max_seq_len=64):
            got[comp.id] = comp.completion_token_ids
            if len(got) == 1:
                assert [sum(kv.values()) for kv in (await _scheduler_kv(c)).values()] == [
                    8 * 3 * _LAYER_SLOT, 4 * 3 * _LAYER_SLOT]
                async for x in held:  # the holder finishes and closes
                    got_held[x.id] = x.completion_token_ids
            if len(got) == len(reqs):  # (the run is still open here)
                during = (await _scheduler_kv(c), await _caches(b), await c.scheduler.glinthawk_status())
    assert got == _reference(reqs) and got_held == _reference(holder_reqs)
    summary = engine.last_summary
    assert (summary.micro_batch_size, summary.n_micro_batches) == (4, 2)
    grew = [g for g in summary.growths if g["kind"] == "grew"]
    assert [(g["from"], g["to"]) for g in grew] == [("2 x 2", "4 x 2")]
    retired = sorted((g for g in summary.growths if g["kind"] == "retired micro-batch"),
                     key=lambda g: g["micro_batch"])
    assert [g["micro_batch"] for g in retired] == [0, 1]
    assert sum(g["swapped_out"] for g in retired) >= 1  # (their sequences went on in the new ones)
    closed = [x for g in retired for x in g["closed"]]  # the shared cache closes with the last of them
    assert [(x["address"], x["cache"], x["slots"]) for x in closed] == [(b.address, summary.run_id, 4)]
    kv, caches, status = during
    assert kv == {summary.run_id: {b.address: 8 * 3 * _LAYER_SLOT}}  # the old 4 slots given back
    assert caches == {f"{summary.run_id}/g1s0": 8}
    line = next(x for x in status_text(status).splitlines() if summary.run_id in x)  # `glinthawk status`
    assert "two-tier, random:tiny-gqa, 4+4 slots in 2 micro-batches" in line and "; grew into freed KV once" in line
    assert holder.last_summary.growths == []  # (placed whole: nothing to grow into)
    assert await _scheduler_kv(c) == {} and await _caches(b) == {}


@gen_cluster(client=True, nthreads=[DENSE, DENSE] + [("127.0.0.1", 1, {"resources": {"KV": 12 * _LAYER_SLOT}})] * 2,
             timeout=120)
async def test_a_run_of_two_slices_grows_onto_other_attention_workers(c, s, d0, d1, w1, w2):
    """Two slices: the new micro-batches' caches may sit on other workers than the old
    ones' (here each slice's moves to the other worker); each slice closes its own."""
    await _setup(c)
    reqs = _rows(40, "r")
    bpt = from_name("tiny-gqa").kv_bytes_per_token(4, 1)
    place = dict(mode="two-tier", n_layers=3, kv_bytes_per_token_layer=bpt, max_seq_len=64, n_slices=2)
    reply = await c.scheduler.glinthawk_plan(run_id="gh-other", micro_batch_size=5, n_micro_batches=1, **place)
    (x,), (y,) = reply["plan"]["attention"]  # 10 and 5 of their 12 slot-layers taken
    summary = await _run_beside_other(c, reqs, micro_batch_size=2, n_micro_batches=2, n_slices=2)
    assert [(g["from"], g["to"]) for g in summary.growths if g["kind"] == "grew"] == [("1 x 2", "2 x 2")]
    plan = summary.placement
    assert plan.attention[0] == [y] * 2 + [x] * 2  # slice 0 (two layers) first on the roomier worker
    assert plan.attention[1] == [x] * 2 + [y] * 2
    closed = sorted((cache["address"], cache["cache"], cache["slots"]) for g in summary.growths
                    if g["kind"] == "retired micro-batch" for cache in g["closed"])
    assert closed == sorted([(x, summary.run_id, 2), (y, summary.run_id, 2)])
    assert await _scheduler_kv(c) == {} and await _caches(w1) == {} and await _caches(w2) == {}


@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 12 * 3 * _LAYER_SLOT}})],
             timeout=180)
async def test_an_auto_plan_grows_when_the_planner_finds_a_faster_plan_in_the_freed_kv(c, s, a, b):
    """An auto plan made beside a run holding most of the KV grows once that run ends:
    its one micro-batch takes more slots in place, which the planner predicts faster by at
    least grow-gain."""
    await _setup(c)
    bpt = from_name("tiny-gqa").kv_bytes_per_token(4, 1)
    place = dict(mode="two-tier", n_layers=3, kv_bytes_per_token_layer=bpt, max_seq_len=64)
    await c.scheduler.glinthawk_plan(run_id="gh-other", micro_batch_size=10, n_micro_batches=1, **place)
    reqs = _rows(60, "r")
    summary = await _run_beside_other(c, reqs, micro_batch_size="auto", n_micro_batches="auto")
    (grew,) = [g for g in summary.growths if g["kind"] == "grew"]
    plan = summary.placement
    assert grew["in_place"] and plan.retired == [] and plan.n_micro_batches == 1  # its one micro-batch took more
    assert grew["from"] == "2 x 1" and f"{plan.sizes[0]} x 1" == grew["to"]  # (of the 2 slots free, and 10 more)
    assert grew["predicted"] >= 1.25 * grew["predicted_before"]
    assert summary.predicted_tokens_per_s == grew["predicted"]
    assert sum(plan.live_sizes()) > 2
    assert await _scheduler_kv(c) == {}


@gen_cluster(client=True, nthreads=[DENSE] + [("127.0.0.1", 1, {"resources": {"KV": 12 * 3 * _LAYER_SLOT}})] * 2,
             timeout=120)
async def test_a_grown_micro_batch_whose_worker_is_lost_moves_as_any_other(c, s, a, w1, w2):
    """The attention worker of a run's micro-batch grown in place leaves mid-run: the
    micro-batch moves to the other worker, at its new size, and every token is still the
    in-process engine's."""
    await _setup(c)
    bpt = from_name("tiny-gqa").kv_bytes_per_token(4, 1)
    place = dict(mode="two-tier", n_layers=3, kv_bytes_per_token_layer=bpt, max_seq_len=64)
    await c.scheduler.glinthawk_plan(run_id="gh-other", micro_batch_size=10, n_micro_batches=2, **place)
    reqs, workers = _rows(60, "r"), {w.address: w for w in (w1, w2)}

    def plans(dask_scheduler):
        return {k: {**r["plan"], "id": k} for k, r in dask_scheduler.plugins["glinthawk"].runs.items()
                if k != "gh-other"}

    closed = None
    with dask.config.set({**FAST, "glinthawk.engine.peer-timeout": 4.0}):
        engine = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=1)
        got = {}
        async for comp in engine.agenerate(reqs, max_seq_len=64):
            got[comp.id] = comp.completion_token_ids
            if len(got) == 1:
                await c.scheduler.glinthawk_run_closed(run_id="gh-other")
            (plan,) = (await c.run_on_scheduler(plans)).values()
            where = plan["attention"][0][-1]  # the micro-batch's worker
            if closed is None and len(got) < 40 and (await _caches(workers[where])).get(plan["id"]) == 4:
                closed = where  # (once its cache grew)
                await workers[closed].close()
    assert got == _reference(reqs) and closed is not None
    summary = engine.last_summary
    grew = [g for g in summary.growths if g["kind"] == "grew"]
    assert [(g["from"], g["to"], g["in_place"]) for g in grew] == [("2 x 1", "4 x 1", True)]
    (moved,) = summary.recoveries
    assert moved["kind"] == "moved micro-batch" and moved["micro_batch"] == 0 and moved["to"] != closed
    assert summary.attention_of() == [moved["to"]] and summary.placement.kv_runs == [[moved["kv_run"]]]
    assert await _scheduler_kv(c) == {}


@gen_cluster(client=True, nthreads=[DENSE] + [("127.0.0.1", 1, {"resources": {"KV": 8 * 3 * _LAYER_SLOT}})] * 2,
             timeout=120)
async def test_a_run_grows_by_micro_batches_beside_its_own(c, s, a, w1, w2):
    """Micro-batches of 8 with auto depth, 5 ms from the attention tier, placed one deep
    on the worker left free: once the other worker frees, the run keeps its micro-batch
    and adds one there (a second micro-batch overlaps the round trips; the freed KV alone
    holds no faster plan than the run's own)."""
    await _setup(c)
    bpt = from_name("tiny-gqa").kv_bytes_per_token(4, 1)
    place = dict(mode="two-tier", n_layers=3, kv_bytes_per_token_layer=bpt, max_seq_len=64)
    reply = await c.scheduler.glinthawk_plan(run_id="gh-other", micro_batch_size=8, n_micro_batches=1, **place)
    ((held,),), reqs = reply["plan"]["attention"], _rows(40, "r")
    summary = await _run_beside_other(c, reqs, micro_batch_size=8, n_micro_batches="auto", latency=0.005)
    (grew,) = [g for g in summary.growths if g["kind"] == "grew"]
    assert (grew["from"], grew["to"], grew["kept"]) == ("8 x 1", "8 x 2", True)
    assert grew["predicted"] >= 1.25 * grew["predicted_before"]
    assert not [g for g in summary.growths if g["kind"] == "retired micro-batch"]
    assert summary.placement.retired == [] and summary.placement.attention[0][1] == held
    assert await _scheduler_kv(c) == {}


@gen_cluster(client=True, nthreads=[DENSE] + [("127.0.0.1", 1, {"resources": {"KV": 8 * 3 * _LAYER_SLOT}})] * 2,
             timeout=120)
async def test_a_run_gives_a_micro_batch_up_to_a_waiting_run_and_grows_back_after_it(c, s, a, w1, w2):
    """A run holding every KV slot (8 x 2 on two workers of 8) gives its second
    micro-batch up once another run waits: its sequences go on in the first (their K/V
    taken out and put back) and its cache closes, the waiting run is placed there, and
    once that run ends the first grows back beside its own."""
    await _setup(c)
    # (lengths that differ: a micro-batch's eight rows never all end in the step it is given up in)
    first_reqs = [Request(f"a{i}", [i % 50 + 1] * 10, SamplingParams(max_tokens=33 + i % 8, ignore_eos=True))
                  for i in range(160)]
    second_reqs = _rows(40, "b")
    first = DaskEngine(c, MODEL, micro_batch_size=8, n_micro_batches=2)
    second = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=1)
    await one_then_another(first, first_reqs, second, second_reqs, FAST)
    one, two = first.last_summary, second.last_summary
    assert second.placement_wait_s > 0 and two.growths == []
    kinds = [(g["kind"], g.get("from"), g.get("to")) for g in one.growths]
    assert kinds[0] == ("yielded", "8 x 2", "8 x 1") and ("grew", "8 x 1", "8 x 2") in kinds, kinds
    (yielded,) = [g for g in one.growths if g["kind"] == "yielded"]
    (closed,) = [g for g in one.growths if g["kind"] == "retired micro-batch"]
    assert closed["micro_batch"] == yielded["micro_batches"][0] == 1 and closed["closed"][0]["slots"] == 8
    # its sequences went on in micro-batch 0, K/V copied (those that ended in the step it was given up in aside)
    assert 1 <= closed["swapped_out"] <= 8
    assert closed["time"] - yielded["time"] < 2.0
    assert two.attention_of() == [closed["closed"][0]["address"]]  # placed in the KV it gave up
    grew = next(g for g in one.growths if g["kind"] == "grew")
    assert grew["kept"] and grew["time"] > closed["time"]
    assert await _scheduler_kv(c) == {}


def test_a_run_gives_up_its_last_cache_whole_and_keeps_one():
    """What a run may give up: its last live micro-batch with those in the same cache on
    every slice, never its last cache, nor micro-batches whose caches others share."""
    from glinthawk_dask.runtime.growth import _yieldable
    from glinthawk_dask.runtime.placement import make_plan

    def plan(depth, workers=2, slices=1):
        return make_plan(mode="two-tier", dense=[f"d{s}" for s in range(slices)],
                         attention={f"a{w}": 10**9 for w in range(workers)}, n_layers=4, kv_bytes_per_token_layer=8,
                         max_seq_len=64, micro_batch_size=4, n_micro_batches=depth, n_slices=slices)

    assert _yieldable(plan(2)) == [1]  # one micro-batch on each worker
    assert _yieldable(plan(4)) == [1, 3]  # two on each: the last one's worker, both
    assert _yieldable(plan(1)) == [] and _yieldable(plan(3, workers=1)) == []  # (one cache: kept)
    assert _yieldable(plan(4, workers=4, slices=2)) == [1, 3]  # each slice's workers hold 1 and 3 together
    retired = dataclasses.replace(plan(4), retired=[1, 3])
    assert _yieldable(retired) == []  # (what is left is one cache)
    grown = plan(2).grown(plan(2), ["r/g1s0"], keep=True)  # two more micro-batches, in new caches
    assert _yieldable(grown) == [3]
