"""Shared pieces of the commands: one-line user errors, option parsing, TLS flags."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator

import click

from ..errors import GlinthawkError

__all__ = [
    "ProgressLine", "parse_memory_limit", "parse_micro_batches", "parse_size", "recovered_note",
    "scheduler_reachable", "security_from", "tls_client", "tls_options", "user_errors",
]


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`GlinthawkError` into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GlinthawkError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


class ProgressLine:
    """A progress callback that prints ``text(progress)`` on stderr: one line rewritten in
    place on a terminal (at most 4 times a second), a new line every 10 s otherwise
    (``glinthawk.cli.progress-interval`` sets another interval); ``quiet``: none.

    Each worker the run lost and recovered from (the progress's ``recoveries``) gets a
    line of its own as soon as it is seen, quiet or not: a run that goes on after a loss
    still tells whoever watches it.
    """

    def __init__(self, text: Callable[[Any], str], every: float | None = None, quiet: bool = False) -> None:
        import sys
        import time

        from .. import config

        self.text = text
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        if every is None:
            every = config.get("cli.progress-interval")
        self.every = float(every) if every is not None else (0.25 if self.tty else 10.0)
        self.clock = time.monotonic
        self.last = self.clock()
        self.shown = False
        self.recoveries_seen = 0

    def __call__(self, p: Any) -> None:
        self._recoveries(getattr(p, "recoveries", ()))
        now = self.clock()
        if self.quiet or now - self.last < self.every:
            return
        self.last = now
        line = self.text(p)
        click.echo(f"\r{line}   " if self.tty else line, err=True, nl=not self.tty)
        self.shown = self.tty

    def _recoveries(self, recoveries: Any) -> None:
        if len(recoveries) <= self.recoveries_seen:
            return
        from ..engine.progress import recovery_text

        self.end()
        for rec in list(recoveries)[self.recoveries_seen:]:
            click.echo(f"glinthawk: {recovery_text(rec)}", err=True)
        self.recoveries_seen = len(recoveries)

    def end(self) -> None:
        """Leave the rewritten line (a terminal's) before the summary."""
        if self.shown:
            click.echo("", err=True)
            self.shown = False


def recovered_note(n: int) -> str:
    """The end of a run's summary line for the ``n`` workers it lost (each was told as it
    happened, by :class:`ProgressLine`)."""
    from ..engine.progress import lost_workers

    if not n:
        return ""
    return f"; recovered from {lost_workers(n)}, every row computed once (see above)"


def scheduler_reachable(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--scheduler`` callback: a refused connection is an error at once, before any
    model is read (Dask's client would retry it for its whole connect timeout)."""
    if value:
        from ..runtime.cluster import refused_fast

        try:
            refused_fast(value)
        except GlinthawkError as e:
            raise click.ClickException(str(e)) from None
    return value


def parse_micro_batches(value: str | None, flag: str = "--micro-batches") -> int | str | None:
    """A positive int or "auto" (None stays None)."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.UsageError(f"{flag} must be a positive integer or auto, not {value!r}")
    return n


def tls_options(role: str) -> Callable:
    """``--tls-ca-file``, ``--tls-cert`` and ``--tls-key``, like ``dask scheduler`` and ``dask worker``."""
    pem = click.Path(exists=True, dir_okay=False, resolve_path=True)
    options = [
        click.option("--tls-ca-file", type=pem, default=None, metavar="PEM", help="CA certificate(s) for TLS."),
        click.option("--tls-cert", type=pem, default=None, metavar="PEM", help=f"This {role}'s TLS certificate."),
        click.option("--tls-key", type=pem, default=None, metavar="PEM", help=f"This {role}'s TLS private key."),
    ]

    return option_group(options)


def option_group(options: list[Callable]) -> Callable:
    """One decorator applying click ``options`` in the order listed (as ``--help`` shows them)."""

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def security_from(role: str, tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> Any:
    """A ``distributed.Security`` from the TLS options, or None (Dask's configuration applies)."""
    from ..runtime.tls import security

    return security(role, tls_ca_file, tls_cert, tls_key)


@contextlib.contextmanager
def tls_client(scheduler: str | None, security: Any) -> Iterator[Any]:
    """A client of ``scheduler`` that uses ``security`` (closed at the end), or None without TLS options."""
    if security is None:
        yield None
        return
    from ..runtime.cluster import connect

    if scheduler is None:
        raise GlinthawkError("the --tls-* options need --scheduler tls://HOST:PORT")
    client, _ = connect(scheduler, security=security)
    try:
        yield client
    finally:
        client.close()


def parse_size(value: str, flag: str) -> int:
    """Bytes from ``4GiB``, ``500MB``, ``1e9`` or ``123``."""
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(value)
    except (ValueError, TypeError):
        n = -1
    if n < 0:
        raise GlinthawkError(f"{flag} {value!r} is not a size; use bytes like 4GiB, 500MB or 1e9")
    return n


def parse_memory_limit(value: str) -> int | float:
    """``--memory-limit``: auto (this machine's or container's memory), 0 (none), a fraction, or a size."""
    from distributed.system import MEMORY_LIMIT

    if value == "auto":
        return int(MEMORY_LIMIT)
    try:
        number = float(value)
    except ValueError:
        return parse_size(value, "--memory-limit")
    if number < 0 or math.isnan(number):
        raise GlinthawkError(f"--memory-limit {value!r} must not be negative")
    return number if 0 < number <= 1 else int(number)  # like Dask: at most 1 is a share of the machine
