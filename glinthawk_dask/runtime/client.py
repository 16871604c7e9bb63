"""The caller's side of a distributed run.

:class:`DaskEngine` places a run through the scheduler plugin (one message), opens the
KV caches and layer slices on the workers, submits requests straight to the first
dense worker and collects completions from it as they finish: the scheduler sees a
handful of messages per run, never per layer or per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import torch

from ..engine.request import Completion, Request
from ..errors import GlinthawkError, ModelLoadError
from ..model.config import ModelConfig
from ..model.resolve import missing_elsewhere, resolve_checkpoint
from .. import config
from .compute import busy_seconds, overlap_seconds
from .faults import Unplaceable, WorkerFailure, is_worker_failure
from .autoplan import auto_plan, weight_bytes
from .growth import Growth, maybe_grow, note_records
from .kv_signals import listen
from .messages import DTYPES, Plan, Results, SliceSpec
from .retry import retry_until
from .runs import RequestFeed, RunState, RunSummary

__all__ = ["DaskEngine", "RunSummary"]

logger = logging.getLogger(__name__)


class DaskEngine:
    """Generate on a Dask cluster whose workers run :class:`DenseWorkerPlugin` and
    :class:`AttentionWorkerPlugin`.

    ``mode`` is ``"two-tier"`` (attention on KV workers), ``"single-tier"`` (KV on
    the dense workers) or ``"hybrid"`` (some micro-batches' KV on the dense workers, as
    much as ``dense_kv_budget`` bytes per dense worker and the planner find worth it,
    the rest on KV workers; ``local_micro_batches`` fixes how many).  ``micro_batch_size`` and ``n_micro_batches`` are ints or
    ``"auto"``: the planner (:mod:`glinthawk_dask.planner`) simulates the run's requests
    on the cluster's profile (measured once per cluster and model, kept on the
    scheduler) and picks the fastest.  ``latency`` (seconds) delays every inter-tier
    message.  Unset knobs come from ``dask.config`` (``glinthawk.engine``).
    """

    def __init__(
        self,
        client: Any,
        model: str,
        *,
        mode: str | None = None,
        n_slices: int | None = None,
        micro_batch_size: int | str | None = None,
        n_micro_batches: int | str | None = None,
        max_step_tokens: int | None = None,
        max_seq_len: int | None = None,
        dtype: str = "float32",
        latency: float | None = None,
        model_config: ModelConfig | None = None,
        dense_kv_budget: int | None = None,
        local_micro_batches: int | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.mode = mode or config.get("engine.mode")
        if self.mode not in ("two-tier", "single-tier", "hybrid"):
            raise GlinthawkError(f"DaskEngine mode must be two-tier, single-tier or hybrid, not {self.mode!r}")
        if dense_kv_budget is not None and int(dense_kv_budget) < 1:
            raise GlinthawkError("dense_kv_budget must be at least 1 byte (None: the dense workers' own)")
        self.dense_kv_budget = None if dense_kv_budget is None else int(dense_kv_budget)
        self.local_micro_batches = local_micro_batches  # hybrid: fixed, or None for the planner's choice
        self.label = ""  # what its runs are for (a pipeline's name): `glinthawk status` shows it beside their ids
        self.n_slices = n_slices
        mbs = micro_batch_size or config.get("engine.micro-batch-size")
        self.micro_batch_size: int | str = mbs if mbs == "auto" else int(mbs)
        self.n_micro_batches = n_micro_batches or config.get("engine.micro-batches")
        self.max_step_tokens = int(max_step_tokens or config.get("engine.max-step-tokens"))
        self.max_seq_len = max_seq_len or config.get("engine.max-seq-len")
        self.dtype = dtype
        self.latency = float(config.get("engine.induced-latency") if latency is None else latency)
        self.model_config: ModelConfig = model_config or resolve_checkpoint(model).config
        self.last_summary: RunSummary | None = None
        self.last_prediction: Any = None  # the planner's Prediction for the last auto plan
        self.generated_tokens = 0  # tokens sampled so far by the current (or last) generate call
        self.recoveries: list[dict] = []  # workers the current (or last) generate call lost, as it recovered
        self.placement_wait_s = 0.0  # how long the current (or last) run waited for KV that other runs held
        self.last_timeline: dict[str, list] = {}

    # -- sync API ------------------------------------------------------------------
    def generate(self, requests: Iterable[Request], *, max_seq_len: int | None = None,
                 on_tick: Callable[[], None] | None = None, output_lengths: list[int] | None = None,
                 stop: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Yield completions as they finish (synchronous clients).

        With a KV slot size (``max_seq_len``, else the engine's), ``requests`` is
        consumed lazily (in this thread), keeping about two rounds of slots queued on
        the driver: back-pressure for inputs far larger than memory.  Otherwise it is
        read whole to size the slots.  A run that loses a worker restarts on the
        workers left (see :mod:`~glinthawk_dask.runtime.faults`); every request is
        completed once.  ``on_tick()`` is called after every poll of the run (at least
        every ``glinthawk.engine.poll-interval``), with :attr:`generated_tokens` current.
        ``output_lengths`` (completion lengths seen before) are what an auto plan expects
        rows to stop at, each within its ``max_tokens``.  While the run waits to be
        placed (for KV other runs hold), ``stop()`` turning true ends it with nothing
        generated (checked between asks, at least every second).
        """
        max_seq_len = max_seq_len or self.max_seq_len
        self.generated_tokens = 0
        feed = RequestFeed(requests, self._first_batch_size(max_seq_len))
        if not feed.first:
            return
        self.recoveries, self.placement_wait_s = [], 0.0
        run = self.client.sync(self._open, feed.first, max_seq_len, output_lengths=output_lengths, stop=stop)
        if run is None:  # stopped while waiting to be placed
            return
        self.recoveries = run.recoveries  # (the same list across the run's restarts)
        run.feeding = not feed.exhausted
        try:
            more = feed.first
            while True:
                yield from self.client.sync(self._advance, run, more)
                if on_tick is not None:
                    on_tick()
                more = feed.take(run.room())
                run.feeding = not feed.exhausted
                if not more and not run.pending and feed.exhausted:
                    break
        finally:
            self.client.sync(self._close, run)

    # -- async API -----------------------------------------------------------------
    async def agenerate(
        self, requests: Iterable[Request], *, max_seq_len: int | None = None,
        on_tick: Callable[[], None] | None = None, output_lengths: list[int] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> AsyncIterator[Completion]:
        """Yield completions as they finish (asynchronous clients); arguments as for
        :meth:`generate` (the iterator must not block the event loop)."""
        max_seq_len = max_seq_len or self.max_seq_len
        self.generated_tokens = 0
        feed = RequestFeed(requests, self._first_batch_size(max_seq_len))
        if not feed.first:
            return
        self.recoveries, self.placement_wait_s = [], 0.0
        run = await self._open(feed.first, max_seq_len, output_lengths=output_lengths, stop=stop)
        if run is None:  # stopped while waiting to be placed
            return
        self.recoveries, run.feeding = run.recoveries, not feed.exhausted
        try:
            more = feed.first
            while True:
                for c in await self._advance(run, more):
                    yield c
                if on_tick is not None:
                    on_tick()
                more = feed.take(run.room())
                run.feeding = not feed.exhausted
                if not more and not run.pending and feed.exhausted:
                    break
        finally:
            await self._close(run)

    async def _advance(self, run: RunState, more: list[Request]) -> list[Completion]:
        """Submit ``more``, then collect what finished; a lost worker restarts the run."""
        run.track(more)
        try:
            if more:
                await self._submit(run, more)
            out = await self._poll(run) if run.pending else []
            await maybe_grow(self.client, run, waiting=run.feeding)
        except Exception as e:
            if not is_worker_failure(e):
                raise
            await self._recover(run, e)
            return []
        if time.time() >= run.renew_at:
            await self._renew(run)
        return out

    def _nudge(self, run_id: str, driver: str) -> None:
        """Have the driver of ``run_id`` answer its waiting poll now (word came to act on)."""
        nudge = asyncio.ensure_future(self._rpc(driver, "glinthawk_results_nudge", run_id=run_id))
        nudge.add_done_callback(lambda f: f.cancelled() or f.exception())  # (a driver gone: its run fails apart)

    async def _renew(self, run: RunState) -> None:
        """Renew the run's lease on the scheduler (which closes the runs of clients that
        stop renewing), with the tokens done so far for ``glinthawk status``."""
        timeout = float(config.get("engine.peer-timeout"))
        try:
            reply = await asyncio.wait_for(self.client.scheduler.glinthawk_renew(
                run_id=run.id, generated=int(self.generated_tokens)), timeout)
        except Exception as e:
            if not is_worker_failure(e):
                raise
            raise GlinthawkError(f"run {run.id} lost the Dask scheduler at {self.client.scheduler.address} "
                                 f"({type(e).__name__}: {e}); its workers cannot be trusted to go on") from None
        if "error" in reply:
            raise GlinthawkError(f"run {run.id}: {reply['error']}")
        run.renew_at = time.time() + run.lease / 3

    def _first_batch_size(self, max_seq_len: int | None) -> int | None:
        """Requests read before placing a run: all of them unless slots have a fixed size."""
        if not max_seq_len:
            return None
        size = 64 if self.micro_batch_size == "auto" else self.micro_batch_size
        return size * int(config.get("engine.max-micro-batches"))

    # -- steps ---------------------------------------------------------------------
    def _seq_len(self, requests: list[Request], max_seq_len: int | None) -> int:
        context = self.model_config.max_seq_len
        if max_seq_len:
            return min(int(max_seq_len), context)
        return min(max(len(r.prompt_token_ids) + r.params.max_tokens for r in requests), context)

    async def _rpc(self, addr: str, op: str, **kwargs: Any) -> Any:
        return await getattr(self.client.rpc(addr), op)(**kwargs)

    async def _open(self, requests: list[Request], max_seq_len: int | None, size_hint: int = 0,
                    output_lengths: list[int] | None = None,
                    stop: Callable[[], bool] | None = None) -> RunState | None:
        cfg = self.model_config
        run_id = f"gh-{uuid.uuid4().hex[:12]}"
        seq_len = self._seq_len(requests, max_seq_len)
        elem = torch.tensor([], dtype=DTYPES[self.dtype]).element_size()
        bpt_layer = cfg.kv_bytes_per_token(elem, 1)
        n = max(len(requests), size_hint)  # a restarted run keeps the size of the first
        mb_size, depth = self.micro_batch_size, self.n_micro_batches
        prediction, profile_s, n_local, check = None, 0.0, 0, None
        if mb_size == "auto" or depth == "auto" or (self.mode == "hybrid" and self.local_micro_batches is None):
            chosen = await auto_plan(
                self.client, cfg, requests, model=self.model, mode=self.mode, dtype=self.dtype, seq_len=seq_len,
                micro_batch_size=None if mb_size == "auto" else min(int(mb_size), n),
                n_micro_batches=None if depth == "auto" else int(depth), n_slices=self.n_slices,
                dense_kv_budget=self.dense_kv_budget, latency=self.latency, max_step_tokens=self.max_step_tokens,
                output_lengths=output_lengths,
            )
            mb_size, depth, n_local, prediction, profile_s, check = chosen
            if prediction is not None:
                self.last_prediction = prediction
        if self.mode == "hybrid" and self.local_micro_batches is not None:
            n_local = self.local_micro_batches
        mb_size = min(int(mb_size), n)
        # (hybrid: local micro-batches the dense budget shrinks may stand beside as many remote ones)
        depth = max(1, min(int(depth), math.ceil(n / mb_size) + (n_local if self.mode == "hybrid" else 0)))
        per_layer, ends = weight_bytes(cfg, elem)
        lease = float(config.get("engine.lease"))
        waits: list[Unplaceable] = []
        timeout, t_asked = float(config.get("engine.placement-timeout")), time.time()
        deadline = t_asked + timeout  # a run that does not fit beside the others waits until then

        async def place() -> dict:
            reply = await self.client.scheduler.glinthawk_plan(
                run_id=run_id, mode=self.mode, n_layers=cfg.n_layers, kv_bytes_per_token_layer=bpt_layer,
                max_seq_len=seq_len, micro_batch_size=mb_size, n_micro_batches=depth, n_slices=self.n_slices,
                dense_kv_budget=self.dense_kv_budget, local_micro_batches=min(n_local, depth),
                layer_weight_bytes=per_layer, ends_weight_bytes=ends, client=self.client.id, lease=lease,
                model=self.model, wait_s=0.0 if size_hint else deadline - time.time(), label=self.label,
            )
            if "error" in reply:
                raise Unplaceable(reply["error"], wait=bool(reply.get("wait")))
            return reply

        def waiting(e: Exception) -> None:
            if not waits:
                logger.warning("glinthawk run %s waits to be placed, up to %.0f s "
                               "(glinthawk.engine.placement-timeout): %s", run_id, timeout, e)
            waits.append(e)

        def stopped() -> bool:
            return stop is not None and stop()

        freed = listen(self.client, ("freed",), own=run_id)  # (asked again at once when a run frees KV)
        try:  # other runs may free room (asked every second at least); a recovery waits itself
            reply = await retry_until(place, deadline=deadline, retry_on=lambda e: (
                isinstance(e, Unplaceable) and e.wait and not size_hint and not stopped()), on_retry=waiting,
                max_delay=1.0, wake=freed.wait)
        except Unplaceable as e:
            if waits and stopped():  # (no longer waiting: the scheduler stops listing it at once)
                logger.warning("glinthawk run %s stopped while it waited to be placed (%.0f s)", run_id,
                               time.time() - t_asked)
                await self.client.scheduler.glinthawk_run_closed(run_id=run_id)
                self.placement_wait_s = time.time() - t_asked
                return None
            if waits and e.wait:
                raise Unplaceable(f"{e}: waited {time.time() - t_asked:.0f} s for room (glinthawk.engine."
                                  "placement-timeout); rerun once they finish, or give the attention workers more "
                                  "memory", wait=True) from None
            if waits:
                raise Unplaceable(f"{e} (waited for other runs to finish)", wait=e.wait) from None
            raise
        if not size_hint:  # (a recovery's placement is its own)
            self.placement_wait_s = time.time() - t_asked if waits else 0.0
        run = RunState(id=run_id, plan=Plan.from_wire(reply["plan"]), max_seq_len=max_seq_len, size=n, lease=lease,
                   renew_at=time.time() + lease / 3, prediction=prediction, profile_seconds=profile_s, plan_check=check)
        run.growth = Growth.of_engine(self, requests, seq_len, output_lengths, prediction, run.plan,
                                      int(reply.get("kv_free", 0)))
        run.kv_word = listen(self.client, ("wanted", "freed"), own=run_id,  # (it looks at once: see maybe_grow)
                             on_word=functools.partial(self._nudge, run_id, run.plan.dense[0]))
        try:
            await self._open_workers(run)
        except BaseException:
            await self._close(run)
            raise
        return run

    async def _open_workers(self, run: RunState) -> None:
        plan, run_id = run.plan, run.id
        cfg = dataclasses.asdict(self.model_config)
        opens = []
        for s, (a, b) in enumerate(plan.slices):  # the remote micro-batches' caches
            for addr, n_slots in plan.n_slots[s].items():
                opens.append(self._rpc(
                    addr, "glinthawk_kv_open", run_id=run_id, config=cfg, layer_start=a, layer_stop=b,
                    n_slots=n_slots, max_seq_len=plan.max_seq_len, dtype=self.dtype, latency=self.latency,
                    depth=plan.n_micro_batches,
                ))
        for s in range(len(plan.slices)):
            spec = SliceSpec.of_plan(
                plan, s, run_id=run_id, model=self.model, dtype=self.dtype, latency=self.latency,
                engine={"max_step_tokens": self.max_step_tokens}, peer_timeout=float(config.get("engine.peer-timeout")),
            )
            opens.append(self._open_slice(plan.dense[s], run_id, spec))
        await asyncio.gather(*opens)

    async def _open_slice(self, address: str, run_id: str, spec: SliceSpec) -> None:
        """Open a slice on a dense worker, which loads the model itself: a model file only
        this machine has is told as such."""
        try:
            await self._rpc(address, "glinthawk_slice_open", run_id=run_id, spec=spec.to_wire())
        except ModelLoadError as e:
            if not missing_elsewhere(e, self.model):
                raise
            raise ModelLoadError(f"the dense worker {address} does not find the model {self.model}, which is on "
                                 "this machine: each dense worker loads the model from the path given; put it "
                                 "there on every dense worker's host (or on a filesystem they share)") from None

    async def _recover(self, run: RunState, error: BaseException) -> None:
        """Start the run over as a new epoch on the workers there are (waiting for some
        if none is left), with every unfinished request resubmitted."""
        t0 = time.time()
        await self._renew(run)  # a run the scheduler closed on purpose (its lease ran out) stays closed
        lost_tokens, run.in_flight_tokens = run.in_flight_tokens, None
        logger.warning("glinthawk run %s lost a worker (%s); restarting it", run.id, error)
        if len(run.recoveries) >= int(config.get("engine.max-recoveries")):
            raise GlinthawkError(f"run {run.id} lost workers {len(run.recoveries)} times; last: {error}")
        await self._release(run)
        deadline = t0 + float(config.get("engine.recovery-timeout"))
        pending = [run.requests[i] for i in sorted(run.pending)]

        def waiting(e: Exception) -> None:
            if run.status == "running":
                logger.warning("glinthawk run %s is waiting for workers to restart on: %s", run.id, e)
            run.status = f"waiting for workers: {e}"

        try:  # only lost workers and a cluster too small for now are worth waiting out
            new = await retry_until(lambda: self._open(pending, run.max_seq_len, size_hint=run.size),
                                    deadline=deadline, on_retry=waiting,
                                    retry_on=lambda e: is_worker_failure(e) or isinstance(e, Unplaceable))
        except Exception as e:
            raise GlinthawkError(f"run {run.id} lost a worker ({error}) and could not restart: {e}") from e
        rebuilt = lost_tokens if lost_tokens is not None else sum(len(r.prompt_token_ids) for r in pending)
        run.recoveries.append({
            "kind": "restarted run", "cause": f"{type(error).__name__}: {error}", "old_run": run.id,
            "new_run": new.id, "requests": len(pending), "rebuilt_tokens": int(rebuilt),
            "rebuilt_tokens_exact": lost_tokens is not None, "seconds": time.time() - t0, "time": t0,
        })
        run.restart_as(new, generated_before=self.generated_tokens)
        if pending:
            await self._submit(run, pending)

    async def _submit(self, run: RunState, requests: list[Request]) -> None:
        rows = [
            {"id": r.id, "prompt_token_ids": list(r.prompt_token_ids), "prompt": r.prompt,
             "params": r.params.to_dict()}
            for r in requests
        ]
        try:
            await self._rpc(run.plan.dense[0], "glinthawk_submit", run_id=run.id, requests=rows)
        except Exception as e:
            raise _driver_lost(run, e) from e

    async def _poll(self, run: RunState) -> list[Completion]:
        first = run.plan.dense[0]
        wait = float(config.get("engine.poll-interval"))
        poll = asyncio.ensure_future(self._rpc(first, "glinthawk_results", run_id=run.id, timeout=wait))
        deadline = time.time() + wait + float(config.get("engine.peer-timeout"))
        try:
            # a poll answers within `wait`; one that takes longer asks the scheduler whether
            # the worker is still there (Dask retries connecting to a dead one for its
            # whole connect timeout)
            while not (await asyncio.wait({poll}, timeout=wait + 1.0))[0]:
                reg = await self.client.scheduler.glinthawk_registry()
                if first not in reg["dense"]:
                    raise WorkerFailure(f"run {run.id}: dense worker {first} left the cluster")
                if time.time() > deadline:
                    raise asyncio.TimeoutError(f"dense worker {first} did not answer")
            try:
                wire = poll.result()
            except Exception as e:
                raise _driver_lost(run, e) from e
            reply = Results.from_wire(wire)
        finally:
            poll.cancel()
        if reply.error:
            if reply.worker_failure:
                run.in_flight_tokens = reply.in_flight_tokens
                raise WorkerFailure(f"run {run.id}: {reply.error}")
            raise GlinthawkError(f"run {run.id} failed: {reply.error}")
        run.stats = {"n_steps": reply.n_steps, "n_tokens": reply.n_tokens}
        # tokens sampled by this run's driver, plus those of the runs a recovery replaced
        self.generated_tokens = run.generated_before + int(reply.n_generated)
        run.recoveries.extend(reply.moves)
        for m in reply.moves:  # (where its micro-batches are: a run may grow or shrink them after)
            run.plan = run.plan.moved(m["slice"], m["micro_batch"], m["to"], m["kv_run"])
        note_records(run, reply.retired)
        out = []
        for d in reply.completions:
            c = Completion(**d)
            if run.deliver(c):  # (not a duplicate from a replayed step)
                out.append(c)
        return out

    async def _release(self, run: RunState) -> None:
        """Close the run on its workers and free its placement (lost workers skipped)."""
        plan, run_id = run.plan, run.id
        timeout = float(config.get("engine.peer-timeout"))
        # workers the scheduler no longer knows are gone: connecting to them would only
        # wait out distributed's connect timeout
        reg = await self.client.scheduler.glinthawk_registry()
        closes = [self._rpc(a, "glinthawk_slice_close", run_id=run_id) for a in plan.dense if a in reg["dense"]]
        if plan.mode != "single-tier":  # every attention worker: micro-batches may have moved anywhere
            closes += [self._rpc(a, "glinthawk_kv_close", run_id=run_id) for a in reg["attention"]]
        await asyncio.gather(*(asyncio.wait_for(c, timeout) for c in closes), return_exceptions=True)
        closed = await self.client.scheduler.glinthawk_run_closed(run_id=run_id)
        run.beside.update((closed or {}).get("beside", ()))

    async def _close(self, run: RunState) -> None:
        if self.client.status in ("closing", "closed"):  # the scheduler closes a departed client's runs
            return
        plan, run_id = run.plan, run.id
        seconds = time.time() - run.t0
        timeout = float(config.get("engine.peer-timeout"))
        try:
            reg = await asyncio.wait_for(self.client.scheduler.glinthawk_registry(), timeout)
            tiers = [(a, tier) for a, tier in _workers_of(plan) if a in reg[tier]]  # (lost ones would time out)
            timelines = await asyncio.gather(
                *[asyncio.wait_for(self._rpc(a, f"glinthawk_{tier}_timeline", since=run.t0), timeout)
                  for a, tier in tiers],
                return_exceptions=True,
            )
            self.last_timeline = {
                f"{tier} {addr}": t["events"] for (addr, tier), t in zip(tiers, timelines) if isinstance(t, dict)
            }
            await self._release(run)
        except Exception as e:  # a scheduler that is gone: an error on the way out must not hide the first
            if not is_worker_failure(e):
                raise
            logger.warning("glinthawk run %s could not be closed (%s: %s); its workers close it with the "
                           "scheduler", run_id, type(e).__name__, e)
        self.last_summary = RunSummary(
            run_id=run_id, mode=plan.mode, n_requests=run.n_requests,
            n_steps=run.stats.get("n_steps", 0), n_tokens=run.stats.get("n_tokens", 0),
            generated_tokens=run.generated, seconds=seconds, micro_batch_size=plan.micro_batch_size,
            n_micro_batches=len(plan.live_sizes()), plan=plan.to_wire(), recoveries=list(run.recoveries),
            predicted_tokens_per_s=run.prediction.tokens_per_s if run.prediction else None,
            profile_seconds=run.profile_seconds, runs_beside=len(run.beside),
            predicted_for_lengths=await run.predicted_for_lengths(),
            planned_on_rows=run.plan_check.lengths_seen if run.plan_check else 0, growths=list(run.growths),
        )

    # -- measurements --------------------------------------------------------------
    def tier_overlap(self) -> dict[str, float]:
        """Busy seconds of each tier in the last run and the time both were busy at once."""
        dense = [(e[1], e[2]) for ev in self.last_timeline.values() for e in ev if e[0] == "dense"]
        attn = [(e[1], e[2]) for ev in self.last_timeline.values() for e in ev if e[0] == "attention"]
        return {"dense_busy": busy_seconds(dense), "attention_busy": busy_seconds(attn),
                "overlap": overlap_seconds(dense, attn)}


def _driver_lost(run: RunState, error: Exception) -> Exception:
    """A broken connection to the run's driver (its first dense worker) as the failure it
    is, naming the worker; any other error as it is."""
    if not is_worker_failure(error) or isinstance(error, WorkerFailure):
        return error
    return WorkerFailure(f"dense worker {run.plan.dense[0]}, the run's driver: {type(error).__name__}: {error}")


def _workers_of(plan: Plan) -> list[tuple[str, str]]:
    """(address, tier) of every worker in a plan."""
    return [(a, "dense") for a in plan.dense] + [(a, "attention") for a in plan.attention_workers()]
