"""Detached pipelines: a run whose driver is a task on the cluster, not its client.

>>> from distributed import Client
>>> from glinthawk_dask.pipeline.detached import submit_detached
>>> from glinthawk_dask.pipeline.spec import load_spec
>>> pipe = submit_detached(load_spec("pipelines/s3-jsonl.yaml"), Client("tcp://scheduler:8786"))
>>> pipe.state            # submitted, starting, running, then finished, cancelled, failed or lost
>>> pipe.cancel()         # stops between completions; the committed rows stay
>>> pipe.wait()           # the scheduler's record once the run ended; pipe.report(): its RunReport

``glinthawk run SPEC --scheduler ADDR --detach`` does the same from the command line.
:func:`submit_detached` sends :func:`~glinthawk_dask.pipeline.run.run_pipeline` to a CPU
worker as a Dask task kept by ``fire_and_forget``, and returns: the client may leave
(a laptop closed, a notebook restarted), and prompts and completions flow between the
workers and storage, never through it.  The driver reports its state to the scheduler
(:mod:`glinthawk_dask.runtime.pipelines`), where ``glinthawk status``, ``glinthawk
attach NAME`` and ``glinthawk cancel NAME`` find it from any machine.

If the worker that runs the driver dies, Dask runs the task again on another one, and
the run resumes from the rows its output committed (the record counts ``attempts``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

import fsspec

from ..errors import GlinthawkError
from ..runtime.pipelines import ACTIVE, ENDED
from .run import RunReport, run_pipeline
from .spec import PipelineSpec

__all__ = [
    "ACTIVE", "ENDED", "DetachedPipeline", "cancel_event", "detached_pipelines", "drive", "report_from", "run_driver",
    "spec_fields", "spec_from", "submit_detached",
]

logger = logging.getLogger("glinthawk_dask.pipeline.detached")  # (also as the driver process's __main__)

#: seconds a driver whose worker died has to commit its finished rows before it exits
ORPHAN_GRACE = 10.0


def submit_detached(spec: PipelineSpec, client: Any, *, overwrite: bool = False,
                    force: bool = False) -> "DetachedPipeline":
    """Start ``spec`` on ``client``'s cluster with its driver on a CPU worker; its handle.

    Refused while a pipeline of the same name runs there.  A local output path is made
    absolute and written from this machine, by a driver under any of its workers
    (refused when none runs here);
    ``memory://`` outputs are refused (they live in the process that writes them).
    ``overwrite`` applies to the first attempt only: a driver rerun after its worker
    died resumes.
    """
    from distributed import Event, fire_and_forget

    from ..runtime.cluster import ensure_plugins

    spec = _portable(spec)
    ensure_plugins(client)
    workers, anywhere = _driver_workers(client, spec)
    key = f"glinthawk-pipeline-{spec.name}-{time.time_ns():x}"
    fields = {"spec_name": spec.name, "model": spec.model, "output": spec.output.url, "key": key,
              "submitted_from": socket.gethostname()}
    record = client.sync(client.scheduler.glinthawk_pipeline_put, name=spec.name, fields=fields, new=True)
    if "refused" in record:
        other = record["refused"]
        raise GlinthawkError(
            f"a pipeline named {spec.name!r} is already {other['state']} on this cluster (writing "
            f"{other.get('output')}): follow it with `glinthawk attach {spec.name}`, stop it with `glinthawk cancel "
            f"{spec.name}`, or give this spec another name")
    Event(cancel_event(spec.name), client=client).clear()  # (a cancel of an earlier run of this name)
    future = client.submit(drive, spec_fields(spec), overwrite, force, key, key=key, workers=workers,
                           allow_other_workers=anywhere, pure=False)
    fire_and_forget(future)
    return DetachedPipeline(client, spec.name)


def detached_pipelines(client: Any) -> list[dict]:
    """The scheduler's records of the detached pipelines it knows (see
    :mod:`glinthawk_dask.runtime.pipelines`), oldest first."""
    from ..runtime.plugins import GlinthawkSchedulerPlugin

    client.register_plugin(GlinthawkSchedulerPlugin())  # (the scheduler's alone, as cluster_status)
    return client.sync(client.scheduler.glinthawk_pipelines)


class DetachedPipeline:
    """A detached pipeline on a cluster, by name: its record, :meth:`cancel`, :meth:`wait`."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name

    def record(self) -> dict:
        """The scheduler's record: ``state``, ``attempts``, ``worker``, ``output``, ``error``
        (failed, lost), ``report`` (ended: the :class:`RunReport`'s fields), ``progress``
        (active: the run's latest report)."""
        found = self.client.sync(self.client.scheduler.glinthawk_pipelines, name=self.name)
        if not found:
            raise GlinthawkError(f"no detached pipeline named {self.name!r} on this cluster (`glinthawk status` "
                                 "lists them; the scheduler forgets them when it restarts)")
        return found[0]

    @property
    def state(self) -> str:
        return self.record()["state"]

    def cancel(self) -> None:
        """Ask the run to stop between completions (its finished rows are committed; a
        rerun resumes).  :meth:`wait` for it to end."""
        from distributed import Event

        self.record()  # (an unknown name: say so)
        Event(cancel_event(self.name), client=self.client).set()

    def wait(self, timeout: float | None = None, *, until: tuple[str, ...] = ENDED, poll: float = 1.0,
             on_record: Callable[[dict], None] | None = None) -> dict:
        """Poll the record every ``poll`` seconds until its state is one of ``until``
        (every state that ends a run, by default); the record.  ``on_record`` sees each
        record polled.  Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.record()
            if on_record is not None:
                on_record(record)
            if record["state"] in until:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} is still {record['state']} after {timeout} s")
            time.sleep(poll)

    def report(self) -> RunReport | None:
        """The ended run's report (None while it runs, or when it failed before one)."""
        fields = self.record().get("report")
        return None if fields is None else report_from(fields)


