"""The two-tier engine on Dask: token-identical to the in-process engine on every topology."""

from __future__ import annotations

import bisect
import random

import pytest
from distributed.utils_test import gen_cluster

from glinthawk_dask.engine.engine import EngineConfig, InProcessEngine
from glinthawk_dask.engine.request import Request
from glinthawk_dask.model import from_name, load_slice
from glinthawk_dask.model.synthetic import SyntheticCheckpoint
from glinthawk_dask.runtime import AttentionWorkerPlugin, DaskEngine, DenseWorkerPlugin, GlinthawkSchedulerPlugin
from glinthawk_dask.runtime.compute import busy_seconds, overlap_seconds
from glinthawk_dask.sampling import SamplingParams
from helpers import count_scheduler_messages

MODEL = "random:tiny-gqa"
DENSE = ("127.0.0.1", 1, {"resources": {"GPU": 1}})
ATTN = ("127.0.0.1", 1, {"resources": {"KV": 2**28}})


def _requests(n, seed=0):
    rng = random.Random(seed)
    vocab = from_name("tiny-gqa").vocab_size
    out = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.choice([1, 3, 17, 60, 130]))]
        params = SamplingParams(max_tokens=rng.choice([1, 4, 9, 30]), ignore_eos=True)
        if i % 5 == 4:
            params = params.replace(temperature=0.8, top_p=0.9, seed=i)
        out.append(Request(f"r{i}", prompt, params))
    return out


def _reference(requests):
    weights = load_slice(SyntheticCheckpoint(from_name("tiny-gqa")))
    engine = InProcessEngine(weights, config=EngineConfig(micro_batch_size=4))
    return {c.id: c.completion_token_ids for c in engine.generate(requests)}


async def _setup(c):
    await c.register_plugin(GlinthawkSchedulerPlugin())
    await c.register_plugin(DenseWorkerPlugin())
    await c.register_plugin(AttentionWorkerPlugin())


async def _check(c, requests, **kw):
    engine = DaskEngine(c, MODEL, **kw)
    got = {}
    async for comp in engine.agenerate(requests):
        assert comp.id not in got
        got[comp.id] = comp.completion_token_ids
    assert got == _reference(requests)
    return engine


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_one_dense_one_attention(c, s, a, b):
    await _setup(c)
    engine = await _check(c, _requests(20), micro_batch_size=3, n_micro_batches=3, max_step_tokens=32)
    assert engine.last_summary.n_micro_batches == 3


@gen_cluster(client=True, nthreads=[DENSE, ATTN, ATTN, ATTN], timeout=120)
async def test_one_dense_three_attention(c, s, *workers):
    await _setup(c)
    engine = await _check(c, _requests(25, seed=1), micro_batch_size=2, n_micro_batches=6)
    plan = engine.last_summary.plan
    assert len(set(plan["attention"][0])) == 3  # micro-batches spread over all three


@gen_cluster(client=True, nthreads=[DENSE, DENSE, ATTN, ATTN], timeout=120)
async def test_two_dense_slices_two_attention(c, s, *workers):
    await _setup(c)
    engine = await _check(c, _requests(18, seed=2), micro_batch_size=3, n_micro_batches=2, n_slices=2)
    plan = engine.last_summary.plan
    assert plan["slices"] == [[0, 2], [2, 3]]
    assert plan["attention"][0] != plan["attention"][1]  # each slice has its own attention worker


