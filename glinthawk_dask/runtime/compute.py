"""One compute stream per worker, run by priority, and a timeline of what it ran.

The dense worker has one device and therefore one stream of compute: every micro-batch
in flight submits its next dense step here, and they run in the order they became
ready (the data plane's sends and control jobs first).  The event loop never computes;
it only waits for results, so network messages keep flowing while the stream is busy.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import selectors
import threading
import time
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)

__all__ = ["ComputeStream", "Timeline", "busy_seconds", "one_torch_thread", "overlap_seconds"]


class Timeline:
    """A bounded record of ``(kind, start, stop, micro_batch, layer)`` intervals.

    Written by the compute thread, read on the event loop (hence the lock).  Besides
    the intervals it keeps a running count (a cursor for readers that want only what
    is new, see :meth:`read`) and cumulative ``(seconds, count)`` per kind.
    """

    def __init__(self, maxlen: int = 200_000) -> None:
        self._events: collections.deque[tuple[str, float, float, int, int]] = collections.deque(
            maxlen=maxlen
        )
        self._lock = threading.Lock()
        self._count = 0  # intervals ever recorded
        self._totals: dict[str, list[float]] = {}  # kind -> [seconds, count]

    def record(self, kind: str, start: float, stop: float, micro_batch: int = -1, layer: int = -1) -> None:
        with self._lock:
            self._events.append((kind, start, stop, micro_batch, layer))
            self._count += 1
            total = self._totals.setdefault(kind, [0.0, 0])
            total[0] += stop - start
            total[1] += 1

    def events(self, since: float = 0.0) -> list[tuple[str, float, float, int, int]]:
        with self._lock:
            events = list(self._events)
        return [e for e in events if e[2] >= since]

    def read(
        self, cursor: int = 0, limit: int | None = None
    ) -> tuple[list[tuple[str, float, float, int, int]], int, int]:
        """Intervals recorded after ``cursor`` (0, or a cursor this returned before):
        ``(the newest limit of them, the new cursor, how many were left out)``."""
        with self._lock:
            count = self._count
            if cursor > count:  # a cursor of an earlier timeline (restarted worker)
                cursor = 0
            new = min(count - cursor, len(self._events))
            take = new if limit is None else min(new, limit)
            events = list(itertools.islice(self._events, len(self._events) - take, None))
        return events, count, count - cursor - take

    def totals(self) -> dict[str, tuple[float, int]]:
        """Cumulative ``(seconds, count)`` of each kind of interval."""
        with self._lock:
            return {k: (v[0], int(v[1])) for k, v in self._totals.items()}

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


def _merged(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Wall time covered by the union of ``intervals``."""
    return sum(b - a for a, b in _merged(intervals))


def overlap_seconds(a: Iterable[tuple[float, float]], b: Iterable[tuple[float, float]]) -> float:
    """Wall time during which both sets of intervals are busy."""
    ma, mb = _merged(a), _merged(b)
    i = j = 0
    total = 0.0
    while i < len(ma) and j < len(mb):
        lo, hi = max(ma[i][0], mb[j][0]), min(ma[i][1], mb[j][1])
        if hi > lo:
            total += hi - lo
        if ma[i][1] < mb[j][1]:
            i += 1
        else:
            j += 1
    return total


def one_torch_thread() -> None:
    """Keep this thread's torch work on this thread alone.

    OpenMP keeps a team of threads for every thread that starts parallel work.  Once a
    process holds more OpenMP threads than cores, libgomp makes every team's idle threads
    sleep at once instead of waiting briefly for the next op, so each op of the compute
    stream first wakes its helpers (a dense worker that had loaded its weights on a side
    thread of two torch threads was in that state).  On a tier worker the compute stream
    is the one thread that computes on several; the event loop and side threads call this.
    """
    set_torch_threads(1)


def set_torch_threads(n: int) -> None:
    """Give this thread ``n`` torch threads, for good.

    torch sets up a thread's count lazily, at its first parallel op, from the value the
    process set last (on any thread): set without that first, a count can be undone by
    another thread's setting.
    """
    import torch

    torch.get_num_threads()  # the lazy set-up, now
    torch.set_num_threads(n)


