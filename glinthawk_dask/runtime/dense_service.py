"""Tier 1 on a Dask worker: layer slices (weights cached across runs) and their runs.

A dense worker hosts a contiguous slice of layers; each run it takes part in is a
:class:`~.slice_run.SliceRun`, and the first slice's run also has the run's
:class:`~.driver.RunDriver` (continuous batching).  Its profiling handlers are
:class:`~.dense_probes.DenseProbes`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from dask.utils import parse_bytes

from .. import config
from ..model.resolve import resolve_checkpoint
from ..model.weights import SliceWeights, load_slice
from ..tokenizer import Tokenizer
from .compute import ComputeStream
from .dataplane import DataPlane
from .dense_probes import DenseProbes
from .driver import RunDriver
from .faults import StaleRunError
from .messages import DTYPES, ForwardReply, SliceSpec, StepMessage
from .slice_run import SliceRun

logger = logging.getLogger(__name__)

__all__ = ["DenseService"]


class DenseService:
    """Holds layer slices (weights cached across runs) and their runs on one worker."""

    def __init__(self, worker: Any, threads: int | None = None) -> None:
        self.worker = worker
        self.runs: dict[str, SliceRun] = {}
        self._weights: dict[tuple, SliceWeights] = {}
        self._tokenizers: dict[str, Any] = {}
        self.stream = ComputeStream("glinthawk-dense", threads=threads)
        self.dataplane = DataPlane(worker, self.stream, "dense", ["glinthawk_forward"])
        self.probes = DenseProbes(self.stream, self.dataplane)

    def handlers(self) -> dict[str, Any]:
        return {
            "glinthawk_slice_open": self.open,
            "glinthawk_slice_close": self.close_run,
            "glinthawk_forward": self.forward,
            "glinthawk_submit": self.submit,
            "glinthawk_results": self.results,
            "glinthawk_results_nudge": self.nudge,
            "glinthawk_probe": self.probes.probe,
            "glinthawk_profile_dense": self.probes.profile,
            "glinthawk_profile_alternate": self.probes.profile_alternate,
            "glinthawk_slice_reroute": self.reroute,
            "glinthawk_slice_grow": self.grow,
            "glinthawk_slice_retire": self.retire,
            "glinthawk_slice_yield": self.yield_micro_batches,
            "glinthawk_slice_resize": self.resize,
            "glinthawk_slice_resize_cache": self.resize_cache,
            "glinthawk_slice_swap_out": self.swap_out,
            "glinthawk_slice_swap_in": self.swap_in,
            "glinthawk_dense_capacity": self.capacity,
            "glinthawk_dense_kv_info": self.kv_info,
        }

    def kv_info(self) -> dict:
        """KV this worker holds for its runs' local micro-batches (single-tier, hybrid),
        and the K/V of sequences taken out of attention caches it keeps (``kv_out``)."""
        caches = {run_id: run.cache for run_id, run in self.runs.items() if run.cache is not None}
        return {"kv_out": sum(k.nbytes + v.nbytes for run in self.runs.values() for k, v in run.swapped.values()),
                "kv_allocated": sum(c.capacity_bytes for c in caches.values()),
                "kv_used": sum(c.used_bytes for c in caches.values()),
                "runs": {run_id: {"n_slots": c.n_slots, "live": len(c), "used_bytes": c.used_bytes,
                                  "capacity_bytes": c.capacity_bytes} for run_id, c in caches.items()}}

    def capacity(self, weight_bytes: int = 0) -> int | None:
        """KV bytes this worker's device can hold once a slice of ``weight_bytes`` is
        loaded: on a GPU, the memory free now plus what this worker's weights and local
        caches hold (the scheduler accounts for those itself), less the slice and
        ``glinthawk.dense.workspace-bytes``; None on a CPU (the memory limit decides)."""
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(device)
        held = sum(w.nbytes() for w in self._weights.values())
        held += sum(r.cache.capacity_bytes for r in self.runs.values() if r.cache is not None)
        workspace = parse_bytes(str(config.get("dense.workspace-bytes")))
        return max(0, int(free + held - weight_bytes - workspace))

    def _load(self, spec: SliceSpec) -> SliceWeights:
        device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        key = (spec.model, spec.start, spec.stop, spec.dtype, str(device))
        if key not in self._weights:
            self._weights.clear()  # one model slice at a time per worker
            source = resolve_checkpoint(spec.model)
            self._weights[key] = load_slice(source, spec.start, spec.stop, dtype=DTYPES[spec.dtype], device=device)
        return self._weights[key]

    def tokenizer(self, model: str) -> Any:
        """The model's tokenizer (None for synthetic weights), loaded once per worker."""
        if model not in self._tokenizers:
            self._tokenizers[model] = Tokenizer.from_checkpoint(resolve_checkpoint(model))
        return self._tokenizers[model]

    async def open(self, run_id: str, spec: dict) -> dict:
        """Load the slice (off the event loop) and prepare the run."""
        if run_id in self.runs:
            return {"ok": True}
        s = SliceSpec.from_wire(spec)
        weights = await self.stream.offload(self._load, s)
        run = SliceRun(s, weights, worker=self.worker, stream=self.stream, dataplane=self.dataplane)
        if weights.is_first:
            tokenizer = await self.stream.offload(self.tokenizer, s.model)
            run.driver = RunDriver(run, tokenizer)
        self.runs[run_id] = run
        return {"ok": True, "n_layers": s.stop - s.start}

    async def close_run(self, run_id: str) -> None:
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        if run.driver is not None:
            await run.driver.close()
        # the driver and its run refer to each other: left to the cyclic collector, a
        # closed run's KV cache (GBs) outlived it until the worker's memory limit paused
        # or restarted the worker after a few single-tier runs
        run.driver, run.cache, run.staging = None, None, []

    def _run(self, run_id: str) -> SliceRun:
        run = self.runs.get(run_id)
        if run is None:
            raise StaleRunError(f"glinthawk run {run_id!r} is not open on {self.worker.address}")
        return run

    def reroute(self, run_id: str, micro_batch: int, address: str, kv_run: str) -> None:
        """A micro-batch of a run moved to another attention worker (see SliceRun.reroute)."""
        self._run(run_id).reroute(micro_batch, address, kv_run)

    def grow(self, run_id: str, attention: list[str], slot_base: list[int], sizes: list[int], kv_run: str,
             keep: bool = False) -> list[int]:
        """A run grew by remote micro-batches (see SliceRun.grow); on the first slice its
        driver starts them and retires the others unless ``keep``.  The new
        micro-batches' indices."""
        run = self._run(run_id)
        new = run.grow(attention, slot_base, sizes, kv_run)
        if run.driver is not None:
            run.driver.grow(new, keep=keep)
        return new

    def yield_micro_batches(self, run_id: str, micro_batches: list[int]) -> None:
        """First slice: the run gives ``micro_batches`` up for runs waiting for KV (they
        admit nothing more and close as they drain; see RunDriver.retire)."""
        driver = self._run(run_id).driver
        if driver is None:
            raise ValueError(f"run {run_id}'s driver is not on {self.worker.address}")
        driver.retire(micro_batches)

    def resize(self, run_id: str, micro_batch: int, n_slots: int) -> None:
        """First slice: give ``micro_batch`` ``n_slots`` slots, in place, once its
        sequences fit them (see RunDriver.resize)."""
        driver = self._run(run_id).driver
        if driver is None:
            raise ValueError(f"run {run_id}'s driver is not on {self.worker.address}")
        driver.resize(micro_batch, n_slots)

    async def resize_cache(self, run_id: str, micro_batch: int, n_slots: int, moves: list,
                           released: list) -> dict:
        """A micro-batch's cache of this slice resizes (see SliceRun.resize)."""
        return await self._run(run_id).resize(micro_batch, n_slots, moves, released)

    async def swap_out(self, run_id: str, micro_batch: int, seq_ids: list[str], released: list[str]) -> None:
        """Sequences of a micro-batch leave this slice's cache, their K/V kept here (see
        SliceRun.swap_out)."""
        await self._run(run_id).swap_out(micro_batch, seq_ids, released)

    async def swap_in(self, run_id: str, micro_batch: int, entries: list, released: list[str]) -> None:
        """Sequences taken out go back into a micro-batch's cache (see SliceRun.swap_in)."""
        await self._run(run_id).swap_in(micro_batch, entries, released)

    async def retire(self, run_id: str, micro_batch: int, released: list[str]) -> list[dict]:
        """A grown run's micro-batch drained (see SliceRun.retire)."""
        return await self._run(run_id).retire(micro_batch, released)

    async def forward(self, run_id: str, msg: dict, x: torch.Tensor) -> dict:
        """From the previous slice, over the data plane (a :class:`~.messages.ForwardRequest`):
        hidden states ``x`` [T, dim] of a micro-batch step (on the host); the sampled
        tokens go back as the reply (a :class:`~.messages.ForwardReply`)."""
        run = self._run(run_id)
        tokens = await run.run_step(StepMessage.from_wire(msg), x)
        return ForwardReply(tokens).to_wire()

    def submit(self, run_id: str, requests: list[dict]) -> int:
        """Queue requests of a run (first slice only); returns how many are queued in all."""
        return self._run(run_id).driver.submit(requests)

    async def results(self, run_id: str, timeout: float = 1.0) -> dict:
        """Completions finished since the last call (waits up to ``timeout`` for one)."""
        return (await self._run(run_id).driver.take_results(timeout)).to_wire()

    def nudge(self, run_id: str) -> None:
        """Answer run ``run_id``'s waiting ``glinthawk_results`` now (a run that ended
        has nothing waiting)."""
        run = self.runs.get(run_id)
        if run is not None and run.driver is not None:
            run.driver.nudge()

    def close(self) -> None:
        self.runs.clear()
        self._weights.clear()
        self.dataplane.close()
        self.stream.close()