@gen_cluster(client=True, nthreads=[DENSE], timeout=120)
async def test_single_tier(c, s, a):
    await _setup(c)
    await _check(c, _requests(15, seed=3), mode="single-tier", micro_batch_size=4, n_micro_batches=2)


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_induced_latency_and_auto_depth(c, s, a, b):
    await _setup(c)
    engine = await _check(c, _requests(12, seed=4), micro_batch_size=2, n_micro_batches="auto", latency=0.01)
    # 10 ms per message each way dwarfs a tiny model's dense step, even one measured on a
    # machine busy with the rest of the suite (cold x5, x4 under contention): auto picks a
    # deep pipeline
    assert engine.last_summary.n_micro_batches >= 3
    # every layer's round trip took both messages' latency, held where they arrive and
    # leave (the attention side): its request reached attention at least 10 ms after the
    # dense job that sent it started (it leaves inside that job, whose end may come after
    # the request is already held), and its output reached the next dense job at least
    # 10 ms after the attention ended
    trips = [t for ts in _round_trips(engine.last_timeline).values() for t in ts]
    out = [start - sent[1] for sent, start, _, _ in trips]
    back = [took[1] - stop for _, _, stop, took in trips]
    assert out and min(out) >= 0.01 and min(back) >= 0.01, (min(out), min(back))


def _dense_jobs(timeline: dict[str, list]) -> dict[int, list]:
    """Each micro-batch's dense jobs in the order they started (timeline events
    ``(kind, start, stop, micro_batch, layer)`` of every worker)."""
    dense: dict[int, list] = {}
    for e in sorted((e for ev in timeline.values() for e in ev if e[0] == "dense"), key=lambda e: e[1]):
        dense.setdefault(e[3], []).append(e)
    return dense


def _round_trips(timeline: dict[str, list]) -> dict[int, list[tuple]]:
    """Each micro-batch's attention round trips: ``(the dense job that sent its q/k/v,
    the attention's start, its stop, the dense job that took its output)`` (jobs as
    timeline events ``(kind, start, stop, micro_batch, layer)``)."""
    events = [e for ev in timeline.values() for e in ev]
    dense = _dense_jobs(timeline)
    trips: dict[int, list[tuple]] = {m: [] for m in dense}
    starts = {m: [j[1] for j in jobs] for m, jobs in dense.items()}
    stops = {m: [j[2] for j in jobs] for m, jobs in dense.items()}
    for kind, start, stop, mb, _ in events:
        if kind != "attention" or mb not in dense:
            continue
        jobs = dense[mb]
        i = bisect.bisect_right(stops[mb], start) - 1  # the job that sent it
        k = bisect.bisect_left(starts[mb], stop)  # the job that took its output
        if i >= 0 and k < len(jobs):
            trips[mb].append((jobs[i], start, stop, jobs[k]))
    return trips


def _dense_share_while_others_attend(timeline: dict[str, list]) -> float:
    """The share of the dense tier's busy time spent on one micro-batch while another
    micro-batch's attention was out: from the dense job that sent its q/k/v to the one
    that took the output.  0 when micro-batches take turns (or a dense job waits for
    its own attention); a pipeline that works fills those waits with the others' layers."""
    dense = _dense_jobs(timeline)
    out = {mb: [(sent[2], took[1]) for sent, _, _, took in ts] for mb, ts in _round_trips(timeline).items()}
    hidden = sum(overlap_seconds([(j[1], j[2]) for j in jobs], [w for m, ws in out.items() if m != mb for w in ws])
                 for mb, jobs in dense.items())
    return hidden / busy_seconds([(j[1], j[2]) for jobs in dense.values() for j in jobs])


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_tiers_busy_at_once(c, s, a, b):
    """Micro-batches overlap: most dense work runs while other micro-batches' attention
    is out.  (Measured on a loaded 2-core machine: 0.75-0.83 with 4 micro-batches, 0 with
    one.  The plain busy-time overlap of the two tiers cannot tell: the in-process tiers'
    threads overlap by 40-50% of the attention time with one micro-batch, where a dense
    job's tail and the attention it just sent run at once.)"""
    await _setup(c)
    engine = await _check(c, _requests(24, seed=5), micro_batch_size=4, n_micro_batches=4)
    overlap = engine.tier_overlap()
    assert overlap["dense_busy"] > 0 and overlap["attention_busy"] > 0 and overlap["overlap"] > 0
    share = _dense_share_while_others_attend(engine.last_timeline)
    assert share > 0.4, share


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_scheduler_messages_do_not_grow_with_tokens(c, s, a, b):
    await _setup(c)
    counts = count_scheduler_messages(s)

    async def scheduler_messages(max_tokens):
        counts.clear()
        reqs = [r for r in _requests(8, seed=6)]
        reqs = [Request(r.id, r.prompt_token_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                for r in reqs]
        engine = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=2)
        n = 0
        async for comp in engine.agenerate(reqs):
            n += len(comp.completion_token_ids)
        assert n == 8 * max_tokens
        return sum(v for k, v in counts.items() if k != "heartbeat_worker")

    few = await scheduler_messages(2)
    many = await scheduler_messages(60)  # 30x the tokens, each over 3 layers x 2 tiers
    assert few <= 6 and many <= few + 2, counts


@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 80_000}})], timeout=120)
async def test_kv_admission_under_a_small_budget(c, s, a, b):
    """The attention worker's KV budget fits only a few sequences: the micro-batch size
    shrinks, 10x more requests than fit wait for slots, and all complete identically."""
    await _setup(c)
    cfg = from_name("tiny-gqa")
    reqs = [Request(f"q{i}", [i % 50 + 1] * 20, SamplingParams(max_tokens=12, ignore_eos=True)) for i in range(30)]
    per_seq = cfg.kv_bytes_per_token(4) * 32  # max_seq_len = 20 + 12
    assert 80_000 // per_seq == 3
    engine = await _check(c, reqs, micro_batch_size=8, n_micro_batches=1)
    assert engine.last_summary.micro_batch_size == 3
    info = await c.rpc(b.address).glinthawk_kv_info()
    assert info["kv_allocated"] == 0 and info["kv_budget"] == 80_000


@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 10_000}})], timeout=120)
async def test_kv_budget_too_small_is_a_clear_error(c, s, a, b):
    from glinthawk_dask.errors import GlinthawkError

    await _setup(c)
    with pytest.raises(GlinthawkError, match="KV budget"):
        async for _ in DaskEngine(c, MODEL).agenerate(_requests(2)):
            pass


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_stale_attention_message_is_rejected(c, s, a, b):
    await _setup(c)

    from glinthawk_dask.runtime.messages import pack
    import torch

    t = torch.zeros(1, 6, 16)
    reply = await c.rpc(b.address).glinthawk_attend(run_id="gone", micro_batch=0, step=1, layer=0,
                                                    q=pack(t), k=pack(t[:, :2]), v=pack(t[:, :2]))
    assert "not open" in reply["stale"] and "o" not in reply  # refused, nothing applied


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_requests_stream_in_with_back_pressure(c, s, a, b):
    """With a fixed slot size the client submits requests as slots free up: never more
    than two rounds of slots ahead, same tokens."""
    await _setup(c)
    requests = _requests(40, seed=3)
    pulled = []

    def feed():
        for r in requests:
            pulled.append(r.id)
            yield r

    engine = DaskEngine(c, MODEL, micro_batch_size=2, n_micro_batches=2, max_step_tokens=32)
    got, ahead = {}, []
    async for comp in engine.agenerate(feed(), max_seq_len=200):
        ahead.append(len(pulled) - len(got))
        got[comp.id] = comp.completion_token_ids
    assert got == _reference(requests)
    assert max(ahead) <= 2 * 8 + 4, max(ahead)  # first batch (8 slots' worth) + two rounds
    assert engine.last_summary.plan["max_seq_len"] == 200


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_generated_tokens_are_counted_while_a_run_goes(c, s, a, b):
    await _setup(c)
    engine = DaskEngine(c, MODEL, micro_batch_size=2, n_micro_batches=2)
    counts = []
    reqs = _requests(6, seed=9)
    out = [x async for x in engine.agenerate(reqs, on_tick=lambda: counts.append(engine.generated_tokens))]
    assert counts and counts == sorted(counts)
    assert engine.generated_tokens == sum(len(x.completion_token_ids) for x in out)


class _DenseWithoutTheModelFile(DenseWorkerPlugin):
    """A dense worker on a host that lacks the model file the client has."""

    def setup(self, worker):
        super().setup(worker)
        if self.service is None:
            return
        from glinthawk_dask.errors import ModelLoadError

        async def slice_open(run_id, spec):
            raise ModelLoadError(f"no such file or directory: {spec['model']}; pass a .gguf file, ...")

        worker.handlers["glinthawk_slice_open"] = slice_open


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_a_model_file_only_this_machine_has_is_told_as_such(c, s, a, b):
    from glinthawk_dask.errors import GlinthawkError
    from glinthawk_dask.model.resolve import embedded_gguf_path

    await c.register_plugin(GlinthawkSchedulerPlugin())
    await c.register_plugin(_DenseWithoutTheModelFile())
    await c.register_plugin(AttentionWorkerPlugin())
    path = str(embedded_gguf_path())  # here, not on the dense worker's host
    engine = DaskEngine(c, path, micro_batch_size=2, n_micro_batches=1)
    with pytest.raises(GlinthawkError, match=f"the dense worker {a.address} does not find the model {path}, which "
                                             "is on this machine: .* on every dense worker's host"):
        [comp async for comp in engine.agenerate([Request("r", [1, 2, 3], SamplingParams(max_tokens=2))])]
    assert (await c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.plugins["glinthawk"].runs))) == 0


_SLOTS_64 = from_name("tiny-gqa").kv_bytes_per_token(4) * 64  # one KV slot of 64 positions, every layer


@gen_cluster(client=True, nthreads=[DENSE] + [("127.0.0.1", 1, {"resources": {"KV": 12 * _SLOTS_64}})] * 2,
             timeout=120)
async def test_a_run_beside_another_is_planned_and_placed_in_the_room_left(c, s, a, b1, b2):
    """A second run, auto-planned while a first holds 8 of an attention worker's 12
    slots, plans within the room the other worker has and is placed there whole (not on
    the first run's worker, shrunk under its plan); both say they shared the cluster."""
    await _setup(c)
    first_reqs = [Request(f"a{i}", [i % 50 + 1] * 20, SamplingParams(max_tokens=12, ignore_eos=True))
                  for i in range(12)]
    second_reqs = [Request(f"b{i}", [i % 40 + 3] * 16, SamplingParams(max_tokens=9, ignore_eos=True))
                   for i in range(10)]
    first = DaskEngine(c, MODEL, micro_batch_size=8, n_micro_batches=1)
    running = first.agenerate(first_reqs, max_seq_len=64)
    got = {}
    comp = await running.__anext__()  # placed, and held open while the second run goes
    got[comp.id] = comp.completion_token_ids
    second = DaskEngine(c, MODEL, micro_batch_size="auto", n_micro_batches=1)
    got2 = {x.id: x.completion_token_ids async for x in second.agenerate(second_reqs, max_seq_len=64)}
    async for comp in running:
        got[comp.id] = comp.completion_token_ids
    assert got == _reference(first_reqs) and got2 == _reference(second_reqs)
    one, two = first.last_summary, second.last_summary
    assert {*one.attention_of(), *two.attention_of()} == {b1.address, b2.address}  # one worker each
    # the plan held as placed: the second worker's 12 free slots, not the 4 the first left
    assert second.last_prediction.micro_batch_size == two.micro_batch_size == 10
    assert one.runs_beside == two.runs_beside == 1
    assert two.predicted_tokens_per_s and one.predicted_tokens_per_s is None
    assert two.predicted_for_lengths is None  # (EOS ignored: every row ran to max_tokens)


async def collect_all(completions) -> list:
    return [x async for x in completions]


@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 12 * _SLOTS_64}})], timeout=120)
async def test_a_run_waits_for_kv_other_runs_hold_and_says_whose(c, s, a, b, caplog):
    """A run that would fit the cluster alone waits while another run holds every KV
    slot, says which run holds them, and is placed once that run closes; past the
    placement timeout the error says how long it waited and what to do."""
    import asyncio

    import dask

    from glinthawk_dask.errors import GlinthawkError

    await _setup(c)
    holder = DaskEngine(c, MODEL, micro_batch_size=12, n_micro_batches=1)
    held = holder.agenerate([Request(f"h{i}", [i + 1] * 8, SamplingParams(max_tokens=4, ignore_eos=True))
                             for i in range(12)], max_seq_len=64)
    await held.__anext__()  # placed: all 12 slots of the one attention worker
    with dask.config.set({"glinthawk.engine.placement-timeout": 0.5}):
        with pytest.raises(GlinthawkError, match=r"the KV it needs is held by 1 other run: gh-\w+ of Client-\S+ with "
                                                 r"[\d.]+ GiB \(.*\): waited \d+ s for room .* rerun once they finish"):
            [x async for x in DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=1).agenerate(
                [Request("x", [3] * 8, SamplingParams(max_tokens=2))], max_seq_len=64)]
    waiter = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=1)
    reqs = [Request(f"w{i}", [i + 2] * 10, SamplingParams(max_tokens=5, ignore_eos=True)) for i in range(4)]

    async def collect():
        return {x.id: x.completion_token_ids async for x in waiter.agenerate(reqs, max_seq_len=64)}

    task = asyncio.ensure_future(collect())
    await asyncio.sleep(1.0)
    assert not task.done()  # waiting for the holder's slots
    assert any("waits to be placed" in r.getMessage() and "held by 1 other run" in r.getMessage()
               for r in caplog.records)
    from glinthawk_dask.cli.cluster import status_text

    status = await c.scheduler.glinthawk_status()  # what a colleague's `glinthawk status` shows
    [waiting] = status["waiting"]
    assert [w["run_id"] for w in s.plugins["glinthawk"].metrics.waiting()] == [waiting["run_id"]]  # the page's
    assert waiting["client"] == c.id and waiting["model"] == MODEL and waiting["waited_s"] >= 0.5
    assert f"runs waiting for KV the open runs hold: 1\n  {waiting['run_id']} by client {c.id}: " in \
        status_text(status)
    # a run told to stop while it waits (a cancelled pipeline) ends with nothing, and is no longer listed
    quitter, stop = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=1), asyncio.Event()
    quitting = asyncio.ensure_future(collect_all(quitter.agenerate(reqs, max_seq_len=64, stop=stop.is_set)))
    await asyncio.sleep(0.6)
    assert not quitting.done() and len((await c.scheduler.glinthawk_status())["waiting"]) == 2
    stop.set()
    assert await asyncio.wait_for(quitting, 10.0) == []
    assert [w["run_id"] for w in (await c.scheduler.glinthawk_status())["waiting"]] == [waiting["run_id"]]
    assert any("stopped while it waited to be placed" in r.getMessage() for r in caplog.records)
    [x async for x in held]  # the holder finishes and frees its slots
    assert await task == _reference(reqs)
    assert not (await c.scheduler.glinthawk_status())["waiting"]  # placed: no longer waiting
    assert waiter.placement_wait_s >= 1.0 and holder.placement_wait_s == 0.0


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_an_auto_plan_expects_rows_to_stop_as_earlier_rows_did(c, s, a, b):
    """Completion lengths seen before (a resumed output's) are what the plan simulates,
    each within its request's max_tokens; the summary counts them."""
    await _setup(c)
    reqs = [Request(f"r{i}", [i + 1] * 6, SamplingParams(max_tokens=12, ignore_eos=True)) for i in range(8)]
    engine = DaskEngine(c, MODEL, micro_batch_size="auto", n_micro_batches=1)
    got = {x.id: x.completion_token_ids async for x in engine.agenerate(reqs, max_seq_len=32,
                                                                        output_lengths=[3, 30, 5, 7])}
    assert got == _reference(reqs)
    # the sample (all 8) spread over the 4 lengths in order, each within max_tokens 12
    assert engine.last_prediction.generated_tokens == 2 * (3 + 12 + 5 + 7)
    summary = engine.last_summary
    assert summary.planned_on_rows == 4
    # every row ran its 12 tokens, not the 54 expected: the plan is predicted again on them
    assert summary.predicted_for_lengths and summary.predicted_for_lengths != summary.predicted_tokens_per_s
