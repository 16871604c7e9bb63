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
                      cold: bool = True, idle: bool = False, rounds: int | None = None) -> dict:
        """Timings for a profile (see :mod:`glinthawk_dask.planner.microbench`), on this
        worker's device and compute stream: the dense layer curve at ``tokens`` (over
        ``rounds`` rounds; None: as many as a profile's), the cold factor (unless not
        ``cold``: a profile with an attention worker measures it against real round trips,
        :meth:`profile_alternate`), with ``idle`` what longer idle gaps add, the head curve
        at ``rows``, attention points at ``attention`` shapes ([sequences, context, new
        tokens]) and the driver's cost."""
        from ..planner import microbench as mb

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dt = DTYPES[dtype]
        return await self.stream.submit(
            0, lambda: mb.dense_points(config, dt, device, tokens, rows, attention, cold=cold,
                                     idle=idle, rounds=rounds or mb.ROUNDS), kind="calibrate")

    async def profile_alternate(self, address: str | list[str], config: dict, tokens: int,
                                dtype: str = "float32", n: int = 16, repeats: int = 1) -> dict:
        """A dense layer and an attention request as a run sees them.

        ``address`` names the attention worker of each chain (one address: one chain).  A
        chain alternates a dense job on the compute stream (a layer, then sending its
        attention request of ``tokens`` tokens) with the round trip to its worker,
        answered on the stream as a run's are.  With two or more chains each dense job
        runs while another chain's attention computes, as in a pipeline that many
        micro-batches deep.  The medians of ``n``: ``{"alone": a dense layer back to
        back, "alternating": a dense layer in the chains, "job": a dense job in the
        chains (the layer and the send), "cycle": from a job's start to the start of
        its chain's next job, "attention": an attention worker's compute seconds per
        request in the chains}``.  With ``repeats`` above 1 the whole measurement runs
        that many times on the same layers and ``"rounds"`` holds each one's dict (the
        top-level values are the first round's)."""
        from ..model.config import ModelConfig
        from ..planner import microbench as mb

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dt = DTYPES[dtype]
        cfg = ModelConfig(**config)
        mcfg, layers = await self.stream.offload(mb._layers, cfg, dt, device)
        rounds = [await self._alternate(address, config, cfg, mcfg, layers, tokens, dt, device, n)
                  for _ in range(max(1, repeats))]
        return {**rounds[0], "rounds": rounds} if repeats > 1 else rounds[0]

    async def _alternate(self, address: str | list[str], config: dict, cfg: Any, mcfg: Any, layers: Any,
                         tokens: int, dt: torch.dtype, device: torch.device, n: int) -> dict:
        """One measurement of :meth:`profile_alternate` on ``layers`` (of ``mcfg``)."""
        from ..planner import microbench as mb

        loop = asyncio.get_running_loop()
        q, kv = _request_tensors(cfg, tokens, dt)
        x = torch.randn(tokens, cfg.dim, dtype=dt, device=device)  # [T, dim]
        o = torch.randn(tokens, cfg.n_heads, cfg.head_dim, dtype=dt, device=device)  # [T, H, D]
        cos = torch.ones(tokens, cfg.head_dim, dtype=dt, device=device)  # [T, D]
        channels = [await self.dataplane.channel(a, "attention")
                    for a in ([address] if isinstance(address, str) else address)]
        warm = 2 * len(channels)  # each chain's first layers warm up
        done = loop.create_future()
        layer_s: list[float] = []
        job_s: list[float] = []
        cycle_s: list[float] = []
        started: dict[int, float] = {}  # each chain's last job start (chains may share a channel)
        attention: list[float] = []
        ended: list[bool] = []  # set once: replies still in flight then go nowhere

        def finish(error: BaseException | None) -> None:
            if not ended:
                ended.append(True)
                settle_threadsafe(done, None, error)

        def job(chain: int, channel: Any) -> None:  # on the stream thread, as a run's dense jobs
            if ended:
                return
            i = len(job_s)
            with torch.inference_mode():
                t = time.perf_counter()
                if chain in started:
                    cycle_s.append(t - started[chain])
                started[chain] = t
                (a, b), = layers.take(1)  # through every layer, as a run's steps
                post_pre_attention(mcfg, a, b, x, o, cos, cos)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            layer_s.append(time.perf_counter() - t)
            if i + 1 < n + warm:
                channel.request("glinthawk_attend_probe", {"config": config}, {"q": q, "k": kv, "v": kv},
                                lambda r, e: answered(chain, channel, r, e), 60.0)
            job_s.append(time.perf_counter() - t)
            if len(job_s) >= n + warm:
                finish(None)

        def answered(chain: int, channel: Any, reply: Any, error: BaseException | None) -> None:
            if error is not None:
                finish(error)
                return
            attention.append(float(reply.get("s", 0.0)) if isinstance(reply, dict) else 0.0)
            self.stream.push(0, lambda: job(chain, channel), kind=None)

        def start() -> None:
            for i, ch in enumerate(channels):
                self.stream.push(0, lambda i=i, ch=ch: job(i, ch), kind=None)

        await self.stream.run(start)
        await done
        alone = await self.stream.run(lambda: mb._time_layers(mcfg, layers, tokens, dt, device, n))
        return {"alone": alone, "alternating": _median(layer_s[warm:]), "job": _median(job_s[warm:]),
                "cycle": _median(cycle_s[warm:]), "attention": _median(attention[len(channels):])}

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


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else 0.0
