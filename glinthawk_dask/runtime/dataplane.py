"""The data plane: one streamed connection per pair of workers, served on the compute streams.

Dask keeps the control plane (placing runs, opening caches, submitting requests).  The
per-layer traffic (q/k/v out, attention outputs back, hidden states between slices and
sampled tokens back) goes over plain sockets beside distributed's comms:

* each tier of a worker listens on one extra port (:class:`DataPlane`), announced by
  the worker's ``glinthawk_dataplane`` handler and secured with the cluster's own TLS
  settings when the cluster uses TLS;
* a worker keeps one long-lived connection to each peer it talks to
  (:meth:`DataPlane.channel`); every request carries an id and replies, in any order,
  are matched by id, so all micro-batches in flight share that connection;
* the sockets are served by the tier's :class:`~.compute.ComputeStream` thread, not by
  the event loop: a dense job sends its q/k/v the moment it has them, and a reply
  queues the next dense job on the same thread.  On an attention worker the requests
  that arrived together are computed in one go and their replies leave in one write;
* frames (:mod:`~glinthawk_dask.runtime.wire`) are read with ``recv_into`` into a
  preallocated buffer (large ones straight into their own buffer), decoded without a
  copy, and written with one ``sendmsg`` of header and tensor buffers
  (:mod:`~glinthawk_dask.runtime.link`: one socket on a compute stream);
* a request names a handler of the worker (``worker.handlers``) among those the tier
  serves on the data plane.  Handlers the tier runs inline (on the stream thread) are
  used as long as the worker's handler table still holds the tier's own coroutine for
  that name; any other handler (a plugin that wraps it, say) runs on the event loop.

A connection that closes fails every request pending on it at once
(:class:`ConnectionResetError`); a request not answered within its deadline fails
with :class:`TimeoutError`; a reply whose request is no longer pending (timed out, or
of an older run) is dropped and counted.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import socket
import ssl
import time
from typing import Any, Callable

import torch
from distributed.comm.addressing import get_address_host

from .compute import ComputeStream, settle_threadsafe
from .faults import AttentionLost, StaleRunError, WorkerFailure
from .link import Frame, Link
from .wire import encode

logger = logging.getLogger(__name__)

__all__ = ["Channel", "DataPlane", "RemoteError"]

OnReply = Callable[[Any, BaseException | None], None]


class RemoteError(RuntimeError):
    """The peer's handler raised: its type and message, as text."""


# Errors that cross the data plane as themselves (the driver acts on them); any other
# exception arrives as a RemoteError with its type and message.
_WIRE_ERRORS: dict[str, type[BaseException]] = {
    "AttentionLost": AttentionLost,
    "StaleRunError": StaleRunError,
    "WorkerFailure": WorkerFailure,
}


def _error_to_wire(e: BaseException) -> dict:
    name = type(e).__name__
    if isinstance(e, _WIRE_ERRORS.get(name, ())):
        return {"type": name, "args": [a if isinstance(a, (int, str, float)) else str(a) for a in e.args]}
    return {"type": "RemoteError", "args": [f"{name}: {e}"]}


def _error_from_wire(d: dict) -> BaseException:
    return _WIRE_ERRORS.get(d["type"], RemoteError)(*d["args"])


class Channel:
    """The requesting side of a connection: ids, pending replies and their deadlines.

    :meth:`request` runs on the stream thread and calls ``on_reply(result, error)``
    there; :meth:`arequest` is the same for coroutines on the event loop.
    """

    def __init__(self, peer: str, sock: socket.socket, stream: ComputeStream) -> None:
        self.peer = peer  # the worker address, for messages
        self.stream = stream
        self.link = Link(sock, stream, peer, self._on_frames, self._on_closed)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[OnReply, float]] = {}  # id -> (on_reply, deadline)
        self._check_at: float | None = None  # when the deadline check timer fires
        self.dropped = 0  # replies whose request was no longer pending

    @property
    def closed(self) -> bool:
        return self.link.closed

    def request(self, op: str, args: dict | None, tensors: dict[str, torch.Tensor] | None, on_reply: OnReply,
                timeout: float = 60.0) -> None:
        """Send a request for handler ``op`` (stream thread); ``on_reply(result, error)``
        gets the handler's result (a dict holding its tensors, decoded) or the error."""
        if self.closed:
            on_reply(None, ConnectionResetError(f"data-plane connection to {self.peer} is closed"))
            return
        rid = next(self._ids)
        deadline = time.monotonic() + timeout
        self._pending[rid] = (on_reply, deadline)
        if self._check_at is None or deadline < self._check_at:
            self._check_at = deadline
            self.stream.call_later(timeout, functools.partial(self._expire, deadline))
        self.link.send(encode({"i": rid, "op": op, "a": args or {}}, tensors))

    async def arequest(self, op: str, args: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
                       timeout: float = 60.0) -> Any:
        """:meth:`request` from a coroutine on the event loop."""
        fut = asyncio.get_running_loop().create_future()
        await self.stream.run(lambda: self.request(op, args, tensors, functools.partial(settle_threadsafe, fut),
                                                   timeout))
        return await fut

    def _expire(self, at: float) -> None:
        """Fail the requests past their deadline (a timer set for ``at``; a timer that an
        earlier deadline superseded does nothing, so one timer chain runs per channel)."""
        if at != self._check_at:
            return
        now = time.monotonic()
        self._check_at = None
        for rid in [r for r, (_, d) in self._pending.items() if d <= now]:
            on_reply, deadline = self._pending.pop(rid)
            on_reply(None, TimeoutError(f"{self.peer} did not answer within the deadline"))
        if self._pending:
            self._check_at = min(d for _, d in self._pending.values())
            self.stream.call_later(max(0.0, self._check_at - now), functools.partial(self._expire, self._check_at))

    def _on_frames(self, link: Link, frames: list[Frame]) -> None:
        for meta, tensors in frames:
            entry = self._pending.pop(meta["i"], None)
            if entry is None:
                self.dropped += 1
                continue
            if "e" in meta:
                entry[0](None, _error_from_wire(meta["e"]))
            else:
                result = meta.get("r")
                entry[0]({**result, **tensors} if isinstance(result, dict) else result, None)

    def _on_closed(self, link: Link, exc: BaseException | None) -> None:
        pending, self._pending = self._pending, {}
        why = f": {exc}" if exc else ""
        for on_reply, _ in pending.values():
            on_reply(None, ConnectionResetError(f"data-plane connection to {self.peer} closed{why}"))

    def close(self) -> None:
        self.link.close()


