"""Tier 2 on a Dask worker: KV caches as worker-resident state, attention on request.

Dense workers call :meth:`AttentionService.attend` over the data plane
(:mod:`~glinthawk_dask.runtime.dataplane`, worker to worker; the scheduler never sees
these messages).  The data plane's sockets are served on this worker's compute stream:
the requests that arrive together are computed there at once, with no hop through the
event loop.  A run opens one
:class:`~glinthawk_dask.model.kv_cache.KVCache` here for its slice of layers, sized up
front within the worker's KV budget, so attention memory can never grow past it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..model import cpu_attention
from ..model.attention import AttentionBatch
from ..model.config import ModelConfig
from ..model.kv_cache import KVCache
from .compute import ComputeStream
from .dataplane import DataPlane
from .messages import DTYPES, AttendReply, StepLayout, pack, unpack
from .thread_tuner import ThreadTuner

logger = logging.getLogger(__name__)

__all__ = ["AttentionService"]

@dataclass
class _Run:
    cache: KVCache
    latency: float
    batches: dict[int, tuple[int, AttentionBatch]]  # micro-batch -> (step, layout)
    tuner: ThreadTuner | None = None  # chooses the torch threads of the run's attention
    threads: int | None = None  # what the tuner chose last (None: the worker's own)


class AttentionService:
    """Holds the KV caches of runs and answers attention requests."""

    def __init__(self, worker: Any, kv_budget: int, threads: int | None = None,
                 try_threads: int | None = None) -> None:
        self.worker = worker
        self.kv_budget = int(kv_budget)
        self.runs: dict[str, _Run] = {}
        self.stream = ComputeStream("glinthawk-attention", threads=threads)
        # the compiled decode kernel, loaded while the worker starts rather than in a run's first step
        self.warmed = threading.Event()
        threading.Thread(target=self._warm, name="glinthawk-warm-kernel", daemon=True).start()
        self.threads = threads  # the stream's torch threads (None: torch's own count)
        # runs one micro-batch deep also try attention on this many threads (a ThreadTuner)
        self.try_threads = try_threads if try_threads and threads and try_threads > threads else None
        self._threads_now = threads
        self.thread_picks: collections.deque[dict] = collections.deque(maxlen=64)  # the tuners' picks, latest last
        self._scratch: dict[tuple, tuple[KVCache, AttentionBatch]] = {}  # the cache and layout of probe requests
        self._lock = threading.Lock()  # cache work: the stream thread, or the loop (rpc callers)
        self.dataplane = DataPlane(
            worker, self.stream, "attention", ["glinthawk_attend", "glinthawk_attend_probe", "glinthawk_echo"],
            inline={"glinthawk_attend": (self.attend_now, self.attend),
                    "glinthawk_attend_probe": (self._probe_inline, self.probe),
                    "glinthawk_echo": (self._echo_inline, self.echo)},
            latency=lambda kwargs: self._latency(kwargs.get("run_id")),
        )

    def _warm(self) -> None:
        try:
            cpu_attention.warm()
        finally:
            self.warmed.set()

    async def ready(self, timeout: float = 30.0) -> bool:
        """Whether the worker has loaded its attention kernel, waiting up to ``timeout``
        seconds for it: about a second of a core as the worker starts, which a
        measurement of the cluster's speed must not share the machine with."""
        deadline = time.monotonic() + timeout
        while not self.warmed.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.warmed.is_set()

    # -- handlers (event loop) -------------------------------------------------------
    def handlers(self) -> dict[str, Any]:
        return {
            "glinthawk_attention_ready": self.ready,
            "glinthawk_kv_open": self.open,
            "glinthawk_kv_close": self.close_run,
            "glinthawk_kv_resize": self.resize,
            "glinthawk_kv_swap_out": self.swap_out,
            "glinthawk_kv_swap_in": self.swap_in,
            "glinthawk_attend": self.attend,
            "glinthawk_attend_probe": self.probe,
            "glinthawk_echo": self.echo,
            "glinthawk_kv_info": self.info,
            "glinthawk_profile_attention": self.profile,
        }

    def open(
        self,
        run_id: str,
        config: dict,
        layer_start: int,
        layer_stop: int,
        n_slots: int,
        max_seq_len: int,
        dtype: str = "float32",
        latency: float = 0.0,
        depth: int | None = None,
    ) -> dict:
        """Allocate the KV cache of a run (idempotent for the same run).

        ``depth`` is how many micro-batches the run keeps in flight: a run one deep (the
        dense tier waits while attention computes) also tries attention on the worker's
        ``try_threads`` (``glinthawk.attention.try-threads``) and keeps what is faster.
        """
        if run_id in self.runs:
            return self.info(run_id)
        cfg = ModelConfig(**config)
        need = cfg.kv_bytes_per_token(torch.tensor([], dtype=DTYPES[dtype]).element_size(),
                                      layer_stop - layer_start) * n_slots * max_seq_len
        if need > self.kv_budget - self.used_bytes():
            raise MemoryError(
                f"KV cache of {need / 2**20:.0f} MiB does not fit the {self.kv_budget / 2**20:.0f} MiB "
                f"KV budget of {self.worker.address}: lower the micro-batch size or max_seq_len, "
                "or add attention workers"
            )
        cache = KVCache(cfg, n_slots, max_seq_len, layer_start=layer_start, layer_stop=layer_stop,
                        dtype=DTYPES[dtype], threads=None)  # the kernel on the threads each job runs with
        tuner = ThreadTuner((self.threads, self.try_threads)) if self.try_threads and depth == 1 else None
        self.runs[run_id] = _Run(cache, float(latency), {}, tuner)
        logger.info("glinthawk run %s: %r", run_id, cache)
        return self.info(run_id)

    async def _between_steps(self, run_id: str, released: list | None, fn: Any) -> dict:
        """``fn(cache)`` on the compute stream for the KV cache ``run_id``, between two steps
        of its micro-batch, once the sequences ``released`` since its last step are freed
        (their slots may be the ones ``fn`` uses); its result, or ``{"stale": why}`` for a
        run not open here."""
        run = self.runs.get(run_id)
        if run is None:
            return {"stale": f"run {run_id!r} is not open on {self.worker.address}"}

        def job() -> dict:
            with self._lock:
                run.cache.apply(released or [], [])
                return fn(run.cache)

        return await self.stream.run(job)

    async def resize(self, run_id: str, n_slots: int, moves: list | None = None, released: list | None = None) -> dict:
        """Resize the KV cache ``run_id`` to ``n_slots`` slots, its sequences ``moves``
        (``[seq_id, slot]``) moved (see :meth:`KVCache.resize`): ``{"before": bytes,
        "after": bytes}`` it held (see :meth:`_between_steps`).  Raises ``MemoryError``
        when a larger cache does not fit the worker's KV budget."""
        run = self.runs.get(run_id)
        if run is not None:
            before = run.cache.capacity_bytes
            if before // run.cache.n_slots * int(n_slots) - before > self.kv_budget - self.used_bytes():
                raise MemoryError(f"{n_slots} KV slots do not fit the KV budget of {self.worker.address}")

        def resize(cache: KVCache) -> dict:
            before = cache.capacity_bytes
            cache.resize(int(n_slots), [(seq_id, int(slot)) for seq_id, slot in moves or ()])
            logger.info("glinthawk run %s: resized to %r", run_id, cache)
            return {"before": before, "after": cache.capacity_bytes}

        return await self._between_steps(run_id, released, resize)

    async def swap_out(self, run_id: str, seq_ids: list, released: list | None = None) -> dict:
        """Take sequences ``seq_ids`` out of the KV cache ``run_id``: ``{"kv": {seq_id: [k,
        v]}}``, each packed ``[Ll, KVH, n, D]``, their slots freed (see :meth:`_between_steps`)."""
        def take(cache: KVCache) -> dict:
            out = {}
            for seq_id in seq_ids:
                out[seq_id] = [pack(t) for t in cache.export(seq_id)]
                cache.free(seq_id)
            return {"kv": out}

        return await self._between_steps(run_id, released, take)

    async def swap_in(self, run_id: str, entries: list, released: list | None = None) -> dict:
        """Put sequences taken out by :meth:`swap_out` back into the KV cache ``run_id``:
        ``entries`` of ``[seq_id, slot, k, v]``; ``{}`` (see :meth:`_between_steps`)."""
        def put(cache: KVCache) -> dict:
            for seq_id, slot, k, v in entries:
                cache.restore(seq_id, int(slot), unpack(k), unpack(v))
            return {}

        return await self._between_steps(run_id, released, put)

    def close_run(self, run_id: str, exact: bool = False) -> None:
        """Free the run's KV caches (also those opened for micro-batches moved here or
        for a grown run's new ones); with ``exact``, the cache ``run_id`` alone."""
        for key in [k for k in self.runs if k == run_id or (not exact and k.startswith(run_id + "/"))]:
            self.runs.pop(key, None)

    def used_bytes(self) -> int:
        return sum(r.cache.capacity_bytes for r in self.runs.values())

    def info(self, run_id: str | None = None) -> dict:
        out = {"kv_budget": self.kv_budget, "kv_allocated": self.used_bytes(), "runs": {},
               "thread_picks": [p for p in self.thread_picks if run_id is None or p["run_id"] == run_id]}
        for rid, r in self.runs.items():
            if run_id is None or rid == run_id:
                out["runs"][rid] = {
                    "n_slots": r.cache.n_slots,
                    "live": len(r.cache),
                    "used_bytes": r.cache.used_bytes,
                    "capacity_bytes": r.cache.capacity_bytes,
                }
        return out

    async def attend(
        self,
        run_id: str,
        micro_batch: int,
        step: int,
        layer: int,
        q: torch.Tensor | dict,
        k: torch.Tensor | dict,
        v: torch.Tensor | dict,
        layout: dict | None = None,
    ) -> dict:
        """Append k/v of ``layer`` and return attention outputs ``{"o": [T, H, D]}`` for one
        micro-batch step, or ``{"stale": why}`` when the run or step is not held here
        (the arguments are an :class:`~.messages.AttendRequest` and its tensors; the
        reply an :class:`~.messages.AttendReply`).

        The first layer of a step carries the ``layout`` (a :class:`~.messages.StepLayout`:
        segments, admitted and released sequences); the following layers refer to it by ``step``.  The data
        plane runs this inline on the compute stream (:meth:`attend_now`); called as a
        coroutine (over rpc, with packed tensors answered packed, or by a wrapper) it
        runs there too.  Either way the run's induced latency holds the request before
        it is computed and the reply after: the latency of both messages of the round trip.
        """
        packed = isinstance(q, dict)
        q, k, v = (unpack(t) if isinstance(t, dict) else t for t in (q, k, v))
        latency = self._latency(run_id)
        if latency:
            await asyncio.sleep(latency)
        reply = await self.stream.run(lambda: self.attend_now(run_id, micro_batch, step, layer, q, k, v, layout))
        if latency:
            await asyncio.sleep(latency)
        if packed and "o" in reply:
            reply["o"] = pack(reply["o"])
        return reply

    def _latency(self, run_id: str | None) -> float:
        """The induced latency of each message of run ``run_id`` (0 for none)."""
        run = self.runs.get(run_id) if run_id is not None else None
        return run.latency if run is not None else 0.0

    @torch.inference_mode()
    def attend_now(self, run_id, micro_batch, step, layer, q, k, v, layout=None) -> dict:
        """:meth:`attend` here and now (q/k/v as tensors)."""
        start = time.time()
        with self._lock:
            run = self.runs.get(run_id)
            if run is None:
                return AttendReply(stale=f"run {run_id!r} is not open on {self.worker.address}").to_wire()
            if layout is not None:
                steps = StepLayout.from_wire(layout)
                batch = AttentionBatch.build(steps.slots, steps.starts, steps.counts)
                run.batches[micro_batch] = (step, batch)
                run.cache.apply(steps.released, steps.admitted)
                if run.tuner is not None:
                    picks = len(run.tuner.history)
                    run.threads = run.tuner.layout(micro_batch, time.perf_counter(), all(c == 1 for c in steps.counts))
                    if len(run.tuner.history) > picks:
                        self._picked(run_id, run.tuner)
            else:
                held = run.batches.get(micro_batch)
                if held is None or held[0] != step:  # refused, never applied: the sender treats this peer as lost
                    return AttendReply(stale=f"run {run_id!r} micro-batch {micro_batch}: "
                                             f"no layout for step {step}").to_wire()
                batch = held[1]
            self._use_threads(run.threads)
            o = run.cache.attend(layer, q, k, v, batch)  # [T, H, D]
        self.stream.timeline.record("attention", start, time.time(), micro_batch, layer)
        return AttendReply(o=o).to_wire()

    def _picked(self, run_id: str, tuner: ThreadTuner) -> None:
        medians = tuner.history[-1]
        self.thread_picks.append({"run_id": run_id, "threads": tuner.chosen,
                                  "step_s": {str(c): round(s, 6) for c, s in medians.items()}})
        logger.info("glinthawk run %s: attention on %d torch threads (median step %s)", run_id, tuner.chosen,
                    ", ".join(f"{s * 1e3:.1f} ms on {c}" for c, s in medians.items()))

    def _use_threads(self, n: int | None) -> None:
        """Compute the next torch work of the stream on ``n`` threads (None: the worker's own)."""
        n = n or self.threads
        if n and n != self._threads_now and self.stream.on_stream:
            torch.set_num_threads(n)
            self._threads_now = n

    async def probe(self, config: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
        """A decode attention request shaped like a run's (``q`` [T, H, D], ``k``/``v``
        [T, KVH, D]) on a scratch cache, computed as :meth:`attend` computes: what a
        dense worker times to choose the depth of its pipeline and to profile.  The
        reply is ``{"o": [T, H, D], "s": seconds the computation took here}``."""
        return await self.stream.run(lambda: self._probe_inline(config, q, k, v))

    @torch.inference_mode()
    def _probe_inline(self, config: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
        """The probe as a run's layers after a step's first compute it: the scratch cache
        holds the step's layout (its sequences admitted, the batch built and checked once,
        by its first layer), and each request attends on a later layer of the step.
        (Re-admitting the sequences, building and checking the batch on every request
        made a probe cost half again a run's attention of the same size.)"""
        cfg = ModelConfig(**config).replace(n_layers=2)
        n = q.shape[0]
        key = (repr(cfg), n, q.dtype)
        with self._lock:
            entry = self._scratch.get(key)
            if entry is None:
                self._scratch.clear()
                cache = KVCache(cfg, n, 1, dtype=q.dtype, threads=None)
                ids = list(range(n))
                cache.apply([], [(i, i) for i in ids])
                batch = AttentionBatch.build(ids, [0] * n, [1] * n)
                cache.attend(0, q, k, v, batch)  # the step's first layer: lengths set, layout checked
                entry = self._scratch[key] = (cache, batch)
            cache, batch = entry
            self._use_threads(None)
            t = time.perf_counter()
            o = cache.attend(1, q, k, v, batch)  # [T, H, D]
            return {"o": o, "s": time.perf_counter() - t}

    async def profile(self, config: dict, shapes: list[list[int]], dtype: str = "float32") -> dict:
        """Attention timings for a profile on this worker's compute stream: ``{"points":
        [[kv_bytes, flops, seconds]]}`` for ``shapes`` ([sequences, context, new tokens])."""
        from ..planner import microbench as mb

        def measure() -> dict:
            self._use_threads(None)
            spare = max(0, self.kv_budget - self.used_bytes()) // 2  # the runs' caches keep the rest
            return {"points": mb.attention_points(config, DTYPES[dtype], torch.device("cpu"), shapes,
                                                  max_bytes=spare),
                    "threads": torch.get_num_threads()}

        return await self.stream.run(measure)

    async def echo(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> dict:
        """``{"o": q}``: a reply the size of an attention output, nothing computed (what a
        profile times to learn the data plane's own cost)."""
        return {"o": q}

    def _echo_inline(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                     **_: Any) -> dict:
        return {"o": q}

    def close(self) -> None:
        self.runs.clear()
        self.dataplane.close()
        self.stream.close()
