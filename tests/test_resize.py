"""A micro-batch resized in place: its slots, its caches and its KV reservation."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from glinthawk_dask.engine.request import Request
from glinthawk_dask.engine.scheduler import BatchScheduler
from glinthawk_dask.runtime.messages import Plan
from glinthawk_dask.sampling import SamplingParams


def _req(i: int, max_tokens: int = 5) -> Request:
    return Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_a_capped_micro_batch_shrinks_moving_its_sequences_into_the_slots_it_keeps():
    sched = BatchScheduler(n_micro_batches=1, micro_batch_size=6, max_step_tokens=64, max_seq_len=32)
    for i in range(8):
        sched.add(_req(i, max_tokens=3 + i))
    step = sched.schedule(0)
    assert sorted(step.slots) == [0, 1, 2, 3, 4, 5]
    sched.cap(0, 3)
    assert not sched.may_resize(0, 3)  # (six run)
    while len(sched.running[0]) > 3:  # those that end are not replaced: fewer than 3 run... until 3 are left
        step = sched.schedule(0)
        assert not step.admitted
        sched.update(step, [7] * len(step.sample_seqs))
    assert sched.may_resize(0, 3)
    before = {s.id: s.slot for s in sched.running[0].values()}
    moves = sched.resize(0, 3)
    after = {s.id: s.slot for s in sched.running[0].values()}
    assert sorted(after.values()) == [0, 1, 2] and set(after) == set(before)
    assert moves == [(i, after[i]) for i in sorted(before, key=before.get) if before[i] >= 3]
    assert sched.sizes == [3] and sched.micro_batch_size == 3 and not sched.caps
    while sched.has_work():  # the rest run in the three slots
        step = sched.schedule(0)
        assert max(step.slots) < 3
        sched.update(step, [7] * len(step.sample_seqs))


def test_sequences_taken_out_go_back_into_the_first_free_slots_before_new_requests():
    sched = BatchScheduler(n_micro_batches=2, micro_batch_size=3, max_step_tokens=64, max_seq_len=32)
    for i in range(8):
        sched.add(_req(i, max_tokens=4 if i == 0 else 9))
    steps = [sched.schedule(mb) for mb in (0, 1)]
    for step in steps:
        sched.update(step, [7] * len(step.sample_seqs))
    out = sched.swap_out(0, 2)
    assert [s.id for s in out] == ["r1", "r2"] and list(sched.running[0]) == [0] and not sched.swapped
    sched.set_aside(out)  # (once their KV is out)
    assert sched.has_work()
    assert sched.n_tokens_in_flight() == 6 * 4  # (those taken out too: 3 prompt tokens and 1 sampled each)
    step = sched.schedule(0)  # the two slots freed take them back, not the queue's r6, r7
    assert [s.id for s in step.restored] == ["r1", "r2"] and not step.admitted and sorted(step.slots) == [0, 1, 2]
    assert step.counts == [1, 1, 1] and [s.n_cached for s in step.restored] == [3, 3]  # (decoding on)
    sched.update(step, [7] * 3)
    sched.set_aside(sched.swap_out(0, 1))
    sched.cap(0, 2)
    for _ in range(20):  # micro-batch 1's slots free first: r2 goes back there
        step = sched.schedule(1)
        if step.restored:
            break
        sched.update(step, [7] * len(step.sample_seqs))
    assert [(s.id, s.micro_batch) for s in step.restored] == [("r2", 1)]
    assert [s.id for s in step.admitted] == ["r6", "r7"]  # (after it)


def test_only_the_last_micro_batch_grows_past_its_slots_and_new_ones_never_reuse_a_number():
    sched = BatchScheduler(n_micro_batches=2, micro_batch_size=4, max_step_tokens=16, max_seq_len=32)
    assert not sched.may_resize(0, 6) and sched.may_resize(1, 6)  # slots 4..9: numbers no one had
    assert sched.resize(1, 6) == [] and sched.sizes == [4, 6] and sched.max_step_tokens == 16
    assert sched.resize(1, 2) == [] and sched.add_micro_batches([3]) == [2]
    assert sched.bases == [0, 4, 10]  # (after 4..9, which micro-batch 1 held)
    assert not sched.may_resize(1, 4)  # (11..13 are micro-batch 2's)
    for i in range(12):
        sched.add(_req(i))
    slots = {mb: sorted(sched.schedule(mb).slots) for mb in range(3)}
    assert slots == {0: [0, 1, 2, 3], 1: [4, 5], 2: [10, 11, 12]}
    with pytest.raises(ValueError):
        sched.resize(0, 2)  # (four run)


def test_a_resized_plan_holds_the_new_slots_on_each_slices_worker():
    plan = Plan(mode="two-tier", slices=[[0, 2], [2, 3]], dense=["d0", "d1"], attention=[["a"], ["b"]],
                slot_base=[[0], [0]], n_slots=[{"a": 8}, {"b": 8}], micro_batch_size=8, n_micro_batches=1,
                max_seq_len=64, local=[False], sizes=[8], kv_bytes_per_token_layer=8)
    small = Plan.from_wire(plan.resized(0, 3).to_wire())
    assert small.sizes == [3] and small.micro_batch_size == 3 and small.n_slots == [{"a": 3}, {"b": 3}]
    assert small.attention_kv() == {"a": 3 * 2 * 8 * 64, "b": 3 * 1 * 8 * 64}
    assert small.resized(0, 12).attention_kv() == {"a": 12 * 2 * 8 * 64, "b": 12 * 1 * 8 * 64}
    moved = Plan.from_wire(small.moved(1, 0, "c", "r/mb0-1").to_wire())  # (slice 1's worker lost)
    assert moved.attention == [["a"], ["c"]] and moved.kv_runs == [[""], ["r/mb0-1"]] and moved.slot_base == [[0], [0]]
    assert moved.n_slots == [{"a": 3}, {"c": 3}] and moved.resized(0, 5).attention_kv() == {
        "a": 5 * 2 * 8 * 64, "c": 5 * 1 * 8 * 64}


class _Slices:
    """The first slice of a run as its driver sees it, with a fake cache per micro-batch
    (slot -> [sequence, tokens cached]) that every step, take-out and put-back is checked
    against; a sequence's next token is a function of its id and position alone."""

    def __init__(self, sizes: list[int], take_out_s: float, host_room: int = 2**40) -> None:
        from glinthawk_dask.runtime.messages import SliceSpec

        self.spec = SliceSpec(run_id="r", model="m", start=0, stop=1, micro_batch_size=max(sizes),
                              n_micro_batches=len(sizes), max_seq_len=64, sizes=list(sizes),
                              local=[False] * len(sizes), engine={"max_step_tokens": 64})
        self.kv_bytes_per_token, self.take_out_s, self.room = 10, take_out_s, host_room
        self.cache: list[dict[int, list]] = [{} for _ in sizes]
        self.kept: dict[str, int] = {}  # tokens cached of each sequence taken out

    def host_room(self) -> int:  # (the dense worker's memory, as SliceRun.host_room gives it)
        return self.room

    def _release(self, mb: int, released: list[str]) -> None:
        for slot in [k for k, (seq, _) in self.cache[mb].items() if seq in released]:
            del self.cache[mb][slot]

    async def run_step(self, msg) -> list[int]:
        cache = self.cache[msg.mb]
        self._release(msg.mb, msg.released)
        for seq, slot, _ in msg.admitted:
            assert slot not in cache, (seq, slot, cache)
            cache[slot] = [seq, 0]
        ends = {}
        for slot, start, count in zip(msg.slots, msg.starts, msg.counts):
            assert cache[slot][1] == start, (slot, start, cache[slot])
            cache[slot][1] += count
            ends[cache[slot][0]] = cache[slot][1]
        await asyncio.sleep(0.001)
        return [_token(seq, ends[seq]) for seq in msg.sample]

    async def swap_everywhere(self, mb, out=None, released=None, back=None) -> None:
        self._release(mb, released or [])
        cache = self.cache[mb]
        if out is not None:
            await asyncio.sleep(self.take_out_s)  # (other micro-batches step meanwhile)
            for slot in [k for k, (seq, _) in cache.items() if seq in out]:
                seq, n = cache.pop(slot)
                self.kept[seq] = n
            return
        for seq, slot in back:
            assert seq in self.kept and slot not in cache, (seq, slot)  # (its K/V out first, the slot free)
            cache[slot] = [seq, self.kept.pop(seq)]

    async def retire_everywhere(self, mb: int, released: list[str]) -> list[dict]:
        self._release(mb, released)
        assert not self.cache[mb]
        return []


