"""Exporting an output to JSON Lines or Parquet, a row chunk at a time.

JSON Lines: one record per line, as :meth:`OutputTable.records` gives them (unknown
timings and absent errors as null).  Parquet: one row group per row chunk, with the
records' columns, ``completion_token_ids`` as ``list<int32>``, plus
``prompt_is_json`` since ``prompt`` holds the stored text (JSON for chat messages and
token-id lists).
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import FIELD_DTYPES, OFFSETS, TOKEN_IDS, OutputError
from .table import OutputTable, read_output
from .spec import options_for

__all__ = ["FORMATS", "PARQUET_SCHEMA", "export_output", "format_of"]

FORMATS = ("jsonl", "parquet")
#: file name endings of each format (before a compression suffix, for JSON Lines)
_ENDINGS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}

_ARROW_TYPES = {str: pa.string(), "int32": pa.int32(), "float32": pa.float32()}


def _parquet_schema() -> pa.Schema:
    columns = []
    for name, dtype in FIELD_DTYPES.items():
        columns.append((name, pa.list_(pa.int32()) if name == TOKEN_IDS else _ARROW_TYPES[dtype]))
        if name == "prompt":
            columns.append(("prompt_is_json", pa.bool_()))
    return pa.schema(columns)


#: the Parquet columns: the fields of a row (``error`` and unknown timings null), with
#: ``prompt_is_json`` after ``prompt``
PARQUET_SCHEMA = _parquet_schema()


def format_of(dest: str) -> tuple[str | None, str | None]:
    """``(format, compression)`` that ``dest``'s name ends in (``out.jsonl.gz``:
    ``("jsonl", "gzip")``); None for either it does not name."""
    name = dest.rstrip("/").rsplit("/", 1)[-1].lower()
    compression = fsspec.utils.infer_compression(name)
    if compression is not None:
        name = name.rsplit(".", 1)[0]
    ending = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    return _ENDINGS.get(ending), compression


def export_output(
    url: str,
    dest: str,
    to: str | None = None,
    *,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    dest_storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    stdout: BinaryIO | None = None,
) -> int:
    """Write the committed rows of the output at ``url`` to ``dest`` (an fsspec URL) as ``to``.

    ``to`` defaults to the format ``dest``'s name ends in (``.jsonl``, ``.parquet``, ...;
    JSON Lines otherwise); a name ending in the other format is refused.  JSON Lines are
    compressed as the name says (``.jsonl.gz``).  Both option mappings are keyed by
    protocol, like the pipeline's.  A ``dest`` that exists is refused unless
    ``overwrite`` (it may be the very input the output was made from); ``"-"`` writes
    to ``stdout`` (a binary stream).  Returns the rows written.
    """
    named, compression = format_of(dest)
    to = to or named or "jsonl"
    if to not in FORMATS:
        raise OutputError(f"unknown export format {to!r}: choose one of {', '.join(FORMATS)}")
    if named is not None and named != to:
        raise OutputError(f"{dest} is named as {named} but the export is asked as {to}: name it for {to} or "
                          f"ask for {named}")
    if compression is not None and to == "parquet":
        raise OutputError(f"{dest}: Parquet compresses its own columns; drop the .{dest.rsplit('.', 1)[-1]} ending")
    table = read_output(url, storage_options=storage_options)
    if dest == "-":
        if stdout is None:
            raise OutputError('"-" writes to standard output: give the stream to write to')
        (_write_jsonl if to == "jsonl" else _write_parquet)(table, stdout)
        stdout.flush()
        return len(table)
    try:
        opened = fsspec.open(dest, "wb", compression=compression, **options_for(dest, dest_storage_options))
        if not overwrite and opened.fs.exists(opened.path):
            raise OutputError(f"{dest} exists: name another destination, or replace it (`glinthawk export "
                              "--overwrite`, overwrite=True)")
        f = opened.open()
    except OSError as e:
        raise OutputError(f"cannot write {dest} ({type(e).__name__}: {e}): check that its directory or "
                          "bucket exists and is writable") from e
    try:
        with f:
            (_write_jsonl if to == "jsonl" else _write_parquet)(table, f)
    except OSError as e:  # (a full disk, a store that went away: the output is untouched)
        raise OutputError(f"cannot write {dest} ({type(e).__name__}: {e}): what it holds is incomplete; make "
                          "room (or fix access) and export again") from e
    return len(table)


def _write_jsonl(table: OutputTable, f: BinaryIO) -> None:
    f.writelines(json.dumps(r, ensure_ascii=False, allow_nan=False).encode() + b"\n" for r in table.records())


def _write_parquet(table: OutputTable, f: BinaryIO) -> None:
    with pq.ParquetWriter(f, PARQUET_SCHEMA) as writer:
        for batch in table.batches():
            writer.write_table(_arrow_table(batch))


def _arrow_table(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """A batch of :meth:`OutputTable.batches` as an Arrow table of :data:`PARQUET_SCHEMA`."""
    ends = np.append(batch[OFFSETS], batch[OFFSETS][-1] + batch["completion_tokens"][-1]).astype(np.int32)
    columns = {
        TOKEN_IDS: pa.ListArray.from_arrays(ends, pa.array(batch[TOKEN_IDS], type=pa.int32())),
        "error": pa.array(batch["error"], type=pa.string(), mask=batch["error"] == ""),
    }
    for name in ("time_to_first_token", "time_per_token"):
        columns[name] = pa.array(batch[name], type=pa.float32(), mask=np.isnan(batch[name]))
    return pa.table(
        [columns[f.name] if f.name in columns else pa.array(batch[f.name], type=f.type) for f in PARQUET_SCHEMA],
        schema=PARQUET_SCHEMA,
    )
