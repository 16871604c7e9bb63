"""The scheduler's record of detached pipelines: runs whose driver is a task on the cluster.

A detached pipeline (:mod:`glinthawk_dask.pipeline.detached`) has no client to ask how
it goes: its client submitted it and left.  Its driver, a long-running Dask task on a
CPU worker, reports here as its state changes, so that ``glinthawk status``,
``glinthawk attach`` and ``glinthawk cancel`` (from any machine) find it by name:

``submitted`` -> ``starting`` (a worker runs the driver; again, with ``attempts`` + 1,
when Dask reruns it after its worker died) -> ``running`` (the engine generates) ->
``finished`` | ``cancelled`` | ``failed``.

A record whose driver task is gone from the scheduler before it reported an end is
``lost``: Dask gave up on it (its workers died ``distributed.scheduler.allowed-failures``
times), or the task was cancelled from outside.  Records are plain dicts of JSON types;
this module knows nothing of specs or outputs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["ACTIVE", "ENDED", "PipelineRegistry"]

ACTIVE = ("submitted", "starting", "running")
ENDED = ("finished", "cancelled", "failed", "lost")

#: seconds a submitted record's task may take to reach the scheduler (the client's graph
#: update and its record's creation travel apart)
SUBMIT_GRACE = 30.0

#: ended records kept (the oldest go first)
KEEP_ENDED = 20


class PipelineRegistry:
    """Detached pipelines by name, on the scheduler (handlers ``glinthawk_pipeline_put``
    and ``glinthawk_pipelines``).

    ``progress(name)`` gives the latest progress the pipeline's run reported for the
    dashboard page (``glinthawk_progress``), joined to its record when listed.
    """

    def __init__(self, scheduler: Any, progress: Callable[[str], dict | None]) -> None:
        self.scheduler = scheduler
        self.progress = progress
        self.records: dict[str, dict] = {}
        scheduler.handlers["glinthawk_pipeline_put"] = self.put
        scheduler.handlers["glinthawk_pipelines"] = self.list

    def put(self, name: str, fields: dict, new: bool = False, key: str | None = None) -> dict:
        """Create (``new``) or update the record ``name`` with ``fields``; the record.

        A new record is refused (``{"refused": <the active record>}``) while one of the
        same name is active.  An update from a driver names its task's ``key``: one for
        another record of the name (an earlier run's driver, still ending) is ignored, as
        is one that names an ``attempt`` other than the last (a driver Dask replaced);
        the answer then says ``stale``.  ``state: starting`` counts an attempt; a state
        that ends the record stamps ``ended``.
        """
        now = time.time()
        old = self._checked(name)
        if new:
            if old is not None and old["state"] in ACTIVE:
                return {"refused": old}
            self.records.pop(name, None)
            self.records[name] = {"name": name, "state": "submitted", "attempts": 0, "submitted": now,
                                  "updated": now, **fields}
            self._trim()
            return dict(self.records[name])
        record = self.records.get(name)
        if record is None:  # (the scheduler restarted under a running driver: begin again)
            record = self.records[name] = {"name": name, "state": "submitted", "attempts": 0, "submitted": now,
                                           "key": key}
        attempt = fields.pop("attempt", None)
        if (key is not None and key != record.get("key")) or (attempt is not None and attempt != record["attempts"]):
            return {**record, "stale": True}  # (its news is not this record's)
        if record["state"] in ENDED and fields.get("state") in ACTIVE:
            return dict(record)  # (a driver Dask reran after its record ended: it stops on this answer)
        if fields.get("state") == "starting":
            record["attempts"] += 1
        record.update(fields, updated=now)
        if record["state"] in ENDED:
            record.setdefault("ended", now)
        return dict(record)

    def list(self, name: str | None = None) -> list[dict]:
        """The records (``name``'s alone, when given), oldest first, each with ``progress``
        (the run's latest report, or None) and its driver task checked."""
        names = [name] if name is not None else list(self.records)
        out = []
        for n in names:
            record = self._checked(n)
            if record is not None:
                out.append({**record, "progress": self.progress(n) if record["state"] in ACTIVE + ("lost",)
                            else None})
        return out

    def _checked(self, name: str) -> dict | None:
        """``name``'s record, ``lost`` if its driver task left the scheduler before it ended."""
        record = self.records.get(name)
        if record is None:
            return None
        key = record.get("key")
        young = record["state"] == "submitted" and time.time() - record["submitted"] < SUBMIT_GRACE
        if record["state"] in ACTIVE and key is not None and key not in self.scheduler.tasks and not young:
            last = self.progress(name) or {}
            record.update(state="lost", ended=time.time(), error=(
                "its driver task left the scheduler before the run ended: the workers that ran it died "
                f"{record['attempts']} time(s) (Dask gives up after distributed.scheduler.allowed-failures), or "
                "the task was cancelled; the rows it committed stay in the output"
                + (f" ({last['rows_done']} rows in its last report)" if "rows_done" in last else "")
                + ", and submitting it again resumes"))
        return record

    def _trim(self) -> None:
        ended = [n for n, r in self.records.items() if r["state"] in ENDED]
        for n in ended[:max(0, len(ended) - KEEP_ENDED)]:
            del self.records[n]
