"""``glinthawk run --detach``, ``attach`` and ``cancel``: pipelines whose driver runs on the cluster."""

from __future__ import annotations

import contextlib
import time
import types
from typing import Any, Iterator

import click

from ..errors import GlinthawkError
from ._group import Interrupted, main
from .options import ProgressLine, scheduler_reachable, security_from, tls_options, user_errors
from .pipeline import report_lines, run_text


def detach_run(spec: Any, scheduler: str, security: Any, *, overwrite: bool, force: bool) -> None:
    """Submit ``spec`` as a detached pipeline and return once it generates (or ended), or
    after ``glinthawk.cli.detach-wait`` seconds still starting."""
    from .. import config
    from ..pipeline.detached import ENDED, submit_detached

    limit = float(config.get("cli.detach-wait"))
    with _connected(scheduler, security) as client:
        pipe = submit_detached(spec, client, overwrite=overwrite, force=force)
        click.echo(f"{spec.name}: submitted to {scheduler}; waiting until it generates, up to {limit:g} s "
                   "(Ctrl-C leaves it running there)", err=True)
        try:
            record = pipe.wait(until=("running",) + ENDED, poll=0.5, timeout=limit)
        except KeyboardInterrupt:
            raise Interrupted(f"{spec.name} goes on on the cluster; {_how_to(spec.name, scheduler)}") from None
        except TimeoutError:
            record = pipe.record()
    if record["state"] in ENDED:
        _ended(record)
        return
    if record["state"] != "running":
        click.echo(f"{spec.name}: still {record['state']} on the cluster after {limit:g} s (loading the model, "
                   f"or waiting for KV other runs hold: `glinthawk status` shows them); it goes on there, writing "
                   f"{record.get('output')}; {_how_to(spec.name, scheduler)}", err=True)
        return
    click.echo(f"{spec.name}: running on the cluster (its driver on worker {record.get('worker')}), writing "
               f"{record.get('output')}; {_how_to(spec.name, scheduler)}", err=True)


def _how_to(name: str, scheduler: str) -> str:
    return (f"follow it with `glinthawk attach {name} --scheduler {scheduler}`, stop it with "
            f"`glinthawk cancel {name} --scheduler {scheduler}`")


@main.command()
@click.argument("name")
@click.option("--scheduler", required=True, metavar="ADDRESS", callback=scheduler_reachable,
              help="Dask scheduler of the cluster the pipeline runs on.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@tls_options("client")
@user_errors
def attach(name: str, scheduler: str, quiet: bool, tls_ca_file: str | None, tls_cert: str | None,
           tls_key: str | None) -> None:
    """Follow the detached pipeline NAME until it ends: its progress line, then what it
    did (as `glinthawk run` prints it).  Ctrl-C leaves it running."""
    from ..pipeline.detached import DetachedPipeline

    show = ProgressLine(run_text, quiet=quiet)

    def seen(record: dict) -> None:  # (each worker the run lost gets its line, as `run` prints them)
        if record["state"] == "running" and record.get("progress"):
            show(_progress(record))

    with _connected(scheduler, security_from("client", tls_ca_file, tls_cert, tls_key)) as client:
        try:
            record = DetachedPipeline(client, name).wait(on_record=seen)
        except KeyboardInterrupt:
            show.end()
            raise Interrupted(f"no longer following {name}; it goes on on the cluster") from None
    show.end()
    _ended(record)


@main.command()
@click.argument("name")
@click.option("--scheduler", required=True, metavar="ADDRESS", callback=scheduler_reachable,
              help="Dask scheduler of the cluster the pipeline runs on.")
@click.option("--no-wait", is_flag=True, help="Return once the cancel is sent, without waiting for the run to stop.")
@tls_options("client")
@user_errors
def cancel(name: str, scheduler: str, no_wait: bool, tls_ca_file: str | None, tls_cert: str | None,
           tls_key: str | None) -> None:
    """Stop the detached pipeline NAME between completions: the rows it finished are
    committed, and running the same spec again resumes."""
    from ..pipeline.detached import ENDED, DetachedPipeline

    with _connected(scheduler, security_from("client", tls_ca_file, tls_cert, tls_key)) as client:
        pipe = DetachedPipeline(client, name)
        record = pipe.record()
        if record["state"] in ENDED:
            click.echo(f"{name} already ended ({record['state']}): nothing to cancel", err=True)
            return
        pipe.cancel()
        if no_wait:
            click.echo(f"{name}: cancel sent; it stops after the completion it is on", err=True)
            return
        click.echo(f"{name}: cancel sent; waiting for it to commit its finished rows and stop", err=True)
        record = pipe.wait()
    _ended(record)


@contextlib.contextmanager
def _connected(scheduler: str, security: Any) -> Iterator[Any]:
    """A client of ``scheduler`` (closed at the end)."""
    from ..runtime.cluster import connect

    client, _ = connect(scheduler, security=security)
    try:
        yield client
    finally:
        client.close()


def _progress(record: dict) -> types.SimpleNamespace:
    """A record's latest progress as :func:`run_text` and ``ProgressLine`` read it, with
    the workers the run lost."""
    return types.SimpleNamespace(**{**record["progress"], "recoveries": record.get("recoveries") or ()})


def _ended(record: dict) -> None:
    """Print how the run of ``record`` ended; a failed or lost one is an error."""
    from ..pipeline.detached import report_from

    name, state = record["name"], record["state"]
    if state in ("failed", "lost"):
        raise GlinthawkError(f"{name} {state}: {record.get('error')}")
    if record.get("report") is None:  # (cancelled before it started)
        click.echo(f"{name}: {state} before it started; nothing was written", err=True)
        return
    report = report_from(record["report"])
    lines = report_lines(name, report)
    if state == "cancelled":
        lines.append("  cancelled: the rows finished before it are committed; running the spec again resumes")
    click.echo("\n".join(lines), err=True)


def pipeline_line(record: dict, now: float | None = None) -> str:
    """One detached pipeline in ``glinthawk status``."""
    from ..engine.progress import eta_text, lost_workers
    from ..runtime.pipelines import ENDED

    now = time.time() if now is None else now
    state = record["state"]
    text = f"  {record['name']}: {state}"
    if record.get("attempts", 0) > 1:
        text += f" (attempt {record['attempts']}: the workers of the ones before died)"
    if state in ("starting", "running"):
        text += f" on worker {record.get('worker')}"
    if state == "running" and record.get("progress"):
        text += f", {run_text(_progress(record))}"
    if state in ENDED:
        text += f" {eta_text(max(0.0, now - record.get('ended', now)))} ago"
        if record.get("report"):
            r = record["report"]
            text += f", {r['rows_done']} rows written ({r['errors']} errors)"
    if record.get("recoveries"):
        text += f", {lost_workers(len(record['recoveries']))} recovered"
    if state in ENDED and record.get("error"):
        text += f": {record['error']}"
    return text + f"; output {record.get('output')}"
