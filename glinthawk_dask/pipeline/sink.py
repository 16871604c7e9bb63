"""The output of a pipeline: one Zarr v3 group, written exactly once per row, crash-safe.

Layout (every array 1-D, readable by plain ``zarr.open_group``; dimension names for xarray)::

    id, prompt, completion, finish_reason, error        str      [row]
    prompt_is_json                                       bool     [row]  prompt holds JSON text
    prompt_tokens, completion_tokens                     int32    [row]
    time_to_first_token, time_per_token                  float32  [row]  seconds, NaN when unknown
    completion_offsets                                   int64    [row]  start of the row's ids
    completion_token_ids                                 int32    [token] every row's ids, end to end

Group attribute ``glinthawk`` describes the run (fingerprint, model, spec, sampling, ...) and
holds ``rows`` and ``tokens``: the committed lengths.  A commit (1) writes the new rows'
chunks beyond the arrays' persisted shapes, where no reader looks, (2) grows every array's
shape (metadata only), (3) rewrites the group attributes: that single write is the commit
point.  Reopening cuts every array back to the committed lengths, so a crash anywhere
leaves no half row behind.  Readers use ``rows``/``tokens``, never the arrays' shapes.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.errors import ContainsArrayError
from zarr.storage import FsspecStore, LocalStore

from ..engine.request import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, ROW_FIELDS
from ..errors import GlinthawkError
from .spec import options_for

__all__ = [
    "OutputError", "ZarrSink", "OutputTable", "read_output",
    "FORMAT", "FIELD_DTYPES", "ROW_COLUMNS", "ROW_FIELDS", "TOKEN_IDS", "OFFSETS",
]

#: version of the layout above, stored in the attributes
FORMAT = 1
#: token ids per chunk of ``completion_token_ids``
TOKEN_CHUNK = 65536

TOKEN_IDS = "completion_token_ids"
OFFSETS = "completion_offsets"
#: how every field of a row (:data:`ROW_FIELDS`) is stored (``str``: Zarr's variable-length UTF-8 strings)
FIELD_DTYPES: dict[str, Any] = {
    "id": str, "prompt": str, "completion": str, TOKEN_IDS: "int32", "finish_reason": str, "error": str,
    "prompt_tokens": "int32", "completion_tokens": "int32", "time_to_first_token": "float32",
    "time_per_token": "float32",
}
#: the per-row arrays and their dtypes: every field but the token ids (one flat array of every
#: row's ids), whether the prompt is stored as JSON, and where each row's ids start
ROW_COLUMNS: dict[str, Any] = {
    **{name: dtype for name, dtype in FIELD_DTYPES.items() if name != TOKEN_IDS},
    "prompt_is_json": "bool",
    OFFSETS: "int64",
}
_FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ERROR)
#: how to replace an output, from Python and from the command line
OVERWRITE = "pass overwrite=True (--overwrite on the command line)"


class OutputError(GlinthawkError):
    """The output location cannot be used: not writable, started by another spec, not a glinthawk output."""


# -- the location ----------------------------------------------------------------------------


@dataclass
class _Location:
    """An output URL: a synchronous filesystem to inspect it, and Zarr stores on it."""

    url: str
    options: dict[str, Any]
    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def parse(cls, url: str, storage_options: Mapping[str, Mapping[str, Any]] | None) -> _Location:
        options = options_for(url, storage_options)
        fs, path = fsspec.url_to_fs(url, **options)
        return cls(url, options, fs, path)

    def store(self, read_only: bool) -> LocalStore | FsspecStore:
        # LocalStore writes a file and renames it into place: each write is atomic, as on object stores.
        if isinstance(self.fs, LocalFileSystem):
            return LocalStore(self.path, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)

    def is_empty(self) -> bool:
        """Nothing there, or an empty directory."""
        return not self.fs.exists(self.path) or (self.fs.isdir(self.path) and not self.fs.ls(self.path))

    def existing_meta(self) -> dict[str, Any] | None:
        """The ``glinthawk`` attributes of the output here; None when the location is empty."""
        try:
            group = zarr.open_group(self.store(read_only=True), mode="r")
        except (FileNotFoundError, ContainsArrayError):
            if self.is_empty():
                return None
            raise OutputError(f"{self.url} exists and is not a Zarr group, so not a glinthawk output (to write "
                              f"one there, replace it: {OVERWRITE})") from None
        meta = group.attrs.get("glinthawk")
        if not isinstance(meta, dict):
            raise OutputError(f"{self.url} is a Zarr group but not a glinthawk output (to write one there, "
                              f"replace it: {OVERWRITE})")
        if meta.get("format") != FORMAT:
            raise OutputError(f"{self.url} is a glinthawk output of format {meta.get('format')!r}; this version "
                              f"reads and writes format {FORMAT}")
        return meta


@contextmanager
def _storage_access(url: str, action: str) -> Iterator[None]:
    """Report a storage failure as an OutputError that says what to check.

    Backends raise unrelated types for the same problem (OSError, botocore's credential
    errors, HTTP client errors), so everything but our own errors is translated; the
    original stays chained as the cause.
    """
    try:
        yield
    except GlinthawkError:
        raise
    except Exception as e:
        raise OutputError(
            f"cannot {action} {url} ({type(e).__name__}: {e}): check that the location exists and is "
            f"{'writable' if action == 'write' else 'readable'}, and for object stores the bucket name and "
            "the credentials (storage_options or the environment)"
        ) from e


def _arrays(url: str, group: zarr.Group, meta: Mapping[str, Any]) -> dict[str, zarr.Array]:
    """Every array of the layout, checked to hold at least the committed lengths."""
    arrays: dict[str, zarr.Array] = {}
    for name in (*ROW_COLUMNS, TOKEN_IDS):
        try:
            array = group[name]
        except KeyError:
            raise OutputError(f"{url} is damaged: the array {name!r} is missing; start over: {OVERWRITE}") from None
        committed = meta["tokens"] if name == TOKEN_IDS else meta["rows"]
        if array.shape[0] < committed:
            raise OutputError(f"{url} is damaged: {name!r} holds {array.shape[0]} of {committed} committed "
                              f"entries; start over: {OVERWRITE}")
        arrays[name] = array
    return arrays


# -- writing -----------------------------------------------------------------------------------


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
    if finish not in _FINISH_REASONS:
        raise ValueError(f"record {rid!r}: finish_reason must be one of {_FINISH_REASONS}, got {finish!r}")
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

    def __init__(self, url: str, group: zarr.Group, meta: dict[str, Any], arrays: dict[str, zarr.Array]):
        self.url = url
        self._group = group
        self._meta = meta
        self._arrays = arrays
        self._chunk_rows = arrays["id"].chunks[0]
        self._committed_ids = {str(i) for i in arrays["id"][: meta["rows"]]}
        self._buffer: list[_Row] = []
        self._buffered_ids: set[str] = set()

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
    ) -> ZarrSink:
        """Create the output at ``url``, or reopen it to continue.

        ``storage_options`` are keyed by protocol.  An existing output must come from the
        same spec ``fingerprint`` and ``model`` unless ``force`` (which records the new
        ones); ``overwrite`` replaces whatever is at ``url``.  Reopening discards anything
        written after the last commit.  ``chunk_rows`` (rows per chunk and per commit)
        applies to a new output; an existing one keeps its own.
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        run = json.loads(json.dumps({"fingerprint": fingerprint, "model": model, "spec": spec,
                                     "sampling": sampling}))
        location = _Location.parse(url, storage_options)
        with _storage_access(url, "write"):
            meta = None if overwrite else location.existing_meta()
            if meta is None:
                return cls._create(location, run, chunk_rows)
            _check_same_run(url, meta, run, force)
            group = zarr.open_group(location.store(read_only=False), mode="r+")
            arrays = _arrays(url, group, meta)
            for name, array in arrays.items():
                committed = meta["tokens"] if name == TOKEN_IDS else meta["rows"]
                if array.shape[0] > committed:  # a commit cut short by a crash
                    array.resize((committed,))
            meta.update(run)
            group.update_attributes({"glinthawk": meta})  # unchanged without force; proves we may write
        return cls(url, group, meta, arrays)

    @classmethod
    def _create(cls, location: _Location, run: dict[str, Any], chunk_rows: int) -> ZarrSink:
        now = _now()
        meta = {"format": FORMAT, "rows": 0, "tokens": 0, **run, "version": _package_version(),
                "created": now, "updated": now, "errors": 0}
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
        return cls(location.url, group, meta, arrays)

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
        return committed

    def flush(self) -> int:
        """Commit every buffered row (the last chunk may stay partial); returns the rows committed."""
        n = len(self._buffer)
        if n:
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

    def _commit(self, n: int) -> None:
        """Commit the first ``n`` buffered rows; nothing changes in memory unless it succeeds."""
        batch = self._buffer[:n]
        columns = _columns(batch, self.tokens)
        for name, values in columns.items():  # (1) data, invisible: beyond the persisted shapes
            if len(values):
                _write_beyond(self._arrays[name], self.tokens if name == TOKEN_IDS else self.rows, values)
        rows, tokens = self.rows + n, self.tokens + len(columns[TOKEN_IDS])
        for name, array in self._arrays.items():  # (2) shapes
            array.resize((tokens if name == TOKEN_IDS else rows,))
        errors = self.n_errors + int(np.count_nonzero(columns["finish_reason"] == FINISH_ERROR))
        meta = {**self._meta, "rows": rows, "tokens": tokens, "errors": errors, "updated": _now()}
        self._group.update_attributes({"glinthawk": meta})  # (3) the commit point
        self._meta = meta
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