def report_from(fields: dict) -> RunReport:
    """A :class:`RunReport` from the fields a record keeps."""
    names = {f.name for f in dataclasses.fields(RunReport)}
    return RunReport(**{k: v for k, v in fields.items() if k in names})


def cancel_event(name: str) -> str:
    """The name of the ``distributed.Event`` that cancels the detached pipeline ``name``."""
    return f"glinthawk-cancel-{name}"


# -- the driver, on a worker ------------------------------------------------------------------


def drive(spec: dict, overwrite: bool, force: bool, key: str) -> str:
    """The Dask task ``key`` of a detached pipeline: run its driver in a process of its
    own on this worker's host, relay its log to the worker's, and wait for it; the state
    the run ended in.

    A process of its own, not this worker's: the driver's Python work (feeding requests,
    detokenizing, committing) would otherwise share a GIL and an event loop with the
    attention this worker serves (measured on a 2-core VM: the quickstart ran 41-44 tok/s
    with the driver inside an attention worker against 58-59 from a client process in
    the same minutes; in a process of its own, ``benchmarks/bench_detached.py`` measured
    medians of 54.5 against 52.3 from a client).  The process ends when this worker does
    (it watches its parent).
    """
    import collections
    import json
    import subprocess
    import sys

    from distributed import get_client, get_worker, secede

    secede()  # (runs for hours: gives its thread back to the worker, whose tasks read the shards)
    worker, client = get_worker(), get_client()
    job = {"spec": spec, "overwrite": overwrite, "force": force, "key": key, "scheduler": worker.scheduler.address,
           "tls": _tls_of(worker.security), "worker": worker.address, "parent": os.getpid()}
    proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    tail: collections.deque[str] = collections.deque(maxlen=12)
    for line in proc.stderr:  # (its log records, "<logger> <LEVEL> <message>", at their level here)
        words = line.rstrip().split(" ", 2)
        level = logging.getLevelName(words[1]) if len(words) > 2 else None
        logger.log(level if isinstance(level, int) else logging.WARNING, "%s [the driver of pipeline %s]",
                   words[2] if isinstance(level, int) else line.rstrip(), spec["name"])
        tail.append(line.rstrip())
    rc = proc.wait()
    name = spec["name"]
    record = client.sync(client.scheduler.glinthawk_pipelines, name=name)
    if not record or record[0].get("key") != key:  # (a newer run of the name has the record)
        return "ended"
    state = record[0]["state"]
    if state in ACTIVE:  # (it died before it could say how it ended)
        client.sync(client.scheduler.glinthawk_pipeline_put, name=name, key=key, fields={
            "state": "failed", "error": f"its driver process exited with code {rc}: " + " | ".join(tail)})
        state = "failed"
    return state


