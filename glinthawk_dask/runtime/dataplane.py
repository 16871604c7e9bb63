"""The data plane: one streamed connection per pair of workers, requests multiplexed on it.

Dask keeps the control plane (placing runs, opening caches, submitting requests).  The
per-layer traffic (q/k/v out, attention outputs back, hidden states between slices and
sampled tokens back) goes over plain asyncio streams beside distributed's comms:

* every worker that hosts a tier listens on one extra port (:class:`DataPlane`),
  announced by the ``glinthawk_dataplane`` handler and secured with the worker's own
  TLS settings when the cluster uses TLS;
* a worker keeps one long-lived connection to each peer it talks to
  (:meth:`DataPlane.channel`); every request carries an id and the replies, in any
  order, are matched by id, so all micro-batches in flight share that connection;
* frames (:mod:`~glinthawk_dask.runtime.wire`) are received with ``recv_into`` into a
  preallocated buffer (large ones straight into their own buffer) and decoded without
  a copy; the frames written in one pass of the event loop leave in one write;
* a request names a handler of the worker (``worker.handlers``) among those the tiers
  allowed on the data plane, with its arguments and tensors as keyword arguments: the
  same handlers the rpc layer serves.

A connection that closes fails every request pending on it at once
(:class:`ConnectionResetError`); a request not answered within its deadline fails
with :class:`TimeoutError`; a reply whose request is no longer pending (timed out, or
of an older run) is dropped and counted.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from typing import Any, Callable

import torch
from distributed.comm.addressing import get_address_host

from .faults import AttentionLost, StaleRunError, WorkerFailure
from .wire import PREFIX, decode, encode

logger = logging.getLogger(__name__)

__all__ = ["Channel", "Connection", "DataPlane", "RemoteError"]

STAGING_BYTES = 1 << 16  # frames up to this size are parsed from the staging buffer


class RemoteError(RuntimeError):
    """The peer's handler raised: its type and message, as text."""


# Errors that cross the data plane as themselves (the driver acts on them); any other
# exception arrives as a RemoteError with its type and message.
_WIRE_ERRORS: dict[str, Callable[..., BaseException]] = {
    "AttentionLost": AttentionLost,
    "StaleRunError": StaleRunError,
    "WorkerFailure": WorkerFailure,
}


def _error_to_wire(e: BaseException) -> dict:
    name = type(e).__name__
    if name in _WIRE_ERRORS and isinstance(e, _WIRE_ERRORS[name]):  # type: ignore[arg-type]
        return {"type": name, "args": [a if isinstance(a, (int, str, float)) else str(a) for a in e.args]}
    return {"type": "RemoteError", "args": [f"{name}: {e}"]}


def _error_from_wire(d: dict) -> BaseException:
    return _WIRE_ERRORS.get(d["type"], RemoteError)(*d["args"])


