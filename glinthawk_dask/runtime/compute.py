"""One compute stream per worker, run by priority, and a timeline of what it ran.

The dense worker has one device and therefore one stream of compute: every micro-batch
in flight submits its next dense step here, and the deepest layer goes first (it is
closest to producing tokens).  The event loop never computes; it only waits for
results, so network messages keep flowing while the stream is busy.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import threading
import time
from typing import Any, Callable, Iterable

__all__ = ["ComputeStream", "Timeline", "busy_seconds", "overlap_seconds"]


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


class ComputeStream:
    """A single thread that runs submitted functions, lowest ``priority`` value first."""

    def __init__(
        self, name: str = "glinthawk-compute", timeline: Timeline | None = None, threads: int | None = None
    ) -> None:
        self.timeline = timeline or Timeline()
        self._threads = threads
        # (priority, order, fn, future or on_done callback, loop, (kind, micro_batch, layer))
        self._heap: list[tuple[float, int, Callable[[], Any], Any, asyncio.AbstractEventLoop, tuple]] = []
        self._count = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

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
        soon as ``fn`` returns (one hand-off, e.g. straight into a send).  With
        ``kind=None`` nothing is recorded on the timeline (``fn`` records its own parts).
        """
        loop = asyncio.get_running_loop()
        fut = on_done if on_done is not None else loop.create_future()
        with self._cv:
            if self._closed:
                raise RuntimeError("compute stream is closed")
            heapq.heappush(self._heap, (priority, next(self._count), fn, fut, loop, (kind, micro_batch, layer)))
            self._cv.notify()
        return None if on_done is not None else fut

    def _loop(self) -> None:
        if self._threads:
            import torch

            # intra-op thread counts are per calling thread: set them where the work runs
            torch.set_num_threads(self._threads)
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, fn, fut, loop, (kind, mb, layer) = heapq.heappop(self._heap)
            start = time.time()
            try:
                result, error = fn(), None
            except BaseException as e:  # handed to the awaiting coroutine
                result, error = None, e
            if kind is not None:
                self.timeline.record(kind, start, time.time(), mb, layer)
            if isinstance(fut, asyncio.Future):
                loop.call_soon_threadsafe(_settle, fut, result, error)
            else:
                loop.call_soon_threadsafe(fut, result, error)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
