"""The dense tier's measurements for profiles and planning, on its compute stream:
dense layer and head curves, attention round trips and a dense layer as a run sees it
(see :mod:`glinthawk_dask.planner.microbench`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from ..model.ops import post_pre_attention
from .compute import ComputeStream, settle_threadsafe
from .dataplane import DataPlane
from .messages import DTYPES

__all__ = ["DenseProbes"]


def _request_tensors(cfg: Any, tokens: int, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q [T, H, D] and k/v [T, KVH, D] on the host: an attention request of a
    micro-batch of ``tokens`` decode tokens (what probes send)."""
    q = torch.randn(tokens, cfg.n_heads, cfg.head_dim).to(dt)  # [T, H, D]
    kv = torch.randn(tokens, cfg.n_kv_heads, cfg.head_dim).to(dt)  # [T, KVH, D]
    return q, kv


class DenseProbes:
    """The profiling handlers of a dense worker (``glinthawk_profile_dense``,
    ``glinthawk_profile_alternate``, ``glinthawk_probe``)."""

    def __init__(self, stream: ComputeStream, dataplane: DataPlane) -> None:
        self.stream = stream
        self.dataplane = dataplane

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
            if layer_only:
                return mb.dense_points(config, dt, device, tokens, driver=False)
            return mb.dense_points(config, dt, device, tokens, rows, attention, cold=cold)

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
        built = await self.stream.offload(mb._layers, cfg, dt, device)
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