def run_driver(client: Any, spec: PipelineSpec, *, overwrite: bool, force: bool, worker: str, key: str) -> str:
    """Run ``spec`` on ``client``'s cluster as the driver of the detached pipeline whose
    task is ``key`` (under ``worker``), reporting to the scheduler's record as it goes;
    the state it ended in."""
    from distributed import Event

    name = spec.name

    def put(**fields: Any) -> dict:
        return client.sync(client.scheduler.glinthawk_pipeline_put, name=name, key=key, fields=fields)

    record = put(state="starting", worker=worker, host=socket.gethostname(), pid=os.getpid())
    if record.get("stale") or record["state"] != "starting":  # ended before this attempt began: nothing to do
        return record["state"]
    attempt = record["attempts"]  # (every later update names it: once Dask runs another, they are ignored)
    if attempt > 1:
        logger.warning("glinthawk: pipeline %s: attempt %d (the worker of the last one died): resuming its output",
                       name, attempt)
    requested = Event(cancel_event(name), client=client)
    cancel, done = threading.Event(), threading.Event()

    def watch() -> None:  # a cancel from `glinthawk cancel`, anywhere
        while not done.is_set():
            try:
                if requested.wait(timeout=1.0):
                    cancel.set()
                    return
            except Exception:  # (the scheduler gone: the run fails on its own)
                return

    running, recoveries = [False], [0]

    def progress(p: Any) -> None:  # the record's state, and the workers the run lost (for `attach`)
        fields: dict[str, Any] = {}
        if not running[0]:
            running[0] = True
            fields["state"] = "running"
        if len(p.recoveries) > recoveries[0]:
            recoveries[0] = len(p.recoveries)
            fields["recoveries"] = list(p.recoveries)
        if fields:
            put(attempt=attempt, **fields)

    threading.Thread(target=watch, name=f"glinthawk-cancel-{name}", daemon=True).start()
    try:
        if requested.is_set():
            state, fields = "cancelled", {}
        else:
            report = run_pipeline(spec, client=client, overwrite=overwrite and attempt == 1, force=force,
                                  cancel=cancel, progress=progress)
            state = "cancelled" if report.cancelled else "finished"
            fields = {"report": dataclasses.asdict(report)}
    except GlinthawkError as e:
        state, fields = "failed", {"error": str(e)}
    except Exception as e:
        logger.exception("glinthawk: pipeline %s failed", name)
        state, fields = "failed", {"error": f"{type(e).__name__}: {e}"}
    finally:
        done.set()
    put(state=state, attempt=attempt, **fields)
    return state


def spec_fields(spec: PipelineSpec) -> dict:
    """``spec`` as JSON values, storage options and source included (:func:`spec_from`)."""
    return {**spec.to_dict(), "storage_options": spec.storage_options, "source": spec.source}


def spec_from(fields: dict) -> PipelineSpec:
    """The spec :func:`spec_fields` gave (storage options as they were, not expanded again)."""
    from .spec import parse_spec

    data = {k: v for k, v in fields.items() if k not in ("storage_options", "source")}
    return parse_spec(data, source=fields["source"]).replace(storage_options=fields["storage_options"])


