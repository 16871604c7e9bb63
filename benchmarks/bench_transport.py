#!/usr/bin/env python
"""The data plane against distributed's rpc, one attention-shaped round trip at a time.

An echo attention worker (a real Dask worker process) answers ``glinthawk_echo``
requests of the attention request's shape: q [T, 9, 64], k and v [T, 3, 64] out, an
output o of q's shape back (SmolLM2's heads; T sets the payload).  The dense side is a
Dask worker in this process and sends the requests two ways:

* **rpc**: ``worker.rpc(addr).glinthawk_echo(q=pack(q), ...)`` from coroutines on the
  event loop: the pooled request/reply the two-tier engine used before the data plane
  (one connection per call in flight, each array serialized on its own, the message
  walked for its size; the echo worker answers on its event loop);
* **stream**: :class:`glinthawk_dask.runtime.dataplane.DataPlane`, as the engine uses
  it: one connection per peer served on a compute stream thread on each side, requests
  multiplexed on it by id, one frame per message, each reply sending the next request
  from that thread (as a reply there queues the next dense job).

* **floor**: the same request and reply bytes over a plain blocking socket to an echo
  thread of the same worker, one at a time, no framing: what the kernel and the
  interpreter's socket calls cost on their own, the floor any Python transport stands on.

For each payload (``--payloads`` KB of q+k+v, fp32 and bf16), each number of requests
in flight (``--in-flight``), without and with a background thread that holds the GIL
half of the time (0.5 ms of pure Python, then 0.5 ms asleep), and for the stream beside
a process that runs the same loop (a core's share without the GIL), it prints the p50 and
p99 round trip, round trips per second, and the dense side's CPU in the thread that
serves the transport: the event loop's for rpc, the compute stream's for the stream
(each read with ``time.thread_time`` on that thread over the measured window), per
round trip and per message.  A round trip is two messages on the dense side, as one
layer of a micro-batch is: the request it writes and the reply it reads.  The event
loop's CPU per round trip during the stream rows is printed too.  The machine's CPU
shares during the whole run are printed beside them.  Finally the issue's targets at
64 KB with 4 in flight.

Usage::

    python benchmarks/bench_transport.py [--payloads 4,64,1024] [--in-flight 1,2,4,8]
        [--seconds 1.0] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_two_tier (cpu shares)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

import dask
import torch
from distributed import Scheduler, Worker

from bench_two_tier import cpu_share, cpu_text, cpu_ticks
from glinthawk_dask import config as glinthawk_config
from glinthawk_dask.runtime.cluster import housekeeping_config
from glinthawk_dask.runtime.compute import ComputeStream
from glinthawk_dask.runtime.dataplane import DataPlane
from glinthawk_dask.runtime.messages import pack, unpack
from glinthawk_dask.runtime.wire import host_bytes

H, KVH, D = 9, 3, 64  # SmolLM2-135M's attention shape
TARGET_LOOP_US = 50.0
TARGET_P99_MS = 1.0
TARGET_RATIO = 3.0


async def echo(q, k, v):
    """The echo attention worker's handler (rpc, and the event-loop path of the data
    plane): o of q's shape back, packed if q came packed."""
    if isinstance(q, dict):
        return {"o": pack(unpack(q))}
    return {"o": q}


def echo_inline(q, k, v):
    """The same on the data plane's stream thread."""
    return {"o": q}


RAW_HEADER = "<QQ"  # request bytes to follow, reply bytes wanted (a format: the echo is shipped by value)


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    while view.nbytes:
        n = sock.recv_into(view)
        if not n:
            return False
        view = view[n:]
    return True


def _raw_echo_server(lsock: socket.socket) -> None:
    """The floor's echo: plain blocking sockets, no framing beyond a 16-byte header."""
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head, buf, reply = bytearray(struct.calcsize(RAW_HEADER)), bytearray(1), b""
        with conn:
            while _recv_exactly(conn, memoryview(head)):
                want, give = struct.unpack(RAW_HEADER, head)
                if len(buf) < want:
                    buf = bytearray(want)
                if len(reply) != give:
                    reply = bytes(give)
                if not _recv_exactly(conn, memoryview(buf)[:want]):
                    break
                conn.sendall(reply)


