"""Job handles: work running in the background, with progress, results and cancelling.

:class:`GenerationJob` generates a list of prompt rows (:func:`submit_prompts`, or
:meth:`LLM.submit <glinthawk_dask.LLM.submit>`); :mod:`glinthawk_dask.jobs` adds pipeline
jobs on the same base.  A job's work is a task of a ``concurrent.futures`` executor with
one worker thread per :class:`~glinthawk_dask.LLM`, so jobs given the same LLM take turns
in submission order; a pipeline loading its own model runs in a thread of its own.  Its
outcome is a ``Future`` of its own, set when the task ends or is cancelled while queued.
When the interpreter exits, running jobs are cancelled and waited for (so a pipeline
commits every row it finished); queued ones end without running.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import concurrent.futures.thread  # its exit handler is registered before ours (see the end)
import contextlib
import dataclasses
import html
import itertools
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .engine.progress import eta_text, rows_of
from .engine.request import FINISH_ERROR, ROW_FIELDS, Completion, Request
from .errors import GlinthawkError
from .sampling import SamplingParams

__all__ = ["COLUMNS", "GenerationJob", "JobCancelledError", "JobProgress", "submit_prompts"]

#: the columns of ``to_pandas()``: a completion row (:data:`~glinthawk_dask.engine.request.ROW_FIELDS`)
#: without its token ids
COLUMNS = tuple(name for name in ROW_FIELDS if name != "completion_token_ids")

QUEUED, RUNNING, FINISHED, CANCELLED, FAILED = "queued", "running", "finished", "cancelled", "failed"
ENDED = (FINISHED, CANCELLED, FAILED)


class JobCancelledError(GlinthawkError, concurrent.futures.CancelledError):
    """The result of a cancelled generation job was asked for."""


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands (a snapshot).

    For pipelines, ``rows_total`` is this run's rows once a shard is read: exact once
    every shard is read (``rows_total_exact``), until then estimated from the shards
    read; ``tokens_left`` (the tokens their rows will still generate) gives their ETA.
    """

    status: str = QUEUED  # queued | running | finished | cancelled | failed
    rows_done: int = 0  # rows finished by this job: completions and error records
    rows_total: int | None = None
    errors: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0  # generating (pipelines: since the engine was ready)
    skipped: int = 0  # pipelines: rows already in the output from an earlier run
    shards_read: int | None = None  # pipelines only
    shards_total: int | None = None
    rows_total_exact: bool = True
    tokens_left: int | None = None  # pipelines only

    @property
    def done(self) -> bool:
        return self.status in ENDED

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Remaining time: pipelines by their tokens left at the rate so far, prompt lists
        by the share of rows done; None when unknown."""
        if self.done:
            return 0.0
        if self.tokens_left is not None:
            rate = self.tokens_per_s
            return self.tokens_left / rate if rate > 0 else None
        done, total = self.rows_done, self.rows_total
        if not done or not total or done >= total or self.seconds <= 0:
            return None
        return self.seconds * (total - done) / done

    def rows_text(self) -> str:
        """``3/10`` (``3/~10`` while a pipeline's total is estimated); ``3`` when unknown."""
        return rows_of(self.rows_done, self.rows_total, self.rows_total_exact)


class _Job:
    """What both handles share: the task, status, progress, waiting, cancelling, display.

    The work is a task of the LLM's executor (see :class:`_Lanes`); the job's outcome is a
    ``concurrent.futures.Future`` of its own, set when the task ends or is cancelled
    while still queued.
    """

    def __init__(self, llm: Any, progress: JobProgress) -> None:
        self._llm = llm
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._progress = progress
        self._outcome: concurrent.futures.Future = concurrent.futures.Future()
        self._task: concurrent.futures.Future | None = None

    # -- the work (in the LLM's worker thread) ---------------------------------------
    def _start(self) -> None:
        _live.add(self)
        self._task = _lanes.submit(self._llm if self._llm is not None else self, self._work, self._settle)

    def _work(self) -> Any:
        self._update(status=RUNNING)
        return self._run()

    def _settle(self, task: concurrent.futures.Future) -> None:
        """Record how the task ended (or that it was cancelled while queued) in the outcome."""
        value, error = None, None
        try:
            if task.cancelled():
                value = self._not_run()
            elif task.exception() is not None:
                error = task.exception()
            else:
                value = task.result()
        except BaseException as e:  # _not_run failed
            error = e
        self._update(status=FAILED if error is not None else CANCELLED if self._was_cancelled(value) else FINISHED)
        if error is not None:
            self._outcome.set_exception(error)
        else:
            self._outcome.set_result(value)
        _live.discard(self)

    def _run(self) -> Any:
        raise NotImplementedError

    def _not_run(self) -> Any:
        return None

    def _was_cancelled(self, value: Any) -> bool:
        """Whether the job, ending with ``value``, was stopped before it finished."""
        raise NotImplementedError

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._progress = dataclasses.replace(self._progress, **changes)

    # -- the handle -----------------------------------------------------------------
    @property
    def progress(self) -> JobProgress:
        """Where the job stands now."""
        return self._progress

    @property
    def status(self) -> str:
        """``queued``, ``running``, ``finished``, ``cancelled`` or ``failed``."""
        return self._progress.status

    def done(self) -> bool:
        """Whether the job has ended (finished, cancelled or failed)."""
        return self._outcome.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job ends, at most ``timeout`` seconds; returns :meth:`done`."""
        concurrent.futures.wait([self._outcome], timeout)
        return self.done()

    def cancel(self) -> bool:
        """Ask the job to stop, between two completions; returns False if it had already ended.

        A queued job ends at once without running; a running one is not waited for:
        :meth:`wait` for that.
        """
        if self.done():
            return False
        self._cancel.set()
        if self._task is not None:
            self._task.cancel()  # succeeds only while queued
        return True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the job failed with (None if it did not), after waiting for it to end."""
        if not self.wait(timeout):
            raise self._still_going(timeout)
        return self._outcome.exception()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end and return its result; the job's exception is raised again."""
        if not self.wait(timeout):
            raise self._still_going(timeout)
        return self._outcome.result()

    def _still_going(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(f"{self!r} is still going after {timeout} s")

    def to_pandas(self) -> Any:
        raise NotImplementedError

    # -- display --------------------------------------------------------------------
    def show_progress(self, *, block: bool = True, interval: float = 0.25) -> _Job:
        """A live progress bar (``tqdm.auto``: a widget in Jupyter, text in a terminal)
        until the job ends.  ``block=False`` updates it from a thread and returns at once.

        Interrupting it stops the display only; the job goes on.  Returns the job.
        """
        from tqdm.auto import tqdm

        p = self.progress
        bar = tqdm(total=p.rows_total, desc=self._label(), unit="row", mininterval=0)

        def update() -> None:
            p = self.progress
            if p.rows_total != bar.total:  # a pipeline's, once (and as) its shards are read
                bar.total = p.rows_total
            bar.n = p.rows_done
            bar.set_postfix_str(self._postfix(p), refresh=False)
            bar.refresh()

        def follow() -> None:
            try:
                while not self.wait(interval):
                    update()
                update()
            finally:
                bar.close()

        if block:
            follow()
        else:
            threading.Thread(target=follow, name="glinthawk-progress", daemon=True).start()
        return self

    def _label(self) -> str:
        return type(self).__name__

    def _postfix(self, p: JobProgress) -> str:
        parts = [p.status, f"{p.tokens_per_s:.1f} tok/s", f"{p.errors} errors"]
        if p.shards_total is not None:
            parts.insert(1, f"shards {p.shards_read}/{p.shards_total}")
        if p.skipped:
            parts.append(f"{p.skipped} skipped")
        return ", ".join(parts)

    def _summary(self, p: JobProgress) -> list[tuple[str, str]]:
        """(name, value) pairs for the reprs."""
        eta = p.eta_seconds
        items = [("status", p.status), ("rows", p.rows_text()), ("errors", str(p.errors)),
                 ("tok/s", f"{p.tokens_per_s:.1f}")]
        if p.shards_total is not None:
            items.insert(2, ("shards", f"{p.shards_read}/{p.shards_total}"))
        if p.skipped:
            items.append(("skipped", str(p.skipped)))
        if not p.done and eta is not None:
            items.append(("ETA", eta_text(eta)))
        error = self._outcome.exception() if self._outcome.done() else None
        if error is not None:
            items.append(("error", f"{type(error).__name__}: {error}"))
        return items

    def _where(self) -> list[tuple[str, str]]:
        """Extra (name, value) pairs for the HTML table."""
        return []

    def __repr__(self) -> str:
        items = dict(self._summary(self.progress))
        status, rows = items.pop("status"), items.pop("rows")
        rest = ", ".join(f"{v} {k}" if k in ("errors", "tok/s", "skipped") else f"{k} {v}" for k, v in items.items())
        where = "".join(f" -> {v}" for _, v in self._where())
        return f"<{self._label()} {status}: {rows} rows, {rest}{where}>"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(v)}</td></tr>" for k, v in [*self._summary(self.progress), *self._where()])
        return f"<table><caption style='text-align:left'><b>{html.escape(self._label())}</b></caption>{rows}</table>"


class GenerationJob(_Job):
    """Completions of a list of prompt rows, generated in the background (see :func:`submit_prompts`).

    :meth:`result` gives every completion in input order; on a cancelled job it raises
    :class:`JobCancelledError`, and :meth:`completions` gives those that finished.
    """

    def __init__(self, llm: Any, rows: list[Any], params: SamplingParams | None, chat: bool) -> None:
        super().__init__(llm, JobProgress(rows_total=len(rows)))
        self._rows = rows
        self._params = params
        self._chat = chat
        self._completions: list[Completion | None] = [None] * len(rows)
        self._t0 = time.perf_counter()

    def _run(self) -> list[Completion]:
        self._t0 = time.perf_counter()
        entries = self._llm.make_requests(self._rows, self._params, chat=self._chat)
        index = {}
        for i, e in enumerate(entries):
            if isinstance(e, Request):
                index[e.id] = i
            else:
                self._note(i, e)  # a row that could not be processed
        requests = itertools.takewhile(lambda _: not self._cancel.is_set(),
                                       (e for e in entries if isinstance(e, Request)))
        with contextlib.closing(self._llm.stream_requests(requests)) as completions:
            for c in completions:
                self._note(index[c.id], c)
                if self._cancel.is_set():
                    break
        return self._completions  # type: ignore[return-value]  # complete unless cancelled

    def _note(self, i: int, c: Completion) -> None:
        with self._lock:
            self._completions[i] = c
            p = self._progress
            self._progress = dataclasses.replace(
                p, rows_done=p.rows_done + 1, errors=p.errors + (c.finish_reason == FINISH_ERROR),
                generated_tokens=p.generated_tokens + len(c.completion_token_ids),
                seconds=time.perf_counter() - self._t0,
            )

    def _was_cancelled(self, value: Any) -> bool:
        return self._cancel.is_set() and self._progress.rows_done < len(self._rows)

    def _not_run(self) -> list[Completion | None]:
        return self._completions

    def result(self, timeout: float | None = None) -> list[Completion]:
        """Every completion in input order (error rows have ``finish_reason == "error"``)."""
        value = super().result(timeout)
        if self.status == CANCELLED:
            p = self.progress
            raise JobCancelledError(f"the job was cancelled after {p.rows_done} of {p.rows_total} rows: "
                                    "job.completions() and job.to_pandas() hold the finished ones")
        return list(value)

    def completions(self) -> list[Completion]:
        """The completions finished so far, in input order."""
        with self._lock:
            return [c for c in self._completions if c is not None]

    def to_pandas(self) -> Any:
        """The completions finished so far as a DataFrame (:data:`COLUMNS`), in input order."""
        import pandas as pd

        df = pd.DataFrame([c.to_row() for c in self.completions()], columns=list(COLUMNS))
        return df.astype({"time_to_first_token": float, "time_per_token": float})  # unknown: NaN


def submit_prompts(
    llm: Any, rows: Iterable[Any] | str, params: SamplingParams | None = None, *, chat: bool = False
) -> GenerationJob:
    """Start generating ``rows`` with ``llm`` in the background and return the handle at once.

    Rows and arguments are those of :meth:`LLM.generate <glinthawk_dask.LLM.generate>`,
    whose result :meth:`GenerationJob.result` equals.
    """
    rows = [rows] if isinstance(rows, str) else list(rows)
    job = GenerationJob(llm, rows, params, chat)
    job._start()
    return job


# -- one lane per LLM ---------------------------------------------------------------------------


class _Lanes:
    """A single-thread executor per key (an LLM, or a job running alone): its tasks run one
    at a time, in submission order.  An executor is shut down, and its thread ends, once
    it has no task left; the key's next task starts a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: dict[Any, tuple[concurrent.futures.ThreadPoolExecutor, int]] = {}  # key: (executor, tasks)

    def submit(self, key: Any, fn: Callable[[], Any],
               on_done: Callable[[concurrent.futures.Future], None]) -> concurrent.futures.Future:
        """Run ``fn()`` after the key's earlier tasks; ``on_done(task)`` once it ended or was cancelled."""
        with self._lock:
            executor, tasks = self._lanes.get(key, (None, 0))
            if executor is None:
                executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="glinthawk-job")
            self._lanes[key] = (executor, tasks + 1)
            task = executor.submit(fn)
        task.add_done_callback(on_done)
        task.add_done_callback(lambda _: self._release(key))
        return task

    def _release(self, key: Any) -> None:
        with self._lock:
            executor, tasks = self._lanes[key]
            if tasks > 1:
                self._lanes[key] = (executor, tasks - 1)
                return
            del self._lanes[key]
        executor.shutdown(wait=False)


_lanes = _Lanes()


# -- interpreter exit --------------------------------------------------------------------------

_live: weakref.WeakSet[_Job] = weakref.WeakSet()
EXIT_WAIT_S = 60.0


def _cancel_live_jobs() -> None:
    """At exit, before executors shut down: cancel running jobs and let them commit what they finished."""
    jobs = list(_live)
    for job in jobs:
        job.cancel()
    deadline = time.monotonic() + EXIT_WAIT_S
    for job in jobs:
        job.wait(max(0.0, deadline - time.monotonic()))


# When the main thread ends, concurrent.futures' own exit handler makes every executor in the
# process refuse new work, and Zarr's codecs need one to commit a chunk.  Python offers no
# public hook that runs before it; this is the one concurrent.futures itself uses, and handlers
# run in reverse order of registration: registered after it (imported above), ours runs first.
try:
    threading._register_atexit(_cancel_live_jobs)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover
    atexit.register(_cancel_live_jobs)
