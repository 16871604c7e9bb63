"""Fault tolerance: lost, wedged, slow and repeating workers never change or lose a row.

Fault injection subclasses the attention plugin (delayed, dropped and duplicated
messages) on in-process clusters; real worker processes are SIGKILLed under their
nannies on the embedded local cluster.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import dask.config
import psutil
import pytest
from distributed.utils_test import gen_cluster

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask.runtime import AttentionWorkerPlugin, DaskEngine, DenseWorkerPlugin, GlinthawkSchedulerPlugin
from glinthawk_dask.runtime.faults import StaleRunError, is_worker_failure

from test_two_tier import ATTN, DENSE, MODEL, _reference, _requests


class _FaultyAttention(AttentionWorkerPlugin):
    """The attention tier with a fault injected into ``glinthawk_attend``."""

    fault = "none"
    calls = 0  # class-wide: in-process workers share it

    def setup(self, worker):
        super().setup(worker)
        if self.service is None:
            return
        real = self.service.attend

        async def attend(**kw):
            cls = type(self)
            cls.calls += 1
            if cls.fault == "delay":
                await asyncio.sleep(random.random() * 0.01)
            elif cls.fault == "drop" and cls.calls == 40:
                await asyncio.sleep(3600)  # never answers: a wedged peer
            elif cls.fault == "duplicate" and cls.calls % 3 == 0:
                await real(**kw)  # the same message applied twice
            return await real(**kw)

        worker.handlers["glinthawk_attend"] = attend


def _plugin(fault):
    cls = type(f"Faulty{fault.title()}", (_FaultyAttention,), {"fault": fault, "calls": 0})
    return cls()


async def _run(c, fault, n=16, **kw):
    await c.register_plugin(GlinthawkSchedulerPlugin())
    await c.register_plugin(DenseWorkerPlugin())
    await c.register_plugin(_plugin(fault))
    requests = _requests(n, seed=5)
    engine = DaskEngine(c, MODEL, **{"micro_batch_size": 3, "n_micro_batches": 2, "max_step_tokens": 32, **kw})
    got = {}
    async for comp in engine.agenerate(requests):
        assert comp.id not in got, f"{comp.id} delivered twice"
        got[comp.id] = comp.completion_token_ids
    assert got == _reference(requests)
    return engine


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_delayed_messages_change_nothing(c, s, a, b):
    engine = await _run(c, "delay")
    assert engine.last_summary.recoveries == []


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_duplicated_messages_change_nothing(c, s, a, b):
    engine = await _run(c, "duplicate")
    assert engine.last_summary.recoveries == []


@gen_cluster(client=True, nthreads=[DENSE, ATTN, ATTN], timeout=120)
async def test_a_wedged_attention_worker_is_detected_and_its_micro_batch_moves(c, s, *workers):
    with dask.config.set({"glinthawk.engine.peer-timeout": 4.0}):
        engine = await _run(c, "drop")
    (rec,) = engine.last_summary.recoveries
    assert engine.recoveries == [rec] and rec["time"] > 0  # what the caller could watch as it ran
    assert rec["kind"] == "moved micro-batch" and "TimeoutError" in rec["cause"]
    assert rec["requests"] > 0 and rec["rebuilt_tokens"] > 0  # only its sequences, from their tokens so far
    (moved,) = [m for _, m in await c.get_events("glinthawk-kv") if m["kind"] == "grew"]  # (the KV changes say so)
    lost = moved["detail"].removeprefix(f"a micro-batch moved to {rec['to']} off ").removesuffix(
        ", which did not answer")
    assert moved["run_id"] == engine.last_summary.run_id and lost in {w.address for w in workers} - {rec["to"]}


@gen_cluster(client=True, nthreads=[DENSE, ATTN, ATTN], timeout=120)
async def test_hybrid_a_wedged_attention_worker_moves_only_remote_micro_batches(c, s, *workers):
    """Micro-batch 0 keeps its KV on the dense worker: only remote ones move."""
    with dask.config.set({"glinthawk.engine.peer-timeout": 4.0}):
        engine = await _run(c, "drop", mode="hybrid", n_micro_batches=3, local_micro_batches=1)
    (rec,) = engine.last_summary.recoveries
    assert rec["kind"] == "moved micro-batch" and rec["micro_batch"] in (1, 2)
    assert engine.last_summary.attention_of()[0] == "dense"


@gen_cluster(client=True, nthreads=[DENSE, DENSE, ATTN, ATTN, ATTN], timeout=120)
async def test_a_lost_attention_worker_of_a_later_slice(c, s, *workers):
    """Two dense slices: the micro-batch moves on whichever slice lost its attention worker."""
    with dask.config.set({"glinthawk.engine.peer-timeout": 4.0}):
        engine = await _run(c, "drop", n_slices=2)
    (rec,) = engine.last_summary.recoveries
    assert rec["kind"] == "moved micro-batch" and rec["rebuilt_tokens"] > 0
    assert len(engine.last_summary.plan["slices"]) == 2


def test_worker_failures_are_told_from_bugs():
    assert is_worker_failure(OSError("connection refused"))
    assert is_worker_failure(asyncio.TimeoutError())
    assert is_worker_failure(StaleRunError("run gh-1 is not open"))
    assert not is_worker_failure(ValueError("a bug"))
    assert not is_worker_failure(KeyError("x"))


# -- real processes, SIGKILL ------------------------------------------------------------------

ROWS = [{"id": f"k{i}", "prompt_token_ids": [(13 * i + j) % 300 + 1 for j in range(2 + 7 * (i % 5))],
         "max_tokens": 20 + 3 * (i % 4), "ignore_eos": True} for i in range(24)]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(MODEL, mode="in-process")
    return {c.id: c.completion_token_ids for c in llm.generate(ROWS, SamplingParams())}


def _pid(client, address):
    return client.run(os.getpid, workers=[address])[address]


def _driver_progress(llm, address):
    """``(n_done, n_submitted)`` of the run open on the dense worker ``address`` (its driver)."""
    metrics = llm.client.sync(lambda: llm.client.rpc(address).glinthawk_dense_metrics(limit=0))
    (stats,) = metrics["runs"].values()
    return stats["n_done"], stats["n_submitted"]


def _kill_mid_run(llm, pick_victim):
    """Generate ROWS; at the first completion streamed back, SIGKILL the worker
    ``pick_victim`` chooses from the registry, having read on the run's driver (the
    first dense worker) just before that the run still had requests to finish.
    Returns completions by id (each asserted once)."""
    got = {}
    killed = None
    told = []  # LLM.recoveries at each completion after the kill
    requests = [r for r in llm.make_requests(ROWS, SamplingParams())]
    for comp in llm.engine.generate(requests):
        assert comp.id not in got, f"{comp.id} delivered twice"
        got[comp.id] = comp.completion_token_ids
        if killed is not None:
            told.append(len(llm.recoveries))
        if killed is None:
            reg = llm.client.sync(llm.client.scheduler.glinthawk_registry)
            pid = _pid(llm.client, pick_victim(reg))
            done, submitted = _driver_progress(llm, reg["dense"][0])
            os.kill(pid, signal.SIGKILL)
            killed = pid
            assert done < len(ROWS), f"the run was over before the kill ({done} of {submitted} submitted done)"
    assert killed is not None and not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"
    assert told and told[-1] >= 1, told  # the recovery was known while rows were still arriving
    return got


@pytest.mark.parametrize("tier,mode", [("attention", "two-tier"), ("dense", "two-tier"),
                                       ("attention", "hybrid"), ("dense", "hybrid")])
def test_sigkill_a_worker_mid_run(tier, mode, reference):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with dask.config.set({"glinthawk.engine.micro-batch-size": 4}):
        llm = LLM(MODEL, mode=mode)
    if mode == "hybrid":  # micro-batch 0 local, 1 and 2 on the attention workers
        llm.engine.n_micro_batches, llm.engine.local_micro_batches = 3, 1
    try:
        victim = []
        got = _kill_mid_run(llm, lambda reg: victim.append(reg[tier][0]) or victim[0])
        assert got == reference  # every row once, tokens identical
        recoveries = llm.engine.last_summary.recoveries
        assert len(recoveries) >= 1 and all(r["requests"] > 0 for r in recoveries)
        assert llm.recoveries == recoveries and all(r["time"] > 0 for r in recoveries)
        # a lost attention worker moves its micro-batches; a lost dense worker (the driver's) restarts the run
        kind = "moved micro-batch" if tier == "attention" else "restarted run"
        assert all(r["kind"] == kind for r in recoveries), recoveries
        if tier == "dense":  # the cause names the lost worker
            assert all(f"dense worker {victim[0]}" in r["cause"] for r in recoveries), recoveries
        if mode == "hybrid":
            assert llm.engine.last_summary.attention_of()[0] == "dense"
            assert all(r["micro_batch"] != 0 for r in recoveries if tier == "attention"), recoveries
        assert llm.engine.last_summary.n_requests >= len(ROWS)
    finally:
        llm.close()
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    gone, alive = psutil.wait_procs([p for p in left if "resource_tracker" not in " ".join(p.cmdline())],
                                    timeout=30)
    assert not alive, "worker processes outlived LLM.close()"


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120)
async def test_with_no_attention_worker_left_the_run_waits_for_one(c, s, a, b):
    from distributed import Worker

    await c.register_plugin(GlinthawkSchedulerPlugin())
    await c.register_plugin(DenseWorkerPlugin())
    await c.register_plugin(AttentionWorkerPlugin())
    requests = _requests(14, seed=9)
    engine = DaskEngine(c, MODEL, micro_batch_size=3, n_micro_batches=2, max_step_tokens=32)
    got, newcomer = {}, None

    async def join_later():
        await asyncio.sleep(1.5)
        return await Worker(s.address, nthreads=1, resources={"KV": 2**28})

    with dask.config.set({"glinthawk.engine.peer-timeout": 4.0}):
        async for comp in engine.agenerate(requests):
            assert comp.id not in got
            got[comp.id] = comp.completion_token_ids
            if len(got) == 2:
                newcomer = asyncio.create_task(join_later())  # another joins a while later ...
                await b.close()  # ... after the only attention worker leaves
    assert got == _reference(requests)
    joined = await newcomer
    recs = engine.last_summary.recoveries
    assert recs and all(r["kind"] == "moved micro-batch" for r in recs)
    assert {r["to"] for r in recs} == {joined.address}  # nowhere to go until the newcomer came
    await joined.close()
