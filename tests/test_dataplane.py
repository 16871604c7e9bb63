"""The data plane's protocol: framing, coalesced writes, replies out of order, stale
ids, deadlines, and a peer that dies with requests pending.

Servers and channels here run on real sockets and real compute streams, with a stand-in
for the Dask worker (an address, a handler table, an rpc that finds data planes); the
engine's use of it is covered by test_two_tier, test_faults and the TLS cluster test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from distributed.utils_test import gen_test

from glinthawk_dask.runtime.compute import ComputeStream
from glinthawk_dask.runtime.dataplane import DataPlane, RemoteError
from glinthawk_dask.runtime.link import STAGING_BYTES, FrameReader
from glinthawk_dask.runtime.faults import AttentionLost
from glinthawk_dask.runtime.wire import PREFIX, decode, encode


class FakeWorker:
    """What a DataPlane needs of a Dask worker."""

    planes: dict[str, "FakeWorker"] = {}

    def __init__(self, name: str) -> None:
        self.address = f"tcp://127.0.0.1:{name}"
        self.handlers: dict = {}
        self.extensions: dict = {}
        self.security = None
        FakeWorker.planes[self.address] = self

    def rpc(self, peer: str):
        worker = FakeWorker.planes[peer]

        class Rpc:
            async def glinthawk_dataplane(self, tier):
                return await worker.handlers["glinthawk_dataplane"](tier=tier)

        return Rpc()


def _tensors(n: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"q": torch.randn(n, 9, 64).to(dtype), "k": torch.randn(n, 3, 64).to(dtype),
            "v": torch.arange(n * 3 * 64).reshape(n, 3, 64).to(dtype)}


# -- frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_a_frame_round_trips_without_a_copy(dtype):
    tensors = {**_tensors(5, dtype), "empty": torch.empty(0, 4, dtype=dtype), "odd": torch.ones(3, dtype=dtype)}
    meta = {"i": 7, "op": "x", "a": {"layout": {"slots": [1, 2], "admitted": [["a", 1, {"seed": 3}]]}}}
    buffers = encode(dict(meta), tensors)
    raw = b"".join(bytes(b) for b in buffers)
    meta_len, data_len = PREFIX.unpack_from(raw)
    body = bytearray(raw[PREFIX.size:])
    assert len(body) == data_len + meta_len + (-meta_len % 16)
    got_meta, got = decode(body, meta_len)
    assert got_meta == meta
    assert set(got) == set(tensors)
    base = torch.frombuffer(body, dtype=torch.uint8).data_ptr()
    for name, t in tensors.items():
        assert got[name].dtype == dtype and got[name].shape == t.shape and torch.equal(got[name], t)
        if t.numel():
            assert base <= got[name].data_ptr() < base + len(body)  # a view of the receive buffer
            assert got[name].data_ptr() % 16 == base % 16  # aligned in the frame


def test_frames_are_found_whatever_the_chunking():
    rng = random.Random(3)
    row = (9 + 3 + 3) * 64 * 4  # bytes of q/k/v per row
    # frames smaller and larger than the staging buffer, one just around its size
    sizes = [1, 3, STAGING_BYTES // row - 1, STAGING_BYTES // row + 1, 4 * STAGING_BYTES // row, 2, 60]
    sent = [({"i": i, "op": "x", "a": {}}, _tensors(n)) for i, n in enumerate(sizes)]
    stream = b"".join(b"".join(bytes(b) for b in encode(dict(m), t)) for m, t in sent)
    for _ in range(5):
        reader, frames, pos = FrameReader(), [], 0
        while pos < len(stream):
            buf = reader.get_buffer()
            n = min(len(buf), rng.choice([1, 7, 100, 5000, 3 * STAGING_BYTES]), len(stream) - pos)
            buf[:n] = stream[pos : pos + n]
            pos += n
            reader.buffer_updated(n, frames)
        assert [m["i"] for m, _ in frames] == list(range(len(sizes)))
        for (m, t), (gm, gt) in zip(sent, frames):
            assert all(torch.equal(t[k], gt[k]) for k in t)


# -- requests and replies ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _pair():
    """A server plane ("attention") and a client plane ("dense"), each on its own stream."""
    server_worker, client_worker = FakeWorker("1"), FakeWorker("2")
    streams = [ComputeStream("test-server"), ComputeStream("test-client")]
    server = DataPlane(server_worker, streams[0], "attention", ["echo", "slow", "hang", "boom"],
                       inline={"echo": (lambda **kw: {"o": kw["q"], "n": kw.get("n")}, None)})
    server.register()
    client = DataPlane(client_worker, streams[1], "dense", [])

    async def echo(**kw):
        return {"o": kw["q"], "n": kw.get("n")}

    async def slow(delay, n):
        await asyncio.sleep(delay)
        return {"n": n}

    async def hang():
        await asyncio.sleep(3600)

    def boom():
        raise KeyError("no such thing")

    server_worker.handlers.update(echo=echo, slow=slow, hang=hang, boom=boom)
    server.inline["echo"] = (server.inline["echo"][0], echo)
    try:
        yield server, client, server_worker
    finally:
        client.close()
        server.close()
        for s in streams:
            s.close()


@gen_test(timeout=30)
async def test_a_stream_keeps_its_torch_threads_and_its_side_thread_has_one():
    """torch sets a thread's count up lazily from the value set last in the process: a
    side thread's one thread, set after the stream set its own, must not become the
    stream's (a dense worker computed on one thread of two that way)."""
    stream = ComputeStream("test-threads", threads=2)
    try:
        await stream.run(lambda: None)  # the stream has set its count
        side = await stream.offload(torch.get_num_threads)  # the side thread sets one, afterwards
        assert side == 1
        assert await stream.run(torch.get_num_threads) == 2  # the stream's first torch call
    finally:
        stream.close()