class Connection(asyncio.BufferedProtocol):
    """Frames over one stream, either side.

    ``on_frames(connection, [(meta, tensors), ...])`` gets the frames that arrived
    together; ``on_lost(connection, exc)`` is called once when the stream closes.
    """

    def __init__(self, on_frames: Callable, on_lost: Callable | None = None) -> None:
        self.on_frames = on_frames
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.peer = "?"
        self._staging = bytearray(STAGING_BYTES)
        self._sview = memoryview(self._staging)
        self._start = self._end = 0  # unparsed bytes in the staging buffer
        self._body: bytearray | None = None  # a large frame being read into its own buffer
        self._body_view: memoryview | None = None
        self._body_got = self._body_meta = 0
        self._out: list[Any] = []
        self._flush_scheduled = False
        self.frames_in = self.frames_out = self.writes = 0

    # -- asyncio callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body_view is not None:
            return self._body_view[self._body_got:]
        if self._end == len(self._staging):  # full of a frame's beginning: move it to the front
            n = self._end - self._start
            self._staging[:n] = self._staging[self._start : self._end]
            self._start, self._end = 0, n
        return self._sview[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        frames = []
        if self._body is not None:
            self._body_got += nbytes
            if self._body_got < len(self._body):
                return
            frames.append(decode(self._body, self._body_meta))
            self._body = self._body_view = None
        else:
            self._end += nbytes
            self._parse(frames)
        if frames:
            self.frames_in += len(frames)
            self.on_frames(self, frames)

    def _parse(self, frames: list) -> None:
        buf, size = self._staging, PREFIX.size
        while self._end - self._start >= size:
            meta_len, data_len = PREFIX.unpack_from(buf, self._start)
            body_len = meta_len + (-meta_len % 16) + data_len
            have = self._end - self._start - size
            if have >= body_len:  # whole: copy it out of the staging buffer
                s = self._start + size
                frames.append(decode(bytearray(self._sview[s : s + body_len]), meta_len))
                self._start = s + body_len
                continue
            if size + body_len > len(buf) - self._start:  # too large to finish here: its own buffer
                self._body = bytearray(body_len)
                self._body_view = memoryview(self._body)
                self._body[:have] = self._sview[self._start + size : self._end]
                self._body_got, self._body_meta = have, meta_len
                self._start = self._end = 0
            break
        if self._start == self._end:
            self._start = self._end = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out = []
        if self.on_lost is not None:
            self.on_lost(self, exc)

    # -- writing -------------------------------------------------------------------
    def send(self, meta: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Queue one frame; the frames queued in one pass of the event loop leave in one write."""
        if self.closed:
            raise ConnectionResetError(f"data-plane connection to {self.peer} is closed")
        self._out += encode(meta, tensors)
        self.frames_out += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and not self.closed:
            self.transport.writelines(out)
            self.writes += 1

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class Channel:
    """The requesting side of a connection: ids, pending replies, deadlines."""

    def __init__(self, peer: str) -> None:
        self.peer = peer  # the worker address, for messages
        self.connection = Connection(self._on_frames, self._on_lost)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, asyncio.TimerHandle | None]] = {}
        self.dropped = 0  # replies whose request was no longer pending

    @property
    def closed(self) -> bool:
        return self.connection.closed

    def request(
        self,
        op: str,
        args: dict | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        timeout: float | None = None,
        future: asyncio.Future | None = None,
    ) -> asyncio.Future:
        """Send a request for handler ``op``; the future gets the reply (a dict holding
        the handler's result, its tensors decoded) or the error."""
        loop = asyncio.get_running_loop()
        fut = future if future is not None else loop.create_future()
        if self.closed:
            fut.set_exception(ConnectionResetError(f"data-plane connection to {self.peer} is closed"))
            return fut
        rid = next(self._ids)
        timer = loop.call_later(timeout, self._expire, rid, timeout) if timeout else None
        self._pending[rid] = (fut, timer)
        self.connection.send({"i": rid, "op": op, "a": args or {}}, tensors)
        return fut

    def _expire(self, rid: int, timeout: float) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(TimeoutError(f"{self.peer} did not answer within {timeout:g} s"))

    def _on_frames(self, conn: Connection, frames: list) -> None:
        for meta, tensors in frames:
            entry = self._pending.pop(meta["i"], None)
            if entry is None:
                self.dropped += 1
                continue
            fut, timer = entry
            if timer is not None:
                timer.cancel()
            if fut.done():
                continue
            if "e" in meta:
                fut.set_exception(_error_from_wire(meta["e"]))
            else:
                result = meta.get("r")
                fut.set_result({**result, **tensors} if isinstance(result, dict) else result)

    def _on_lost(self, conn: Connection, exc: Exception | None) -> None:
        pending, self._pending = self._pending, {}
        why = f": {exc}" if exc else ""
        for fut, timer in pending.values():
            if timer is not None:
                timer.cancel()
            if not fut.done():
                fut.set_exception(ConnectionResetError(f"data-plane connection to {self.peer} closed{why}"))

    def close(self) -> None:
        self.connection.close()


class DataPlane:
    """A worker's data-plane endpoint: its listener and its connections to peers.

    One per worker (in ``worker.extensions``), shared by the tiers the worker hosts;
    each tier allows its handlers with :meth:`allow`.
    """

    extension = "glinthawk-dataplane"

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.ops: set[str] = set()
        self._server: asyncio.AbstractServer | None = None
        self._address: dict | None = None
        self._starting: asyncio.Future | None = None
        self._channels: dict[str, Channel] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._served: set[Connection] = set()

    @classmethod
    def of(cls, worker: Any) -> "DataPlane":
        """The worker's data plane (made on first use, with its ``glinthawk_dataplane`` handler)."""
        dp = worker.extensions.get(cls.extension)
        if dp is None:
            dp = worker.extensions[cls.extension] = cls(worker)
            worker.handlers["glinthawk_dataplane"] = dp.address
        return dp

    def allow(self, ops: list[str]) -> None:
        self.ops.update(ops)

    def disallow(self, ops: list[str]) -> None:
        """Withdraw handlers; with none left, close everything."""
        self.ops.difference_update(ops)
        if not self.ops:
            self.close()
            self.worker.extensions.pop(self.extension, None)
            self.worker.handlers.pop("glinthawk_dataplane", None)

    # -- the listening side ----------------------------------------------------------
    def _tls(self, listen: bool):
        if not self.worker.address.startswith("tls://"):
            return None
        sec = self.worker.security
        args = sec.get_listen_args("worker") if listen else sec.get_connection_args("worker")
        return args.get("ssl_context")

    async def address(self) -> dict:
        """Where this worker's data plane listens (started on first call)."""
        if self._address is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
        return self._address

    async def _start(self) -> None:
        host = get_address_host(self.worker.address)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self._serve, lambda conn, exc: self._served.discard(conn)),
            host=host, port=0, ssl=self._tls(True),
        )
        sock = self._server.sockets[0]
        self._address = {"host": host, "port": sock.getsockname()[1], "tls": self._tls(True) is not None}
        logger.debug("glinthawk data plane of %s on %s:%d", self.worker.address, host, self._address["port"])

    def _serve(self, conn: Connection, frames: list) -> None:
        self._served.add(conn)
        for meta, tensors in frames:
            rid, op = meta["i"], meta["op"]
            handler = self.worker.handlers.get(op) if op in self.ops else None
            if handler is None:
                conn.send({"i": rid, "e": {"type": "RemoteError", "args": [f"no data-plane handler {op!r}"]}})
                continue
            try:
                result = handler(**meta["a"], **tensors)
            except Exception as e:
                _reply(conn, rid, None, e)
                continue
            if inspect.isawaitable(result):
                asyncio.ensure_future(result).add_done_callback(
                    lambda f, conn=conn, rid=rid: _reply(conn, rid, *_outcome(f)))
            else:
                _reply(conn, rid, result, None)

    # -- the requesting side ---------------------------------------------------------
    async def channel(self, peer: str, timeout: float = 30.0) -> Channel:
        """The open channel to worker ``peer`` (connected on first use, or again after it closed)."""
        ch = self._channels.get(peer)
        if ch is not None and not ch.closed:
            return ch
        pending = self._connecting.get(peer)
        if pending is None:
            pending = self._connecting[peer] = asyncio.ensure_future(self._connect(peer, timeout))
            pending.add_done_callback(lambda _: self._connecting.pop(peer, None))
        return await asyncio.shield(pending)

    async def _connect(self, peer: str, timeout: float) -> Channel:
        t0 = time.monotonic()
        where = await asyncio.wait_for(self.worker.rpc(peer).glinthawk_dataplane(), timeout)
        ch = Channel(peer)
        loop = asyncio.get_running_loop()
        ssl = self._tls(False) if where["tls"] else None
        left = max(0.1, timeout - (time.monotonic() - t0))
        await asyncio.wait_for(
            loop.create_connection(lambda: ch.connection, where["host"], where["port"], ssl=ssl), left)
        self._channels[peer] = ch
        return ch

    def forget(self, peer: str) -> None:
        """Close the channel to ``peer`` (it is gone, or will not be talked to again)."""
        ch = self._channels.pop(peer, None)
        if ch is not None:
            ch.close()

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        for conn in list(self._served):
            conn.close()
        if self._server is not None:
            self._server.close()
            self._server = None


def _outcome(f: asyncio.Future) -> tuple[Any, BaseException | None]:
    if f.cancelled():
        return None, asyncio.CancelledError("the handler was cancelled")
    e = f.exception()
    return (None, e) if e is not None else (f.result(), None)


def _reply(conn: Connection, rid: int, result: Any, error: BaseException | None) -> None:
    if conn.closed:
        return
    if error is not None:
        conn.send({"i": rid, "e": _error_to_wire(error)})
    elif isinstance(result, dict):
        tensors = {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in result.items() if k not in tensors} if tensors else result
        conn.send({"i": rid, "r": rest}, tensors)
    else:
        conn.send({"i": rid, "r": result})