def _token(seq: str, position: int) -> int:
    return (sum(map(ord, seq)) * 31 + position) % 97


@pytest.mark.parametrize("host_room, taken_out", [(2**40, 4), (0, 0)])
def test_a_micro_batch_given_up_hands_its_sequences_to_the_others_with_their_kv(host_room, taken_out):
    """The driver takes a retired micro-batch's sequences out of its cache while another
    micro-batch goes on stepping, and that one takes them back only once their K/V is out;
    every sequence's tokens are those it would have had, and the emptied one closes.  With
    no room in the dense worker's memory, they run to their end where they are."""
    from glinthawk_dask.runtime.driver import RunDriver
    from glinthawk_dask.runtime.messages import Results

    async def main() -> dict:
        slices = _Slices([4, 4], take_out_s=0.05, host_room=host_room)
        driver = RunDriver(slices, None)
        lengths = [2, 3, 3, 3, 12, 12, 12, 12] + [5] * 8
        driver.submit([{"id": f"q{i}", "prompt_token_ids": [1, 2, 3],
                        "params": {"max_tokens": n, "ignore_eos": True}} for i, n in enumerate(lengths)])
        got, retired = {}, []
        while len(got) < len(lengths):
            results = await driver.take_results(1.0)
            assert results.error is None, results.error
            for c in results.completions:
                got[c["id"]] = c["completion_token_ids"]
            retired += results.retired
            if len(got) >= 1 and not driver.sched.retired:
                driver.retire([1])  # (its four run on, in micro-batch 0's slots as they free)
        await driver.close()
        assert isinstance(results, Results) and [r["micro_batch"] for r in retired] == [1]
        assert retired[0]["swapped_out"] == taken_out and not slices.kept
        return got

    got = asyncio.run(main())
    lengths = [2, 3, 3, 3, 12, 12, 12, 12] + [5] * 8
    assert got == {f"q{i}": [_token(f"q{i}", 3 + k) for k in range(n)] for i, n in enumerate(lengths)}


