"""What counts as a lost worker, and the errors that say so.

A run survives the loss of any of its workers by starting over as a new *epoch*: a new
run id, placed on the workers that are left (or that join), with every request that
had not finished resubmitted.  A request's KV is rebuilt from its tokens by the same
prefill path that built it, and its sampling generator restarts from its seed, so
its tokens are the ones an uninterrupted run gives.  Messages of the old epoch carry
the old run id, which no worker holds any more: they are refused
(:class:`StaleRunError`), never applied.
"""

from __future__ import annotations

import asyncio

__all__ = ["StaleRunError", "WorkerFailure", "is_worker_failure"]


class StaleRunError(RuntimeError):
    """A message names a run (or a step of it) that this worker does not hold: it is
    from an older epoch, or for a worker that restarted since the run was placed."""


class WorkerFailure(RuntimeError):
    """A run failed because a worker of it was lost or stopped answering."""


def is_worker_failure(error: BaseException) -> bool:
    """True for errors that mean "a peer is gone or wedged" rather than a bug or a
    user mistake: broken connections, timeouts, and stale-run refusals (a worker that
    restarted forgot the run)."""
    return isinstance(error, (OSError, asyncio.TimeoutError, StaleRunError, WorkerFailure))