# -- reading -----------------------------------------------------------------------------------


def read_output(url: str, *, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> OutputTable:
    """Open the output at ``url`` for reading: its committed rows only."""
    location = _Location.parse(url, storage_options)
    with _storage_access(url, "read"):
        meta = location.existing_meta()
        if meta is None:
            raise OutputError(f"there is no glinthawk output at {url}")
        group = zarr.open_group(location.store(read_only=True), mode="r")
        return OutputTable(url, meta, _arrays(url, group, meta))


class OutputTable:
    """The committed rows of an output, read from Zarr on demand.

    ``attrs`` is the ``glinthawk`` attribute dict; ``columns`` loads the per-row arrays
    whole; :meth:`batches` and :meth:`records` stream one row chunk at a time.
    """

    def __init__(self, url: str, attrs: dict[str, Any], arrays: dict[str, zarr.Array]):
        self.url = url
        self.attrs = attrs
        self._arrays = arrays

    def __len__(self) -> int:
        return self.attrs["rows"]

    def __repr__(self) -> str:
        return f"OutputTable({self.url!r}, rows={len(self)}, model={self.attrs.get('model')!r})"

    @cached_property
    def columns(self) -> dict[str, np.ndarray]:
        """Every per-row array (not the flat token ids: see :meth:`token_ids`), committed rows only."""
        return self._read(ROW_COLUMNS, 0, len(self))

    def token_ids(self, i: int) -> list[int]:
        """The completion token ids of row ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        start = int(self._arrays[OFFSETS][i])
        return self._arrays[TOKEN_IDS][start : start + int(self._arrays["completion_tokens"][i])].tolist()

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The committed rows a row chunk at a time: the per-row arrays, plus ``completion_token_ids``
        holding the batch's ids end to end, with ``completion_offsets`` counted from its start."""
        size = self._arrays["id"].chunks[0]
        for start in range(0, len(self), size):
            batch = self._read(ROW_COLUMNS, start, min(start + size, len(self)))
            first = int(batch[OFFSETS][0])
            last = int(batch[OFFSETS][-1] + batch["completion_tokens"][-1])
            batch[TOKEN_IDS] = self._arrays[TOKEN_IDS][first:last]
            batch[OFFSETS] = batch[OFFSETS] - first
            yield batch

    def records(self) -> Iterator[dict[str, Any]]:
        """The committed rows as JSON-able records (the shape :meth:`ZarrSink.append` takes).

        ``error`` and unknown timings are None; a prompt stored as JSON is decoded.
        """
        for batch in self.batches():
            for j in range(len(batch["id"])):
                yield _record(batch, j)

    def to_pandas(self) -> Any:
        """The committed rows as a ``pandas.DataFrame``, with the columns of :meth:`records`
        (``error`` None when there is none; unknown timings NaN).  Loads the whole output."""
        import pandas as pd

        c = self.columns
        flat = self._arrays[TOKEN_IDS][: self.attrs["tokens"]]
        return pd.DataFrame({
            "id": c["id"].tolist(),
            "prompt": [json.loads(p) if j else p for p, j in zip(c["prompt"].tolist(), c["prompt_is_json"])],
            "completion": c["completion"].tolist(),
            TOKEN_IDS: [flat[o : o + n].tolist() for o, n in zip(c[OFFSETS], c["completion_tokens"])],
            "finish_reason": c["finish_reason"].tolist(),
            "error": [e or None for e in c["error"].tolist()],
            "prompt_tokens": c["prompt_tokens"].astype(np.int64),
            "completion_tokens": c["completion_tokens"].astype(np.int64),
            "time_to_first_token": c["time_to_first_token"].astype(np.float64),
            "time_per_token": c["time_per_token"].astype(np.float64),
        })

    def summary(self) -> dict[str, Any]:
        """Row and token counts, finish reasons, mean timings (None when unknown)."""
        c = self._read(["finish_reason", "prompt_tokens", "completion_tokens", "time_to_first_token",
                        "time_per_token"], 0, len(self))
        reasons = Counter(str(r) for r in c["finish_reason"])
        return {
            "rows": len(self),
            "errors": reasons.get(FINISH_ERROR, 0),
            "prompt_tokens": int(c["prompt_tokens"].sum(dtype=np.int64)),
            "completion_tokens": int(c["completion_tokens"].sum(dtype=np.int64)),
            "finish_reasons": dict(reasons),
            "mean_time_to_first_token": _mean(c["time_to_first_token"]),
            "mean_time_per_token": _mean(c["time_per_token"]),
        }

    def _read(self, names: Iterable[str], start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: self._arrays[name][start:stop] for name in names}


def _record(batch: Mapping[str, np.ndarray], j: int) -> dict[str, Any]:
    """Row ``j`` of a batch from :meth:`OutputTable.batches` as a record."""
    start, n = int(batch[OFFSETS][j]), int(batch["completion_tokens"][j])
    prompt = str(batch["prompt"][j])
    return {
        "id": str(batch["id"][j]),
        "prompt": json.loads(prompt) if batch["prompt_is_json"][j] else prompt,
        "completion": str(batch["completion"][j]),
        "completion_token_ids": batch[TOKEN_IDS][start : start + n].tolist(),
        "finish_reason": str(batch["finish_reason"][j]),
        "error": str(batch["error"][j]) or None,
        "prompt_tokens": int(batch["prompt_tokens"][j]),
        "completion_tokens": n,
        "time_to_first_token": _optional(batch["time_to_first_token"][j]),
        "time_per_token": _optional(batch["time_per_token"][j]),
    }


def _optional(seconds: np.floating) -> float | None:
    return None if math.isnan(seconds) else float(seconds)


def _mean(seconds: np.ndarray) -> float | None:
    known = seconds[~np.isnan(seconds)]
    return float(known.mean()) if len(known) else None