def install_echo(dask_worker) -> dict:
    """Run on the echo worker: serve ``glinthawk_echo`` over rpc and the data plane, and
    a plain socket echo for the floor; where to reach them."""
    dask_worker.handlers["glinthawk_echo"] = echo
    stream = ComputeStream("glinthawk-echo")
    DataPlane(dask_worker, stream, "attention", ["glinthawk_echo"],
              inline={"glinthawk_echo": (echo_inline, echo)}).register()
    host = dask_worker.address.rsplit("//", 1)[-1].rsplit(":", 1)[0]
    lsock = socket.create_server((host, 0))
    threading.Thread(target=_raw_echo_server, args=(lsock,), daemon=True, name="raw-echo").start()
    return {"address": dask_worker.address, "raw": (host, lsock.getsockname()[1])}


def measure_floor(raw: tuple[str, int], payload: dict[str, torch.Tensor], seconds: float) -> dict[str, float]:
    """The floor: the same request and reply bytes over a plain blocking socket, one in
    flight, no framing, no tensors; this thread's CPU per round trip."""
    req = b"".join(bytes(host_bytes(t)) for t in payload.values())
    rep_len = payload["q"].nbytes
    rep = memoryview(bytearray(rep_len))
    rtts: list[float] = []
    with socket.create_connection(raw) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = struct.pack(RAW_HEADER, len(req), rep_len)

        def once() -> None:
            t = time.perf_counter()
            sock.sendmsg([head, req])
            _recv_exactly(sock, rep)
            rtts.append(time.perf_counter() - t)

        for _ in range(5):  # warm
            once()
        rtts.clear()
        cpu0, t0 = time.thread_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            once()
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - t0
    rtts.sort()
    n = len(rtts)
    return {"round_trips": n, "p50_ms": rtts[n // 2] * 1e3, "p99_ms": rtts[min(n - 1, int(n * 0.99))] * 1e3,
            **_per(n, wall, cpu, 0.0)}


class GilHolder:
    """A thread that holds the GIL half of the time: 0.5 ms busy in Python, 0.5 ms asleep."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            end = time.perf_counter() + 0.0005
            while time.perf_counter() < end:
                pass
            time.sleep(0.0005)

    def __enter__(self) -> "GilHolder":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


_SPIN = ("import time\n"
         "while True:\n"
         "    end = time.perf_counter() + 0.0005\n"
         "    while time.perf_counter() < end:\n"
         "        pass\n"
         "    time.sleep(0.0005)\n")


class CpuHolder:
    """The same half-time busy loop in a process of its own: it takes as much of a core
    as :class:`GilHolder` but no GIL of the dense side, so the two rows beside each
    other split the p99 into what the GIL costs and what sharing the cores does."""

    def __enter__(self) -> "CpuHolder":
        self._proc = subprocess.Popen([sys.executable, "-c", _SPIN])
        return self

    def __exit__(self, *exc: Any) -> None:
        self._proc.kill()
        self._proc.wait()


def tensors(payload_kb: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    elem = torch.tensor([], dtype=dtype).element_size()
    t = max(1, round(payload_kb * 1024 / ((H + 2 * KVH) * D * elem)))
    return {"q": torch.randn(t, H, D).to(dtype), "k": torch.randn(t, KVH, D).to(dtype),
            "v": torch.randn(t, KVH, D).to(dtype)}


async def measure(worker: Worker, plane: DataPlane, peer: str, path: str, payload: dict[str, torch.Tensor],
                  in_flight: int, seconds: float) -> dict[str, float]:
    """Closed loops of ``in_flight`` requesters for ``seconds``: round trips, and CPU per
    message of the event loop and (stream) of the compute stream thread."""
    stream = plane.stream
    rtts: list[float] = []
    if path == "stream":
        channel = await plane.channel(peer, "attention")
        loop = asyncio.get_running_loop()

        async def closed_loops(n_each: int | None, stop_at: float) -> None:
            done = loop.create_future()
            left = [in_flight]

            def send(sent: int) -> None:
                t = time.perf_counter()
                channel.request("glinthawk_echo", None, payload, lambda r, e: reply(t, sent, r, e), 30.0)

            def reply(t: float, sent: int, r: Any, e: BaseException | None) -> None:
                if e is not None:
                    loop.call_soon_threadsafe(done.set_exception, e)
                    return
                assert r["o"].shape == payload["q"].shape
                rtts.append(time.perf_counter() - t)
                if (n_each is None and time.perf_counter() < stop_at) or (n_each is not None and sent < n_each):
                    send(sent + 1)
                    return
                left[0] -= 1
                if not left[0]:
                    loop.call_soon_threadsafe(done.set_result, None)

            await stream.run(lambda: [send(1) for _ in range(in_flight)])
            await done
    else:
        async def call() -> None:
            t = time.perf_counter()
            reply = await worker.rpc(peer).glinthawk_echo(
                q=pack(payload["q"]), k=pack(payload["k"]), v=pack(payload["v"]))
            assert unpack(reply["o"]).shape == payload["q"].shape
            rtts.append(time.perf_counter() - t)

        async def closed_loops(n_each: int | None, stop_at: float) -> None:
            async def requester() -> None:
                sent = 0
                while (n_each is None and time.perf_counter() < stop_at) or (n_each is not None and sent < n_each):
                    await call()
                    sent += 1
            await asyncio.gather(*(requester() for _ in range(in_flight)))

    await closed_loops(5, 0.0)  # warm: connections, buffers
    rtts.clear()
    cpu0, scpu0, t0 = time.thread_time(), await stream.run(time.thread_time), time.perf_counter()
    await closed_loops(None, time.perf_counter() + seconds)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - t0
    scpu = await stream.run(time.thread_time) - scpu0
    rtts.sort()
    n = len(rtts)
    served_by = scpu if path == "stream" else cpu
    return {"round_trips": n, "p50_ms": rtts[n // 2] * 1e3, "p99_ms": rtts[min(n - 1, int(n * 0.99))] * 1e3,
            **_per(n, wall, served_by, cpu)}


MESSAGES_PER_ROUND_TRIP = 2  # on the dense side: the request written and the reply read


def _per(n: int, wall: float, served_cpu: float, loop_cpu: float) -> dict[str, float]:
    """Rates and CPU of ``n`` round trips in ``wall`` seconds: ``served_cpu`` seconds of
    the thread serving the transport, ``loop_cpu`` of the event loop."""
    return {"round_trips_per_s": n / wall, "cpu_us_per_round_trip": served_cpu / n * 1e6,
            "cpu_us_per_message": served_cpu / (n * MESSAGES_PER_ROUND_TRIP) * 1e6,
            "loop_us_per_round_trip": loop_cpu / n * 1e6}


HOLDERS = {"no": contextlib.nullcontext, "gil": GilHolder, "cpu": CpuHolder}  # what runs beside the measure


def report_row(kb: float, dtype: torch.dtype, holder: str, in_flight: int, path: str, r: dict) -> dict:
    """One row of the report, printed as it comes (the floor has no event loop: "-");
    ``holder`` is a key of :data:`HOLDERS`."""
    row = {"payload_kb": kb, "dtype": str(dtype).removeprefix("torch."), "gil_thread": holder == "gil",
           "cpu_process": holder == "cpu", "in_flight": in_flight, "path": path, **r}
    loop = "-" if path == "floor" else f"{r['loop_us_per_round_trip']:.1f}"
    print(f"{kb:>6g}KB {row['dtype']:>8} {holder:>6} {in_flight:>8} | {path:>6} "
          f"{r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['round_trips_per_s']:>8.0f} "
          f"{r['cpu_us_per_round_trip']:>9.1f} {r['cpu_us_per_message']:>9.1f} {loop:>7}", flush=True)
    return row


async def run(args: argparse.Namespace) -> dict:
    # the scheduler, the echo worker and the dense side under the housekeeping that tier
    # workers run with (glinthawk.housekeeping)
    with dask.config.set(housekeeping_config()):
        return await _run(args)


async def _run(args: argparse.Namespace) -> dict:
    from distributed import Client, Nanny

    async with Scheduler(dashboard_address=":0", port=0) as s:
        async with Nanny(s.address, nthreads=1) as nanny, Worker(s.address, nthreads=1) as dense:
            async with Client(s.address, asynchronous=True) as c:
                echo_at = (await c.run(install_echo, workers=[nanny.worker_address]))[nanny.worker_address]
                peer, raw = echo_at["address"], tuple(echo_at["raw"])
                plane = DataPlane(dense, ComputeStream("glinthawk-dense"), "dense", [])
                rows = []
                header = (f"{'payload':>8} {'dtype':>8} {'beside':>6} {'inflight':>8} | {'path':>6} {'p50 ms':>7} "
                          f"{'p99 ms':>7} {'rt/s':>8} {'us/rt':>9} {'us/msg':>9} {'(loop)':>7}")
                print(header)
                print("-" * len(header), flush=True)
                loop = asyncio.get_running_loop()
                for kb in args.payloads:
                    for dtype in (torch.float32, torch.bfloat16):
                        payload = tensors(kb, dtype)
                        r = await loop.run_in_executor(None, measure_floor, raw, payload, args.seconds)
                        rows.append(report_row(kb, dtype, "no", 1, "floor", r))
                        for holder in HOLDERS:
                            for k in args.in_flight:
                                for path in ("rpc", "stream") if holder != "cpu" else ("stream",):
                                    with HOLDERS[holder]():
                                        r = await measure(dense, plane, peer, path, payload, k, args.seconds)
                                    rows.append(report_row(kb, dtype, holder, k, path, r))
                plane.close()
                plane.stream.close()
                return {"rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--payloads", default="4,64,1024", help="KB of q+k+v per request (default 4,64,1024)")
    p.add_argument("--in-flight", default="1,2,4,8", help="requests in flight (default 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=1.0, help="measured seconds per row (default 1)")
    p.add_argument("--json", metavar="OUT", help="write the rows and targets to this JSON file")
    args = p.parse_args(argv)
    try:
        args.payloads = [float(x) for x in args.payloads.split(",")]
        args.in_flight = [int(x) for x in args.in_flight.split(",")]
    except ValueError:
        p.error("--payloads and --in-flight take comma-separated numbers")
    if not args.payloads or min(args.payloads) <= 0 or not args.in_flight or min(args.in_flight) < 1:
        p.error("--payloads must be positive and --in-flight at least 1")
    return args


def targets(rows: list[dict]) -> dict:
    """The issue's targets, read at 64 KB fp32 with 4 in flight."""
    def pick(path: str, gil: bool, cpu: bool = False) -> dict | None:
        return next((r for r in rows if r["payload_kb"] == 64 and r["dtype"] == "float32" and r["in_flight"] == 4
                     and r["path"] == path and r["gil_thread"] == gil and r["cpu_process"] == cpu), None)

    s, s_gil, rpc = pick("stream", False), pick("stream", True), pick("rpc", False)
    out: dict[str, Any] = {}
    print("\n== targets (64 KB fp32, 4 in flight) ==")
    if s is None or s_gil is None or rpc is None:
        print("n/a: run with 64 in --payloads and 4 in --in-flight")
        return out
    # The unit: a message, two of which (the request and its reply) make one
    # layer's round trip on the dense side; per round trip is printed beside it.
    checks = [
        ("cpu_us", f"CPU of the serving thread <= {TARGET_LOOP_US:g} us/message", s["cpu_us_per_message"],
         s["cpu_us_per_message"] <= TARGET_LOOP_US,
         "{:.1f} us (%.1f us a round trip of two)" % s["cpu_us_per_round_trip"]),
        ("p99_gil", f"p99 round trip <= {TARGET_P99_MS:g} ms with the GIL-holding thread", s_gil["p99_ms"],
         s_gil["p99_ms"] <= TARGET_P99_MS, "{:.3f} ms"),
        ("ratio", f">= {TARGET_RATIO:g}x fewer CPU us/message than rpc",
         rpc["cpu_us_per_message"] / s["cpu_us_per_message"],
         rpc["cpu_us_per_message"] / s["cpu_us_per_message"] >= TARGET_RATIO, "{:.1f}x"),
    ]
    for key, what, value, ok, fmt in checks:
        out[key] = {"value": value, "ok": ok}
        print(f"{what}: {fmt.format(value)} {'PASS' if ok else 'SHORT'}")
    s_cpu = pick("stream", False, cpu=True)
    if s_cpu is not None:
        out["p99_beside"] = {"nothing": s["p99_ms"], "cpu_process": s_cpu["p99_ms"], "gil_thread": s_gil["p99_ms"]}
        print(f"(the p99 with nothing beside it: {s['p99_ms']:.3f} ms; beside a process busy the same half of the "
              f"time, which holds a core but not this process's GIL: {s_cpu['p99_ms']:.3f} ms)")
    floor = next((r for r in rows if r["payload_kb"] == 64 and r["dtype"] == "float32" and r["path"] == "floor"), None)
    if floor is not None:
        out["floor_cpu_us_per_round_trip"] = floor["cpu_us_per_round_trip"]
        print(f"(the floor, the same bytes over a plain blocking socket one at a time: "
              f"{floor['cpu_us_per_round_trip']:.1f} us of CPU a round trip; the stream spends "
              f"{s['cpu_us_per_round_trip'] - floor['cpu_us_per_round_trip']:.1f} us above it)")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, os.cpu_count() = {os.cpu_count()}; echo attention worker: a Dask worker "
          f"process; dense side: a Dask worker on this process's loop; Dask's housekeeping: "
          f"{glinthawk_config.get('housekeeping')} (glinthawk.housekeeping, as tier workers)\n")
    before = cpu_ticks()
    report = asyncio.run(run(args))
    share = cpu_share(before, cpu_ticks())
    print(f"\nmachine CPU during the run: {cpu_text(share)}")
    report["cpu"] = share
    report["targets"] = targets(report["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
