"""A two-tier run growing into KV that other runs freed, and giving KV up to runs
that wait for it.

A run placed while other runs held KV gets the plan that fits beside them: an auto plan
chosen for the KV free then, or the micro-batches asked for shrunk to it.  Plans were
fixed for a run's life, so a long pipeline started beside a big run kept its small plan
for hours after that run ended.  Every ``glinthawk.engine.grow-every`` seconds, and at
once when the scheduler says a run began to wait for KV or gave some back
(:mod:`.kv_signals`), when more KV is free than when it last looked and requests wait for slots, the client asks
whether the KV free now (its own not counted: it still holds it) takes a plan at least
``glinthawk.engine.grow-gain`` times as fast as its own, on the same profile:

* the planner's best two-tier plan for the free KV, instead of the run's own;
* the run's own plan with more micro-batches of its size, the new ones in the free KV
  (auto depth only);
* for a plan the caller fixed, the plan it asked for, instead of its own;
* for a run of one micro-batch holding its caches alone (the plans this planner picks
  on CPU workers), that micro-batch with more slots, in place.

The fastest that fits goes: the scheduler places its micro-batches (``glinthawk_grow``),
their caches open on the attention workers and every slice adds them, the first slice
last, whose driver starts them and, unless they are added beside them, retires the
run's other micro-batches.  Those admit nothing more; their sequences are taken out of
their caches, K/V kept on the dense workers (``glinthawk.engine.swap-bytes`` at most,
within ``swap-memory-fraction`` of the worker's memory; past that they run to their
end), and go on in the new micro-batches' free slots, K/V copied back; once empty
their caches close and their KV goes back to the scheduler.
In place, the micro-batch's caches copy their live tokens into caches of the new size
between two of its steps (``RunDriver.resize``) and it admits more at once.  A K/V
copy is bit for bit: no token is computed twice, and every sequence's tokens are those
it would have had.

The other way round: while runs wait to be placed for KV the open runs hold, no run
grows, and a run holding more than its share of the attention tier's KV (the tier's
budget over the open and waiting runs) gives some up.  A run of two or more
micro-batches gives its last one up (with those in the same cache), keeping at least
one: its sequences are taken out the same way, to go on in the others as they have
room.  A run of one micro-batch shrinks it to its share: the sequences past it are
taken out, the others move into the slots it keeps (K/V copied), and its caches
shrink.  Taken-out sequences go back before new requests.  The waiting run is placed in
the KV freed, and once it ends the first grows back, beside its own micro-batches or in
place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any

from .. import config
from ..engine.request import Request
from .autoplan import GrowOption, grow_options, sample_of
from .faults import WorkerFailure, is_worker_failure
from .messages import Plan
from .runs import RunState

__all__ = ["Growth", "maybe_grow", "note_records"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Growth:
    """What a run needs to grow: how its plan was chosen, and when it looks next."""

    micro_batch_size: int | str  # as asked: an int, or "auto"
    n_micro_batches: int | str
    model_config: Any
    requests: list[Request]  # those the plan was chosen on (auto plans)
    plan_kwargs: dict  # what else the planner took: model, dtype, seq_len, latency, ...
    current: Any  # auto plans: the planner's configuration of the live plan (None: not planned)
    next_check: float = 0.0
    free_seen: int = -1  # attention KV bytes free when it last looked
    yielded: set = dataclasses.field(default_factory=set)  # micro-batches given up for runs waiting for KV
    drained: set = dataclasses.field(default_factory=set)  # retired micro-batches of this epoch that drained
    resizing: dict | None = None  # a micro-batch resizing in place, until its driver reports it did

    @property
    def auto(self) -> bool:
        return "auto" in (self.micro_batch_size, self.n_micro_batches)

    def asked(self, n_requests: int) -> tuple[int, int]:
        """A fixed plan's size and depth, as a run of ``n_requests`` places them."""
        size = min(int(self.micro_batch_size), n_requests)
        return size, max(1, min(int(self.n_micro_batches), math.ceil(n_requests / size)))

    def may_grow(self, live: list[int], n_requests: int) -> bool:
        """Whether a plan of ``live`` slots has anything to grow to: a fixed plan placed
        short enough of the plan asked; an auto plan the planner chose."""
        if self.auto:
            return self.current is not None
        size, depth = self.asked(n_requests)
        return size * depth >= float(config.get("engine.grow-gain")) * sum(live)

    @classmethod
    def of_engine(cls, engine: Any, requests: list[Request], seq_len: int, output_lengths: list[int] | None,
                  prediction: Any, plan: Plan, kv_free: int) -> "Growth":
        """A :class:`~.client.DaskEngine` run's, placed as ``plan`` with ``kv_free``
        attention KV bytes left free beside it (chosen by ``prediction``, or None when it
        was not planned).  Placement may have shrunk the plan the planner chose (one that
        fit nowhere beside the other runs was chosen for the cluster alone): the plan to
        beat is the one placed."""
        current = None
        if prediction is not None:
            live = plan.live_sizes()
            size = max(1, round(max(live) * len(sample_of(requests)) / len(requests)))  # (the sample's scale)
            current = dataclasses.replace(prediction.config, micro_batch_size=size, micro_batches=len(live))
        return cls(
            engine.micro_batch_size, engine.n_micro_batches, engine.model_config, requests, dict(
                model=engine.model, dtype=engine.dtype, seq_len=seq_len, n_slices=engine.n_slices,
                dense_kv_budget=engine.dense_kv_budget, latency=engine.latency,
                max_step_tokens=engine.max_step_tokens, output_lengths=output_lengths),
            current, next_check=time.time() + float(config.get("engine.grow-every")), free_seen=kv_free)