class DataPlane:
    """One tier's data-plane endpoint on a worker: its listener and its channels to peers,
    all served on the tier's compute stream.

    ``ops`` are the handler names the tier serves here; ``inline`` maps some of them to
    ``(fn, handler)``: while ``worker.handlers[name] == handler``, requests run as
    ``fn(**kwargs) -> reply`` on the stream thread; otherwise ``worker.handlers[name]``
    runs on the event loop.  ``latency(kwargs)`` (seconds, the induced latency of the
    request's run) holds an inline request that long after it arrived and its reply that
    long before it leaves: both messages of the exchange cross a slow network, whatever
    the requesting side's thread is doing meanwhile.
    """

    def __init__(self, worker: Any, stream: ComputeStream, tier: str, ops: list[str],
                 inline: dict[str, tuple[Callable[..., Any], Any]] | None = None,
                 latency: Callable[[dict], float] | None = None) -> None:
        self.worker = worker
        self.stream = stream
        self.tier = tier
        self.ops = set(ops)
        self.inline = inline or {}
        self.latency = latency
        self._listener: socket.socket | None = None
        self._address: dict | None = None
        self._starting: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[str, Channel] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._served: set[Link] = set()

    # -- announced through the worker ----------------------------------------------------
    def register(self) -> None:
        """Announce this data plane through the worker's ``glinthawk_dataplane(tier)`` handler."""
        planes = self.worker.extensions.setdefault(_EXTENSION, {})
        planes[self.tier] = self
        self.worker.handlers["glinthawk_dataplane"] = _address_handler(planes)

    def unregister(self) -> None:
        planes = self.worker.extensions.get(_EXTENSION, {})
        if planes.get(self.tier) is self:
            del planes[self.tier]
        if not planes:
            self.worker.handlers.pop("glinthawk_dataplane", None)

    # -- the listening side ----------------------------------------------------------
    def _tls(self, listen: bool) -> ssl.SSLContext | None:
        if not self.worker.address.startswith("tls://"):
            return None
        sec = self.worker.security
        args = sec.get_listen_args("worker") if listen else sec.get_connection_args("worker")
        return args.get("ssl_context")

    async def address(self) -> dict:
        """Where this tier's data plane listens (started on first call)."""
        if self._address is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
        return self._address

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host = get_address_host(self.worker.address)
        lsock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        lsock.setblocking(False)
        self._listener = lsock
        await self.stream.run(lambda: self.stream.watch(lsock, self._accept))
        self._address = {"host": host, "port": lsock.getsockname()[1], "tls": self._tls(True) is not None}
        logger.debug("glinthawk %s data plane of %s on %s:%d", self.tier, self.worker.address, host,
                     self._address["port"])

    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        ctx = self._tls(True)
        if ctx is not None:
            try:
                sock.settimeout(10.0)
                sock = ctx.wrap_socket(sock, server_side=True)  # the handshake, on this thread
            except (OSError, ssl.SSLError) as e:
                logger.warning("glinthawk data plane: TLS handshake with %s failed: %s", addr, e)
                sock.close()
                return
        link = Link(sock, self.stream, f"{addr[0]}:{addr[1]}", self._serve, lambda lk, exc: self._served.discard(lk))
        self._served.add(link)
        link.start()

    def _serve(self, link: Link, frames: list[Frame]) -> None:
        now: list[Any] = []  # replies that leave together, in one write
        for meta, tensors in frames:
            rid, op = meta["i"], meta["op"]
            handler = self.worker.handlers.get(op) if op in self.ops else None
            if handler is None:
                error = (StaleRunError(f"{self.worker.address} no longer serves {op!r} (its tier is closing)")
                         if op in self.ops else RemoteError(f"no data-plane handler {op!r} on {self.worker.address}"))
                now += _reply(rid, None, error)
                continue
            kwargs = {**meta["a"], **tensors}
            fast = self.inline.get(op)
            if fast is not None and handler == fast[1]:
                delay = self.latency(kwargs) if self.latency is not None else 0.0
                if delay:  # the request arrives after the latency; its reply leaves it behind
                    self.stream.call_later(delay, functools.partial(self._serve_late, link, rid, fast[0], kwargs,
                                                                    delay))
                else:
                    now += _answer_inline(rid, fast[0], kwargs)
            else:
                self._loop.call_soon_threadsafe(self._serve_on_loop, link, rid, handler, kwargs)
        if now:
            _send_quietly(link, now)

    def _serve_late(self, link: Link, rid: int, fn: Callable[..., Any], kwargs: dict, delay: float) -> None:
        frame = _answer_inline(rid, fn, kwargs)
        self.stream.call_later(delay, lambda: _send_quietly(link, frame))

    def _serve_on_loop(self, link: Link, rid: int, handler: Callable, kwargs: dict) -> None:
        def answer(result: Any, error: BaseException | None) -> None:
            frame = _reply(rid, result, error)
            try:
                self.stream.submit(-float("inf"), lambda: _send_quietly(link, frame), kind=None)
            except RuntimeError:  # the stream closed: the worker is going away
                pass

        try:
            result = handler(**kwargs)
        except Exception as e:
            answer(None, e)
            return
        if inspect.isawaitable(result):
            asyncio.ensure_future(result).add_done_callback(lambda f: answer(*_outcome(f)))
        else:
            answer(result, None)

    # -- the requesting side ---------------------------------------------------------
    async def channel(self, peer: str, tier: str, timeout: float = 30.0) -> Channel:
        """The open channel to the ``tier`` data plane of worker ``peer`` (connected on
        first use, or again after it closed)."""
        key = f"{tier} {peer}"
        ch = self._channels.get(key)
        if ch is not None and not ch.closed:
            return ch
        pending = self._connecting.get(key)
        if pending is None:
            pending = self._connecting[key] = asyncio.ensure_future(self._connect(peer, tier, timeout))
            pending.add_done_callback(lambda _: self._connecting.pop(key, None))
        ch = await asyncio.shield(pending)
        self._channels[key] = ch
        return ch

    async def _connect(self, peer: str, tier: str, timeout: float) -> Channel:
        t0 = time.monotonic()
        where = await asyncio.wait_for(self.worker.rpc(peer).glinthawk_dataplane(tier=tier), timeout)
        if not isinstance(where, dict):  # a worker closing (its tier's handlers already gone)
            raise ConnectionRefusedError(f"{peer} serves no glinthawk {tier} data plane (is it closing?)")
        left = max(0.1, timeout - (time.monotonic() - t0))
        ctx = self._tls(False) if where["tls"] else None

        def connect() -> socket.socket:
            sock = socket.create_connection((where["host"], where["port"]), timeout=left)
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname=None if not ctx.check_hostname else where["host"])
            return sock

        sock = await asyncio.get_running_loop().run_in_executor(None, connect)
        ch = Channel(peer, sock, self.stream)
        await self.stream.run(ch.link.start)
        return ch

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        for link in list(self._served):
            link.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


