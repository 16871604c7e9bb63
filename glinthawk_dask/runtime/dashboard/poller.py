"""Scheduler side: the pipeline as the page shows it, pulled from the tier workers.

:class:`PipelineMetrics` is owned by the scheduler plugin and polls the workers'
``glinthawk_{tier}_metrics`` handlers (see :mod:`.worker`) only while a page looks.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from . import INTERVAL, MAX_EVENTS_PER_PULL

__all__ = ["FINISHED_KEEP", "LEASE", "PipelineMetrics"]

logger = logging.getLogger(__name__)

#: A page refresh keeps the scheduler pulling for this many intervals
LEASE = 3
#: Seconds a finished run stays on the page (unless a newer run starts first)
FINISHED_KEEP = 600.0


class _Ring:
    """The newest ``maxlen`` rows of a stream, with a running count as a cursor."""

    def __init__(self, maxlen: int) -> None:
        self.rows: collections.deque = collections.deque(maxlen=maxlen)
        self.count = 0

    def extend(self, rows: list) -> None:
        self.rows.extend(rows)
        self.count += len(rows)

    def since(self, cursor: int, limit: int | None = None) -> tuple[list, int]:
        """Rows added after ``cursor`` (the newest ``limit`` of them) and the new cursor."""
        new = min(max(self.count - cursor, 0), len(self.rows))
        if limit is not None:
            new = min(new, limit)
        return list(itertools.islice(self.rows, len(self.rows) - new, None)), self.count


class PipelineMetrics:
    """The scheduler's view of the pipeline, pulled from the tier workers.

    ``tiers()`` gives ``{address: {"dense", "attention"}}`` (the scheduler plugin's
    registry).  :meth:`poll` asks every tier worker once for what is new; :meth:`watch`
    (called by every page refresh) keeps a background loop polling every ``interval``
    seconds for a few more intervals.  With no page open nothing is polled.
    """

    def __init__(self, scheduler: Any, tiers: Callable[[], dict[str, set[str]]], interval: float = INTERVAL,
                 max_intervals: int = 20_000, max_samples: int = 3_600,
                 waiting: Callable[[], list[dict]] = list, detached: Callable[[], dict[str, dict]] = dict) -> None:
        self.scheduler = scheduler
        self.tiers = tiers
        self.waiting = waiting  # the runs waiting to be placed (the scheduler plugin's)
        self.detached = detached  # detached pipelines' records by name (runtime.pipelines)
        self.interval = interval
        #: (left_ms, right_ms, lane, kind, micro_batch, layer), scheduler clock
        self.intervals = _Ring(max_intervals)
        self._utilisation: tuple[Any, dict[str, float]] = (None, {})  # (poll, rows, window) -> busy shares
        #: (t_ms, generated tokens/s, processed tokens/s, micro-batches in flight)
        self.samples = _Ring(max_samples)
        self.lanes: dict[tuple[str, str], int] = {}  # (address, tier) -> row of the stream
        self.labels: dict[tuple[str, str], str] = {}
        # (worker, tier) -> {"budget", "allocated", "used", "runs"}: attention workers, and
        # dense workers holding local micro-batches' KV
        self.kv: dict[tuple[str, str], dict] = {}
        self.runs: dict[str, dict] = {}  # run id -> driver counters (first dense slice)
        # runs that ended, kept (marked finished) until a newer run starts or FINISHED_KEEP passes
        self.finished: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}  # pipeline name -> last reported progress
        self.dropped = 0  # intervals that workers did not hand out (more than a pull takes)
        self.n_polls = 0
        self._cursors: dict[tuple[str, str], int] = {}
        self._baseline: dict[tuple[str, str], tuple[int, int]] = {}  # (worker, run) -> generated, tokens
        self._last_poll = 0.0
        self._watch_until = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._closed = False

    # -- pulling -----------------------------------------------------------------------
    def watch(self) -> None:
        """Keep polling for the next few intervals (a page is looking)."""
        self._watch_until = time.time() + LEASE * self.interval
        if self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            self._task = asyncio.get_running_loop().create_task(self._watching())
        except RuntimeError:  # no running loop: nothing to schedule on
            self._task = None

    async def _watching(self) -> None:
        while not self._closed and time.time() < self._watch_until:
            try:
                await self.poll()
            except Exception:  # pragma: no cover - a page must never take the scheduler down
                logger.exception("glinthawk dashboard poll failed")
            await asyncio.sleep(self.interval)

    async def poll(self, timeout: float = 5.0) -> None:
        """Ask every tier worker for its new intervals and gauges (one rpc each)."""
        async with self._lock:
            targets = [(addr, tier) for addr, tiers in sorted(self.tiers().items()) for tier in sorted(tiers)]
            replies = await asyncio.gather(*[self._ask(a, t, timeout) for a, t in targets])
            now = time.time()
            runs: dict[str, dict] = {}
            kv: dict[tuple[str, str], dict] = {}
            rows = []
            # rates need the previous poll, and a recent one (not one before a pause)
            continued = bool(self._last_poll) and now - self._last_poll < (LEASE + 2) * self.interval
            generated = processed = 0.0
            in_flight = 0
            baseline: dict[tuple[str, str], tuple[int, int]] = {}
            for (addr, tier), reply in zip(targets, replies):
                if reply is None:
                    continue
                lane = self._lane(addr, tier)
                self._cursors[addr, tier] = reply["cursor"]
                self.dropped += reply.get("dropped", 0)
                delay = self._time_delay(addr)
                for kind, start, stop, mb, layer in reply["events"]:
                    rows.append(((start + delay) * 1000, (stop + delay) * 1000, lane, kind, mb, layer))
                if "kv" in reply:
                    kv[addr, tier] = reply["kv"]
                for run_id, st in reply.get("runs", {}).items():
                    runs[run_id] = {**st, "worker": addr}
                    in_flight += st["n_in_flight"]
                    key = (addr, run_id)
                    now_counts = (st["n_generated"], st["n_tokens"])
                    before = self._baseline.get(key) if continued else now_counts
                    if before is None:  # started since the last poll: all of it is new
                        before = (0, 0) if st["age"] <= now - self._last_poll else now_counts
                    generated += now_counts[0] - before[0]
                    processed += now_counts[1] - before[1]
                    baseline[key] = now_counts
            rows.sort()
            self.intervals.extend(rows)
            self.kv = kv
            for run_id, st in self.runs.items():
                if run_id not in runs:
                    self.finished[run_id] = {**st, "finished_at": now}
            self.runs = runs
            started = [now - st["age"] for st in runs.values()]
            self.finished = {r: st for r, st in self.finished.items()
                             if now - st["finished_at"] < FINISHED_KEEP and r not in runs
                             and not any(t > st["finished_at"] for t in started)}
            while len(self.finished) > 3:
                self.finished.pop(next(iter(self.finished)))
            self._baseline = baseline
            if continued:
                dt = max(now - self._last_poll, 1e-6)
                self.samples.extend([(now * 1000, generated / dt, processed / dt, in_flight)])
            elif not runs:  # after a pause with nothing open: draw the end, not the last value
                self.samples.extend([(now * 1000, 0.0, 0.0, 0)])
            self._last_poll = now
            self.n_polls += 1

    async def _ask(self, addr: str, tier: str, timeout: float) -> dict | None:
        try:
            call = getattr(self.scheduler.rpc(addr), f"glinthawk_{tier}_metrics")
            return await asyncio.wait_for(call(cursor=self._cursors.get((addr, tier), 0),
                                               limit=MAX_EVENTS_PER_PULL), timeout)
        except Exception as e:  # a worker leaving, or one without the handler
            logger.debug("glinthawk dashboard: no metrics from %s %s: %s", tier, addr, e)
            return None

    def _lane(self, addr: str, tier: str) -> int:
        key = (addr, tier)
        if key not in self.lanes:
            self.lanes[key] = len(self.lanes)
            ws = self.scheduler.workers.get(addr)
            name = ws.name if ws is not None and isinstance(ws.name, str) and ws.name != addr else addr
            self.labels[key] = name if name.startswith(tier) else f"{tier} {name}"
        return self.lanes[key]

    def utilisation(self, window_s: float = 60.0) -> dict[str, float]:
        """Each tier's busy share over the last ``window_s`` seconds (or since the page
        began pulling, if later): compute time of its workers / (window x workers).
        Computed once per poll (every tab's refresh between two polls reads the same)."""
        key = (self.n_polls, self.intervals.count, window_s)
        if self._utilisation[0] != key:
            self._utilisation = (key, self._busy_shares(window_s))
        return self._utilisation[1]

    def _busy_shares(self, window_s: float) -> dict[str, float]:
        if not self.intervals.rows:
            return {}
        now_ms = time.time() * 1000
        start = max(now_ms - window_s * 1000, self.intervals.rows[0][0])
        span = now_ms - start
        if span <= 0:
            return {}
        tier_of = {lane: key[1] for key, lane in self.lanes.items()}
        busy: dict[str, float] = {}
        for left, right, lane, kind, _, _ in self.intervals.rows:
            if right > start and kind != "calibrate":
                tier = tier_of.get(lane, "")
                busy[tier] = busy.get(tier, 0.0) + min(right, now_ms) - max(left, start)
        workers = {t: sum(1 for k in self.lanes if k[1] == t) for t in ("dense", "attention")}
        return {t: min(1.0, busy.get(t, 0.0) / (span * n)) for t, n in workers.items() if n}

    def _time_delay(self, addr: str) -> float:
        ws = self.scheduler.workers.get(addr)
        return getattr(ws, "time_delay", 0.0) if ws is not None else 0.0

    # -- pipelines -----------------------------------------------------------------------
    def report_progress(self, name: str, progress: dict) -> None:
        """Scheduler handler ``glinthawk_progress``: a pipeline's latest progress."""
        self.pipelines.pop(name, None)
        self.pipelines[name] = {**progress, "t": time.time()}
        while len(self.pipelines) > 5:
            self.pipelines.pop(next(iter(self.pipelines)))

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
