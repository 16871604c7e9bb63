"""The output of a pipeline: one Zarr v3 group, written exactly once per row, crash-safe.

This module holds what the writer (:mod:`.sink`) and the reader (:mod:`.table`) share:
the layout, the location and its errors.

Layout (every array 1-D, readable by plain ``zarr.open_group``; dimension names for xarray)::

    id, prompt, completion, finish_reason, error        str      [row]
    prompt_is_json                                       bool     [row]  prompt holds JSON text
    prompt_tokens, completion_tokens                     int32    [row]
    time_to_first_token, time_per_token                  float32  [row]  seconds, NaN when unknown
    completion_offsets                                   int64    [row]  start of the row's ids
    completion_token_ids                                 int32    [token] every row's ids, end to end

Group attribute ``glinthawk`` describes the run (fingerprint, model, spec, sampling, ...) and
holds ``rows`` and ``tokens``: the committed lengths (and ``complete_inputs``, once a run has
committed every row of its inputs: see :meth:`.sink.ZarrSink.mark_complete`; ``recoveries``
and ``recoveries_total``, once a run writing it has lost a worker and gone on: see
:meth:`.sink.ZarrSink.record_recoveries`; ``writer``, the run that opened it to write last,
the only one whose commits are taken).  A commit (1) writes the new rows'
chunks beyond the arrays' persisted shapes, where no reader looks, (2) grows every array's
shape (metadata only), (3) rewrites the group attributes: that single write is the commit
point.  Reopening cuts every array back to the committed lengths, so a crash anywhere
leaves no half row behind.  Readers use ``rows``/``tokens``, never the arrays' shapes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.errors import ContainsArrayError
from zarr.storage import FsspecStore, LocalStore

from ..engine.request import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP
from ..errors import GlinthawkError
from .spec import options_for

__all__ = [
    "FORMAT", "FIELD_DTYPES", "ROW_COLUMNS", "TOKEN_CHUNK", "TOKEN_IDS", "OFFSETS", "OVERWRITE",
    "FINISH_REASONS", "OutputError", "Location", "storage_access", "committed_arrays",
]

#: version of the layout above, stored in the attributes
FORMAT = 1
#: token ids per chunk of ``completion_token_ids``
TOKEN_CHUNK = 65536

TOKEN_IDS = "completion_token_ids"
OFFSETS = "completion_offsets"
#: how every field of a row (:data:`~glinthawk_dask.engine.request.ROW_FIELDS`) is stored (``str``: Zarr's variable-length UTF-8 strings)
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
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ERROR)
#: how to replace an output, from Python and from the command line
OVERWRITE = "pass overwrite=True (--overwrite on the command line)"


class OutputError(GlinthawkError):
    """The output location cannot be used: not writable, started by another spec, not a glinthawk output."""


# -- the location ----------------------------------------------------------------------------


@dataclass
class Location:
    """An output URL: a synchronous filesystem to inspect it, and Zarr stores on it."""

    url: str
    options: dict[str, Any]
    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def parse(cls, url: str, storage_options: Mapping[str, Mapping[str, Any]] | None) -> Location:
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
def storage_access(url: str, action: str) -> Iterator[None]:
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


def committed_arrays(url: str, group: zarr.Group, meta: Mapping[str, Any]) -> dict[str, zarr.Array]:
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
