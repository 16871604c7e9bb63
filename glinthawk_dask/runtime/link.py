"""One data-plane socket served on a compute stream: bytes in, whole frames out, and
frames written without waiting on the peer.

:class:`FrameReader` parses a byte stream into frames (:mod:`~.wire`): read with
``recv_into`` into a preallocated staging buffer, large frames straight into their own
buffer, decoded without a copy.  :class:`Link` serves a socket on the thread of a
:class:`~.compute.ComputeStream`: it reads when the socket is readable, and writes
header and tensor buffers with one ``sendmsg``, keeping what the socket does not take
until it can take more.  The request/reply protocol on top is :mod:`~.dataplane`'s.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Callable

import torch

from .compute import ComputeStream
from .wire import PREFIX, data_offset, decode

__all__ = ["Frame", "FrameReader", "Link", "SEND_BUFFER", "STAGING_BYTES"]

STAGING_BYTES = 1 << 16  # frames up to this size are parsed from the staging buffer
_IOV_MAX = 512  # buffers per sendmsg

Frame = tuple[dict, dict[str, torch.Tensor]]


class FrameReader:
    """Bytes of a stream in, whole frames out (the parsing half of a connection)."""

    def __init__(self) -> None:
        self._staging = bytearray(STAGING_BYTES)
        self._sview = memoryview(self._staging)
        self._start = self._end = 0  # unparsed bytes in the staging buffer
        self._body: bytearray | None = None  # a large frame being read into its own buffer
        self._body_view: memoryview | None = None
        self._body_got = self._body_meta = 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes go."""
        if self._body_view is not None:
            return self._body_view[self._body_got:]
        if self._end == len(self._staging):  # full of a frame's beginning: move it to the front
            n = self._end - self._start
            self._staging[:n] = self._staging[self._start : self._end]
            self._start, self._end = 0, n
        return self._sview[self._end:]

    def buffer_updated(self, nbytes: int, frames: list[Frame]) -> None:
        """``nbytes`` were written into the last buffer: append the frames now whole."""
        if self._body is not None:
            self._body_got += nbytes
            if self._body_got == len(self._body):
                frames.append(decode(self._body, self._body_meta))
                self._body = self._body_view = None
            return
        self._end += nbytes
        buf, size = self._staging, PREFIX.size
        while self._end - self._start >= size:
            meta_len, data_len = PREFIX.unpack_from(buf, self._start)
            body_len = data_offset(meta_len) + data_len
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


SEND_BUFFER = 4 * 2**20  # bytes of kernel send buffer per data-plane socket


class Link:
    """One data-plane socket served on a compute stream: frames in and out.

    Every method runs on the stream's thread (but :meth:`close`, from anywhere).
    ``on_frames(link, frames)`` gets the frames read together; ``on_closed(link, exc)``
    is called once when the socket closes or fails.
    """

    def __init__(self, sock: socket.socket, stream: ComputeStream, peer: str,
                 on_frames: Callable[["Link", list[Frame]], None],
                 on_closed: Callable[["Link", BaseException | None], None]) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Room in the kernel for whole messages: what a send leaves behind waits for this
        # stream's thread, which may be busy with a dense job for milliseconds (Linux
        # starts a connection at 16 KiB and grows it only as traffic goes by).
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:  # a platform that refuses the size: its default stays
            pass
        self.sock = sock
        self.stream = stream
        self.peer = peer
        self.on_frames = on_frames
        self.on_closed = on_closed
        self.reader = FrameReader()
        self.closed = False
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._out: list[Any] = []  # buffers the socket has not taken yet
        self._waiting = False  # for the socket to take more
        self.frames_in = self.writes = 0

    def start(self) -> None:
        self.stream.watch(self.sock, self._readable)

    def _readable(self) -> None:
        frames: list[Frame] = []
        while not self.closed:
            buf = self.reader.get_buffer()
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as e:
                self._fail(e)
                break
            if n == 0:
                self._fail(None)
                break
            self.reader.buffer_updated(n, frames)
            if n < len(buf) and not self._tls:  # drained (TLS may hold decrypted bytes: read on)
                break
        if frames:
            self.frames_in += len(frames)
            self.on_frames(self, frames)

    def send(self, buffers: list[Any]) -> None:
        """Write the buffers of one or more frames (:func:`~.wire.encode`): at once, in
        one ``sendmsg``, as far as the socket takes them; the rest when it can take more
        (the thread never waits on a slow peer, so two workers sending to each other
        cannot block each other)."""
        if self.closed:
            raise ConnectionResetError(f"data-plane connection to {self.peer} is closed")
        if self._tls:  # no sendmsg on TLS sockets
            buffers = [b"".join(buffers)]
        if self._out:  # earlier bytes are still waiting: keep the order
            self._out += buffers
            return
        self._out = list(buffers)
        self._write()

    def _write(self) -> None:
        out = self._out
        while out:
            try:
                if self._tls:
                    n = self.sock.send(out[0])
                else:
                    n = self.sock.sendmsg(out[:_IOV_MAX] if len(out) > _IOV_MAX else out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as e:
                self._fail(e)
                return
            self.writes += 1
            taken = 0  # whole buffers the socket took
            for b in out:
                size = len(b) if type(b) is bytes else b.nbytes
                if n < size:
                    if n:  # a part of this one
                        out[taken] = memoryview(b).cast("B")[n:]
                    break
                n -= size
                taken += 1
            del out[:taken]
        waiting = bool(out)
        if waiting != self._waiting and not self.closed:  # wait for the socket to take more, or stop
            self._waiting = waiting
            self.stream.want_write(self.sock, self._write if waiting else None)

    def _fail(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._out = []
        self.stream.unwatch(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_closed(self, exc)

    def close(self) -> None:
        """Close the socket (on the stream thread, wherever it is called from)."""
        if self.stream.on_stream:
            self._fail(None)
        else:
            try:
                self.stream.push(-float("inf"), lambda: self._fail(None), kind=None)
            except RuntimeError:  # the stream is closed: so is every socket it watched
                self.closed = True
                self.sock.close()
