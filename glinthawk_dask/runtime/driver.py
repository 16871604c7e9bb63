"""The engine core of a run, on the first dense worker.

It owns the request queue and the :class:`~glinthawk_dask.engine.scheduler.BatchScheduler`
(continuous batching, chunked prefill), and runs one loop per micro-batch: plan a step,
push it through the slices, record the sampled tokens.  All micro-batch loops share
the worker's compute stream, so while some wait on attention workers, others compute.
Finished completions are buffered until the caller collects them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Protocol

from ..engine.request import Request
from ..engine.scheduler import BatchScheduler
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .. import config
from .faults import AttentionLost, WorkerFailure, is_worker_failure
from .messages import Results, SliceSpec, StepMessage
from .retry import retry_until

logger = logging.getLogger(__name__)

__all__ = ["NoAttentionWorker", "RunDriver", "SliceRunner"]


class NoAttentionWorker(Exception):
    """No attention worker could take a moved micro-batch yet (one may join or free room)."""


class SliceRunner(Protocol):
    """What the driver needs of the first slice of its run (a dense worker's
    :class:`~.slice_run.SliceRun`)."""

    spec: SliceSpec

    async def run_step(self, msg: StepMessage) -> list[int]:
        """Push a micro-batch step through every slice; the sampled tokens."""

    async def open_moved_cache(self, lost: AttentionLost, mb: int, kv_run: str) -> str:
        """One try at a new attention worker for micro-batch ``mb`` of the slice that
        ``lost`` names: the scheduler picks one and a cache ``kv_run`` of the
        micro-batch's slots opens there; its address.  Raises :class:`NoAttentionWorker`
        when none can take it (yet)."""

    async def reroute_slice(self, slice_index: int, mb: int, address: str, kv_run: str) -> None:
        """Send micro-batch ``mb``'s attention on slice ``slice_index`` to ``address``'s cache ``kv_run``."""

    async def retire_everywhere(self, mb: int, released: list[str]) -> list[dict]:
        """Micro-batch ``mb`` drained after the run grew: every slice forgets it and closes
        the caches no live micro-batch is in; what was closed."""

    kv_bytes_per_token: int  # K/V bytes of one token over every layer (in the run's dtype)

    async def swap_everywhere(self, mb: int, out: list[str] | None = None, released: list[str] | None = None,
                              back: list | None = None) -> None:
        """On every slice, take sequences ``out`` of micro-batch ``mb``'s cache (their K/V
        kept on the slice's dense worker), or put ``back`` (``[seq_id, slot]``) into it."""

    async def resize_everywhere(self, mb: int, n: int, moves: list, released: list) -> list[dict]:
        """Every slice's cache of micro-batch ``mb`` takes ``n`` slots (the sequences
        ``released`` since its last step freed and its sequences ``moves`` moved first),
        and the scheduler's ledger holds that much; what each cache held before and
        after.  Raises ``MemoryError`` (every cache as it was) when a cache cannot grow."""


