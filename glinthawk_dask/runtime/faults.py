"""What counts as a lost worker, and the errors that say so.

When an attention worker is lost and the driver (the first dense worker) is not, only
the micro-batches it served move: each gets a KV cache on another attention worker
and its sequences rebuild their KV there from their tokens so far (prompt and
generated), through the prefill path; the other micro-batches go on.  Sampling
generators live on the last dense slice and are not touched, so outputs are those of
an uninterrupted run.

A run survives the loss of any other worker by starting over as a new *epoch*: a new
run id, placed on the workers that are left (or that join), with every request that
had not finished resubmitted.  A request's KV is rebuilt from its tokens by the same
prefill path that built it, and its sampling generator restarts from its seed, so
its tokens are the ones an uninterrupted run gives.  Messages of the old epoch carry
the old run id, which no worker holds any more: they are refused
(:class:`StaleRunError`), never applied.
"""

from __future__ import annotations

import asyncio
import errno

from ..errors import GlinthawkError

__all__ = ["AttentionLost", "StaleRunError", "Unplaceable", "WorkerFailure", "is_worker_failure"]

# errno values of an OSError that mean the network or a peer, not this machine's files
_NETWORK_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "EPIPE", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN",
    "ENETRESET", "EHOSTDOWN", "ETIMEDOUT", "ENOTCONN", "ESHUTDOWN") if hasattr(errno, name))


class StaleRunError(RuntimeError):
    """A message names a run (or a step of it) that this worker does not hold: it is
    from an older epoch, or for a worker that restarted since the run was placed."""


class WorkerFailure(RuntimeError):
    """A run failed because a worker of it was lost or stopped answering."""


class AttentionLost(WorkerFailure):
    """The attention worker of one micro-batch of one slice did not answer: only that
    micro-batch moves to another attention worker and rebuilds its KV there."""

    def __init__(self, address: str, slice_index: int, micro_batch: int, cause: str) -> None:
        super().__init__(address, slice_index, micro_batch, cause)
        self.address, self.slice_index, self.micro_batch, self.cause = address, slice_index, micro_batch, cause

    def __str__(self) -> str:
        return f"attention worker {self.address} (slice {self.slice_index}, micro-batch {self.micro_batch}): {self.cause}"


class Unplaceable(GlinthawkError):
    """The cluster cannot host the run now: too few tier workers, or too little free KV
    (``wait``: because other runs hold it, so waiting may help)."""

    def __init__(self, message: str, wait: bool = False) -> None:
        super().__init__(message)
        self.wait = wait


def is_worker_failure(error: BaseException) -> bool:
    """True for errors that mean "a peer is gone or wedged" rather than a bug or a
    user mistake: broken connections (Dask's ``CommClosedError``, connection errors, a
    connect that timed out, network errno values), timeouts, and stale-run refusals (a
    worker that restarted forgot the run).  Every other error, a missing file on a
    worker included, is permanent: retrying cannot help."""
    from distributed.comm.core import CommClosedError

    if isinstance(error, (StaleRunError, WorkerFailure, TimeoutError, asyncio.TimeoutError, ConnectionError,
                          CommClosedError)):
        return True
    if isinstance(error, OSError):
        # Dask raises a bare OSError("Timed out trying to connect ...") for a peer that is gone
        return error.errno in _NETWORK_ERRNOS or (type(error) is OSError and error.errno is None)
    return False
