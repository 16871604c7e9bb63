"""Where a generate call stands, while it runs: rows, errors, tokens, rate, ETA and the
workers it lost."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

__all__ = ["GenerationProgress", "ProgressTracker", "bytes_text", "eta_text", "estimate_tokens_left", "lost_workers", "recovery_text",
           "rows_of"]


@dataclass(frozen=True)
class GenerationProgress:
    """A snapshot of a generate call.

    ``tokens_per_s`` is the rate of the last ``window`` seconds (tokens sampled, finished
    rows or not); ``eta_seconds`` is the tokens left (:func:`estimate_tokens_left`) at
    that rate.
    """

    rows_done: int
    rows_total: int
    errors: int
    generated_tokens: int
    expected_tokens: int  # the sum of every row's max_tokens
    seconds: float
    tokens_per_s: float
    eta_seconds: float | None
    recoveries: tuple[dict, ...] = ()  # workers lost so far and how the run went on (LLM.recoveries)


def estimate_tokens_left(*, held: int, waiting: float, running: int, finished: int, in_flight: int,
                         budget_done: int, tokens_done: int, floor: int) -> int:
    """Tokens unfinished rows will still generate: the rows in flight, their ``held``
    ``max_tokens`` less the ``running`` tokens they have (an upper bound: the rows still
    running are the long ones); and the rows not taken yet, their ``waiting`` ``max_tokens``
    times the share of theirs the ``finished`` rows used (``tokens_done`` of
    ``budget_done``) once as many have finished as are ``in_flight`` (and 32), since rows
    that stop early (EOS, stop strings) leave most of it unused.  At least ``floor``."""
    if finished >= max(32, in_flight) and budget_done:
        waiting *= min(1.0, tokens_done / budget_done)
    return max(floor, round(waiting + held - running))


class ProgressTracker:
    """Builds :class:`GenerationProgress` snapshots from the counts a generate call sees."""

    def __init__(self, rows_total: int, expected_tokens: int, window: float = 10.0,
                 clock=time.monotonic) -> None:
        self.rows_total = rows_total
        self.expected_tokens = expected_tokens
        self.window = window
        self.clock = clock
        self.t0 = clock()
        self.rows_done = self.errors = self.generated = 0
        self.pulled = self.budget_pulled = 0  # requests the engine has taken, and their max_tokens
        self.finished = self.budget_done = self.tokens_done = 0  # ... of them done: count, max_tokens, tokens
        self.recoveries: list[dict] = []
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self.t0, 0)])

    def row(self, error: bool, budget: int = 0, tokens: int = 0) -> None:
        """A row done; a request's ``max_tokens`` (``budget``) and the ``tokens`` it generated."""
        self.rows_done += 1
        self.errors += error
        if budget:
            self.finished += 1
            self.budget_done += budget
            self.tokens_done += tokens

    def take(self, budget: int) -> None:
        """The engine took a request of ``budget`` ``max_tokens``."""
        self.pulled += 1
        self.budget_pulled += budget

    def tokens_left(self) -> int:
        """Tokens the unfinished requests will still generate (each at least one more)."""
        return estimate_tokens_left(
            held=self.budget_pulled - self.budget_done, waiting=self.expected_tokens - self.budget_pulled,
            running=max(0, self.generated - self.tokens_done), finished=self.finished,
            in_flight=self.pulled - self.finished, budget_done=self.budget_done, tokens_done=self.tokens_done,
            floor=self.rows_total - self.rows_done)

    def tokens(self, generated: int) -> None:
        """The tokens sampled so far (a running total, never lower than before)."""
        self.generated = max(self.generated, generated)
        now = self.clock()
        self._samples.append((now, self.generated))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def snapshot(self) -> GenerationProgress:
        now = self.clock()
        (t_old, n_old) = self._samples[0]
        span = now - t_old
        rate = (self.generated - n_old) / span if span > 0 else 0.0
        left = self.tokens_left()
        eta = 0.0 if self.rows_done >= self.rows_total else (left / rate if rate > 0 else None)
        return GenerationProgress(self.rows_done, self.rows_total, self.errors, self.generated,
                                  self.expected_tokens, now - self.t0, rate, eta, tuple(self.recoveries))


def recovery_text(rec: dict) -> str:
    """One line for a recovery record (an item of :attr:`~glinthawk_dask.LLM.recoveries`): what
    was lost, what the run did about it and what that cost."""
    rebuilt = f"{int(rec.get('rebuilt_tokens', 0)):,}"
    if not rec.get("rebuilt_tokens_exact", True):
        rebuilt = f"about {rebuilt}"
    cost = f"{rec.get('requests', 0)} requests' KV rebuilt from {rebuilt} tokens in {rec.get('seconds', 0.0):.1f} s"
    if rec.get("kind") == "moved micro-batch":
        return f"lost {rec.get('cause')}; micro-batch {rec.get('micro_batch')} moved to {rec.get('to')}, {cost}"
    if rec.get("kind") == "restarted run":
        return f"lost a worker ({rec.get('cause')}); the run restarted on the workers left as {rec.get('new_run')}, {cost}"
    return f"{rec.get('kind', 'recovery')}: {rec.get('cause')}"


def lost_workers(n: int) -> str:
    """``n`` lost worker(s), as summaries count recoveries."""
    return f"{n} lost worker{'s' if n != 1 else ''}"


def eta_text(seconds: float) -> str:
    """A time left as people read it: ``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def bytes_text(n: int) -> str:
    """Bytes as people read them: ``1.2 GiB``, ``480.0 KiB``, ``12 B``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def eta_part(seconds: float | None) -> str:
    """``, ETA 12 min`` after a progress line's other parts (nothing while unknown)."""
    return "" if seconds is None else f", ETA {eta_text(seconds)}"


def rows_of(done: int, total: int | None, exact: bool = True) -> str:
    """``3/10`` rows done of a total, ``3/~10`` while the total is an estimate (a
    pipeline's unread shards), ``3`` when it is unknown."""
    return str(done) if total is None else f"{done}/{'' if exact else '~'}{total}"