@gen_test(timeout=30)
async def test_requests_multiplexed_on_one_connection_and_coalesced_replies():
    async with _pair() as (server, client, _):
        channel = await client.channel("tcp://127.0.0.1:1", "attention")
        assert await client.channel("tcp://127.0.0.1:1", "attention") is channel  # one connection per peer
        payload = _tensors(4)
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(8)]

        def send_all():  # eight requests in one go, on the client's stream
            for n, fut in enumerate(futs):
                channel.request("echo", {"n": n}, payload,
                                lambda r, e, fut=fut: loop.call_soon_threadsafe(fut.set_result, (r, e)), 10.0)

        await client.stream.run(send_all)
        replies = await asyncio.gather(*futs)
        assert [r["n"] for r, e in replies] == list(range(8)) and all(e is None for _, e in replies)
        assert all(torch.equal(r["o"], payload["q"]) for r, _ in replies)
        (link,) = server._served
        assert link.frames_in == 8
        assert link.writes < 8  # replies to requests read together leave in one write


@gen_test(timeout=30)
async def test_induced_latency_holds_the_request_and_its_reply_on_the_serving_side():
    """Each message of an exchange is held ``latency(kwargs)`` on the serving side: the
    request after it arrived (the handler runs no sooner), the reply before it leaves.
    The requesting side sends at once: a job on its stream right after the send, longer
    than the latency, does not hold the request (as a timer on that thread would)."""
    lat = 0.3
    async with _pair() as (server, client, _):
        ran: list[float] = []
        echo = server.inline["echo"]
        server.inline["echo"] = (lambda **kw: (ran.append(time.monotonic()), echo[0](**kw))[1], echo[1])
        server.latency = lambda kw: lat if kw.get("n", 0) >= 0 else 0.0
        channel = await client.channel("tcp://127.0.0.1:1", "attention")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        sent: list[float] = []

        def send_then_compute():  # the request, then 1 s of other work on the same stream
            sent.append(time.monotonic())
            channel.request("echo", {"n": 1}, _tensors(2),
                            lambda r, e: loop.call_soon_threadsafe(fut.set_result, (r, e)), 10.0)
            time.sleep(1.0)

        await client.stream.run(send_then_compute)
        reply, error = await fut
        back = time.monotonic()
        assert error is None and reply["n"] == 1
        assert lat <= ran[0] - sent[0] < 0.65  # held on arrival, not behind the sender's 1 s job
        assert back - ran[0] >= lat  # and the reply held before it left
        server.latency = lambda kw: 0.0  # no latency: answered at once
        t = time.monotonic()
        assert (await channel.arequest("echo", {"n": 2}, _tensors(2)))["n"] == 2
        assert time.monotonic() - t < lat


@gen_test(timeout=60)
async def test_large_frames_both_ways_at_once_never_block_the_streams():
    """More bytes in flight each way than the sockets buffer: sends that the socket does
    not take wait on the stream's selector, so both sides keep reading."""
    async with _pair() as (_, client, _):
        channel = await client.channel("tcp://127.0.0.1:1", "attention")
        payload = _tensors(1500)  # ~5.8 MB of q/k/v out, ~3.5 MB of o back, per request
        got = await asyncio.gather(*(channel.arequest("echo", {"n": n}, payload) for n in range(6)))
        assert [r["n"] for r in got] == list(range(6))
        assert all(torch.equal(r["o"], payload["q"]) for r in got)
        # empty tensors (a step with nothing to attend) travel too
        empty = {"q": torch.empty(0, 9, 64), "k": torch.empty(0, 3, 64), "v": torch.empty(0, 3, 64)}
        reply = await channel.arequest("echo", {"n": 7}, empty, timeout=5.0)
        assert reply["n"] == 7 and reply["o"].shape == (0, 9, 64)