def plan_words(sizes: list[int]) -> str:
    """Micro-batch sizes as ``"32 x 2"`` (or ``"32 + 16"`` when they differ)."""
    return f"{sizes[0]} x {len(sizes)}" if len(set(sizes)) == 1 else " + ".join(map(str, sizes))


async def maybe_grow(client: Any, run: RunState, waiting: bool) -> None:
    """Grow ``run`` (see the module) if it is time to look, more KV is free than when it
    last looked, requests wait for slots (``waiting``: more to feed, or more pending
    than its slots) and a plan that fits there is worth it; while other runs wait for
    KV, give some up instead, if it holds more than its share.  A worker lost while its
    new micro-batches are added to the slices raises :class:`~.faults.WorkerFailure`
    (the caller restarts the run); a plan that no longer fits, or a cache that does not
    open (its worker lost, or out of KV), leaves the run as it was."""
    g = run.growth
    now = time.time()
    every = float(config.get("engine.grow-every"))
    if g is None or every <= 0 or run.plan.mode != "two-tier" or g.resizing:
        return
    if now < g.next_check and not (run.kv_word is not None and run.kv_word.take()):  # (word: look at once)
        return
    g.next_check = now + every
    live = run.plan.live_sizes()
    wants = (waiting or len(run.pending) > sum(live)) and g.may_grow(live, run.size)
    if not wants and len(live) < 2 and _resizable(run) is None:  # (nothing to grow to, nor to give up)
        return
    room = await client.scheduler.glinthawk_kv_room()
    if room["waiting"]:  # runs wait for KV: none grows, and a run above its share gives some up
        await _yield(client, run, room)
        return
    free = int(room["free"])
    if not wants or free <= g.free_seen:
        g.free_seen = free
        return
    g.free_seen = free
    options, before = await _options(client, run, g, live, free)
    for option in options:  # the fastest that fits the free KV
        t0 = time.time()
        if option.in_place is not None:  # its micro-batch takes more slots: the KV first, then its caches
            reply = await client.scheduler.glinthawk_resize(run_id=run.id, micro_batch=option.in_place,
                                                            n_slots=option.micro_batch_size)
            if "error" in reply:
                logger.info("glinthawk run %s did not grow to %d slots: %s", run.id, option.micro_batch_size,
                            reply["error"])
                continue
            try:
                await client.rpc(run.plan.dense[0]).glinthawk_slice_resize(
                    run_id=run.id, micro_batch=option.in_place, n_slots=option.micro_batch_size)
            except BaseException:  # (a lost driver fails the run; either way the KV goes back)
                await client.scheduler.glinthawk_resize(run_id=run.id, micro_batch=option.in_place,
                                                        n_slots=run.plan.sizes[option.in_place])
                raise
            g.resizing = {"option": option, "live": live, "before": before, "free": free, "t0": t0}
            return
        size = min(option.micro_batch_size, run.size)
        depth = option.n_micro_batches if option.keep else max(1, min(option.n_micro_batches,
                                                                       math.ceil(run.size / size)))
        reply = await client.scheduler.glinthawk_grow(run_id=run.id, micro_batch_size=size, n_micro_batches=depth,
                                                      keep=option.keep)
        if "error" in reply:
            logger.info("glinthawk run %s did not grow by %d x %d: %s", run.id, size, depth, reply["error"])
            continue
        new, kv_runs = Plan.from_wire(reply["plan"]), list(reply["kv_runs"])
        if not await _add(client, run, new, kv_runs, option.keep):
            return
        _grown(run, option, new, kv_runs, live, before, free, t0)
        return