class ComputeStream:
    """A single thread that runs queued functions, lowest ``priority`` value first, and
    between them serves the sockets and timers given to it.

    The event loop queues work with :meth:`submit`.  Code running on the stream itself
    (a job, a timer, a socket callback) uses :meth:`push`, :meth:`call_later` and
    :meth:`watch`: the data plane's connections live here, so a reply that arrives
    becomes the next job on this thread without passing through the event loop.
    Long work that must not hold the stream (loading weights) goes to :meth:`offload`.
    """

    def __init__(
        self, name: str = "glinthawk-compute", timeline: Timeline | None = None, threads: int | None = None
    ) -> None:
        self.timeline = timeline or Timeline()
        self._threads = threads
        # (priority, order, fn, future / on_done callback / None, loop, (kind, micro_batch, layer))
        self._heap: list[tuple[float, int, Callable[[], Any], Any, Any, tuple]] = []
        self._timers: list[tuple[float, int, Callable[[], Any]]] = []  # (when, order, fn): stream thread only
        self._count = itertools.count()
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._sleeping = False
        self._closed = False
        self._side: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- from the event loop -----------------------------------------------------------
    def submit(
        self,
        priority: float,
        fn: Callable[[], Any],
        *,
        kind: str | None = "dense",
        micro_batch: int = -1,
        layer: int = -1,
        on_done: Callable[[Any, BaseException | None], None] | None = None,
    ) -> asyncio.Future | None:
        """Queue ``fn()``; the returned future (of the running loop) gets its result.

        With ``on_done``, no future: ``on_done(result, error)`` is called on the loop as
        soon as ``fn`` returns.  With ``kind=None`` nothing is recorded on the timeline
        (``fn`` records its own parts).
        """
        loop = asyncio.get_running_loop()
        fut = on_done if on_done is not None else loop.create_future()
        self._queue(priority, fn, fut, loop, (kind, micro_batch, layer))
        return None if on_done is not None else fut

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the stream before any other queued work; its result."""
        return await self.submit(-math.inf, fn, kind=None)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on this stream's side thread (torch on one thread there, see
        :func:`one_torch_thread`) while the stream goes on; its result."""
        if self._side is None:
            self._side = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"{self._thread.name}-side", initializer=one_torch_thread)
        return await asyncio.get_running_loop().run_in_executor(self._side, fn, *args)

    # -- from the stream itself --------------------------------------------------------
    def push(self, priority: float, fn: Callable[[], Any], *, kind: str | None = "dense", micro_batch: int = -1,
             layer: int = -1) -> None:
        """Queue ``fn()`` from the stream's own thread (its result is dropped)."""
        self._queue(priority, fn, None, None, (kind, micro_batch, layer))

    def call_later(self, delay: float, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on the stream after ``delay`` seconds (stream thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._count), fn))

    def watch(self, sock: Any, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable()`` on the stream whenever ``sock`` is readable (stream thread only)."""
        self._selector.register(sock, selectors.EVENT_READ, (on_readable, None))

    def want_write(self, sock: Any, on_writable: Callable[[], None] | None) -> None:
        """Call ``on_writable()`` whenever watched ``sock`` can take more bytes, until
        called again with None (stream thread only)."""
        on_readable = self._selector.get_key(sock).data[0]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on_writable else 0)
        self._selector.modify(sock, events, (on_readable, on_writable))

    def unwatch(self, sock: Any) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    @property
    def on_stream(self) -> bool:
        return threading.current_thread() is self._thread

    # -- the thread ----------------------------------------------------------------------
    def _queue(self, priority: float, fn: Callable[[], Any], fut: Any, loop: Any, where: tuple) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("compute stream is closed")
            heapq.heappush(self._heap, (priority, next(self._count), fn, fut, loop, where))
            wake = self._sleeping
            self._sleeping = False
        if wake:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # the pipe is full: the thread will wake anyway
                pass

    def _poll(self, block: bool) -> None:
        timeout = 0.0
        if block:
            timeout = None if not self._timers else max(0.0, self._timers[0][0] - time.monotonic())
        for key, mask in self._selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            on_readable, on_writable = key.data
            if mask & selectors.EVENT_WRITE and on_writable is not None:
                _guarded(on_writable)
            if mask & selectors.EVENT_READ:
                _guarded(on_readable)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _guarded(heapq.heappop(self._timers)[2])

    def _loop(self) -> None:
        if self._threads:
            # intra-op thread counts are per calling thread: set them where the work runs
            set_torch_threads(self._threads)
        while True:
            with self._lock:
                idle = not self._heap
                if idle:
                    if self._closed:
                        break
                    self._sleeping = True
            self._poll(block=idle)  # idle: wait for work, a socket or a timer; else just look
            with self._lock:
                self._sleeping = False
                if not self._heap:
                    continue
                _, _, fn, fut, loop, (kind, mb, layer) = heapq.heappop(self._heap)
            start = time.time()
            try:
                result, error = fn(), None
            except BaseException as e:  # handed to the awaiting coroutine
                result, error = None, e
            if kind is not None:
                self.timeline.record(kind, start, time.time(), mb, layer)
            if fut is None:
                if error is not None:
                    logger.error("glinthawk compute job failed", exc_info=error)
            elif isinstance(fut, asyncio.Future):
                settle_threadsafe(fut, result, error)
            else:
                try:
                    loop.call_soon_threadsafe(fut, result, error)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sleeping = False
            # under the lock: the thread closes the pipe only after it saw _closed here
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # the pipe is full: the thread will wake anyway
                pass
        if not self.on_stream:
            self._thread.join(timeout=10)
        if self._side is not None:
            self._side.shutdown(wait=False)


def _guarded(fn: Callable[[], Any]) -> None:
    """Run a socket or timer callback: a bug in one must not stop the stream."""
    try:
        fn()
    except Exception:
        logger.exception("glinthawk compute stream: a callback failed")


def settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Give ``fut`` its result or error, unless it is done (cancelled, or settled before)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def settle_threadsafe(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """:func:`settle` from another thread (nothing, if the future's loop has closed)."""
    try:
        fut.get_loop().call_soon_threadsafe(settle, fut, result, error)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass
