"""Writing the output of a pipeline: rows appended, committed a chunk at a time, exactly once.

The layout and its commit protocol are described in :mod:`.layout`; :mod:`.table` reads
an output (``read_output`` and ``OutputTable`` are also importable from here).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import zarr

from ..engine.request import FINISH_ERROR
from .layout import (
    FINISH_REASONS, FORMAT, OFFSETS, OVERWRITE, ROW_COLUMNS, TOKEN_CHUNK, TOKEN_IDS, Location, OutputError,
    committed_arrays, storage_access,
)
from .table import OutputTable, read_output

__all__ = [
    "OutputError", "ZarrSink", "OutputTable", "read_output",
    "FORMAT", "ROW_COLUMNS", "TOKEN_IDS", "OFFSETS",
]

#: recovery records an output keeps (the newest; it counts them all)
KEPT_RECOVERIES = 20


class _Row(NamedTuple):
    """A validated record: the per-row values (all but the offset) and its token ids."""

    values: dict[str, Any]
    token_ids: np.ndarray  # [n] int32


def _row(record: Mapping[str, Any]) -> _Row:
    """Validate a record and turn it into column values (ValueError: a bug of the caller)."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a record must be a mapping, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"a record needs a non-empty string id, got {rid!r}")
    finish = record.get("finish_reason")
    if finish not in FINISH_REASONS:
        raise ValueError(f"record {rid!r}: finish_reason must be one of {FINISH_REASONS}, got {finish!r}")
    ids = np.asarray(record.get("completion_token_ids") or [], dtype=np.int32)
    n = record.get("completion_tokens")
    if n is not None and n != len(ids):
        raise ValueError(f"record {rid!r}: completion_tokens={n} but {len(ids)} completion_token_ids")
    prompt = record.get("prompt")
    is_json = prompt is not None and not isinstance(prompt, str)
    values = {
        "id": rid,
        "prompt": json.dumps(prompt, ensure_ascii=False) if is_json else (prompt or ""),
        "prompt_is_json": is_json,
        "completion": record.get("completion") or "",
        "finish_reason": finish,
        "error": record.get("error") or "",
        "prompt_tokens": record.get("prompt_tokens") or 0,
        "completion_tokens": len(ids),
        "time_to_first_token": _seconds(record.get("time_to_first_token")),
        "time_per_token": _seconds(record.get("time_per_token")),
    }
    return _Row(values, ids)


