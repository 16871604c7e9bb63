"""One run's part on a dense worker: a slice of layers, run for every micro-batch in flight.

For each micro-batch step the slice runs the dense half of each layer on the worker's
one compute stream, sends q/k/v to the micro-batch's attention worker and goes on with
the next layer when its output comes back (:class:`_TwoTierStep`), so while one
micro-batch waits for attention another one computes.  The residual stream never
leaves the worker; between slices only the hidden state travels, and the last slice
samples the next tokens, which return to the first slice as the reply.

Micro-batches whose KV lives here (every one in single-tier mode, the plan's local
ones in hybrid mode) run a slice step as one compute job, attention included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

import torch

from .. import config
from ..engine.runner import SliceLayers, attend_locally, run_layers
from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.ops import RopeTable, embed, head
from ..model.weights import SliceWeights
from ..sampling import SamplingParams, make_generator, sample
from .compute import ComputeStream, settle_threadsafe
from .dataplane import DataPlane
from .driver import NoAttentionWorker, RunDriver
from .faults import AttentionLost, StaleRunError, is_worker_failure
from .messages import (AttendReply, AttendRequest, ForwardReply, ForwardRequest, SliceSpec, StepLayout, StepMessage,
                       pack, unpack)
from .staging import HostStaging

__all__ = ["SliceRun"]

# Every dense job runs at one priority: in the order it became ready.  (Deepest layer
# first starved the micro-batches starting a step behind all the others: 50 ms from the
# attention tier, the prompts of a pipeline sixteen deep went through prefill one after
# another and each step's first job waited 50-65 ms a step; 5% slower in three runs of
# each order, see benchmarks/LOG.md.)
DENSE_PRIORITY = 0


class SliceRun:
    """One run's state on one dense worker."""

    def __init__(self, spec: SliceSpec, weights: SliceWeights, *, worker: Any, stream: ComputeStream,
                 dataplane: DataPlane) -> None:
        self.worker = worker  # the Dask worker hosting the slice
        self.stream = stream  # the worker's dense compute stream
        self.dataplane = dataplane  # its dense data plane
        self.spec = spec
        self.weights = weights
        self.config = weights.config
        self.device = weights.device
        self.rope = RopeTable.build(self.config, spec.max_seq_len, dtype=weights.dtype, device=self.device)
        n = spec.n_micro_batches
        spec.sizes = list(spec.sizes) or [spec.micro_batch_size] * n
        spec.local = list(spec.local) or [spec.mode == "single-tier"] * n
        self.global_base = [sum(spec.sizes[:m]) for m in range(n)]  # the driver's slot numbers
        self.next_base = sum(spec.sizes)  # the first slot number no micro-batch ever had (as the driver's)
        if not spec.slot_base:
            spec.slot_base = list(self.global_base)
        self.cache: KVCache | None = None  # the local micro-batches' KV
        n_local = sum(size for size, local in zip(spec.sizes, spec.local) if local)
        if n_local:
            self.cache = KVCache(
                self.config, n_local, spec.max_seq_len,
                layer_start=spec.start, layer_stop=spec.stop, dtype=weights.dtype, device=self.device,
            )
        if any(not local and not spec.attention[m:m + 1] for m, local in enumerate(spec.local)):
            raise ValueError("every remote micro-batch needs an attention worker")
        # the KV cache of each micro-batch on its attention worker: the run's own, or one
        # opened for it alone after it moved (see reroute)
        self.kv_runs = [spec.run_id] * spec.n_micro_batches
        self.staging = [HostStaging(self.device) for _ in range(spec.n_micro_batches)]  # device → wire
        self.retired: set[int] = set()  # micro-batches that drained after the run grew or gave them up
        self.swapped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # K/V of sequences taken out, by id
        elem = torch.tensor([], dtype=weights.dtype).element_size()
        self.kv_bytes_per_token = self.config.kv_bytes_per_token(elem, self.config.n_layers)  # (every slice's)
        self.params: dict[str, SamplingParams] = {}
        self.generators: dict[str, torch.Generator | None] = {}
        self.driver: RunDriver | None = None  # on the first slice

    # -- per step ------------------------------------------------------------------
    def _local_slot(self, mb: int, slot: int) -> int:
        return self.spec.slot_base[mb] + slot - self.global_base[mb]

    def _layout(self, msg: StepMessage) -> StepLayout:
        mb = msg.mb
        return StepLayout(
            slots=[self._local_slot(mb, s) for s in msg.slots], starts=msg.starts, counts=msg.counts,
            admitted=[[a[0], self._local_slot(mb, a[1])] for a in msg.admitted], released=msg.released,
        )

    def _track_sampling(self, msg: StepMessage) -> None:
        if not self.weights.is_last:
            return
        for seq_id in msg.released:
            self.params.pop(seq_id, None)
            self.generators.pop(seq_id, None)
        for seq_id, _, params in msg.admitted:
            if seq_id in self.params:  # re-admitted to rebuild its KV: its generator goes on
                continue
            p = SamplingParams.from_dict(params)
            self.params[seq_id] = p
            self.generators[seq_id] = None if p.is_greedy else make_generator(p.seed)

    def _head_and_sample(self, x: torch.Tensor, msg: StepMessage) -> list[int]:
        rows = torch.tensor(msg.sample_rows, dtype=torch.long, device=x.device)
        if not len(rows):
            return []
        logits = head(self.weights, x[rows])  # [N, V]
        ids = msg.sample
        return sample(logits, [self.params[i] for i in ids], [self.generators[i] for i in ids]).tolist()

    def _inputs(self, msg: StepMessage, x: torch.Tensor | None, slots: list[int] | None = None):
        batch = AttentionBatch.build(slots or msg.slots, msg.starts, msg.counts, device=self.device)
        cos, sin = self.rope.at(batch.positions, batch.max_position)
        if x is None:
            ids = torch.tensor(msg.input_ids, dtype=torch.long, device=self.device)
            x = embed(self.weights, ids)  # [T, dim]
        else:  # from the previous slice, on the host
            x = x.to(self.device, non_blocking=True).to(self.weights.dtype)
        return batch, cos, sin, x

    async def run_step(self, msg: StepMessage, x: torch.Tensor | None = None) -> list[int]:
        """Run this slice for one micro-batch step; return the sampled tokens."""
        self._track_sampling(msg)
        if self.spec.local[msg.mb]:
            result = await self.stream.submit(
                DENSE_PRIORITY, lambda: self._local(msg, x), kind="dense", micro_batch=msg.mb,
                layer=self.spec.start,
            )
        else:
            result = await self._two_tier(msg, x)
        if self.weights.is_last:
            return result
        return await self._forward_next(msg, result)

    @torch.inference_mode()
    def _local(self, msg: StepMessage, x_in: torch.Tensor | None):
        """A step of a micro-batch whose KV is here: every layer in one job."""
        cache, layout = self.cache, self._layout(msg)
        cache.apply(layout.released, [(a[0], a[1]) for a in layout.admitted])
        batch, cos, sin, x = self._inputs(msg, x_in, layout.slots)
        x = run_layers(self.weights, x, cos, sin, attend_locally(cache, batch))
        return self._head_and_sample(x, msg) if self.weights.is_last else self.staging[msg.mb].to_host(x)[0]

    async def _two_tier(self, msg: StepMessage, x_in: torch.Tensor | None):
        mb = msg.mb
        address = self.spec.attention[mb]
        try:
            channel = await self.dataplane.channel(address, "attention", self.spec.peer_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise AttentionLost(address, self.spec.slice_index, mb, f"{type(e).__name__}: {e}") from None
        done = asyncio.get_running_loop().create_future()
        _TwoTierStep(self, msg, x_in, channel, done).start()
        return await done

    def reroute(self, mb: int, address: str, kv_run: str) -> None:
        """Send micro-batch ``mb``'s attention to ``address``, to the cache ``kv_run``
        that holds its slots alone (from 0)."""
        self.spec.attention[mb] = address
        self.spec.slot_base[mb] = 0
        self.kv_runs[mb] = kv_run

    # -- a grown run (see RunDriver.grow) ---------------------------------------------
    def grow(self, attention: list[str], slot_base: list[int], sizes: list[int], kv_run: str) -> list[int]:
        """Add remote micro-batches after the others: one per entry, on attention worker
        ``attention[i]`` from slot ``slot_base[i]`` of its cache ``kv_run``, of
        ``sizes[i]`` slots; their indices."""
        spec = self.spec
        new = []
        for addr, base, size in zip(attention, slot_base, sizes, strict=True):
            new.append(len(spec.sizes))
            self.global_base.append(self.next_base)
            self.next_base += int(size)
            spec.sizes.append(int(size))
            spec.local.append(False)
            spec.attention.append(addr)
            spec.slot_base.append(int(base))
            self.kv_runs.append(kv_run)
            self.staging.append(HostStaging(self.device))
        spec.n_micro_batches = len(spec.sizes)
        return new

    async def retire(self, mb: int, released: list[str]) -> list[dict]:
        """Micro-batch ``mb`` of a grown run has drained: forget its last sequences'
        sampling state (``released``) and, once every micro-batch in the cache that held
        it has drained, close that cache and give its KV back to the scheduler.  What
        was closed (``address``, ``cache``, ``slots``, ``bytes``)."""
        spec = self.spec
        self.retired.add(mb)
        self.staging[mb] = HostStaging(self.device)
        for seq_id in released:
            self.params.pop(seq_id, None)
            self.generators.pop(seq_id, None)
        if spec.local[mb]:
            return []
        key = (spec.attention[mb], self.kv_runs[mb])
        sharing = [m for m in range(spec.n_micro_batches) if not spec.local[m]
                   and (spec.attention[m], self.kv_runs[m]) == key]
        if not self.retired.issuperset(sharing):
            return []
        address, kv_run = key
        slots = sum(spec.sizes[m] for m in sharing)
        elem = torch.tensor([], dtype=self.weights.dtype).element_size()
        nbytes = self.config.kv_bytes_per_token(elem, 1) * (spec.stop - spec.start) * spec.max_seq_len * slots
        try:
            await asyncio.wait_for(self.worker.rpc(address).glinthawk_kv_close(run_id=kv_run, exact=True),
                                   spec.peer_timeout)
        except Exception as e:  # a lost worker's cache is gone with it; the run's close frees the rest
            if not is_worker_failure(e):
                raise
        await self.worker.scheduler.glinthawk_release(run_id=spec.run_id, address=address, nbytes=nbytes)
        return [{"address": address, "cache": kv_run, "slots": slots, "bytes": nbytes}]

    async def resize(self, mb: int, n: int, moves: list, released: list) -> dict:
        """Give remote micro-batch ``mb`` ``n`` slots (see RunDriver.resize): its cache
        on its attention worker, which holds it alone from slot 0, resizes, the
        sequences ``released`` since its last step freed and its sequences ``moves``
        (``[seq_id, slot]``, the driver's slot numbers) moved first.
        ``{"address", "cache", "before", "after"}`` (bytes the cache held)."""
        spec = self.spec
        address, kv_run = spec.attention[mb], self.kv_runs[mb]
        others = [m for m in range(spec.n_micro_batches) if m != mb and m not in self.retired
                  and not spec.local[m] and (spec.attention[m], self.kv_runs[m]) == (address, kv_run)]
        if spec.local[mb] or spec.slot_base[mb] != 0 or others:
            raise ValueError(f"micro-batch {mb} of run {spec.run_id} does not hold its cache alone")
        reply = await self._cache_call(mb, "glinthawk_kv_resize", n_slots=n, released=released,
                                       moves=[[i, self._local_slot(mb, slot)] for i, slot in moves])
        spec.sizes[mb] = int(n)
        self.next_base = max(self.next_base, self.global_base[mb] + int(n))
        return {"address": address, "cache": kv_run, **reply}

    async def resize_everywhere(self, mb: int, n: int, moves: list, released: list) -> list[dict]:
        """:meth:`resize` micro-batch ``mb`` on every slice, then the run's KV in the
        scheduler's ledger (``glinthawk_resize``: a shrunk cache's KV goes back); what each
        cache held before and after.  When a cache cannot grow (``MemoryError``, or its
        worker lost), those that grew shrink back and the ledger's KV goes back before
        the error goes on."""
        spec, done = self.spec, []
        old = spec.sizes[mb]

        async def one(s: int, k: int, moved: list) -> dict:
            if s == spec.slice_index:
                return await self.resize(mb, k, moved, released)
            return await self.worker.rpc(spec.dense[s]).glinthawk_slice_resize_cache(
                run_id=spec.run_id, micro_batch=mb, n_slots=k, moves=moved, released=released)
        ledger = self.worker.scheduler
        try:
            for s in range(len(spec.dense)):
                done.append(await one(s, n, moves))
            reply = await ledger.glinthawk_resize(run_id=spec.run_id, micro_batch=mb, n_slots=n)
            if reply and "error" in reply:  # (a growth the client did not reserve, and no room for it)
                raise MemoryError(reply["error"])
        except Exception as e:
            if n > old:  # (nothing moved: those that grew can shrink back)
                for s in range(len(done)):
                    try:
                        await one(s, old, [])
                    except Exception as again:
                        if not (is_worker_failure(again) and is_worker_failure(e)):
                            raise
                await ledger.glinthawk_resize(run_id=spec.run_id, micro_batch=mb, n_slots=old)
            raise
        return done

    async def _cache_call(self, mb: int, op: str, **kwargs: Any) -> dict:
        """``op`` on micro-batch ``mb``'s cache on its attention worker (``run_id`` the
        cache's), within the peer timeout; the reply.  One that is no reply, or says the
        worker does not hold the cache (closing, or restarted), raises StaleRunError."""
        address, kv_run = self.spec.attention[mb], self.kv_runs[mb]
        reply = await asyncio.wait_for(getattr(self.worker.rpc(address), op)(run_id=kv_run, **kwargs),
                                       self.spec.peer_timeout)
        if not isinstance(reply, dict) or "stale" in reply:
            raise StaleRunError(f"{address} did not answer {op} for cache {kv_run}: {reply!r}")
        return reply

    # -- sequences taken out of a cache, and put back (see RunDriver.resize) ------------
    def host_room(self) -> int:
        """The K/V bytes (of every slice) the run may still keep out of its caches by this
        worker's memory: this process stays under ``glinthawk.engine.swap-memory-fraction``
        of its memory limit (the machine's memory without one) and takes at most that
        fraction of the memory the machine has available; this slice's share, scaled to
        the whole run."""
        import psutil

        from .ledger import total_memory

        fraction = float(config.get("engine.swap-memory-fraction"))
        limit = getattr(getattr(self.worker, "memory_manager", None), "memory_limit", None) or total_memory()
        free = min(limit * fraction - psutil.Process().memory_info().rss, psutil.virtual_memory().available * fraction)
        share = (self.spec.stop - self.spec.start) / self.config.n_layers
        return max(0, int(free / share))

    async def swap_out(self, mb: int, seq_ids: list[str], released: list[str]) -> None:
        """Take sequences ``seq_ids`` out of micro-batch ``mb``'s cache on its attention
        worker (those ``released`` since its last step freed first), keeping their K/V
        here."""
        reply = await self._cache_call(mb, "glinthawk_kv_swap_out", seq_ids=seq_ids, released=released)
        for seq_id, (k, v) in reply["kv"].items():
            self.swapped[seq_id] = unpack(k), unpack(v)  # [Ll, KVH, n, D] each

    async def swap_in(self, mb: int, entries: list, released: list[str]) -> None:
        """Put sequences taken out back, into micro-batch ``mb``'s cache (those
        ``released`` since its last step freed first): ``entries`` of ``[seq_id, slot]``
        (the driver's slot numbers)."""
        payload = [[seq_id, self._local_slot(mb, slot), *map(pack, self.swapped[seq_id])] for seq_id, slot in entries]
        await self._cache_call(mb, "glinthawk_kv_swap_in", entries=payload, released=released)
        for seq_id, _ in entries:
            self.swapped.pop(seq_id, None)

    async def swap_everywhere(self, mb: int, out: list[str] | None = None, released: list[str] | None = None,
                              back: list | None = None) -> None:
        """On every slice: :meth:`swap_out` sequences ``out`` of micro-batch ``mb``, or
        :meth:`swap_in` ``back`` (``[seq_id, slot]``) into it, the sequences ``released``
        since its last step freed first."""
        spec, released = self.spec, released or []
        for s, address in enumerate(spec.dense):
            if out is not None:
                if s == spec.slice_index:
                    await self.swap_out(mb, out, released)
                else:
                    await self.worker.rpc(address).glinthawk_slice_swap_out(
                        run_id=spec.run_id, micro_batch=mb, seq_ids=out, released=released)
            elif s == spec.slice_index:
                await self.swap_in(mb, back or [], released)
            else:
                await self.worker.rpc(address).glinthawk_slice_swap_in(run_id=spec.run_id, micro_batch=mb,
                                                                       entries=back or [], released=released)

    async def retire_everywhere(self, mb: int, released: list[str]) -> list[dict]:
        """:meth:`retire` micro-batch ``mb`` on every slice (this one and the other dense
        workers'); the caches closed."""
        spec, closed = self.spec, []
        for s, address in enumerate(spec.dense):
            if s == spec.slice_index:
                closed += await self.retire(mb, released)
            else:
                closed += await self.worker.rpc(address).glinthawk_slice_retire(
                    run_id=spec.run_id, micro_batch=mb, released=released)
        return closed

    # -- a lost attention worker (the driver's side, see RunDriver) ------------------
    async def open_moved_cache(self, lost: AttentionLost, mb: int, kv_run: str) -> str:
        """One try at a new attention worker for micro-batch ``mb`` of slice
        ``lost.slice_index``: the scheduler picks one (and reserves its KV), and the
        cache ``kv_run`` of the micro-batch's slots opens there; its address.  Raises
        :class:`~.driver.NoAttentionWorker` when none can take it yet."""
        spec, worker = self.spec, self.worker
        a, b = spec.slices[lost.slice_index]
        reply = await worker.scheduler.glinthawk_replace(
            run_id=spec.run_id, lost=lost.address, slice_index=lost.slice_index, n_slots=spec.sizes[mb],
            n_layers=b - a, max_seq_len=spec.max_seq_len, micro_batch=mb, kv_run=kv_run,
        )
        if "address" not in reply:
            raise NoAttentionWorker(reply["error"])
        address = reply["address"]
        try:
            await asyncio.wait_for(worker.rpc(address).glinthawk_kv_open(
                run_id=kv_run, config=dataclasses.asdict(self.config), layer_start=a, layer_stop=b,
                n_slots=spec.sizes[mb], max_seq_len=spec.max_seq_len, dtype=spec.dtype, latency=spec.latency,
                depth=len(spec.sizes),
            ), spec.peer_timeout)
        except Exception as e:
            if not is_worker_failure(e):
                raise
            raise NoAttentionWorker(f"{address}: {e}") from None
        return address

    async def reroute_slice(self, slice_index: int, mb: int, address: str, kv_run: str) -> None:
        """:meth:`reroute` micro-batch ``mb`` on slice ``slice_index`` (this one, or
        another dense worker's)."""
        if slice_index == self.spec.slice_index:
            self.reroute(mb, address, kv_run)
        else:
            await self.worker.rpc(self.spec.dense[slice_index]).glinthawk_slice_reroute(
                run_id=self.spec.run_id, micro_batch=mb, address=address, kv_run=kv_run)

    async def _forward_next(self, msg: StepMessage, x: torch.Tensor) -> list[int]:
        # the next slices may each wait a peer timeout before they report a lost attention worker
        downstream = max(1, len(self.spec.slices) - self.spec.slice_index - 1)
        timeout = self.spec.peer_timeout * (downstream + 1)
        channel = await self.dataplane.channel(self.spec.next_address, "dense", self.spec.peer_timeout)
        request = ForwardRequest(run_id=self.spec.run_id, msg=msg.to_wire())
        reply = await channel.arequest("glinthawk_forward", request.to_wire(), {"x": x}, timeout=timeout)
        return ForwardReply.from_wire(reply).tokens


class _TwoTierStep:
    """One micro-batch step through a slice's layers, driven on the compute stream.

    Each dense job sends its q/k/v to the attention worker the moment it has them, and
    the reply queues the next layer's dense job on the same thread: the event loop sees
    the step only at its start and at its end (``done`` gets the sampled tokens, or the
    hidden state [T, dim] on the host for the next slice, or the error).
    """

    def __init__(self, run: SliceRun, msg: StepMessage, x_in: torch.Tensor | None, channel: Any,
                 done: asyncio.Future) -> None:
        self.run, self.msg, self.x_in, self.channel, self.done = run, msg, x_in, channel, done
        self.mb = msg.mb
        self.stream = run.stream
        self.staging = run.staging[self.mb]
        self.layers: SliceLayers | None = None  # the dense half of the slice's layers, set by the first job
        self.finished = False

    def start(self) -> None:
        start = self.run.spec.start
        self.stream.submit(DENSE_PRIORITY, self._guarded(self._first), kind="dense", micro_batch=self.mb,
                           layer=start, on_done=lambda _, error: error and self.finish(error=error))

    def _guarded(self, fn, *args):
        def job():
            try:
                with torch.inference_mode():
                    fn(*args)
            except Exception as e:
                self.finish(error=e)
        return job

    # -- on the stream thread --------------------------------------------------------
    def _first(self) -> None:
        run = self.run
        _, cos, sin, x = run._inputs(self.msg, self.x_in)
        self.layers = SliceLayers(run.weights, x, cos, sin)
        self._send(run.spec.start, self.staging.to_host(*self.layers.begin()))

    def _send(self, layer: int, qkv: tuple[torch.Tensor, ...]) -> None:
        spec = self.run.spec
        args = AttendRequest(run_id=self.run.kv_runs[self.mb], micro_batch=self.mb, step=self.msg.step, layer=layer,
                             layout=self.run._layout(self.msg).to_wire() if layer == spec.start else None)
        # an induced latency is held on the attention side, on the request and on the
        # reply (see DataPlane): here the request leaves now, its deadline the longer
        self.channel.request("glinthawk_attend", args.to_wire(), {"q": qkv[0], "k": qkv[1], "v": qkv[2]},
                             functools.partial(self._reply, layer), spec.peer_timeout + 2 * spec.latency)

    def _reply(self, layer: int, reply: Any, error: BaseException | None) -> None:
        if self.finished or self.done.done():  # settled, or nobody waits (the run closed)
            return
        spec = self.run.spec
        if error is None:
            reply = AttendReply.from_wire(reply)
            if reply.stale is not None:  # refused: the attention worker does not hold the run
                error = StaleRunError(reply.stale)
        if error is not None:
            if isinstance(error, (OSError, TimeoutError, StaleRunError)):
                error = AttentionLost(self.channel.peer, spec.slice_index, self.mb, f"{type(error).__name__}: {error}")
            self.finish(error=error)
            return
        self.stream.push(DENSE_PRIORITY, self._guarded(self._dense, layer, reply.o), kind="dense",
                         micro_batch=self.mb, layer=layer)

    def _dense(self, layer: int, o: torch.Tensor) -> None:
        qkv = self.layers.resume(layer, o)  # o [T, H, D] on the host
        if qkv is not None:
            self._send(layer + 1, self.staging.to_host(*qkv))
            return
        run, x = self.run, self.layers.x  # [T, dim]
        self.finish(run._head_and_sample(x, self.msg) if run.weights.is_last else self.staging.to_host(x)[0])

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Settle the step (from the stream thread or the loop), once."""
        if not self.finished:
            self.finished = True
            settle_threadsafe(self.done, result, error)
