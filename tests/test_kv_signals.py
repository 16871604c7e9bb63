"""The scheduler's word that KV is wanted or freed, and those who act on it (runtime/kv_signals.py)."""

from __future__ import annotations

import asyncio
import time

import dask
import pytest
from distributed.utils_test import gen_cluster

from glinthawk_dask.runtime import DaskEngine
from glinthawk_dask.runtime.kv_signals import TOPIC, announce, event_text, listen, recent
from glinthawk_dask.runtime.retry import retry_until
from test_growth import _rows
from test_resize import _SLOT
from test_two_tier import DENSE, MODEL, _reference, _setup


@gen_cluster(client=True, nthreads=[])
async def test_a_listener_hears_the_kinds_it_listens_for_from_other_runs(c, s):
    wanted_or_freed = listen(c, ("wanted", "freed"), own="r1")
    freed = listen(c, ("freed",))
    for _ in range(50):  # (the client's subscription goes on its batched stream: heard once it is there)
        announce(s, "wanted", "r2")
        if await wanted_or_freed.wait(0.1):
            break
    else:
        raise AssertionError("no word in 5 s")
    assert not freed.take()  # (not its kind)
    announce(s, "freed", "r1")  # its own word
    assert await freed.wait(5.0) and not await wanted_or_freed.wait(0.2)
    announce(s, "freed", "r3")
    await freed.wait(5.0)
    assert wanted_or_freed.take() and not wanted_or_freed.take()  # (heard once, then forgotten)
    assert not freed.take()
    announce(s, "placed", "r4", 2**20, "two-tier, 8 slots")  # (heard by neither)
    assert not await freed.wait(0.2) and not wanted_or_freed.take()
    assert event_text(recent(s, 1)[0]).endswith(" r4 placed with 1.0 MiB of KV (two-tier, 8 slots)")
    with pytest.raises(ValueError, match="unknown KV signal"):
        announce(s, "lost", "r1")


def test_a_retry_waits_on_its_wake_and_tries_again_as_soon_as_it_returns():
    tries, waits = [], []

    async def attempt() -> str:
        tries.append(time.monotonic())
        if len(tries) < 4:
            raise KeyError("not yet")
        return "placed"

    async def wake(delay: float) -> bool:
        waits.append(delay)
        return True  # (word came at once)

    t0 = time.monotonic()
    got = asyncio.run(retry_until(attempt, deadline=time.time() + 60, retry_on=lambda e: isinstance(e, KeyError),
                                  delay=5.0, max_delay=30.0, wake=wake))
    assert got == "placed" and waits == [5.0, 10.0, 20.0] and time.monotonic() - t0 < 5.0


@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 8 * _SLOT}})], timeout=120)
async def test_the_scheduler_says_when_a_run_waits_for_kv_and_when_a_run_frees_it(c, s, a, w):
    """Each run is announced as it takes KV and gives it back; a run asking for KV
    another holds as wanting it; the waiting run, woken by the holder's end, is placed
    after it.  (Runs give nothing up here: ``grow-every`` 0.)"""
    await _setup(c)
    holder_reqs, waiter_reqs = _rows(8, "h"), _rows(4, "w")
    holder = DaskEngine(c, MODEL, micro_batch_size=8, n_micro_batches=1)
    waiter = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=1)
    holder.label, waiter.label = "pipeline h", "pipeline w"
    got_holder, got_waiter = {}, {}
    with dask.config.set({"glinthawk.engine.grow-every": 0.0}):
        held = holder.agenerate(holder_reqs, max_seq_len=64)
        first = await held.__anext__()  # placed, and holding every slot
        got_holder[first.id] = first.completion_token_ids

        async def wait_then_run() -> None:
            async for comp in waiter.agenerate(waiter_reqs, max_seq_len=64):
                got_waiter[comp.id] = comp.completion_token_ids

        waiting = asyncio.ensure_future(wait_then_run())
        while not (await c.scheduler.glinthawk_status())["waiting"]:
            await asyncio.sleep(0.05)
        async for comp in held:
            got_holder[comp.id] = comp.completion_token_ids
        await waiting
    h, w = holder.last_summary.run_id, waiter.last_summary.run_id
    events = await c.get_events(TOPIC)
    words = [(msg["kind"], msg["run_id"], msg["label"]) for _, msg in events]
    assert words == [("placed", h, "pipeline h"), ("wanted", w, "pipeline w"), ("freed", h, "pipeline h"),
                     ("placed", w, "pipeline w"), ("freed", w, "pipeline w")], words
    assert event_text({"time": 0, **events[1][1]}).endswith(f" {w} (pipeline w) waits for KV (held by {h} "
                                                            "(pipeline h))")
    assert waiter.placement_wait_s > 0
    assert got_holder == _reference(holder_reqs) and got_waiter == _reference(waiter_reqs)
