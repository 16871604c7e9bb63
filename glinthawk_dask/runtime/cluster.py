"""Tier workers, the embedded local cluster, and connecting to an existing one.

A two-tier cluster is a plain Dask cluster: a scheduler, dense workers tagged
``GPU=1``, attention workers tagged ``KV`` (a byte budget, or 1 for "a share of my
memory limit"), and the glinthawk plugins.  Attention workers hold their KV caches as
unmanaged memory, so they start with Dask's spill-to-disk off (there is nothing
managed to spill) and with pause/terminate thresholds above the KV budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import dask.config
from dask.utils import parse_bytes
from distributed import Client, Nanny, Scheduler, SpecCluster
from distributed.utils import silence_logging_cmgr

from .. import config
from ..errors import GlinthawkError
from .ledger import DENSE_KV
from .plugins import AttentionWorkerPlugin, DenseWorkerPlugin, GlinthawkSchedulerPlugin

__all__ = ["tier_worker_options", "housekeeping_config", "local_cluster", "connect", "ensure_plugins", "tier_workers",
           "cluster_status"]

# KV caches are unmanaged memory: nothing to spill; pause only near the limit.
ATTENTION_MEMORY = {"target": False, "spill": False, "pause": 0.92, "terminate": 0.97}
DENSE_MEMORY = {"target": False, "spill": False, "pause": 0.9, "terminate": 0.95}


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes
# glibc's mmap threshold at 128 KiB: every activation of a dense layer or an attention
# step is then mapped and unmapped afresh, page faults included (measured: a SmolLM2 layer
# at 64-256 tokens 1.4-1.6x slower).  Tier workers keep glibc's own thresholds.
NANNY_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}

# Dask's periodic work at its defaults (a stack sample every 10 ms in every worker, an
# event-loop tick every 20 ms and a memory poll every 100 ms in every server) kept an idle
# embedded cluster at 8.3-8.7% of a 2-core machine; at these intervals, 1.3-1.4%.  Every
# wake in a worker takes its GIL from its compute stream, and the statistical profiler
# samples only Dask's task threads, never the tiers' compute streams.
QUIET_HOUSEKEEPING = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def housekeeping_config() -> dict:
    """The Dask config of ``glinthawk.housekeeping``: :data:`QUIET_HOUSEKEEPING` for
    "quiet", nothing (Dask's own intervals) for "dask"."""
    housekeeping = config.get("housekeeping")
    if housekeeping not in ("quiet", "dask"):
        raise GlinthawkError(f"glinthawk.housekeeping is {housekeeping!r}: use quiet or dask")
    return dict(QUIET_HOUSEKEEPING) if housekeeping == "quiet" else {}


class _QuietLogs:
    """The stream handlers of Dask's loggers at one level while any embedded cluster of
    this process lives.

    Dask's own ``silence_logs`` restores the handlers as each cluster closes: with two
    clusters in one process (a notebook comparing modes, a benchmark), closing the first
    turned the second's scheduler, in this process, back to INFO lines and tracebacks of
    comms it closes.  Here the level is restored when the last cluster closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._stack: contextlib.ExitStack | None = None

    def acquire(self, level: int | str) -> None:
        with self._lock:
            if self._users == 0:
                stack = contextlib.ExitStack()
                for root in ("distributed", "bokeh"):
                    stack.enter_context(silence_logging_cmgr(level=level, root=root))
                self._stack = stack
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._stack is not None:
                self._stack.close()
                self._stack = None


_QUIET_LOGS = _QuietLogs()


class _LocalCluster(SpecCluster):
    """The embedded cluster: a :class:`SpecCluster` that holds :data:`_QUIET_LOGS` at
    ``silence_logs`` (if any) from its start until it closes, or fails to start."""

    def __init__(self, *args: Any, silence_logs: int | str = 0, **kwargs: Any) -> None:
        self._quiet = bool(silence_logs)
        if self._quiet:
            _QUIET_LOGS.acquire(silence_logs)
        try:
            super().__init__(*args, silence_logs=False, **kwargs)
        except BaseException:
            self._unquiet()
            raise

    def _unquiet(self) -> None:
        if self._quiet:  # once, whether closed, closed again or never started
            self._quiet = False
            _QUIET_LOGS.release()

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            self._unquiet()


_LOCAL_CLUSTER = "Leave out the scheduler address (--scheduler on the command line) to start a local cluster"


def tier_environment(tier: str) -> dict[str, str]:
    """Environment variables a worker process of ``tier`` must start with.

    OpenMP reads its settings once, as torch loads; a nanny's ``env`` is applied in the
    worker process only after its modules (torch among them) are imported, so these
    must be in the environment the process is started with.  Idle OpenMP threads of
    the attention tier sleep instead of spinning on cores that other workers share.
    """
    return {"OMP_WAIT_POLICY": "PASSIVE"} if tier == "attention" else {}


def tier_worker_options(tier: str, memory_limit: int | str | None = None, kv_bytes: int | None = None) -> dict:
    """Nanny options for a worker of ``tier`` ("dense" or "attention"); ``kv_bytes`` is
    its KV budget (an attention worker's 1: a share of its memory limit; a dense
    worker's None: its GPU memory left by the weights, or a share of its memory limit).
    Its ``config`` holds the memory thresholds and :func:`housekeeping_config`.  The
    process's environment is :func:`tier_environment`'s business."""
    if tier == "dense":
        resources, memory = {"GPU": 1}, DENSE_MEMORY
        if kv_bytes:
            resources[DENSE_KV] = kv_bytes
    elif tier == "attention":
        resources, memory = {"KV": kv_bytes or 1}, ATTENTION_MEMORY
    else:
        raise ValueError(f"unknown tier {tier!r}; use dense or attention")
    opts: dict[str, Any] = {
        "nthreads": 1,
        "resources": resources,
        # dotted keys: the nanny merges this dict shallowly into the worker's config
        "config": {**{f"distributed.worker.memory.{k}": v for k, v in memory.items()}, **housekeeping_config()},
    }
    if memory_limit is not None:
        opts["memory_limit"] = parse_bytes(memory_limit) if isinstance(memory_limit, str) else memory_limit
    return opts


def local_cluster(
    n_attention: int | None = None,
    n_dense: int = 1,
    *,
    dashboard_address: str = ":0",
    asynchronous: bool = False,
    silence_logs: int = logging.WARNING,
) -> SpecCluster:
    """Start the embedded cluster: ``n_dense`` dense and ``n_attention`` attention worker
    processes on this machine (defaults from ``glinthawk.local-cluster``).

    Dask's periodic housekeeping runs at :data:`QUIET_HOUSEKEEPING`'s intervals in all of
    its processes unless ``glinthawk.housekeeping`` is ``"dask"``.  Dask's loggers in this
    process (its scheduler and nannies) print ``silence_logs`` and above until the last
    embedded cluster of the process closes.

    Its workers start in this process's environment: nannies started together cannot
    each set their own before they spawn, so :func:`tier_environment` is not applied
    (an attention worker computes on ``glinthawk.attention.threads`` torch threads, one
    by default: no OpenMP threads wait idle).  ``glinthawk.local-cluster.attention-threads``
    gives its attention workers more, ``glinthawk.local-cluster.attention-try-threads`` the
    threads their runs one micro-batch deep try (``glinthawk.attention.try-threads``; "auto":
    this machine's cores), and ``glinthawk.local-cluster.openmp-spin`` sets every worker's
    ``GOMP_SPINCOUNT`` before it spawns (one the environment already sets wins)."""
    n_attention = int(n_attention if n_attention is not None else config.get("local-cluster.attention-workers"))
    workers = {}
    dense_kv = config.get("local-cluster.dense-kv-bytes")
    dense_kv = parse_bytes(dense_kv) if isinstance(dense_kv, str) else dense_kv
    for i in range(n_dense):
        opts = tier_worker_options("dense", config.get("local-cluster.dense-memory-limit"), kv_bytes=dense_kv)
        workers[f"dense-{i}"] = {"cls": Nanny, "options": {**opts, "silence_logs": silence_logs}}
    attention_threads = config.get("local-cluster.attention-threads")
    try_threads = config.get("local-cluster.attention-try-threads")
    if try_threads == "auto":
        try_threads = os.cpu_count() or 1
    for i in range(n_attention):
        opts = tier_worker_options("attention", config.get("local-cluster.attention-memory-limit"))
        if attention_threads is not None:
            opts["config"]["glinthawk.attention.threads"] = int(attention_threads)
        if try_threads is not None:
            opts["config"]["glinthawk.attention.try-threads"] = int(try_threads)
        workers[f"attention-{i}"] = {"cls": Nanny, "options": {**opts, "silence_logs": silence_logs}}
    environ = dict(NANNY_CONFIG)
    spin = config.get("local-cluster.openmp-spin")
    if spin is not None:  # OpenMP reads it as torch loads: set before the worker process spawns
        environ["distributed.nanny.pre-spawn-environ.GOMP_SPINCOUNT"] = str(int(spin))
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address, "host": "127.0.0.1"}}
    # read as the scheduler and nannies start (their own timers; their workers' are in opts)
    before = os.environ.get("GOMP_SPINCOUNT")
    try:  # silence_logs: this process's scheduler and nannies; the workers get it in their options
        with dask.config.set({"distributed.worker.daemon": False, **environ, **housekeeping_config()}):
            return _LocalCluster(workers=workers, scheduler=scheduler, asynchronous=asynchronous,
                                 name="glinthawk-local", silence_logs=silence_logs)
    finally:  # a nanny sets its pre-spawn environment in this process: keep ours as it was
        if before is None:
            os.environ.pop("GOMP_SPINCOUNT", None)
        else:
            os.environ["GOMP_SPINCOUNT"] = before


def refused_fast(scheduler: str) -> None:
    """Fail at once when nothing listens at a tcp:// scheduler address: Dask's client
    retries a refused connection until its connect timeout (30 s).  (A tls:// address
    goes to Dask first, which says what its TLS configuration lacks.)"""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        protocol, loc = parse_address(scheduler)
        if protocol != "tcp":
            return
        host, port = parse_host_port(loc)
    except (ValueError, TypeError):
        return  # Dask's own parsing says what is wrong
    try:
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except ConnectionRefusedError as e:
        raise GlinthawkError(
            f"cannot reach the Dask scheduler at {scheduler} ({e}); is it running? "
            f"{_LOCAL_CLUSTER}"
        ) from None
    except OSError:
        return  # slow or unreachable networks: Dask's connect timeout decides


def ensure_plugins(client: Client) -> None:
    """Register the glinthawk plugins on the client's cluster (idempotent)."""
    client.register_plugin(GlinthawkSchedulerPlugin())
    client.register_plugin(DenseWorkerPlugin())
    client.register_plugin(AttentionWorkerPlugin())


def connect(
    scheduler: str | None = None, *, n_dense: int = 1, n_attention: int | None = None, security: Any = None,
) -> tuple[Client, SpecCluster | None]:
    """A client of ``scheduler``, or of a new local cluster of ``n_dense`` dense and
    ``n_attention`` attention workers (returned so it can be closed).

    ``security`` (a ``distributed.Security``, see :func:`.tls.security`) is how the
    client talks to a ``tls://`` scheduler; without it the client reads Dask's
    configuration (``distributed.comm.tls.*``, e.g. from ``DASK_DISTRIBUTED__COMM__TLS__...``
    environment variables).  The local cluster does not use TLS.
    """
    cluster = None
    if scheduler is None:
        if security is not None:
            raise GlinthawkError("security (TLS) needs the address of a running scheduler: pass "
                                 "scheduler='tls://HOST:PORT' (--scheduler tls://HOST:PORT on the command line)")
        cluster = local_cluster(n_attention, n_dense)
        client = Client(cluster)
    else:
        refused_fast(scheduler)
        try:
            client = Client(scheduler, security=security)
        except TypeError as e:  # a tls:// address and no TLS configuration
            if "ssl" not in str(e).lower():
                raise
            raise GlinthawkError(
                f"the scheduler at {scheduler} uses TLS: pass security=glinthawk_dask.runtime.tls.security("
                "'client', ca_file, cert, key) (--tls-ca-file, --tls-cert and --tls-key on the command line), "
                "or set distributed.comm.tls.* in Dask's configuration"
            ) from None
        except ValueError as e:  # an address Dask cannot parse
            raise GlinthawkError(f"bad scheduler address {scheduler!r} ({e})") from None
        except (OSError, TimeoutError) as e:
            hint = ("; a TLS scheduler needs a tls:// address and the client's certificates (security=)"
                    if security is not None or scheduler.startswith("tls://") else "")
            raise GlinthawkError(
                f"cannot reach the Dask scheduler at {scheduler} ({e}); is it running? "
                f"{_LOCAL_CLUSTER}{hint}"
            ) from None
    ensure_plugins(client)
    return client, cluster


def tier_workers(client: Client) -> dict[str, list[str]]:
    """The addresses of a glinthawk cluster's tier workers, ``{"dense": [...],
    "attention": [...]}``: the scheduler's registry, one cheap call (a synchronous
    client; :func:`cluster_status` asks every worker for its KV as well)."""
    reg = client.sync(client.scheduler.glinthawk_registry)
    return {"dense": list(reg["dense"]), "attention": list(reg["attention"])}


def cluster_status(client: Client) -> dict:
    """What a glinthawk cluster holds (a coroutine for an asynchronous client): its tier
    workers, each with its resources, KV budget and the KV that runs reserved, allocated
    and fill; and its open runs, each with its client, age, plan, KV reserved per tier,
    tokens generated (as of the client's last lease renewal) and lease left."""
    if client.asynchronous:
        async def status() -> dict:
            await client.register_plugin(GlinthawkSchedulerPlugin())
            return await client.scheduler.glinthawk_status()

        return status()  # type: ignore[return-value]
    client.register_plugin(GlinthawkSchedulerPlugin())
    return client.sync(client.scheduler.glinthawk_status)