def _grown(run: RunState, option: GrowOption, new: Plan, kv_runs: list[str], live: list[int],
           before: float | None, free: int, t0: float) -> None:
    """Record that ``run`` grew by ``new`` (see :func:`maybe_grow`)."""
    run.plan = run.plan.grown(new, kv_runs, option.keep)
    _record_growth(run, option, live, before, free, t0)


def _record_growth(run: RunState, option: GrowOption, live: list[int], before: float | None, free: int,
                   t0: float) -> None:
    """Record that ``run`` grew from ``live`` to its plan now, as ``option``."""
    g, prediction = run.growth, option.prediction
    if prediction is not None:
        g.current, run.prediction = prediction.config, prediction
    if option.check is not None and run.plan_check is not None:  # (rows of the sample that finished stay known)
        option.check.stopped.update(run.plan_check.stopped)
        run.plan_check = option.check
    record = {"kind": "grew", "from": plan_words(live), "to": plan_words(run.plan.live_sizes()),
              "after_s": t0 - run.t0, "seconds": time.time() - t0, "time": t0, "free_bytes": free,
              "kept": option.keep or option.in_place is not None, "in_place": option.in_place is not None,
              "predicted": None if prediction is None else prediction.tokens_per_s, "predicted_before": before}
    run.growths.append(record)
    logger.warning("glinthawk run %s grew from %s to %s micro-batches into KV other runs freed%s", run.id,
                   record["from"], record["to"], "" if prediction is None else
                   f" (predicted {before:.1f} -> {prediction.tokens_per_s:.1f} tok/s)")