def _tls_of(security: Any) -> dict | None:
    """The worker's TLS files (or PEM text), for its driver process to connect as a client."""
    if security is None or not getattr(security, "tls_ca_file", None):
        return None
    return {"ca": security.tls_ca_file, "cert": security.tls_worker_cert or security.tls_client_cert,
            "key": security.tls_worker_key or security.tls_client_key}


def _main() -> None:
    """The driver process (:func:`drive`): a job as JSON on stdin."""
    import json
    import signal
    import sys

    from distributed import Client, Security

    job = json.load(sys.stdin)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # (commits the finished rows, as Ctrl-C)

    def orphaned() -> None:  # its worker died: stop, as that worker's task is run again elsewhere
        while os.getppid() == job["parent"]:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # (a signal, unlike interrupt_main, ends a blocking wait)
        time.sleep(ORPHAN_GRACE)  # (committing its finished rows; closing its run may wait on the dead worker)
        logger.warning("glinthawk: the driver of %s outlived its worker by %.0f s: exiting; the next attempt "
                       "computes the rows it had not committed", job["spec"]["name"], ORPHAN_GRACE)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    tls = job["tls"]
    security = None if tls is None else Security(tls_ca_file=tls["ca"], tls_client_cert=tls["cert"],
                                                 tls_client_key=tls["key"], require_encryption=True)
    with Client(job["scheduler"], security=security, name=f"glinthawk-pipeline-{job['spec']['name']}") as client:
        run_driver(client, spec_from(job["spec"]), overwrite=job["overwrite"], force=job["force"],
                   worker=job["worker"], key=job["key"])


# -- where the driver may run -----------------------------------------------------------------


def _portable(spec: PipelineSpec) -> PipelineSpec:
    """``spec`` as a worker reads it: a local output path absolute; ``memory://`` refused."""
    url = spec.output.url
    protocol, path = fsspec.core.split_protocol(url)
    if protocol == "memory":
        raise GlinthawkError(f"the output {url} lives in the memory of the process that writes it: a detached "
                             "run writes from a worker, so give a path or a URL (s3://, gs://, ...)")
    if protocol is None:
        return spec.replace(output=dataclasses.replace(spec.output, url=os.path.abspath(path)))
    return spec


def _driver_workers(client: Any, spec: PipelineSpec) -> tuple[list[str], bool]:
    """Where the driver's task may run, and whether other workers may take it: the CPU
    (attention) workers, preferred; for a plain local output path, this machine's hosts
    alone (hosts, not addresses: a worker its nanny restarts comes back at another port).
    ``file://PATH`` says the path is on a filesystem the workers share."""
    from ..runtime.cluster import tier_workers

    cpu = tier_workers(client)["attention"]
    if not cpu:
        raise GlinthawkError("the cluster has no attention (CPU) worker to run a detached pipeline's driver on: "
                             "start one with `glinthawk worker --tier attention`")
    if fsspec.core.split_protocol(spec.output.url)[0] is not None:
        return cpu, True
    hosts = sorted({w["host"] for w in client.scheduler_info()["workers"].values() if _is_this_machine(w["host"])})
    if not hosts:
        raise GlinthawkError(f"the output {spec.output.url} is a path on this machine, but no worker of the "
                             "cluster runs here to write it: give a URL the workers can write (s3://, gs://, ...), or "
                             "file:// and the path if it is on a filesystem they share")
    return hosts, False


def _is_this_machine(host: str) -> bool:
    from distributed.utils import get_ip

    if host in ("127.0.0.1", "localhost", "::1"):
        return True
    try:
        mine = {get_ip(), socket.gethostbyname(socket.gethostname())}
    except OSError:
        mine = set()
    return host in mine


if __name__ == "__main__":
    _main()