@gen_test(timeout=30)
async def test_replies_out_of_order_go_to_their_requests():
    async with _pair() as (_, client, _):
        channel = await client.channel("tcp://127.0.0.1:1", "attention")
        delays = [0.6, 0.0, 0.4, 0.2]
        t = time.monotonic()
        got = await asyncio.gather(*(channel.arequest("slow", {"delay": d, "n": n}) for n, d in enumerate(delays)))
        assert [r["n"] for r in got] == [0, 1, 2, 3]
        # served concurrently (the longest delay, 0.6 s), not one after another (their sum, 1.2 s)
        assert time.monotonic() - t < 0.9


@gen_test(timeout=30)
async def test_deadlines_stale_replies_and_remote_errors():
    async with _pair() as (_, client, _):
        channel = await client.channel("tcp://127.0.0.1:1", "attention")
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            await channel.arequest("hang", timeout=0.3)
        assert 0.25 < time.monotonic() - t < 1.5
        # the late reply of a timed-out request is dropped, not given to another request
        late = asyncio.ensure_future(channel.arequest("slow", {"delay": 0.3, "n": 1}, timeout=0.1))
        with pytest.raises(TimeoutError):
            await late
        assert (await channel.arequest("slow", {"delay": 0.4, "n": 2}))["n"] == 2
        assert channel.dropped == 1
        with pytest.raises(RemoteError, match="KeyError"):
            await channel.arequest("boom")
        with pytest.raises(RemoteError, match="no data-plane handler"):
            await channel.arequest("not-served")


@gen_test(timeout=30)
async def test_a_wrapped_handler_is_the_one_served():
    """Inline handlers serve only while the worker's table holds the tier's own coroutine:
    a wrapper put there (fault injection, say) is what requests reach."""
    async with _pair() as (_, client, worker):
        channel = await client.channel("tcp://127.0.0.1:1", "attention")
        calls = []

        async def wrapper(**kw):
            calls.append(kw["n"])
            return {"o": kw["q"] * 0, "n": -1}

        worker.handlers["echo"] = wrapper
        reply = await channel.arequest("echo", {"n": 5}, _tensors(2))
        assert calls == [5] and reply["n"] == -1


@gen_test(timeout=30)
async def test_errors_that_cross_keep_their_type():
    async with _pair() as (_, client, worker):

        async def lost():
            raise AttentionLost("tcp://x:1", 1, 2, "TimeoutError: gone")

        worker.handlers["boom"] = lost
        channel = await client.channel("tcp://127.0.0.1:1", "attention")
        with pytest.raises(AttentionLost) as info:
            await channel.arequest("boom")
        assert (info.value.address, info.value.slice_index, info.value.micro_batch) == ("tcp://x:1", 1, 2)


# -- a peer that dies ---------------------------------------------------------------------------

SERVER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from test_dataplane import FakeWorker
    from glinthawk_dask.runtime.compute import ComputeStream
    from glinthawk_dask.runtime.dataplane import DataPlane

    async def main():
        worker = FakeWorker("1")
        async def hang(**tensors):
            await asyncio.sleep(3600)
        worker.handlers["hang"] = hang
        plane = DataPlane(worker, ComputeStream("s"), "attention", ["hang"])
        print((await plane.address())["port"], flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


@gen_test(timeout=30)
async def test_a_peer_killed_with_requests_pending_fails_them_all_at_once():
    proc = subprocess.Popen([sys.executable, "-c", SERVER.format(tests=os.path.dirname(__file__))],
                            stdout=subprocess.PIPE, text=True)
    stream = ComputeStream("test-client")
    try:
        port = int(proc.stdout.readline())
        from glinthawk_dask.runtime.dataplane import Channel

        channel = Channel("peer", socket.create_connection(("127.0.0.1", port)), stream)
        await stream.run(channel.link.start)
        loop = asyncio.get_running_loop()
        failed: list[tuple[float, BaseException]] = []
        all_failed = loop.create_future()

        def on_reply(r, e):
            failed.append((time.monotonic(), e))
            if len(failed) == 4:
                loop.call_soon_threadsafe(all_failed.set_result, None)

        await stream.run(lambda: [channel.request("hang", None, _tensors(3), on_reply, 60.0) for _ in range(4)])
        await asyncio.sleep(0.3)
        assert not failed
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(all_failed, 5)
        assert all(isinstance(e, ConnectionResetError) for _, e in failed)
        assert max(t for t, _ in failed) - killed < 0.1
        assert channel.closed
    finally:
        proc.kill()
        proc.wait()
        stream.close()
