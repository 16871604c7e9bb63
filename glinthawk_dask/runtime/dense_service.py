"""Tier 1 on a Dask worker: a slice of layers, run for every micro-batch in flight.

A dense worker hosts a contiguous slice of layers (weights cached across runs).  For
each micro-batch step it runs the dense half of each layer on its one compute stream,
sends q/k/v to the micro-batch's attention worker and awaits the output, so while one
micro-batch waits for attention another one computes.  The residual stream never
leaves the worker; between slices only the hidden state travels, and the last slice
samples the next tokens, which return to the first slice as the reply.

In single-tier mode the KV cache lives here and a slice step is one compute job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.runner import run_layers
from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.ops import RopeTable, embed, head, post_attention, post_pre_attention, pre_attention
from ..model.resolve import resolve_checkpoint
from ..model.weights import SliceWeights, load_slice
from ..sampling import SamplingParams, make_generator, sample
from ..tokenizer import Tokenizer
from .compute import ComputeStream
from .faults import AttentionLost, StaleRunError
from .messages import DTYPES
from .staging import HostStaging

logger = logging.getLogger(__name__)

__all__ = ["DenseService", "SliceSpec", "SliceRun"]


@dataclass
class SliceSpec:
    """What a dense worker needs to take part in a run."""

    run_id: str
    model: str
    start: int
    stop: int
    micro_batch_size: int
    n_micro_batches: int
    max_seq_len: int
    mode: str = "two-tier"  # or "single-tier"
    dtype: str = "float32"
    device: str | None = None
    next_address: str | None = None  # the next slice's dense worker
    attention: list[str] = field(default_factory=list)  # attention worker of each micro-batch
    slot_base: list[int] = field(default_factory=list)  # first local KV slot of each micro-batch
    latency: float = 0.0  # induced delay of every inter-tier message, seconds
    peer_timeout: float = 60.0  # a peer that does not answer within this is treated as lost
    slice_index: int = 0
    dense: list[str] = field(default_factory=list)  # every slice's dense worker (the driver reroutes)
    slices: list[list[int]] = field(default_factory=list)  # every slice's [start, stop) layers
    engine: dict = field(default_factory=dict)  # first slice: scheduler settings


class SliceRun:
    """One run's state on one dense worker."""

    def __init__(self, service: "DenseService", spec: SliceSpec, weights: SliceWeights) -> None:
        self.service = service
        self.spec = spec
        self.weights = weights
        self.config = weights.config
        self.device = weights.device
        self.rope = RopeTable.build(self.config, spec.max_seq_len, dtype=weights.dtype, device=self.device)
        self.cache: KVCache | None = None
        if spec.mode == "single-tier":
            self.cache = KVCache(
                self.config, spec.n_micro_batches * spec.micro_batch_size, spec.max_seq_len,
                layer_start=spec.start, layer_stop=spec.stop, dtype=weights.dtype, device=self.device,
            )
        elif len(spec.attention) != spec.n_micro_batches:
            raise ValueError("two-tier mode needs an attention worker for every micro-batch")
        # the KV cache of each micro-batch on its attention worker: the run's own, or one
        # opened for it alone after it moved (see reroute)
        self.kv_runs = [spec.run_id] * spec.n_micro_batches
        self.staging = [HostStaging(self.device) for _ in range(spec.n_micro_batches)]  # device → wire
        spec.attention, spec.slot_base = list(spec.attention), list(spec.slot_base)  # msgpack gives tuples
        self.params: dict[str, SamplingParams] = {}
        self.generators: dict[str, torch.Generator | None] = {}
        self.driver: Any = None  # set on the first slice

    @property
    def stream(self) -> ComputeStream:
        return self.service.stream

    # -- per step ------------------------------------------------------------------
    def _local_slot(self, mb: int, slot: int) -> int:
        if self.cache is not None:
            return slot
        return self.spec.slot_base[mb] + slot - mb * self.spec.micro_batch_size

    def _layout(self, msg: dict) -> dict:
        mb = msg["mb"]
        return {
            "slots": [self._local_slot(mb, s) for s in msg["slots"]],
            "starts": msg["starts"],
            "counts": msg["counts"],
            "admitted": [[a[0], self._local_slot(mb, a[1])] for a in msg["admitted"]],
            "released": msg["released"],
        }

    def _track_sampling(self, msg: dict) -> None:
        if not self.weights.is_last:
            return
        for seq_id in msg["released"]:
            self.params.pop(seq_id, None)
            self.generators.pop(seq_id, None)
        for seq_id, _, params in msg["admitted"]:
            if seq_id in self.params:  # re-admitted to rebuild its KV: its generator goes on
                continue
            p = SamplingParams.from_dict(params)
            self.params[seq_id] = p
            self.generators[seq_id] = None if p.is_greedy else make_generator(p.seed)

    def _head_and_sample(self, x: torch.Tensor, msg: dict) -> list[int]:
        rows = torch.tensor(msg["sample_rows"], dtype=torch.long, device=x.device)
        if not len(rows):
            return []
        logits = head(self.weights, x[rows])  # [N, V]
        ids = msg["sample"]
        return sample(logits, [self.params[i] for i in ids], [self.generators[i] for i in ids]).tolist()

    def _inputs(self, msg: dict, x: torch.Tensor | None):
        batch = AttentionBatch.build(msg["slots"], msg["starts"], msg["counts"], device=self.device)
        cos, sin = self.rope.at(batch.positions, batch.max_position)
        if x is None:
            ids = torch.tensor(msg["input_ids"], dtype=torch.long, device=self.device)
            x = embed(self.weights, ids)  # [T, dim]
        else:  # from the previous slice, on the host
            x = x.to(self.device, non_blocking=True).to(self.weights.dtype)
        return batch, cos, sin, x

    async def run_step(self, msg: dict, x: torch.Tensor | None = None) -> list[int]:
        """Run this slice for one micro-batch step; return the sampled tokens."""
        self._track_sampling(msg)
        if self.cache is not None:
            result = await self.stream.submit(
                0, lambda: self._single_tier(msg, x), kind="dense", micro_batch=msg["mb"], layer=self.spec.start
            )
        else:
            result = await self._two_tier(msg, x)
        if self.weights.is_last:
            return result
        return await self._forward_next(msg, result)

    @torch.inference_mode()
    def _single_tier(self, msg: dict, x_in: torch.Tensor | None):
        cache = self.cache
        cache.apply(msg["released"], [(a[0], a[1]) for a in msg["admitted"]])
        batch, cos, sin, x = self._inputs(msg, x_in)
        x = run_layers(self.weights, cache, batch, x, cos, sin)
        return self._head_and_sample(x, msg) if self.weights.is_last else self.staging[msg["mb"]].to_host(x)[0]

    async def _two_tier(self, msg: dict, x_in: torch.Tensor | None):
        cfg, layers, start, stop = self.config, self.weights.layers, self.spec.start, self.spec.stop
        mb = msg["mb"]
        address = self.spec.attention[mb]
        channel = await self._channel(address, mb)
        staging = self.staging[mb]
        state: dict[str, Any] = {}

        @torch.inference_mode()
        def first():
            batch, cos, sin, x = self._inputs(msg, x_in)
            q, k, v = pre_attention(cfg, layers[0], x, cos, sin)
            state.update(cos=cos, sin=sin, x=x)
            return staging.to_host(q, k, v)

        job, layout = first, self._layout(msg)
        for layer in range(start, stop):
            args = {"run_id": self.kv_runs[mb], "micro_batch": mb, "step": msg["step"], "layer": layer,
                    "layout": layout if layer == start else None}
            o = await self._compute_then_attend(job, channel, address, mb, layer, args)
            i = layer - start

            @torch.inference_mode()
            def job(i=i, o=o):
                o = o.to(self.device, non_blocking=True).to(self.weights.dtype)  # [T, H, D]
                if i + 1 < len(layers):
                    x, q, k, v = post_pre_attention(cfg, layers[i], layers[i + 1], state["x"], o,
                                                    state["cos"], state["sin"])
                    state["x"] = x
                    return staging.to_host(q, k, v)
                x = post_attention(cfg, layers[i], state["x"], o)  # [T, dim]
                if self.weights.is_last:
                    return self._head_and_sample(x, msg)
                return staging.to_host(x)[0]

        return await self.stream.submit(-stop, job, kind="dense", micro_batch=mb, layer=stop - 1)

    async def _channel(self, address: str, mb: int):
        try:
            return await self.service.dataplane.channel(address, self.spec.peer_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise AttentionLost(address, self.spec.slice_index, mb, f"{type(e).__name__}: {e}") from None

    async def _compute_then_attend(self, job, channel, address: str, mb: int, layer: int, args: dict):
        """Run ``job`` (→ q, k, v on the host) on the compute stream and send its result
        to the attention worker the moment it is done (on the loop, no coroutine in
        between); return the attention output [T, H, D] (on the host)."""
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        failed: list[BaseException] = []
        latency, timeout = self.spec.latency, self.spec.peer_timeout

        def send(qkv, error: BaseException | None) -> None:
            if reply.done():
                return
            if error is not None:
                failed.append(error)
                reply.set_exception(error)
                return
            request = functools.partial(channel.request, "glinthawk_attend", args,
                                        {"q": qkv[0], "k": qkv[1], "v": qkv[2]}, timeout=timeout, future=reply)
            if latency:
                loop.call_later(latency, request)
            else:
                request()

        self.stream.submit(-layer, job, kind="dense", micro_batch=mb, layer=layer, on_done=send)
        try:
            out = await reply
        except (OSError, asyncio.TimeoutError, StaleRunError) as e:
            if failed:  # the dense compute itself failed: not the peer's doing
                raise
            raise AttentionLost(address, self.spec.slice_index, mb, f"{type(e).__name__}: {e}") from None
        if "o" not in out:  # refused: the attention worker does not hold the run (restarted)
            raise AttentionLost(address, self.spec.slice_index, mb, f"StaleRunError: {out.get('stale')}")
        return out["o"]

    def reroute(self, mb: int, address: str, kv_run: str) -> None:
        """Send micro-batch ``mb``'s attention to ``address``, to the cache ``kv_run``
        that holds its slots alone (from 0)."""
        self.spec.attention[mb] = address
        self.spec.slot_base[mb] = 0
        self.kv_runs[mb] = kv_run

    async def _forward_next(self, msg: dict, x: torch.Tensor) -> list[int]:
        # the next slices may each wait a peer timeout before they report a lost attention worker
        downstream = max(1, len(self.spec.slices) - self.spec.slice_index - 1)
        timeout = self.spec.peer_timeout * (downstream + 1)
        channel = await self.service.dataplane.channel(self.spec.next_address, self.spec.peer_timeout)
        reply = await channel.request("glinthawk_forward", {"run_id": self.spec.run_id, "msg": msg}, {"x": x},
                                      timeout=timeout)
        return reply["tokens"]


class DenseService:
    """Holds layer slices (weights cached across runs) and their runs on one worker."""

    def __init__(self, worker: Any, threads: int | None = None) -> None:
        self.worker = worker
        self.runs: dict[str, SliceRun] = {}
        self._weights: dict[tuple, SliceWeights] = {}
        self._tokenizers: dict[str, Any] = {}
        self.stream = ComputeStream("glinthawk-dense", threads=threads)
        self.dataplane: Any = None  # the worker's DataPlane, set by the plugin

    # handlers served on the data plane
    dataplane_ops = ["glinthawk_forward"]

    def handlers(self) -> dict[str, Any]:
        return {
            "glinthawk_slice_open": self.open,
            "glinthawk_slice_close": self.close_run,
            "glinthawk_forward": self.forward,
            "glinthawk_submit": self.submit,
            "glinthawk_results": self.results,
            "glinthawk_calibrate": self.calibrate,
            "glinthawk_probe": self.probe,
            "glinthawk_slice_reroute": self.reroute,
        }

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
        s = SliceSpec(**spec)
        loop = asyncio.get_running_loop()
        weights = await loop.run_in_executor(None, self._load, s)
        run = SliceRun(self, s, weights)
        if weights.is_first:
            from .driver import RunDriver

            tokenizer = await loop.run_in_executor(None, self.tokenizer, s.model)
            run.driver = RunDriver(run, tokenizer)
        self.runs[run_id] = run
        return {"ok": True, "n_layers": s.stop - s.start}

    async def close_run(self, run_id: str) -> None:
        run = self.runs.pop(run_id, None)
        if run is not None and run.driver is not None:
            await run.driver.close()

    def _run(self, run_id: str) -> SliceRun:
        run = self.runs.get(run_id)
        if run is None:
            raise StaleRunError(f"glinthawk run {run_id!r} is not open on {self.worker.address}")
        return run

    def reroute(self, run_id: str, micro_batch: int, address: str, kv_run: str) -> None:
        """A micro-batch of a run moved to another attention worker (see SliceRun.reroute)."""
        self._run(run_id).reroute(micro_batch, address, kv_run)

    async def forward(self, run_id: str, msg: dict, x: torch.Tensor) -> dict:
        """From the previous slice, over the data plane: hidden states ``x`` [T, dim] of a
        micro-batch step (on the host); the sampled tokens go back as the reply."""
        run = self._run(run_id)
        tokens = await run.run_step(msg, x)
        return {"tokens": tokens}

    def submit(self, run_id: str, requests: list[dict]) -> int:
        """Queue requests of a run (first slice only); returns how many are queued in all."""
        return self._run(run_id).driver.submit(requests)

    async def results(self, run_id: str, timeout: float = 1.0) -> dict:
        """Completions finished since the last call (waits up to ``timeout`` for one)."""
        return await self._run(run_id).driver.take_results(timeout)

    async def calibrate(self, config: dict, tokens: int, dtype: str = "float32") -> float:
        """Seconds of one dense layer step for ``tokens`` tokens (random weights of the
        model's shape, on this worker's device and compute stream)."""
        from ..model.config import ModelConfig
        from ..model.synthetic import SyntheticCheckpoint

        cfg = ModelConfig(**config).replace(n_layers=3)  # a middle layer: no embedding, no head
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        def measure() -> float:
            w = load_slice(SyntheticCheckpoint(cfg), 1, 2, dtype=DTYPES[dtype], device=device)
            with torch.inference_mode():
                return _time_layer(w)

        def _time_layer(w: SliceWeights) -> float:
            layer = w.layers[0]
            x = torch.randn(tokens, cfg.dim, dtype=w.dtype, device=device)
            o = torch.randn(tokens, cfg.n_heads, cfg.head_dim, dtype=w.dtype, device=device)
            cos = torch.ones(tokens, cfg.head_dim, dtype=w.dtype, device=device)
            best = float("inf")
            for _ in range(4):
                t = time.perf_counter()
                post_pre_attention(cfg, layer, layer, x, o, cos, cos)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            return best

        return await self.stream.submit(0, measure, kind="calibrate")

    async def probe(self, address: str, config: dict, tokens: int, dtype: str = "float32", n: int = 5) -> float:
        """Seconds of one attention round trip to ``address`` for a micro-batch of
        ``tokens`` decode tokens: requests of a run's shapes over this worker's data plane
        (the median of ``n``, after one to connect and warm up)."""
        from ..model.config import ModelConfig

        cfg = ModelConfig(**config)
        dt = DTYPES[dtype]
        q = torch.randn(tokens, cfg.n_heads, cfg.head_dim).to(dt)  # [T, H, D]
        kv = torch.randn(tokens, cfg.n_kv_heads, cfg.head_dim).to(dt)  # [T, KVH, D]
        channel = await self.dataplane.channel(address)
        times = []
        for _ in range(n + 1):
            t = time.perf_counter()
            await channel.request("glinthawk_attend_probe", {"config": config}, {"q": q, "k": kv, "v": kv},
                                  timeout=60.0)
            times.append(time.perf_counter() - t)
        return sorted(times[1:])[n // 2]

    def close(self) -> None:
        self.runs.clear()
        self._weights.clear()
        self.stream.close()
