"""Tier 2 on a Dask worker: KV caches as worker-resident state, attention on request.

Dense workers call :meth:`AttentionService.attend` over the data plane
(:mod:`~glinthawk_dask.runtime.dataplane`, worker to worker; the scheduler never sees
these messages).  The requests that arrive in one pass of the event loop run as one
job of the compute stream.  A run opens one
:class:`~glinthawk_dask.model.kv_cache.KVCache` here for its slice of layers, sized up
front within the worker's KV budget, so attention memory can never grow past it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..model.attention import AttentionBatch
from ..model.config import ModelConfig
from ..model.kv_cache import KVCache
from .compute import ComputeStream
from .faults import StaleRunError
from .messages import DTYPES, pack, unpack

logger = logging.getLogger(__name__)

__all__ = ["AttentionService", "AttentionRunError"]


class AttentionRunError(StaleRunError):
    """A message refers to a run or step this worker does not hold (stale or misrouted)."""


@dataclass
class _Run:
    cache: KVCache
    latency: float
    batches: dict[int, tuple[int, AttentionBatch]]  # micro-batch -> (step, layout)


class AttentionService:
    """Holds the KV caches of runs and answers attention requests."""

    def __init__(self, worker: Any, kv_budget: int, threads: int | None = None) -> None:
        self.worker = worker
        self.kv_budget = int(kv_budget)
        self.runs: dict[str, _Run] = {}
        self.stream = ComputeStream("glinthawk-attention", threads=threads)
        self._queue: list[tuple[Callable[[], torch.Tensor], asyncio.Future, int, int]] = []
        self._scratch: dict[tuple, KVCache] = {}  # the cache of probe requests
        self.dataplane: Any = None  # the worker's DataPlane, set by the plugin

    # handlers served on the data plane (the rpc layer serves them too)
    dataplane_ops = ["glinthawk_attend", "glinthawk_attend_probe"]

    # -- handlers (event loop) -------------------------------------------------------
    def handlers(self) -> dict[str, Any]:
        return {
            "glinthawk_kv_open": self.open,
            "glinthawk_kv_close": self.close_run,
            "glinthawk_attend": self.attend,
            "glinthawk_attend_probe": self.probe,
            "glinthawk_kv_info": self.info,
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
    ) -> dict:
        """Allocate the KV cache of a run (idempotent for the same run)."""
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
                        dtype=DTYPES[dtype])
        self.runs[run_id] = _Run(cache, float(latency), {})
        logger.info("glinthawk run %s: %r", run_id, cache)
        return self.info(run_id)

    def close_run(self, run_id: str) -> None:
        """Free the run's KV caches (also those opened for micro-batches moved here)."""
        for key in [k for k in self.runs if k == run_id or k.startswith(run_id + "/")]:
            self.runs.pop(key, None)

    def used_bytes(self) -> int:
        return sum(r.cache.capacity_bytes for r in self.runs.values())

    def info(self, run_id: str | None = None) -> dict:
        out = {"kv_budget": self.kv_budget, "kv_allocated": self.used_bytes(), "runs": {}}
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
        micro-batch step, or ``{"stale": why}`` when the run or step is not held here.

        The first layer of a step carries the ``layout`` (segments, admitted and
        released sequences); the following layers refer to it by ``step``.  Tensors come
        from the data plane; packed tensors (:func:`~.messages.pack`, over rpc) are
        answered packed.
        """
        packed = isinstance(q, dict)
        try:
            o = await self._attend(run_id, micro_batch, step, layer, q, k, v, layout)
        except AttentionRunError as e:  # refused, never applied: the sender treats this peer as lost
            return {"stale": str(e)}
        latency = self.runs[run_id].latency if run_id in self.runs else 0.0
        if latency:
            await asyncio.sleep(latency)
        return {"o": pack(o) if packed else o}

    async def _attend(self, run_id, micro_batch, step, layer, q, k, v, layout) -> torch.Tensor:
        run = self.runs.get(run_id)
        if run is None:
            raise AttentionRunError(f"run {run_id!r} is not open on {self.worker.address}")
        if layout is not None:
            batch = AttentionBatch.build(layout["slots"], layout["starts"], layout["counts"])
            run.batches[micro_batch] = (step, batch)
            admitted, released = layout.get("admitted", []), layout.get("released", [])
        else:
            held = run.batches.get(micro_batch)
            if held is None or held[0] != step:
                raise AttentionRunError(
                    f"run {run_id!r} micro-batch {micro_batch}: no layout for step {step}"
                )
            batch, admitted, released = held[1], [], []
        qt, kt, vt = (unpack(t) if isinstance(t, dict) else t for t in (q, k, v))
        cache = run.cache

        def work() -> torch.Tensor:
            cache.apply(released, admitted)
            return cache.attend(layer, qt, kt, vt, batch)  # [T, H, D]

        return await self._enqueue(work, micro_batch, layer)

    async def probe(self, config: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
        """A decode attention request shaped like a run's (``q`` [T, H, D], ``k``/``v``
        [T, KVH, D]) on a scratch cache, through the same queue and compute stream as
        :meth:`attend`: what a dense worker times to choose the depth of its pipeline."""
        cfg = ModelConfig(**config).replace(n_layers=1)
        n = q.shape[0]
        key = (repr(cfg), n, q.dtype)
        cache = self._scratch.get(key)
        if cache is None:
            self._scratch.clear()
            cache = self._scratch[key] = KVCache(cfg, n, 1, dtype=q.dtype)
        ids = list(range(n))
        batch = AttentionBatch.build(ids, [0] * n, [1] * n)

        def work() -> torch.Tensor:
            cache.apply(ids, [(i, i) for i in ids])
            return cache.attend(0, q, k, v, batch)  # [T, H, D]

        return {"o": await self._enqueue(work, -1, 0)}

    # -- the compute stream: what arrived in one pass of the loop, as one job ----------
    def _enqueue(self, work: Callable[[], torch.Tensor], micro_batch: int, layer: int) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((work, fut, micro_batch, layer))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        jobs, self._queue = self._queue, []
        timeline = self.stream.timeline

        @torch.inference_mode()
        def run() -> list[tuple[Any, BaseException | None]]:
            out: list[tuple[Any, BaseException | None]] = []
            for work, _, mb, layer in jobs:
                start = time.time()
                try:
                    out.append((work(), None))
                except Exception as e:  # handed to that request alone
                    out.append((None, e))
                timeline.record("attention", start, time.time(), mb, layer)
            return out

        def done(results: list | None, error: BaseException | None) -> None:
            for (_, fut, _, _), (r, e) in zip(jobs, results or [(None, error)] * len(jobs)):
                if fut.done():
                    continue
                if e is not None:
                    fut.set_exception(e)
                else:
                    fut.set_result(r)

        try:
            self.stream.submit(-max(j[3] for j in jobs), run, kind=None, on_done=done)
        except RuntimeError as e:  # the stream is closed: the worker is shutting down
            done(None, e)

    def close(self) -> None:
        self.runs.clear()
        self.stream.close()