async def _options(client: Any, run: RunState, g: Growth, live: list[int],
                   free: int) -> tuple[list[GrowOption], float | None]:
    """The ways to grow worth trying, fastest first, and the live plan's predicted
    tokens/s (None for a fixed plan).  A run of one micro-batch holding its caches alone
    may also grow it in place, into up to ``free`` more bytes of KV."""
    mb = _resizable(run)
    if not g.auto:  # the plan asked for (placed short enough of it: may_grow)
        size, depth = g.asked(run.size)
        if mb is not None and depth == 1:  # one micro-batch, smaller than asked: it grows in place
            return [GrowOption(size, 1, False, None, in_place=mb)], None
        if set(live) == {size} and len(live) < depth:  # as asked but fewer (it gave some up): beside them
            return [GrowOption(size, depth - len(live), True, None)], None
        return [GrowOption(size, depth, False, None)], None
    kw = dict(g.plan_kwargs)
    kw["micro_batch_size"] = None if g.micro_batch_size == "auto" else min(int(g.micro_batch_size), len(g.requests))
    kw["n_micro_batches"] = None if g.n_micro_batches == "auto" else int(g.n_micro_batches)
    in_place = None
    if mb is not None and g.micro_batch_size == "auto":  # the slots its KV and the free KV hold, at most
        slot = sum(run.plan.attention_kv().values()) // max(1, run.plan.sizes[mb])
        in_place = (mb, min(run.size, run.plan.sizes[mb] + free // max(1, slot)))
    return await grow_options(client, g.model_config, g.requests, g.current, max(live),
                              float(config.get("engine.grow-gain")), in_place=in_place, **kw)


def _resizable(run: RunState) -> int | None:
    """The run's one live micro-batch, if it is remote and holds its cache alone, from
    slot 0, on every slice (none: it cannot resize in place)."""
    plan = run.plan
    drained = run.growth.drained if run.growth is not None else set()
    live = [m for m in range(plan.n_micro_batches) if m not in plan.retired]
    if len(live) != 1 or plan.local[live[0]] or live[0] != plan.n_micro_batches - 1:
        return None
    mb = live[0]
    kv_runs = plan.kv_runs or [[""] * plan.n_micro_batches for _ in plan.slices]
    for s in range(len(plan.slices)):
        cache = (plan.attention[s][mb], kv_runs[s][mb])
        if plan.slot_base[s][mb] != 0 or any((plan.attention[s][m], kv_runs[s][m]) == cache
                                             for m in range(plan.n_micro_batches) if m != mb and m not in drained):
            return None
    return mb


def note_records(run: RunState, records: list[dict]) -> None:
    """What the run's driver reported of its micro-batches: drained ones, and one resized
    in place (the run's plan takes its new size)."""
    run.growths.extend(r for r in records if r["kind"] != "resized micro-batch" or r.get("error"))
    for r in records:
        if r["kind"] == "retired micro-batch" and run.growth is not None:
            run.growth.drained.add(r["micro_batch"])  # (numbers of this epoch's plan: a restart starts over)
        if r["kind"] != "resized micro-batch":
            continue
        g, pending = run.growth, run.growth.resizing if run.growth else None
        if g is not None:
            g.resizing = None
        if r.get("error"):
            continue
        live = run.plan.live_sizes()
        run.plan = run.plan.resized(r["micro_batch"], r["to"])
        if r["to"] > r["from"] and pending is not None:
            _record_growth(run, pending["option"], live, pending["before"], pending["free"], pending["t0"])
        elif r["to"] < r["from"]:  # (given up once done: it waited for its sequences to fit)
            run.growths.append({"kind": "yielded", "micro_batches": [], "from": plan_words(live),
                                "to": plan_words(run.plan.live_sizes()), "after_s": r["time"] - run.t0,
                                "asked_after_s": None if pending is None else pending["t0"] - run.t0,
                                "waiting": None if pending is None else pending["waiting"],
                                "swapped_out": r.get("swapped_out", 0), "time": r["time"]})
            run.growths.append(r)


async def _yield(client: Any, run: RunState, room: dict) -> None:
    """Give up the run's last micro-batches for the runs waiting for KV (those in the
    same cache, so that it closes once they drain), if it holds more than its share of
    the attention tier's KV (``room``: see ``glinthawk_kv_room``), keeps a micro-batch,
    and what it gave up before has drained."""
    g, plan = run.growth, run.plan
    held = sum(plan.attention_kv().values())
    if g.yielded - g.drained or held <= room["budget"] / (room["runs"] + room["waiting"]):
        return
    group = _yieldable(plan)
    if not group:
        await _shrink(client, run, room, held)
        return
    await client.scheduler.glinthawk_yield(run_id=run.id, micro_batches=group)
    await client.rpc(plan.dense[0]).glinthawk_slice_yield(run_id=run.id, micro_batches=group)
    run.plan = dataclasses.replace(plan, retired=sorted(set(plan.retired) | set(group)))
    g.yielded |= set(group)
    if g.current is not None:
        g.current = dataclasses.replace(g.current, micro_batches=len(run.plan.live_sizes()))
    t0 = time.time()
    run.growths.append({"kind": "yielded", "micro_batches": group, "from": plan_words(plan.live_sizes()),
                        "to": plan_words(run.plan.live_sizes()), "waiting": room["waiting"],
                        "after_s": t0 - run.t0, "time": t0})
    logger.warning("glinthawk run %s gives up %s of its micro-batches (%s left) for %d run(s) waiting for KV",
                   run.id, len(group), plan_words(run.plan.live_sizes()), room["waiting"])


async def _shrink(client: Any, run: RunState, room: dict, held: int) -> None:
    """Shrink the run's one micro-batch to its share of the attention tier's KV (it
    holds ``held`` bytes; ``room``: see ``glinthawk_kv_room``): it admits no more until
    it runs no more sequences than that, and then its caches copy those into smaller
    ones (see RunDriver.resize), their KV given back."""
    mb = _resizable(run)
    if mb is None:
        return
    size = run.plan.sizes[mb]
    n = max(1, int(room["budget"] / (room["runs"] + room["waiting"]) // (held / size)))
    if n >= size:
        return
    run.growth.resizing = {"to": n, "t0": time.time(), "waiting": room["waiting"]}
    try:
        await client.rpc(run.plan.dense[0]).glinthawk_slice_resize(run_id=run.id, micro_batch=mb, n_slots=n)
    except BaseException:
        run.growth.resizing = None
        raise
    logger.warning("glinthawk run %s shrinks its micro-batch from %d to %d slots for %d run(s) waiting for KV",
                   run.id, size, n, room["waiting"])


def _yieldable(plan: Plan) -> list[int]:
    """The run's last live micro-batch and those sharing its cache, when every slice
    holds them in caches no other live micro-batch is in and another stays live."""
    n = plan.n_micro_batches
    live = [m for m in range(n) if m not in plan.retired and not plan.local[m]]
    kv_runs = plan.kv_runs or [[""] * n for _ in plan.slices]

    def cache(s: int, m: int) -> tuple[str, str]:
        return plan.attention[s][m], kv_runs[s][m]

    if len(live) < 2:
        return []
    group = [m for m in live if cache(0, m) == cache(0, live[-1])]
    if len(group) == len(live):
        return []
    for s in range(len(plan.slices)):
        theirs = {cache(s, m) for m in group}
        if any(cache(s, m) in theirs for m in live if m not in group):
            return []
    return group


async def _add(client: Any, run: RunState, new: Plan, kv_runs: list[str], keep: bool) -> bool:
    """Open the new micro-batches' caches, then add them to every slice, the first last
    (its driver starts them; the live ones stay with ``keep``); whether they were added.
    When a cache does not open, the others close again and their KV goes back; a worker
    lost once the slices began to take them fails the run as a lost worker (its restart
    closes every cache)."""
    g, timeout = run.growth, float(config.get("engine.peer-timeout"))
    try:
        for s, (a, b) in enumerate(new.slices):
            for addr, n_slots in new.n_slots[s].items():
                await asyncio.wait_for(client.rpc(addr).glinthawk_kv_open(
                    run_id=kv_runs[s], config=dataclasses.asdict(g.model_config), layer_start=a,
                    layer_stop=b, n_slots=n_slots, max_seq_len=run.plan.max_seq_len, dtype=g.plan_kwargs["dtype"],
                    latency=g.plan_kwargs["latency"], depth=new.n_micro_batches), timeout)
    except Exception as e:
        await _give_back(client, run, new, kv_runs)
        if not (is_worker_failure(e) or isinstance(e, MemoryError)):
            raise
        logger.warning("glinthawk run %s could not open the caches to grow into (%s: %s)", run.id,
                       type(e).__name__, e)
        return False
    try:
        for s in reversed(range(len(new.slices))):
            await client.rpc(run.plan.dense[s]).glinthawk_slice_grow(
                run_id=run.id, attention=new.attention[s], slot_base=new.slot_base[s], sizes=new.sizes,
                kv_run=kv_runs[s], keep=keep)
    except Exception as e:
        if is_worker_failure(e):
            raise WorkerFailure(f"run {run.id} lost a worker while it grew: {type(e).__name__}: {e}") from e
        raise
    return True


async def _give_back(client: Any, run: RunState, new: Plan, kv_runs: list[str]) -> None:
    """Close the caches of micro-batches that were not added and return their KV (what
    the scheduler reserved for ``new``)."""
    for s in range(len(new.slices)):
        for addr in new.n_slots[s]:
            try:
                await asyncio.wait_for(client.rpc(addr).glinthawk_kv_close(run_id=kv_runs[s], exact=True),
                                       float(config.get("engine.peer-timeout")))
            except Exception as e:  # a lost worker's caches went with it
                if not is_worker_failure(e) and not isinstance(e, asyncio.TimeoutError):
                    raise
    for addr, nbytes in new.attention_kv().items():
        await client.scheduler.glinthawk_release(run_id=run.id, address=addr, nbytes=nbytes)
