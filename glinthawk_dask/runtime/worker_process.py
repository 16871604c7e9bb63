"""What a tier worker's process changes in itself as its tier starts: its logs and its signals."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from typing import Any

__all__ = ["OneLineHeartbeatFailure", "leave_interrupts_to_the_nanny", "one_line_heartbeat_failures"]

_HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat"


class OneLineHeartbeatFailure(logging.Filter):
    """A worker's failed heartbeat logged in one line, not with a traceback.

    Distributed logs it with the traceback of the closed connection; it happens when
    the scheduler goes away, and as a race while a worker closes with a heartbeat in
    flight (a local cluster shutting down at the end of ``glinthawk generate``).  The
    line keeps the error's type and message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and str(record.msg).startswith(_HEARTBEAT_FAILURE):
            e = record.exc_info[1]
            record.msg, record.args = f"{_HEARTBEAT_FAILURE} ({type(e).__name__}: {e})", ()
            record.exc_info = record.exc_text = None
        return True


def one_line_heartbeat_failures() -> None:
    """Install :class:`OneLineHeartbeatFailure` on distributed's worker logger (once;
    it stays through the worker's close, when the race happens)."""
    log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, OneLineHeartbeatFailure) for f in log.filters):
        log.addFilter(OneLineHeartbeatFailure())


def leave_interrupts_to_the_nanny(worker: Any) -> None:
    """Make a worker process started by a nanny ignore SIGINT.

    A Ctrl-C in a terminal reaches every process of its group: the ``glinthawk`` command
    (which closes the embedded cluster, or the nanny of ``glinthawk worker``) and the
    worker processes it spawned.  Those died of their own KeyboardInterrupt, racing the
    clean close with tracebacks and lost-peer errors; the nanny stops them anyway, and
    they stop when it dies.  In-process workers (tests, notebooks) are left alone."""
    if (getattr(worker, "nanny", None) is None or multiprocessing.parent_process() is None
            or threading.current_thread() is not threading.main_thread()):
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