# -- on a cluster --------------------------------------------------------------------------

from distributed.utils_test import gen_cluster  # noqa: E402

from glinthawk_dask.cli.cluster import status_text  # noqa: E402
from glinthawk_dask.model import from_name  # noqa: E402
from glinthawk_dask.runtime import DaskEngine  # noqa: E402
from test_growth import FAST, _caches, _rows, _scheduler_kv, one_then_another  # noqa: E402
from test_two_tier import DENSE, MODEL, _setup  # noqa: E402

_SLOT = from_name("tiny-gqa").kv_bytes_per_token(4, 1) * 64 * 3  # one KV slot of 64 positions, every layer


@pytest.mark.parametrize("swap_bytes, grow_every, memory", [(2**30, 0.05, 0.7), (0, 0.05, 0.7), (2**30, 600.0, 0.7),
                                                             (2**30, 0.05, 0.0)])
@gen_cluster(client=True, nthreads=[DENSE, ("127.0.0.1", 1, {"resources": {"KV": 8 * _SLOT}})], timeout=120)
async def test_a_run_of_one_micro_batch_shrinks_for_a_waiting_run_and_grows_back_in_place(c, s, a, w, swap_bytes,
                                                                                          grow_every, memory):
    """A run of one micro-batch holding every KV slot (8 x 1 on a worker of 8) shrinks to
    its share once another run waits: four of its sequences are taken out of its cache
    (their K/V kept on the dense worker) and go back as slots free; with no room for that
    (``swap-bytes`` 0, or no memory for it on the dense worker: ``swap-memory-fraction``
    0) it admits no more until four are left, and those move into four slots.  Either way the cache copies them into a cache of four and gives the rest
    back, the waiting run is placed there, and once it ends the first grows back to eight
    in place.  Every token of both is the in-process engine's.  The runs act on the
    scheduler's word, not on their clocks: with ``grow-every`` 600 s the first shrinks as
    soon as the second waits and grows back as soon as it ends."""
    from glinthawk_dask.engine.request import Request
    from glinthawk_dask.sampling import SamplingParams

    await _setup(c)
    # a0 ends at once (the second run starts then), a4-a7 last: with nothing taken out they move into slots 0-3
    lengths = [2, 30, 30, 30, 50, 50, 50, 50] + [20] * 56
    first_reqs = [Request(f"a{i}", [i % 50 + 1] * 10, SamplingParams(max_tokens=n, ignore_eos=True))
                  for i, n in enumerate(lengths)]
    second_reqs = _rows(12, "b")
    first = DaskEngine(c, MODEL, micro_batch_size=8, n_micro_batches=1)
    second = DaskEngine(c, MODEL, micro_batch_size=4, n_micro_batches=1)
    seen = {}

    async def both_open() -> None:  # what the cluster shows
        seen.update(status=await c.scheduler.glinthawk_status(), caches=await _caches(w))

    await one_then_another(first, first_reqs, second, second_reqs,
                           {**FAST, "glinthawk.engine.swap-bytes": swap_bytes,
                            "glinthawk.engine.grow-every": grow_every,
                            "glinthawk.engine.swap-memory-fraction": memory}, both_open)
    one, two = first.last_summary, second.last_summary
    assert second.placement_wait_s > 0 and two.growths == [] and two.attention_of() == [w.address]
    kinds = [(g["kind"], g.get("from"), g.get("to")) for g in one.growths]
    assert kinds == [("yielded", "8 x 1", "4 x 1"), ("resized micro-batch", 8, 4), ("grew", "4 x 1", "8 x 1")], kinds
    shrunk = one.growths[1]
    assert (shrunk["swapped_out"], shrunk["moved"] >= 1) == ((4, False) if swap_bytes and memory else (0, True)), shrunk
    assert [(x["before"], x["after"]) for x in shrunk["caches"]] == [(8 * _SLOT, 4 * _SLOT)]
    assert one.growths[2]["in_place"] and one.growths[2]["time"] > shrunk["time"]
    assert one.plan["sizes"] == [8] and (one.micro_batch_size, one.n_micro_batches) == (8, 1)
    assert seen["caches"] == {one.run_id: 4, two.run_id: 4}
    line = next(x for x in status_text(seen["status"]).splitlines() if one.run_id in x)
    assert "4 slots in 1 micro-batches" in line and "; gave up 4 KV slot(s) for runs waiting for KV" in line
    changes = status_text(seen["status"]).split("last KV changes between runs:\n")[1].splitlines()
    changes = [x.split(" ", 3)[3] for x in itertools.takewhile(lambda x: x.startswith("  "), changes)]  # (no time)
    freed = f"{one.run_id} gave back {4 * _SLOT / 2**10:.1f} KiB of KV (micro-batch 0 from 8 to 4 slots)"
    i = changes.index(f"{two.run_id} waits for KV (held by {one.run_id})")
    assert changes[i + 1:i + 3] == [freed, f"{two.run_id} placed with {4 * _SLOT / 2**10:.1f} KiB of KV (two-tier, "
                                           "4 slots)"], changes
    assert await _scheduler_kv(c) == {} and await _caches(w) == {}


