"""The processes of a cluster: ``glinthawk scheduler``, ``worker --tier dense|attention`` and
``cluster`` (all of it on this machine).  They run until SIGINT or SIGTERM, then close cleanly."""

from __future__ import annotations

import asyncio
import copy
import signal
from typing import Any, Callable

import click

from ..errors import GlinthawkError
from ._group import main
from .options import parse_memory_limit, parse_size, scheduler_reachable, security_from, tls_options, user_errors


# -- the processes of a cluster ------------------------------------------------------------------


async def _signalled() -> int:
    """Wait for SIGINT or SIGTERM and return its number."""
    loop = asyncio.get_running_loop()
    caught: asyncio.Future[int] = loop.create_future()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: caught.done() or caught.set_result(s))
    try:
        return await caught
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve(server: Any, started: Callable[[Any], None], close: Callable[[str], Any]) -> int | None:
    """Start a Dask ``server``, report it, and run it until it finishes or a signal comes.

    Returns the signal that stopped it (None when it finished by itself).  ``close(reason)``
    closes the server.
    """
    stop = asyncio.ensure_future(_signalled())
    start = asyncio.ensure_future(server.start())
    try:
        await asyncio.wait({stop, start}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.done():
            start.result()  # raises what went wrong
            started(server)
            finished = asyncio.ensure_future(server.finished())
            await asyncio.wait({stop, finished}, return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            signum = stop.result()
            await close(f"signal-{signal.Signals(signum).name}")
            return signum
        return None
    finally:
        for task in (stop, start):
            if not task.done():
                task.cancel()


def _start_failure(e: BaseException) -> BaseException | None:
    """What made a Dask server or cluster fail to start (distributed wraps it in a
    RuntimeError "... failed to start"); None for any other error."""
    if isinstance(e, (OSError, TimeoutError, asyncio.TimeoutError)):
        return e
    if isinstance(e, RuntimeError) and "failed to start" in str(e):
        cause = e.__cause__
        return e if cause is None else (_start_failure(cause) or cause)
    return None


def _stopped_by(signum: int | None, what: str) -> None:
    reason = "it finished" if signum is None else signal.Signals(signum).name
    click.echo(f"{what} closed ({reason})", err=True)


def _dashboard_link(scheduler: Any) -> str | None:
    from distributed.comm import get_address_host
    from distributed.utils import format_dashboard_link

    server = scheduler.services.get("dashboard")
    if server is None:
        return None
    try:
        return format_dashboard_link(get_address_host(scheduler.address), server.port)
    except (KeyError, ValueError):
        return None


def _timeout(value: str, flag: str) -> float | None:
    from dask.utils import parse_timedelta

    if value.strip().lower() in ("0", "none", "never"):
        return None
    try:
        seconds = parse_timedelta(value, default="seconds")
    except (ValueError, KeyError, TypeError):
        seconds = -1
    if seconds is None or seconds < 0:
        raise GlinthawkError(f"{flag} {value!r} is not a duration; use e.g. 60s, 5m or 0 for never")
    return seconds


def _scheduler_address(value: str) -> str:
    """Check SCHEDULER up front, so that a typo is a one-line error rather than a worker that never starts."""
    from distributed.comm import get_address_host, parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        get_address_host(value)  # an unknown scheme
        protocol, loc = parse_address(value)
        if protocol in ("tcp", "tls"):
            parse_host_port(loc)
    except (ValueError, TypeError) as e:
        raise GlinthawkError(f"bad scheduler address {value!r} ({e}); use e.g. tcp://HOST:8786 or tls://HOST:8786")
    return value


@main.command()
@click.option("--host", default=None,
              help="Address or interface IP to listen on [default: every interface; 127.0.0.1 for this machine only].")
@click.option("--port", type=click.IntRange(0, 65535), default=8786, show_default=True, help="0 picks a free port.")
@click.option("--dashboard-address", default=":8787", show_default=True, help="The dashboard's [host]:port.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True, help="Serve the dashboard.")
@click.option("--scheduler-file", default=None, type=click.Path(dir_okay=False),
              help="Also write the address as JSON here (like dask scheduler).")
@tls_options("scheduler")
@user_errors
def scheduler(host: str | None, port: int, dashboard_address: str, dashboard: bool, scheduler_file: str | None,
              tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """A Dask scheduler with the glinthawk control plane, until SIGINT or SIGTERM.

    Prints its address and dashboard URL.  With the TLS options it listens on
    tls:// only and accepts peers with a certificate of the same CA.  Start workers
    with: glinthawk worker --tier dense|attention ADDRESS.
    """
    from distributed import Scheduler

    from ..runtime.plugins import GlinthawkSchedulerPlugin

    security = security_from("scheduler", tls_ca_file, tls_cert, tls_key)

    async def main_() -> int | None:
        server = Scheduler(
            host=host, port=port, protocol="tls" if security is not None else None, security=security,
            dashboard=dashboard, dashboard_address=dashboard_address, scheduler_file=scheduler_file,
            plugins=[GlinthawkSchedulerPlugin()],
        )

        def started(s: Any) -> None:
            click.echo(f"glinthawk scheduler at {s.address}")
            link = _dashboard_link(s)
            if link:
                click.echo(f"dashboard at {link}")

        return await _serve(server, started, lambda reason: server.close(reason=reason))

    try:
        signum = asyncio.run(main_())
    except Exception as e:
        cause = _start_failure(e)  # the port is taken, the host is not ours, ...
        if cause is None:
            raise
        raise GlinthawkError(f"cannot start the scheduler on {host or '*'}:{port} "
                             f"({type(cause).__name__}: {cause})") from None
    _stopped_by(signum, "glinthawk scheduler")


# `<entrypoint> dask-scheduler ...`, as the dask/dask Helm chart runs it
_dask_scheduler = copy.copy(scheduler)
_dask_scheduler.hidden = True
main.add_command(_dask_scheduler, "dask-scheduler")


@main.command()
@click.argument("scheduler", metavar="SCHEDULER")
@click.option("--tier", type=click.Choice(["dense", "attention"]), required=True,
              help="dense: carries GPU=1 and runs the layers' dense math; attention: carries KV and holds KV caches.")
@click.option("--kv-bytes", default=None, metavar="SIZE",
              help="The KV cache budget, like 8GiB.  Attention tier: or 1 for a share "
                   "(glinthawk.attention.kv-memory-fraction) of the memory limit [default: 1].  Dense tier: "
                   "KV its single-tier and hybrid runs may keep [default: on a GPU, its memory left by "
                   "the weights and glinthawk.dense.workspace-bytes; else a share of the memory limit].")
@click.option("--nthreads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Dask task threads (the tier's compute has a thread of its own).")
@click.option("--memory-limit", default="auto", show_default=True, metavar="SIZE|FRACTION|auto|0",
              help="Memory of this worker: bytes like 6GiB, a share of the machine like 0.5, "
                   "auto (the machine's or container's memory) or 0 (no limit).")
@click.option("--name", default=None, help="A unique worker name [default: its address].")
@click.option("--host", default=None,
              help="IP or hostname to listen on and advertise [default: the interface that reaches the scheduler].")
@click.option("--worker-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the worker (0: any free port).")
@click.option("--nanny-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the nanny (0: any free port).")
@click.option("--interface", default=None, help="Network interface to listen on, like eth0 or ib0 (instead of --host).")
@click.option("--dashboard-address", default=":0", show_default=True, help="The worker dashboard's [host]:port.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True, help="Serve the worker's dashboard.")
@click.option("--nanny/--no-nanny", default=True, show_default=True,
              help="Run the worker in a child process that a nanny restarts when it dies.")
@click.option("--death-timeout", default="60s", show_default=True, metavar="DURATION",
              help="Give up when the scheduler cannot be reached for this long (0: never).")
@click.option("--local-directory", default=None, type=click.Path(file_okay=False),
              help="Directory for the worker's files [default: Dask's temporary directory].")
@tls_options("worker")
@user_errors
def worker(scheduler: str, tier: str, kv_bytes: str | None, nthreads: int, memory_limit: str, name: str | None,
           host: str | None, worker_port: int, nanny_port: int, interface: str | None, dashboard_address: str,
           dashboard: bool, nanny: bool, death_timeout: str, local_directory: str | None,
           tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """A Dask worker of one tier, attached to SCHEDULER, until SIGINT or SIGTERM.

    It carries the tier's resources and memory thresholds, and brings the glinthawk
    worker plugins, so it needs nothing registered by a client.
    """
    import os

    import dask.config
    from distributed import Nanny, Worker

    from ..runtime.cluster import NANNY_CONFIG, tier_environment, tier_worker_options
    from ..runtime.plugins import AttentionWorkerPlugin, DenseWorkerPlugin

    _scheduler_address(scheduler)
    kv = parse_size(kv_bytes, "--kv-bytes") if kv_bytes is not None else (1 if tier == "attention" else None)
    if kv is not None and kv < 1:
        raise GlinthawkError("--kv-bytes must be at least 1" + (" (1: a share of the memory limit)"
                                                               if tier == "attention" else ""))
    limit = parse_memory_limit(memory_limit)
    timeout = _timeout(death_timeout, "--death-timeout")
    security = security_from("worker", tls_ca_file, tls_cert, tls_key)
    if security is None and scheduler.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file"):
        raise GlinthawkError(f"the scheduler at {scheduler} uses TLS: give --tls-ca-file, --tls-cert and --tls-key "
                             "(or set distributed.comm.tls.* in Dask's configuration)")
    opts = tier_worker_options(tier, kv_bytes=kv)
    memory_config = opts.pop("config")
    # in this process's environment, which the nanny's worker process starts with (a
    # nanny's env= arrives after torch has loaded, too late for OpenMP); without a
    # nanny, torch has loaded here already: the shell must set them
    env = {k: v for k, v in tier_environment(tier).items() if k not in os.environ}
    if host and interface:
        raise GlinthawkError("give --host or --interface, not both")
    opts.update(nthreads=nthreads, memory_limit=limit, name=name, host=host, interface=interface,
                dashboard=dashboard, dashboard_address=dashboard_address, death_timeout=timeout,
                local_directory=local_directory, security=security,
                plugins=(DenseWorkerPlugin(), AttentionWorkerPlugin()))

    async def main_() -> int | None:
        if nanny:
            with dask.config.set(NANNY_CONFIG):  # read by the nanny when it is made
                os.environ.update(env)
                server = Nanny(scheduler, port=nanny_port, worker_port=worker_port, config=memory_config, **opts)
        else:
            if env:
                click.echo(f"note: without a nanny, set {' '.join(f'{k}={v}' for k, v in env.items())} in the "
                           f"environment that starts this worker (OpenMP reads it as torch loads)", err=True)
            dask.config.set(memory_config)
            server = Worker(scheduler, port=worker_port, **opts)

        def started(s: Any) -> None:
            address = s.worker_address if nanny else s.address
            click.echo(f"glinthawk {tier} worker at {address} ({_resources_text(opts['resources'])}), "
                       f"scheduler {scheduler}", err=True)

        close = (lambda reason: server.close(timeout=10, reason=reason)) if nanny else \
            (lambda reason: server.close(reason=reason))
        return await _serve(server, started, close)

    try:
        signum = asyncio.run(main_())
    except Exception as e:
        cause = _start_failure(e)
        if cause is None:
            raise
        raise GlinthawkError(f"the {tier} worker could not start and join the scheduler at {scheduler} "
                             f"({type(cause).__name__}: {cause or 'timed out'}); is it running, and reachable "
                             "from here?") from None
    _stopped_by(signum, f"glinthawk {tier} worker")


def _resources_text(resources: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in resources.items())


@main.command()
@click.option("--dense", "n_dense", type=click.IntRange(min=1), default=1, show_default=True,
              help="Dense worker processes.")
@click.option("--attention", "n_attention", type=click.IntRange(min=0), default=None,
              help="Attention worker processes (0: only --mode single-tier runs) "
                   "[default: glinthawk.local-cluster.attention-workers, 2].")
@click.option("--dashboard-address", default=":8787", show_default=True, help="The dashboard's [host]:port.")
@user_errors
def cluster(n_dense: int, n_attention: int | None, dashboard_address: str) -> None:
    """The two-tier cluster on this machine, until Ctrl-C or SIGTERM.

    Prints the scheduler address (for --scheduler of generate and run, or a Client)
    and the dashboard URL, then waits; on the signal it stops every worker.
    """
    import threading

    from distributed import Client

    from ..runtime.cluster import ensure_plugins, local_cluster
    from ..runtime.dashboard import page_link

    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        caught.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            local = local_cluster(n_attention, n_dense, dashboard_address=dashboard_address)
        except Exception as e:
            cause = _start_failure(e)
            if cause is None:
                raise
            raise GlinthawkError(f"the local cluster failed to start ({type(cause).__name__}: {cause})") from None
        with local, Client(local) as client:
            ensure_plugins(client)
            if not stop.is_set():
                click.echo(f"glinthawk scheduler at {local.scheduler_address}")
                click.echo(f"dashboard at {client.dashboard_link}")
                click.echo(f"glinthawk page at {page_link(client)}")
                click.echo(f"{n_dense} dense and {len(local.workers) - n_dense} attention workers; "
                           "Ctrl-C stops them", err=True)
            while not stop.wait(1.0):
                pass
            click.echo("stopping the cluster", err=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _stopped_by(caught[0] if caught else None, "glinthawk cluster")


@main.command()
@click.option("--scheduler", required=True, metavar="ADDRESS", envvar="DASK_SCHEDULER_ADDRESS",
              callback=scheduler_reachable,
              help="The cluster's scheduler, like tcp://host:8786 [env: DASK_SCHEDULER_ADDRESS].")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.option("--follow", "-f", is_flag=True,
              help="Then print each KV change between runs as it happens, until Ctrl-C (with --json: one JSON "
                   "object per change).")
@tls_options("client")
@user_errors
def status(scheduler: str, as_json: bool, follow: bool, tls_ca_file: str | None, tls_cert: str | None,
           tls_key: str | None) -> None:
    """What a cluster holds: tier workers with their KV budgets and the KV reserved,
    allocated and used on each, the open runs with their client, age, plan and
    tokens done, the runs waiting for KV, the last KV changes between runs, and the
    detached pipelines (`glinthawk run --detach`)."""
    import json

    from ..runtime.cluster import cluster_status, connect

    client, _ = connect(scheduler, security=security_from("client", tls_ca_file, tls_cert, tls_key))
    try:
        info = cluster_status(client)
        click.echo(json.dumps(info) if as_json else status_text(info))
        if follow:
            _follow_kv_changes(client, as_json)
    finally:
        client.close()


def _follow_kv_changes(client: Any, as_json: bool) -> None:
    """Print each KV change the scheduler announces (``glinthawk-kv`` events, pushed to
    this client) until Ctrl-C, or until the scheduler goes away."""
    import json
    import time

    from ..runtime.kv_signals import TOPIC, event_text

    def show(event: tuple[float, Any]) -> None:  # (on the client's event loop)
        change = {"time": event[0], **event[1]}
        click.echo(json.dumps(change) if as_json else f"  {event_text(change)}")

    if not as_json:
        click.echo("following KV changes between runs (Ctrl-C stops):")
    client.subscribe_topic(TOPIC, show)
    try:
        while client.status == "running":
            time.sleep(0.2)
    except KeyboardInterrupt:
        return
    raise click.ClickException(f"lost the scheduler at {client.scheduler.address} ({client.status})")


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def status_text(info: dict) -> str:
    """``glinthawk status`` as a person reads it."""
    def size(n: Any) -> str:
        return "-" if n is None else bytes_text(n)

    from ..engine.progress import bytes_text
    from ..runtime.kv_signals import event_text, run_name

    lines = [f"scheduler {info['scheduler']}"]
    for tier in ("dense", "attention"):
        workers = info["workers"][tier]
        lines.append(f"{tier} workers: {len(workers)}")
        for w in workers:
            budget = (size(w["kv_budget"]) if w["kv_budget"] is not None
                      else "sized by each run (no --kv-bytes: GPU memory the weights leave, else a share of "
                           "its memory limit)")
            lines.append(f"  {w['address']} ({w['name']}, {w['nthreads']} threads): KV budget {budget}, "
                         f"reserved {size(w['kv_reserved'])}, allocated {size(w['kv_allocated'])}, "
                         f"used {size(w['kv_used'])}"
                         + (f"; K/V of sequences taken out of attention caches {size(w['kv_out'])}"
                            if w.get("kv_out") else ""))
    lines.append(f"open runs: {len(info['runs'])}")
    for r in info["runs"]:
        split = f", {r['local_micro_batches']} local" if r["mode"] == "hybrid" else ""
        lines.append(f"  {run_name(r['run_id'], r.get('label', ''))} by client {r['client']}: {r['mode']}, "
                     f"{r['model']}, {'+'.join(map(str, r['sizes']))} slots in {r['micro_batches']} micro-batches{split}, "
                     f"age {r['age_s']:.0f} s, {r['generated_tokens']} tokens, KV reserved "
                     f"{size(r['kv_reserved']['dense'])} dense, {size(r['kv_reserved']['attention'])} attention, "
                     f"lease left {max(0.0, r['lease_left_s']):.0f} s"
                     + (f"; grew into freed KV {_times(r['grown'])}" if r.get("grown") else "")
                     + (f"; gave up {r['yielded']} micro-batch(es) for runs waiting for KV" if r.get("yielded") else "")
                     + (f"; gave up {r['shrunk_slots']} KV slot(s) for runs waiting for KV" if r.get("shrunk_slots")
                        else "")
                     + (f"; lost {', '.join(r['lost_workers'])}" if r.get("lost_workers") else ""))
    if info.get("waiting"):
        lines.append(f"runs waiting for KV the open runs hold: {len(info['waiting'])}")
        lines += [f"  {run_name(w['run_id'], w.get('label', ''))} by client {w['client']}: {w['model']}, "
                  f"waiting {w['waited_s']:.0f} s"
                  for w in info["waiting"]]
    if info.get("kv_events"):
        lines.append("last KV changes between runs:")
        lines += [f"  {event_text(e)}" for e in info["kv_events"]]
    if info.get("pipelines"):
        from .detached import pipeline_line

        lines.append(f"detached pipelines: {len(info['pipelines'])}")
        lines += [pipeline_line(p, info["time"]) for p in info["pipelines"]]
    return "\n".join(lines)