def _seconds(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _columns(rows: list[_Row], token_start: int) -> dict[str, np.ndarray]:
    """The arrays' new entries for ``rows``, whose ids start at ``token_start`` in the flat array."""
    out = {
        name: np.array([r.values[name] for r in rows], dtype=object if dtype is str else dtype)
        for name, dtype in ROW_COLUMNS.items()
        if name != OFFSETS
    }
    lengths = np.array([len(r.token_ids) for r in rows], dtype=np.int64)
    out[OFFSETS] = token_start + np.cumsum(lengths) - lengths
    out[TOKEN_IDS] = np.concatenate([r.token_ids for r in rows])
    return out


def _write_beyond(array: zarr.Array, start: int, values: np.ndarray) -> None:
    """Write ``values`` at ``start``, the committed length, without saving a new shape.

    The chunks go through a second view of the array, built with public constructors from
    the same store path and metadata with the longer shape (``update_shape`` returns a new
    frozen metadata object; constructing an ``AsyncArray`` writes nothing).  That shape is
    never saved: ``Array.__setitem__`` writes chunks, not ``zarr.json``.  Chunks of a
    regular grid are always stored whole, so a chunk straddling the old end is read, merged and rewritten like any partial chunk.
    """
    stop = start + len(values)
    view = zarr.Array(zarr.AsyncArray(array.metadata.update_shape((stop,)), array.store_path, array.config))
    view[start:stop] = values


def _plain(value: Any) -> Any:
    """``value`` as JSON types (what the attributes can hold; anything else as text)."""
    return json.loads(json.dumps(value, default=str))


def _writer() -> dict[str, Any]:
    """Who writes an output now: the run that opened it last."""
    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": _now()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _package_version() -> str:
    try:
        return version("glinthawk-dask")
    except PackageNotFoundError:
        return "unknown"


class ZarrSink:
    """Appends output records to a Zarr group, committing a chunk of rows at a time.

    Records are buffered; a commit happens whenever the buffer completes the current row
    chunk, and on :meth:`flush`.  Committed rows survive any crash; buffered rows do not
    (a rerun recomputes them, skipping :meth:`committed_ids`).  A failed commit leaves the
    rows buffered: retrying (another flush, or reopening) completes or discards it cleanly.
    Create one with :meth:`open`.
    """

    def __init__(self, url: str, group: zarr.Group, meta: dict[str, Any], arrays: dict[str, zarr.Array],
                 location: Location | None = None):
        self.url = url
        self._location = location
        self._taken_over = False
        self._group = group
        self._meta = meta
        self._arrays = arrays
        self._chunk_rows = arrays["id"].chunks[0]
        self._committed_ids = {str(i) for i in arrays["id"][: meta["rows"]]}
        self._buffer: list[_Row] = []
        self._buffered_ids: set[str] = set()
        self.commit_seconds: float | None = None  # commit rows buffered this long (see :meth:`open`)
        self._since = time.monotonic()  # the last commit (or the open)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        fingerprint: str,
        model: str,
        spec: Mapping[str, Any],
        sampling: Mapping[str, Any],
        chunk_rows: int = 256,
        overwrite: bool = False,
        force: bool = False,
        commit_seconds: float | None = None,
    ) -> ZarrSink:
        """Create the output at ``url``, or reopen it to continue.

        ``storage_options`` are keyed by protocol.  An existing output must come from the
        same spec ``fingerprint`` and ``model`` unless ``force`` (which records the new
        ones); ``overwrite`` replaces whatever is at ``url``.  Reopening discards anything
        written after the last commit.  ``chunk_rows`` (rows per chunk and per commit)
        applies to a new output; an existing one keeps its own.  With ``commit_seconds``,
        rows buffered that long are committed at the next append without waiting for
        their chunk to fill, or at :meth:`commit_due` (a slow run loses at most that much
        work to a crash).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        run = json.loads(json.dumps({"fingerprint": fingerprint, "model": model, "spec": spec,
                                     "sampling": sampling}))
        location = Location.parse(url, storage_options)
        with storage_access(url, "write"):
            meta = None if overwrite else location.existing_meta()
            if meta is None:
                sink = cls._create(location, run, chunk_rows)
            else:
                sink = cls._reopen(url, location, meta, run, force)
        sink.commit_seconds = commit_seconds
        return sink

    @classmethod
    def _reopen(cls, url: str, location: Location, meta: dict[str, Any], run: dict[str, Any],
                force: bool) -> ZarrSink:
        _check_same_run(url, meta, run, force)
        group = zarr.open_group(location.store(read_only=False), mode="r+")
        arrays = committed_arrays(url, group, meta)
        for name, array in arrays.items():
            committed = meta["tokens"] if name == TOKEN_IDS else meta["rows"]
            if array.shape[0] > committed:  # a commit cut short by a crash
                array.resize((committed,))
        meta.update(run, writer=_writer())  # the spec unchanged without force; this run now writes here
        group.update_attributes({"glinthawk": meta})  # (proves we may write)
        return cls(url, group, meta, arrays, location)

    @classmethod
    def _create(cls, location: Location, run: dict[str, Any], chunk_rows: int) -> ZarrSink:
        now = _now()
        meta = {"format": FORMAT, "rows": 0, "tokens": 0, **run, "version": _package_version(),
                "created": now, "updated": now, "errors": 0, "writer": _writer()}
        group = zarr.open_group(location.store(read_only=False), mode="w", attributes={"glinthawk": meta})
        arrays = {
            name: group.create_array(
                name, shape=(0,), dtype=dtype, chunks=(chunk_rows,), dimension_names=["row"],
                fill_value=math.nan if dtype == "float32" else None,
            )
            for name, dtype in ROW_COLUMNS.items()
        }
        arrays[TOKEN_IDS] = group.create_array(
            TOKEN_IDS, shape=(0,), dtype="int32", chunks=(TOKEN_CHUNK,), dimension_names=["token"]
        )
        return cls(location.url, group, meta, arrays, location)

    @property
    def rows(self) -> int:
        """Committed rows."""
        return self._meta["rows"]

    @property
    def tokens(self) -> int:
        """Committed completion token ids (the length of the flat id array)."""
        return self._meta["tokens"]

    @property
    def n_errors(self) -> int:
        """Committed error rows (finish_reason ``"error"``)."""
        return self._meta["errors"]

    @property
    def complete_inputs(self) -> str | None:
        """The key (see :meth:`mark_complete`) of the inputs every row of which is committed
        here, as recorded by the last run that read them all; None if none did."""
        return self._meta.get("complete_inputs")

    def mark_complete(self, key: str) -> None:
        """Commit the buffered rows, then record that every row of the inputs ``key`` names
        (a spec's fingerprint and its input files' versions) is committed, so that a rerun
        of the same inputs has nothing to do."""
        self.flush()
        self._record(complete_inputs=key, updated=_now())

    @property
    def recoveries(self) -> list[dict]:
        """The last :data:`KEPT_RECOVERIES` workers lost by the runs that wrote here and how
        each went on (the records of :attr:`~glinthawk_dask.LLM.recoveries`, with ``time``)."""
        return list(self._meta.get("recoveries", []))

    @property
    def n_recoveries(self) -> int:
        """Workers lost by the runs that wrote here, all of them."""
        return int(self._meta.get("recoveries_total", 0))

    def record_recoveries(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Record that a run writing here lost workers and went on (its rows are still
        computed exactly once): kept in the output's attributes, beside its commits."""
        new = [_plain(dict(r)) for r in records]
        if new:
            self._record(recoveries=(self.recoveries + new)[-KEPT_RECOVERIES:],
                         recoveries_total=self.n_recoveries + len(new))

    def record_plan(self, plan: Mapping[str, Any]) -> None:
        """Record how the last run writing here generated (its mode, micro-batches and,
        when the planner chose them, its prediction beside what it measured)."""
        self._record(last_plan=_plain(dict(plan)))

    def _record(self, **changes: Any) -> None:
        """Write ``changes`` into the output's attributes (as this run's writer)."""
        self._check_writer()
        meta = {**self._meta, **changes}
        self._group.update_attributes({"glinthawk": meta})
        self._meta = meta

    def lengths(self, n: int = 256) -> list[tuple[int, int]]:
        """``(prompt tokens, completion tokens)`` of up to ``n`` committed rows (see
        :meth:`OutputTable.lengths`): what a resumed run's plan can expect."""
        return OutputTable(self.url, self._meta, self._arrays).lengths(n)

    def __contains__(self, rid: object) -> bool:
        """Whether a row of id ``rid`` is committed (no copy of the ids, unlike :meth:`committed_ids`)."""
        return rid in self._committed_ids

    def committed_ids(self) -> set[str]:
        """Ids of the committed rows (a copy)."""
        return set(self._committed_ids)

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Buffer ``records`` and commit every row chunk they complete; returns the rows committed.

        All records are validated first: a missing id, an id already committed or
        buffered, or an inconsistent record raises ValueError and buffers none of them.
        """
        rows = [_row(r) for r in records]
        ids: set[str] = set()
        for r in rows:
            rid = r.values["id"]
            if rid in ids or rid in self._committed_ids or rid in self._buffered_ids:
                raise ValueError(f"duplicate record id {rid!r}: already committed or buffered")
            ids.add(rid)
        self._buffer.extend(rows)
        self._buffered_ids.update(ids)
        committed = 0
        room = self._chunk_rows - self.rows % self._chunk_rows  # rows that complete the current chunk
        while len(self._buffer) >= room:
            self._commit(room)
            committed += room
            room = self._chunk_rows
        return committed + self.commit_due()

    def commit_due(self) -> int:
        """Commit the buffered rows if the last commit is ``commit_seconds`` old (a part
        of a chunk, rewritten whole when the chunk fills); returns the rows committed."""
        n = len(self._buffer)
        if not n or self.commit_seconds is None or time.monotonic() - self._since < self.commit_seconds:
            return 0
        self._commit(n)
        return n

    def flush(self) -> int:
        """Commit every buffered row (the last chunk may stay partial); returns the rows committed.
        Once another run has taken the output over, nothing (those rows are that run's to do)."""
        n = len(self._buffer)
        if n and not self._taken_over:
            self._commit(n)
        return n

    def close(self) -> None:
        """Commit the buffered rows."""
        self.flush()

    def __enter__(self) -> ZarrSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # buffered records are finished results: keep them even when the block failed

    def __repr__(self) -> str:
        return (f"ZarrSink({self.url!r}, rows={self.rows}, tokens={self.tokens}, errors={self.n_errors}, "
                f"buffered={len(self._buffer)})")

    def _check_writer(self) -> None:
        """Refuse to commit once another run has opened this output to write (the last to
        open writes: a run resumed while an earlier one still goes must not interleave
        commits with it).  Checked before each commit; two commits within the same few
        milliseconds can still cross."""
        if self._location is None:
            return
        now = self._location.existing_meta() or {}
        theirs, mine = now.get("writer") or {}, self._meta.get("writer") or {}
        if theirs.get("id") == mine.get("id"):
            return
        self._taken_over = True
        who = (f"pid {theirs.get('pid')} on {theirs.get('host')}, since {theirs.get('since')}" if theirs
               else "a writer that does not say who it is")
        raise OutputError(f"another run opened {self.url} to write ({who}): this run stops writing there, and "
                          f"the {len(self._buffer)} rows it had not committed are left to that run (or a rerun)")

    def _commit(self, n: int) -> None:
        """Commit the first ``n`` buffered rows; nothing changes in memory unless it succeeds."""
        self._check_writer()
        batch = self._buffer[:n]
        columns = _columns(batch, self.tokens)
        rows, tokens = self.rows + n, self.tokens + len(columns[TOKEN_IDS])
        errors = self.n_errors + int(np.count_nonzero(columns["finish_reason"] == FINISH_ERROR))
        meta = {**self._meta, "rows": rows, "tokens": tokens, "errors": errors, "updated": _now()}
        try:
            for name, values in columns.items():  # (1) data, invisible: beyond the persisted shapes
                if len(values):
                    _write_beyond(self._arrays[name], self.tokens if name == TOKEN_IDS else self.rows, values)
            for name, array in self._arrays.items():  # (2) shapes
                array.resize((tokens if name == TOKEN_IDS else rows,))
            self._group.update_attributes({"glinthawk": meta})  # (3) the commit point
        except Exception as e:  # (a full disk, lost credentials, a store that went away)
            raise OutputError(
                f"cannot commit rows to {self.url} ({type(e).__name__}: {e}): the {self.rows} rows committed "
                f"before are kept, the {len(self._buffer)} finished since are not; once the store takes writes "
                "again (space, permissions, credentials), rerun to resume after the committed rows") from e
        self._meta = meta
        self._since = time.monotonic()
        ids = columns["id"].tolist()
        self._committed_ids.update(ids)
        self._buffered_ids.difference_update(ids)
        del self._buffer[:n]


def _check_same_run(url: str, meta: Mapping[str, Any], run: Mapping[str, Any], force: bool) -> None:
    """Refuse to continue an output started by another spec or model, unless ``force``."""
    differences = []
    if meta.get("fingerprint") != run["fingerprint"]:
        differences.append("a different spec")
    if meta.get("model") != run["model"]:
        differences.append(f"a different model ({meta.get('model')!r}, now {run['model']!r})")
    if differences and not force:
        raise OutputError(f"{url} was started with {' and '.join(differences)}: to start over, {OVERWRITE}; "
                          "to continue anyway, pass force=True (--force on the command line)")