class RunDriver:
    """Continuous batching for one run, feeding the slice pipeline."""

    def __init__(self, run: SliceRunner, tokenizer: Tokenizer | None) -> None:
        spec = run.spec
        self.run = run
        self.sched = BatchScheduler(
            n_micro_batches=spec.n_micro_batches,
            micro_batch_size=spec.sizes,
            # a step holds at least a whole micro-batch's decode tokens (an auto plan may
            # choose micro-batches above the configured budget), as in-process
            max_step_tokens=max(spec.engine.get("max_step_tokens", 512), *spec.sizes),
            max_seq_len=spec.max_seq_len,
            eos_token_ids=tokenizer.eos_token_ids if tokenizer else (),
            detokenize=tokenizer.decode if tokenizer else None,
        )
        self.n_submitted = 0
        self.n_done = 0
        self.n_steps = 0
        self.n_tokens = 0
        self.n_generated = 0  # sampled tokens (for the dashboard's tokens/s)
        self.n_in_flight = 0  # micro-batches with a step in the pipeline now
        self.t0 = time.time()
        self.error: str | None = None
        self.worker_failure = False  # the error means a lost or wedged worker: the run can restart
        self._results: list[dict] = []
        self._results_ready = asyncio.Event()
        self._arrived = asyncio.Event()
        self._released: list[list[str]] = [[] for _ in range(spec.n_micro_batches)]
        self._step_no = [0] * spec.n_micro_batches
        self._moves: list[dict] = []  # micro-batches moved to another attention worker, not yet reported
        self._retired: list[dict] = []  # micro-batches drained or resized, not yet reported
        self._resizes: dict[int, int] = {}  # micro-batch -> the slots it is to take once its sequences fit
        self._swap_sizes: dict[str, int] = {}  # K/V bytes of each sequence taken out of its cache
        self._n_swapped: dict[int, int] = {}  # micro-batch -> sequences it took out before it shrank
        self._n_moves = 0
        self._closed = False
        self._tasks: list[asyncio.Task] = []

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._loop(mb)) for mb in range(self.run.spec.n_micro_batches)]

    # -- input ---------------------------------------------------------------------
    def submit(self, requests: list[dict]) -> int:
        if self.error:
            raise RuntimeError(self.error)
        for r in requests:
            params = SamplingParams.from_dict(r.get("params"))
            self.sched.add(Request(str(r["id"]), list(r["prompt_token_ids"]), params, r.get("prompt")))
            self.n_submitted += 1
        self._start()
        self._arrived.set()
        self._arrived = asyncio.Event()
        return self.n_submitted

    # -- output --------------------------------------------------------------------
    def nudge(self) -> None:
        """Answer the caller's waiting :meth:`take_results` now, with what there is (its
        client has word that KV is wanted or freed and acts on it between two polls)."""
        self._results_ready.set()

    async def take_results(self, timeout: float) -> Results:
        if not self._results and not self.error:
            try:
                await asyncio.wait_for(self._results_ready.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        out, self._results = self._results, []
        self._results_ready.clear()
        return Results(
            completions=out, moves=self._take_moves(), retired=self._take_retired(), error=self.error,
            worker_failure=self.worker_failure,
            in_flight_tokens=self.sched.n_tokens_in_flight() if self.error else 0, n_submitted=self.n_submitted,
            n_done=self.n_done, n_steps=self.n_steps, n_tokens=self.n_tokens, n_generated=self.n_generated,
        )

    # -- micro-batch loops ---------------------------------------------------------
    async def _loop(self, mb: int) -> None:
        try:
            while not self._closed:
                if mb in self._resizes:
                    await self._maybe_resize(mb)
                elif mb in self.sched.retired and self.sched.running[mb] and not self.run.spec.local[mb]:
                    # a micro-batch the run grew past or gave up: its sequences go on in the live
                    # ones as they have room (K/V copied), and it closes without draining
                    self._n_swapped[mb] = self._n_swapped.get(mb, 0) + await self._take_out(
                        mb, len(self.sched.running[mb]))
                step = self.sched.schedule(mb)
                if step is not None and step.restored:  # (their K/V back into the cache first)
                    await self.run.swap_everywhere(mb, back=[[s.id, s.slot] for s in step.restored],
                                                   released=list(self._released[mb]))
                    for s in step.restored:
                        self._swap_sizes.pop(s.id, None)
                if step is None:
                    if self.sched.drained(mb):
                        await self._retire(mb)
                        return
                    await self._arrived.wait()
                    continue
                self._step_no[mb] += 1
                msg = StepMessage(
                    mb=mb, step=self._step_no[mb], slots=step.slots, starts=step.starts, counts=step.counts,
                    input_ids=step.input_ids, admitted=[[s.id, s.slot, s.params.to_dict()] for s in step.admitted],
                    released=self._released[mb], sample_rows=step.sample_rows, sample=[s.id for s in step.sample_seqs],
                )
                self._released[mb] = []
                self.n_in_flight += 1
                try:
                    tokens = await self.run.run_step(msg)
                except AttentionLost as lost:
                    if self.run.spec.local[mb]:  # (its KV is on a dense worker: cannot happen)
                        raise
                    await self._move(lost, msg)
                    continue
                finally:
                    self.n_in_flight -= 1
                self.n_steps += 1
                self.n_generated += len(tokens)
                self.n_tokens += step.n_tokens
                for c in self.sched.update(step, tokens):
                    self._released[mb].append(c.id)
                    self._results.append(dataclasses.asdict(c))
                    self.n_done += 1
                    self._results_ready.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the run fails as a whole; the caller sees why
            if is_worker_failure(e):
                logger.warning("glinthawk run %s micro-batch %d lost a worker: %s", self.run.spec.run_id, mb, e)
            else:
                logger.exception("glinthawk run %s micro-batch %d failed", self.run.spec.run_id, mb)
            if self.error is None:
                self.error = f"{type(e).__name__}: {e}"
                self.worker_failure = is_worker_failure(e)
            self._results_ready.set()

    # -- attention worker lost -----------------------------------------------------
    async def _move(self, lost: AttentionLost, msg: StepMessage) -> None:
        """Give micro-batch ``msg.mb`` of the lost worker's slice a KV cache on another
        attention worker (waiting for one if there is none) and rebuild its sequences'
        KV there; the other micro-batches go on meanwhile."""
        mb, spec, t0 = msg.mb, self.run.spec, time.time()
        logger.warning("glinthawk run %s: %s; moving micro-batch %d", spec.run_id, lost, mb)
        self._n_moves += 1
        kv_run = f"{spec.run_id}/mb{mb}-{self._n_moves}"
        try:
            address = await retry_until(lambda: self.run.open_moved_cache(lost, mb, kv_run),
                                        deadline=t0 + float(config.get("engine.recovery-timeout")),
                                        retry_on=lambda e: isinstance(e, NoAttentionWorker))
        except NoAttentionWorker as e:
            raise WorkerFailure(f"no attention worker could take micro-batch {mb}: {e}") from None
        await self.run.reroute_slice(lost.slice_index, mb, address, kv_run)
        # releases of the failed step may not have reached every slice: send them again
        self._released[mb] = list(msg.released) + self._released[mb]
        rebuilt = self.sched.rebuild(mb)
        self._moves.append({
            "kind": "moved micro-batch", "cause": str(lost), "micro_batch": mb, "to": address,
            "slice": lost.slice_index, "kv_run": kv_run,
            "requests": len(self.sched.running[mb]), "rebuilt_tokens": rebuilt, "rebuilt_tokens_exact": True,
            "seconds": time.time() - t0, "time": t0,
        })

    def _take_moves(self) -> list[dict]:
        out, self._moves = self._moves, []
        return out

    # -- a grown run ---------------------------------------------------------------
    def grow(self, new: list[int], keep: bool = False) -> None:
        """The run grew by micro-batches ``new`` (already added to every slice, see
        :meth:`~.slice_run.SliceRun.grow`): start them, and retire the others unless
        ``keep``.  Retired ones admit nothing more (see :meth:`retire`)."""
        spec = self.run.spec
        live = [m for m in range(self.sched.n_micro_batches) if m not in self.sched.retired]
        added = self.sched.add_micro_batches([spec.sizes[m] for m in new])
        if added != list(new):
            raise RuntimeError(f"the run's micro-batches disagree: the driver added {added}, the slice {new}")
        self._released += [[] for _ in new]
        self._step_no += [0] * len(new)
        if self._tasks:
            self._tasks += [asyncio.create_task(self._loop(m)) for m in new]
        self.retire([] if keep else live)
        logger.info("glinthawk run %s grew by %d micro-batches of %s slots; retiring %s", spec.run_id, len(new),
                    [spec.sizes[m] for m in new], [] if keep else live)

    def retire(self, micro_batches: list[int]) -> None:
        """Admit nothing more into ``micro_batches``: their sequences go on in the live
        ones as those have room (taken out of their caches, see :meth:`_take_out`; those
        past ``glinthawk.engine.swap-bytes`` run to their end where they are), and once
        empty every slice closes the caches none of the live micro-batches is in."""
        for m in micro_batches:
            self.sched.retire(m)
        self._arrived.set()  # (idle micro-batches now drained retire at once)
        self._arrived = asyncio.Event()

    async def _retire(self, mb: int) -> None:
        t0 = time.time()
        released, self._released[mb] = self._released[mb], []
        try:
            closed = await self.run.retire_everywhere(mb, released)
        except Exception as e:  # its caches close with the run
            if not is_worker_failure(e):
                raise
            logger.warning("glinthawk run %s: micro-batch %d drained, its caches not closed: %s",
                           self.run.spec.run_id, mb, e)
            closed = []
        self._retired.append({"kind": "retired micro-batch", "micro_batch": mb, "closed": closed,
                              "swapped_out": self._n_swapped.pop(mb, 0), "seconds": time.time() - t0, "time": t0})

    # -- a micro-batch resized in place ------------------------------------------------
    def resize(self, mb: int, n: int) -> None:
        """Give micro-batch ``mb`` ``n`` slots, in place, between two of its steps: at
        once to grow (the scheduler's ledger holds the KV already), or, to shrink, once
        it runs no more than ``n`` sequences (it admits no more until then); its
        sequences past ``n`` slots move into free ones below, their KV copied as it is."""
        sched = self.sched
        if not (0 < n and mb < sched.n_micro_batches and mb not in sched.retired):
            raise ValueError(f"micro-batch {mb} cannot take {n} slots")
        if n > sched.sizes[mb] and not sched.may_resize(mb, n):
            raise ValueError(f"micro-batch {mb} cannot grow past its slots: others follow it")
        if n < sched.sizes[mb]:
            sched.cap(mb, n)
        self._resizes[mb] = n
        self._arrived.set()  # (an idle micro-batch resizes at once)
        self._arrived = asyncio.Event()

    async def _maybe_resize(self, mb: int) -> None:
        """Resize ``mb`` as asked if its sequences fit; to shrink, first take those past
        the new size out of its caches (their K/V kept on the dense workers, up to
        ``glinthawk.engine.swap-bytes`` in all), to go back into any micro-batch's free
        slot before new requests; the others it waits for to end."""
        n, sched = self._resizes[mb], self.sched
        excess = len(sched.running[mb]) - n
        if excess > 0 and n < sched.sizes[mb]:
            self._n_swapped[mb] = self._n_swapped.get(mb, 0) + await self._take_out(mb, excess)
        if sched.may_resize(mb, n):
            await self._resize(mb)

    async def _take_out(self, mb: int, k: int) -> int:
        """Take up to ``k`` of ``mb``'s sequences (those in its highest slots) out of its
        caches, their K/V kept on the dense workers while ``glinthawk.engine.swap-bytes``
        allows; they go back into the first free slots of any micro-batch, before new
        requests; and while the dense worker's memory allows (``SliceRun.host_room``).
        How many it took out."""
        per_token = self.run.kv_bytes_per_token
        room = int(config.get("engine.swap-bytes")) - sum(self._swap_sizes.values())
        if room > 0:  # (the worker's memory asked only then: a given-up micro-batch asks every step)
            room = min(room, self.run.host_room())
        out = self.sched.swap_out(mb, k, max_tokens=max(0, room) // per_token)
        if out:
            sizes = {s.id: per_token * s.n_cached for s in out}
            await self.run.swap_everywhere(mb, out=list(sizes), released=list(self._released[mb]))
            self.sched.set_aside(out)  # (only now: another micro-batch's loop may take them back at once)
            self._swap_sizes.update(sizes)
            self._arrived.set()  # (an idle micro-batch with free slots takes them back at once)
            self._arrived = asyncio.Event()
        return len(out)

    async def _resize(self, mb: int) -> None:
        n, old, t0 = self._resizes.pop(mb), self.sched.sizes[mb], time.time()
        if n == old:
            self.sched.caps.pop(mb, None)
            return
        moves = self.sched.resize(mb, n) if n < old else []  # (a growth takes its slots once the caches have)
        record = {"kind": "resized micro-batch", "micro_batch": mb, "from": old, "to": n, "moved": len(moves),
                  "swapped_out": self._n_swapped.pop(mb, 0), "time": t0}
        try:
            record["caches"] = await self.run.resize_everywhere(mb, n, [list(m) for m in moves],
                                                                list(self._released[mb]))
        except Exception as e:
            # a growth leaves every cache as it was (a lost worker's step finds it lost and
            # moves the micro-batch); a shrink moved sequences: the run must start again
            if n < old or not (isinstance(e, MemoryError) or is_worker_failure(e)):
                raise
            logger.warning("glinthawk run %s: micro-batch %d did not grow to %d slots: %s: %s",
                           self.run.spec.run_id, mb, n, type(e).__name__, e)
            record.update(error=f"{type(e).__name__}: {e}", to=old)
        else:
            if n > old:
                self.sched.resize(mb, n)
        record["seconds"] = time.time() - t0
        self._retired.append(record)
        self._results_ready.set()

    def _take_retired(self) -> list[dict]:
        out, self._retired = self._retired, []
        return out

    async def close(self) -> None:
        self._closed = True
        self._arrived.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