_EXTENSION = "glinthawk-dataplanes"  # worker.extensions key: {tier: DataPlane}


def _address_handler(planes: dict[str, DataPlane]) -> Callable:
    async def glinthawk_dataplane(tier: str) -> dict:
        """Where this worker's data plane of ``tier`` listens."""
        plane = planes.get(tier)
        if plane is None:
            raise ValueError(f"this worker hosts no {tier} tier")
        return await plane.address()

    return glinthawk_dataplane


def _outcome(f: asyncio.Future) -> tuple[Any, BaseException | None]:
    if f.cancelled():
        return None, asyncio.CancelledError("the handler was cancelled")
    e = f.exception()
    return (None, e) if e is not None else (f.result(), None)


def _answer_inline(rid: int, fn: Callable[..., Any], kwargs: dict) -> list[Any]:
    """The reply frame of ``fn(**kwargs)``, run here (its error, if it raises)."""
    try:
        return _reply(rid, fn(**kwargs), None)
    except Exception as e:
        return _reply(rid, None, e)


def _reply(rid: int, result: Any, error: BaseException | None) -> list[Any]:
    """The buffers of a reply frame."""
    if error is not None:
        return encode({"i": rid, "e": _error_to_wire(error)})
    if isinstance(result, dict):
        tensors = {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in result.items() if k not in tensors} if tensors else result
        return encode({"i": rid, "r": rest}, tensors)
    return encode({"i": rid, "r": result})


def _send_quietly(link: Link, buffers: list[Any]) -> None:
    """Send replies; a peer that went away gets none (its requests failed on its side)."""
    if not link.closed:
        link.send(buffers)
