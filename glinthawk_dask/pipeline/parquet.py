"""Parquet input: a big file read as ranges of its row groups, one Dask task each.

A Parquet file says in its footer how many rows and how many uncompressed bytes each
row group holds, so a file bigger than the input's ``blocksize`` becomes shards of
consecutive row groups of about that many bytes.  Each task then holds one range's
rows, not the whole file's, and the CPU workers tokenize the ranges side by side.  A
row's position (which ids made up for rows without one are built from) is its index in
the file, however the file is cut, so the ids do not depend on the ``blocksize``.

Only the columns a row is built from are read (Parquet stores each column apart): a
dataset's other columns, long documents or embeddings, cost neither the read nor the
memory.  The ids made up for rows without one hash the whole row, so a range where the
id column is missing or null somewhere is read whole, as before.
"""

from __future__ import annotations

import contextlib
from typing import IO, Any, Collection, Iterator

__all__ = ["parquet_records", "row_group_ranges", "shard_records"]


def row_group_ranges(f: IO[bytes], blocksize: int, url: str) -> list[tuple[int, int]]:
    """``(first row group, row groups)`` ranges of the Parquet file ``f`` (at ``url``),
    each of the fewest consecutive row groups that reach ``blocksize`` uncompressed bytes
    (the last may hold fewer); one range for a file of one row group."""
    import pyarrow.parquet as pq

    with _readable(url):
        meta = pq.ParquetFile(f).metadata  # reads the footer alone
    ranges: list[tuple[int, int]] = []
    first, size = 0, 0
    for i in range(meta.num_row_groups):
        size += meta.row_group(i).total_byte_size
        if size >= blocksize:
            ranges.append((first, i + 1 - first))
            first, size = i + 1, 0
    if first < meta.num_row_groups or not ranges:
        ranges.append((first, meta.num_row_groups - first))
    return ranges


def parquet_records(
    f: IO[bytes], url: str, key: str, groups: tuple[int, int] | None,
    columns: Collection[str] | None = None, id_column: str = "id",
) -> Iterator[tuple[int, str, Any]]:
    """``(row index in the file, where, row as plain Python)`` of the rows of ``groups``
    (``(first, count)`` row groups; None: the whole file), with only the ``columns`` the
    file has of those given (None: all) when every row of the range has an id in
    ``id_column``."""
    import pyarrow.parquet as pq

    with _readable(url):
        pf = pq.ParquetFile(f)
        if groups is None:
            first, chosen = 0, list(range(pf.metadata.num_row_groups))
        else:
            first, chosen = groups[0], list(range(groups[0], groups[0] + groups[1]))
        index = sum(pf.metadata.row_group(i).num_rows for i in range(first))
        names = pf.schema_arrow.names
        read = None
        if columns is not None and id_column in names and not _nulls(pf, chosen, id_column):
            read = [name for name in names if name in columns]
        for batch in pf.iter_batches(row_groups=None if groups is None else chosen, columns=read):
            for row in batch.to_pylist():
                yield index, f"{key} row {index}", row
                index += 1


def shard_records(f: IO[bytes], shard: Any, columns: Collection[str] | None = None,
                  id_column: str = "id") -> Iterator[tuple[int, str, Any]]:
    """:func:`parquet_records` of a :class:`~.sources.Shard` (its row groups)."""
    groups = None if shard.length is None else (shard.offset, shard.length)
    return parquet_records(f, shard.url, shard.key, groups, columns, id_column)


def _nulls(pf: Any, groups: list[int], name: str) -> bool:
    """Whether column ``name`` holds a null in any of the row ``groups``: from the
    footer's statistics where every group has them, else by reading that column alone."""
    meta = pf.metadata
    leaf = next((j for j in range(len(pf.schema)) if pf.schema.column(j).path == name), None)  # a flat column
    if leaf is not None:
        stats = [meta.row_group(g).column(leaf).statistics for g in groups]
        if all(st is not None and st.has_null_count for st in stats):
            return any(st.null_count for st in stats)
    return pf.read_row_groups(groups, columns=[name]).column(0).null_count > 0


@contextlib.contextmanager
def _readable(url: str) -> Iterator[None]:
    """Arrow's errors as what they mean to the user: the file is not Parquet (or is damaged)."""
    import pyarrow as pa

    from .sources import InputError

    try:
        yield
    except pa.ArrowException as e:
        raise InputError(f"cannot read {url}: not a readable Parquet file ({e})") from e
