"""Tier 1 on a Dask worker: a slice of layers, run for every micro-batch in flight.

A dense worker hosts a contiguous slice of layers (weights cached across runs).  For
each micro-batch step it runs the dense half of each layer on its one compute stream,
sends q/k/v to the micro-batch's attention worker and awaits the output, so while one
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
import logging
import time
from typing import Any

import torch
from dask.utils import parse_bytes

from .. import config
from ..engine.runner import SliceLayers, attend_locally, run_layers
from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.ops import RopeTable, embed, head, post_pre_attention
from ..model.resolve import resolve_checkpoint
from ..model.weights import SliceWeights, load_slice
from ..sampling import SamplingParams, make_generator, sample
from ..tokenizer import Tokenizer
from .compute import ComputeStream, settle_threadsafe
from .dataplane import DataPlane
from .driver import NoAttentionWorker, RunDriver
from .faults import AttentionLost, StaleRunError, is_worker_failure
from .messages import (
    DTYPES, AttendReply, AttendRequest, ForwardReply, ForwardRequest, SliceSpec, StepLayout, StepMessage,
)
from .staging import HostStaging

logger = logging.getLogger(__name__)

__all__ = ["DenseService", "SliceSpec", "SliceRun"]


class SliceRun:
    """One run's state on one dense worker."""

    def __init__(self, service: "DenseService", spec: SliceSpec, weights: SliceWeights) -> None:
        self.service = service
        self.spec = spec
        self.weights = weights
        self.config = weights.config
        self.device = weights.device
        self.rope = RopeTable.build(self.config, spec.max_seq_len, dtype=weights.dtype, device=self.device)
        n = spec.n_micro_batches
        spec.sizes = list(spec.sizes) or [spec.micro_batch_size] * n
        spec.local = list(spec.local) or [spec.mode == "single-tier"] * n
        self.global_base = [sum(spec.sizes[:m]) for m in range(n)]  # the driver's slot numbers
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
        self.params: dict[str, SamplingParams] = {}
        self.generators: dict[str, torch.Generator | None] = {}
        self.driver: RunDriver | None = None  # on the first slice

    @property
    def stream(self) -> ComputeStream:
        return self.service.stream

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
                -self.spec.start, lambda: self._local(msg, x), kind="dense", micro_batch=msg.mb,
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
            channel = await self.service.dataplane.channel(address, "attention", self.spec.peer_timeout)
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

    # -- a lost attention worker (the driver's side, see RunDriver) ------------------
    async def open_moved_cache(self, lost: AttentionLost, mb: int, kv_run: str) -> str:
        """One try at a new attention worker for micro-batch ``mb`` of slice
        ``lost.slice_index``: the scheduler picks one (and reserves its KV), and the
        cache ``kv_run`` of the micro-batch's slots opens there; its address.  Raises
        :class:`~.driver.NoAttentionWorker` when none can take it yet."""
        spec, worker = self.spec, self.service.worker
        a, b = spec.slices[lost.slice_index]
        reply = await worker.scheduler.glinthawk_replace(
            run_id=spec.run_id, lost=lost.address, slice_index=lost.slice_index, n_slots=spec.sizes[mb],
            n_layers=b - a, max_seq_len=spec.max_seq_len,
        )
        if "address" not in reply:
            raise NoAttentionWorker(reply["error"])
        address = reply["address"]
        try:
            await asyncio.wait_for(worker.rpc(address).glinthawk_kv_open(
                run_id=kv_run, config=dataclasses.asdict(self.config), layer_start=a, layer_stop=b,
                n_slots=spec.sizes[mb], max_seq_len=spec.max_seq_len, dtype=spec.dtype, latency=spec.latency,
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
            await self.service.worker.rpc(self.spec.dense[slice_index]).glinthawk_slice_reroute(
                run_id=self.spec.run_id, micro_batch=mb, address=address, kv_run=kv_run)

    async def _forward_next(self, msg: StepMessage, x: torch.Tensor) -> list[int]:
        # the next slices may each wait a peer timeout before they report a lost attention worker
        downstream = max(1, len(self.spec.slices) - self.spec.slice_index - 1)
        timeout = self.spec.peer_timeout * (downstream + 1)
        channel = await self.service.dataplane.channel(self.spec.next_address, "dense", self.spec.peer_timeout)
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
        self.stream.submit(-start, self._guarded(self._first), kind="dense", micro_batch=self.mb, layer=start,
                           on_done=lambda _, error: error and self.finish(error=error))

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
        request = functools.partial(
            self.channel.request, "glinthawk_attend", args.to_wire(), {"q": qkv[0], "k": qkv[1], "v": qkv[2]},
            functools.partial(self._reply, layer), spec.peer_timeout,
        )
        if spec.latency:
            self.stream.call_later(spec.latency, request)
        else:
            request()

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
        self.stream.push(-(layer + 1), self._guarded(self._dense, layer, reply.o), kind="dense",
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


def _request_tensors(cfg: Any, tokens: int, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q [T, H, D] and k/v [T, KVH, D] on the host: an attention request of a
    micro-batch of ``tokens`` decode tokens (what probes send)."""
    q = torch.randn(tokens, cfg.n_heads, cfg.head_dim).to(dt)  # [T, H, D]
    kv = torch.randn(tokens, cfg.n_kv_heads, cfg.head_dim).to(dt)  # [T, KVH, D]
    return q, kv


class DenseService:
    """Holds layer slices (weights cached across runs) and their runs on one worker."""

    def __init__(self, worker: Any, threads: int | None = None) -> None:
        self.worker = worker
        self.runs: dict[str, SliceRun] = {}
        self._weights: dict[tuple, SliceWeights] = {}
        self._tokenizers: dict[str, Any] = {}
        self.stream = ComputeStream("glinthawk-dense", threads=threads)
        self.dataplane = DataPlane(worker, self.stream, "dense", ["glinthawk_forward"])

    def handlers(self) -> dict[str, Any]:
        return {
            "glinthawk_slice_open": self.open,
            "glinthawk_slice_close": self.close_run,
            "glinthawk_forward": self.forward,
            "glinthawk_submit": self.submit,
            "glinthawk_results": self.results,
            "glinthawk_probe": self.probe,
            "glinthawk_profile_dense": self.profile,
            "glinthawk_profile_alternate": self.profile_alternate,
            "glinthawk_slice_reroute": self.reroute,
            "glinthawk_dense_capacity": self.capacity,
            "glinthawk_dense_kv_info": self.kv_info,
        }

    def kv_info(self) -> dict:
        """KV this worker holds for its runs' local micro-batches (single-tier, hybrid)."""
        caches = {run_id: run.cache for run_id, run in self.runs.items() if run.cache is not None}
        return {"kv_allocated": sum(c.capacity_bytes for c in caches.values()),
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
        loop = asyncio.get_running_loop()
        weights = await loop.run_in_executor(None, self._load, s)
        run = SliceRun(self, s, weights)
        if weights.is_first:
            tokenizer = await loop.run_in_executor(None, self.tokenizer, s.model)
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

    async def profile(self, config: dict, dtype: str = "float32", tokens: list[int] | None = None,
                      rows: list[int] | None = None, attention: list[list[int]] | None = None,
                      busy_for: float = 0.0, layer_only: bool = False, cold: bool = True) -> dict:
        """Timings for a profile (see :mod:`glinthawk_dask.planner.microbench`), on this
        worker's device and compute stream: the dense layer curve at ``tokens``, the cold
        factor (unless not ``cold``: a profile with an attention worker measures it against
        real round trips, :meth:`profile_alternate`), the head curve at ``rows``, attention
        points at ``attention`` shapes ([sequences, context, new tokens]) and the driver's
        cost (with ``layer_only``, the layer curve alone); or, with ``busy_for``, dense
        layers back to back for that many seconds (load for a contention measure)."""
        from ..model.config import ModelConfig
        from ..planner import microbench as mb

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dt = DTYPES[dtype]

        def measure() -> dict:
            if busy_for:
                cfg, layers = mb._layers(ModelConfig(**config), dt, device)
                n = mb.busy_loop(busy_for, lambda: mb._time_layers(cfg, layers, (tokens or [32])[0], dt, device, 1))
                return {"layers": n}
            out: dict = {"device": device.type, "dtype": dtype, "threads": torch.get_num_threads()}
            if tokens:
                out["layer_s"] = mb.dense_layer_points(config, dt, device, tokens)
                if layer_only:
                    return out
                if cold:
                    out["cold_factor"] = mb.cold_factor(config, dt, device, tokens[len(tokens) // 2])
            if rows:
                out["head_s"] = mb.head_points(config, dt, device, rows)
            if attention:
                out["attention"] = mb.attention_points(config, dt, device, attention)
            out["step_s"], out["step_per_seq_s"] = mb.driver_cost()
            return out

        return await self.stream.submit(0, measure, kind="calibrate")

    async def profile_alternate(self, address: str, config: dict, tokens: int, dtype: str = "float32",
                                n: int = 16) -> dict:
        """A dense layer's seconds as a run sees them: ``{"alone": ..., "alternating":
        ...}``, the median of ``n`` layers back to back, and of ``n`` layers each after an
        attention round trip to ``address`` of ``tokens`` tokens (sent and answered on
        the compute stream, as a run's are)."""
        from ..model.config import ModelConfig
        from ..planner import microbench as mb

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dt = DTYPES[dtype]
        cfg = ModelConfig(**config)
        loop = asyncio.get_running_loop()
        built = await loop.run_in_executor(None, mb._layers, cfg, dt, device)
        mcfg, layers = built
        q, kv = _request_tensors(cfg, tokens, dt)
        x = torch.randn(tokens, cfg.dim, dtype=dt, device=device)  # [T, dim]
        o = torch.randn(tokens, cfg.n_heads, cfg.head_dim, dtype=dt, device=device)  # [T, H, D]
        cos = torch.ones(tokens, cfg.head_dim, dtype=dt, device=device)  # [T, D]
        channel = await self.dataplane.channel(address, "attention")
        done = loop.create_future()
        times: list[float] = []

        def layer() -> None:
            i = len(times)
            with torch.inference_mode():
                t = time.perf_counter()
                post_pre_attention(mcfg, layers[i % len(layers)], layers[(i + 1) % len(layers)], x, o, cos, cos)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t)
            if len(times) == n + 2:
                settle_threadsafe(done, None, None)
            else:
                channel.request("glinthawk_attend_probe", {"config": config}, {"q": q, "k": kv, "v": kv},
                                lambda r, e: self.stream.push(0, layer, kind=None) if e is None
                                else settle_threadsafe(done, None, e), 60.0)

        await self.stream.run(layer)
        await done
        alternating = sorted(times[2:])[n // 2]
        alone = await self.stream.run(lambda: mb._time_layers(mcfg, layers, tokens, dt, device, n))
        return {"alone": alone, "alternating": alternating}

    async def probe(self, address: str, config: dict, tokens: int, dtype: str = "float32", n: int = 5,
                    detail: bool = False, echo: bool = False) -> float | dict:
        """Seconds of one attention round trip to ``address`` for a micro-batch of
        ``tokens`` decode tokens: requests of a run's shapes sent and answered on this
        worker's compute stream, as a run's are (the median of ``n``, after one to warm up).
        With ``detail``, ``{"rtt_s": ..., "cpu_s": ...}``: also the compute thread's CPU
        seconds per request (sending it and reading its reply).  With ``echo`` the
        attention worker computes nothing (the data plane alone)."""
        from ..model.config import ModelConfig

        cfg = ModelConfig(**config)
        dt = DTYPES[dtype]
        q, kv = _request_tensors(cfg, tokens, dt)
        channel = await self.dataplane.channel(address, "attention")
        done = asyncio.get_running_loop().create_future()
        times: list[float] = []
        state = {"t": 0.0, "cpu": 0.0}

        def send() -> None:  # on the stream thread: each reply sends the next request, as a run's do
            state["t"] = time.perf_counter()
            op, args = ("glinthawk_echo", {}) if echo else ("glinthawk_attend_probe", {"config": config})
            channel.request(op, args, {"q": q, "k": kv, "v": kv}, reply, 60.0)

        def reply(_: Any, error: BaseException | None) -> None:
            times.append(time.perf_counter() - state["t"])
            if len(times) == 1:
                state["cpu"] = time.thread_time()  # the first one warms up
            if error is not None or len(times) == n + 1:
                settle_threadsafe(done, time.thread_time() - state["cpu"], error)
            else:
                send()

        await self.stream.run(send)
        cpu = await done / n
        rtt = sorted(times[1:])[n // 4 if detail else n // 2]  # profiles take the lower quartile
        return {"rtt_s": rtt, "cpu_s": cpu} if detail else rtt

    def close(self) -> None:
        self.runs.clear()
        self._weights.clear()
        self.dataplane.close()
        self.stream.close()