def test_the_kv_kept_out_is_bounded_by_the_dense_workers_memory_and_shown():
    """``SliceRun.host_room``: the bytes (of every slice) the process may still take,
    under ``swap-memory-fraction`` of its worker's memory limit, scaled from its slice's
    layers; the dense worker reports what it keeps (``glinthawk status`` shows it)."""
    from types import SimpleNamespace

    import psutil
    import torch

    from glinthawk_dask.runtime.dense_service import DenseService
    from glinthawk_dask.runtime.slice_run import SliceRun

    rss = psutil.Process().memory_info().rss

    def room(limit: int) -> int:
        run = SimpleNamespace(worker=SimpleNamespace(memory_manager=SimpleNamespace(memory_limit=limit)),
                              spec=SimpleNamespace(start=0, stop=1), config=SimpleNamespace(n_layers=4))
        return SliceRun.host_room(run)

    assert room(rss) == 0  # (over 70% of its limit already)
    got, want = room(2 * rss), 4 * (1.4 * rss - rss)  # one layer of four: the run's K/V is four times this slice's
    assert abs(got - want) < 0.1 * want, (got, want)
    runs = {"r": SimpleNamespace(cache=None, swapped={"s": (torch.zeros(2, 3), torch.zeros(2, 3))})}
    assert DenseService.kv_info(SimpleNamespace(runs=runs))["kv_out"] == 48
    info = {"scheduler": "tcp://s", "time": 0.0, "runs": [], "workers": {"attention": [], "dense": [{
        "address": "tcp://d", "name": "dense-0", "nthreads": 1, "kv_budget": None, "kv_reserved": 0,
        "kv_allocated": 0, "kv_used": 0, "kv_out": 3 * 2**20}]}}
    assert status_text(info).splitlines()[2].endswith("; K/V of sequences taken out of attention caches 3.0 MiB")
