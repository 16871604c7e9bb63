"""Input sources: find the files of a dataset and read them as prompt rows.

:func:`list_shards` expands URLs and globs on any fsspec filesystem (local paths,
``s3://``, ``gs://``, ``memory://``...) into shards, the units that Dask tasks read
(:class:`Shard`); :func:`read_shard` reads one into canonical prompt rows (see
:mod:`glinthawk_dask.prompts`), mapping input columns to the canonical fields and
optionally building the prompt from a template.

Big uncompressed line files (``jsonl``, ``text`` in line mode) are split into byte
ranges.  A range owns every line that *starts* inside it: its reader skips the partial
first line (it belongs to the range before) and reads past its end to finish its last
line, so every line is read exactly once.

Rows without an id get ``"{key}:{pos}-{hash}"``: ``key`` is the file's path relative
to the input's common directory (so it does not depend on the bucket or the mount),
``pos`` the line's byte offset in the decompressed file (the row index for csv and
parquet) and ``hash`` 12 hex digits of the SHA-256 of the row.  Byte offsets rather
than line numbers keep the id the same however the file is split.

Problems with the input itself (no matching file, missing bucket, bad credentials,
unreachable endpoint) raise :class:`InputError` saying what to fix; a bad record
becomes an :class:`~glinthawk_dask.prompts.UndecodableRow` in its place.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import itertools
import json
import posixpath
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol
from fsspec.utils import infer_compression

from ..errors import GlinthawkError
from ..prompts import UndecodableRow, stable_row_id
from ..sampling import SamplingParams
from .parquet import row_group_ranges, shard_records
from .spec import FORMATS, options_for
from .versions import file_version

__all__ = ["FORMATS", "TEXT_MODES", "InputError", "Shard", "list_shards", "read_shard"]

TEXT_MODES = ("line", "file")

# Canonical row fields, each read from the input column of the same name unless mapped.
_CONTENT_FIELDS = ("prompt", "messages", "prompt_token_ids")
_SAMPLING_FIELDS = SamplingParams.field_names()
_FIELDS = ("id", *_CONTENT_FIELDS, *_SAMPLING_FIELDS)
# CSV cells are text: these fields are parsed as JSON when they can be ("64", "[1, 2]").
_CSV_JSON_FIELDS = frozenset(("messages", "prompt_token_ids", *_SAMPLING_FIELDS))

_CREDENTIAL_ENV = {
    "s3": "AWS_* environment variables",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS",
    "az": "AZURE_STORAGE_* environment variables",
    "abfs": "AZURE_STORAGE_* environment variables",
}
_LOCAL_PROTOCOLS = ("file", "local", "memory")
_DOUBLE_STAR = re.compile(r"(^|/)\*\*(?=[^/])")  # "x/**.jsonl": fsspec wants "x/**/*.jsonl"
_READ_CHUNK = 2**16


class InputError(GlinthawkError):
    """The input of a pipeline cannot be listed or read; the message says what to fix.
    ``missing``: the file was not found (kept when the error is pickled back from a worker)."""

    missing = False


@dataclass(frozen=True)
class Shard:
    """One unit of input read by one Dask task.

    ``url`` is the file's full fsspec URL; ``key`` its path relative to the common
    directory of the input, used in row ids.  ``compression`` is an fsspec codec name
    (None: none).  ``offset`` and ``length`` select a byte range of an uncompressed
    line file, or the first row group and the number of row groups of a Parquet file
    (``length`` None: to the end); ``text_mode`` says whether a ``text`` file holds a
    prompt per line or is one prompt.
    """

    index: int
    url: str
    key: str
    format: str
    compression: str | None
    offset: int = 0
    length: int | None = None
    text_mode: str = "line"
    version: str | None = None  # the file's version as listed (None: its store gives none)

    @property
    def splittable(self) -> bool:
        """Whether the file may be cut into byte ranges: uncompressed lines."""
        lines = self.format == "jsonl" or (self.format == "text" and self.text_mode == "line")
        return lines and self.compression is None


# -- listing ------------------------------------------------------------------------------


def list_shards(
    urls: Sequence[str],
    *,
    format: str,
    compression: str | None = "infer",
    text_mode: str = "line",
    blocksize: int | None = 64 * 2**20,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Shard]:
    """The shards of the files that ``urls`` (URLs, globs or directories) name.

    Files come in the order of ``urls``, each glob or directory sorted, duplicates
    dropped.  ``compression="infer"`` picks a codec by file extension.  Uncompressed
    line files bigger than ``blocksize`` bytes are split into ranges of about that
    size, Parquet files into ranges of row groups of about that many uncompressed bytes
    (None: never split); other files are one shard each.  ``storage_options``
    maps a protocol (``"s3"``) to the options of its filesystem.

    Raises :class:`InputError` when an option is invalid or a URL matches no file or
    cannot be listed.
    """
    if isinstance(urls, str):
        urls = [urls]
    _check_options(urls, format, compression, text_mode, blocksize)
    files: dict[str, tuple[Any, str, dict]] = {}  # URL -> (filesystem, path, listed info)
    for url in urls:
        for fs, path, info in _expand(url, storage_options):
            files.setdefault(fs.unstrip_protocol(path), (fs, path, info))
    root = posixpath.commonpath([posixpath.dirname(p.lstrip("/")) for _, p, _ in files.values()])
    shards: list[Shard] = []
    for url, (fs, path, info) in files.items():
        key = path.lstrip("/")[len(root):].lstrip("/")
        codec = infer_compression(path) if compression == "infer" else compression
        size, version = info.get("size"), file_version(info)
        shard = Shard(len(shards), url, key, format, codec, text_mode=text_mode, version=version)
        if shard.splittable and blocksize is not None and size is not None and size > blocksize:
            for offset, length in _ranges(size, blocksize):
                shards.append(Shard(len(shards), url, key, format, None, offset, length, text_mode, version))
        elif format == "parquet" and blocksize is not None and size is not None and size > blocksize:
            with _storage_errors("read", url), fs.open(path, "rb") as f:
                ranges = row_group_ranges(f, blocksize, url)
            shards += [Shard(len(shards) + i, url, key, format, None, first, n, text_mode, version)
                       for i, (first, n) in enumerate(ranges)]
        else:
            shards.append(shard)
    return shards


def _check_options(
    urls: Sequence[str], format: str, compression: str | None, text_mode: str, blocksize: int | None
) -> None:
    if not urls:
        raise InputError("no input given: name at least one URL, glob or directory")
    if format not in FORMATS:
        raise InputError(f"unknown input format {format!r}; use one of {', '.join(FORMATS)}")
    codecs_ = [c for c in fsspec.available_compressions() if c]
    if compression not in (None, "infer", *codecs_):
        raise InputError(f"unknown compression {compression!r}; use infer, None or one of {', '.join(codecs_)}")
    if text_mode not in TEXT_MODES:
        raise InputError(f"unknown text mode {text_mode!r}; use line or file")
    if blocksize is not None and (not isinstance(blocksize, int) or blocksize < 1):
        raise InputError(f"blocksize must be a positive number of bytes or None, not {blocksize!r}")


def _ranges(size: int, blocksize: int) -> list[tuple[int, int]]:
    """(offset, length) of ``ceil(size / blocksize)`` near-equal ranges covering ``size`` bytes."""
    n = -(-size // blocksize)
    bounds = [size * i // n for i in range(n + 1)]
    return [(a, b - a) for a, b in itertools.pairwise(bounds)]


def _expand(url: str, storage_options: Mapping[str, Mapping[str, Any]] | None) -> list[tuple[Any, str, dict]]:
    """(filesystem, path, listed info) of each file that ``url`` names, sorted by path."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    except (ImportError, ValueError, TypeError) as e:  # unknown protocol, missing package, bad option
        raise InputError(f"cannot open {url}: {e}") from e
    with _storage_errors("list", url):
        fs.invalidate_cache()  # a long-lived filesystem instance may hold a stale listing
        if _has_magic(path):
            try:
                found = fs.glob(_DOUBLE_STAR.sub(r"\1**/*", path), detail=True)
            except ValueError as e:
                raise InputError(f"invalid glob {url}: {e}") from e
        else:
            try:
                info = fs.info(path)
            except FileNotFoundError:
                found = {}
            else:
                found = {path: info}
                if info["type"] == "directory":  # all files under it, but not _SUCCESS, .crc...
                    found = {p: i for p, i in fs.find(path, detail=True).items()
                             if not _hidden(p[len(path):])}
        files = sorted(((p, i) for p, i in found.items() if i["type"] == "file"), key=lambda f: f[0])
        if not files:
            missing = _missing_ancestor(fs, path)
            why = f": {fs.unstrip_protocol(missing)} does not exist" if missing else ""
            raise InputError(f"no file matches {url}{why}; check the path, the pattern and the bucket name")
    return [(fs, p, info) for p, info in files]


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _hidden(relpath: str) -> bool:
    return any(part[:1] in (".", "_") for part in relpath.split("/"))


def _missing_ancestor(fs: Any, path: str) -> str | None:
    """The top-most missing directory (or file) on the literal part of ``path``."""
    literal = path
    if _has_magic(path):
        literal = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0]
    missing = None
    while literal and not fs.exists(literal):
        missing = literal
        parent = posixpath.dirname(literal.rstrip("/"))
        if parent == literal:
            break
        literal = parent
    return missing


# -- storage options and errors -----------------------------------------------------------


def _protocol(url: str) -> str:
    return split_protocol(url)[0] or "file"


@functools.cache
def _storage_error_types() -> tuple[type[BaseException], ...]:
    """What filesystems raise for missing files, denied access or unreachable services."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError, EOFError)
    return (OSError, EOFError, BotoCoreError, ClientError)


@contextmanager
def _storage_errors(action: str, url: str) -> Iterator[None]:
    """Turn a filesystem's exceptions into an :class:`InputError` that says what to fix."""
    try:
        yield
    except _storage_error_types() as e:
        error = InputError(f"cannot {action} {url}: {_explain(e, _protocol(url))}")
        error.missing = isinstance(e, FileNotFoundError)
        raise error from e


def _explain(error: BaseException, protocol: str) -> str:
    # Classes are matched by name so that botocore, aiohttp and the builtins (which all
    # have a "ConnectionError") are recognized without importing them.
    names = {cls.__name__ for cls in type(error).__mro__}
    detail = str(error) or type(error).__name__
    remote = protocol not in _LOCAL_PROTOCOLS
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        what = "no credentials found"
    elif isinstance(error, PermissionError):
        what = f"access denied ({detail})"
    else:
        what = None
    if what is not None:
        if not remote:
            return f"{what}; check the file permissions"
        env = _CREDENTIAL_ENV.get(protocol)
        return f"{what}; check the credentials in storage_options.{protocol}" + (f" or {env}" if env else "")
    if names & {"ConnectionError", "TimeoutError", "ConnectTimeoutError", "ClientConnectorError"}:
        return (f"cannot reach the storage service ({detail}); check endpoint_url in "
                f"storage_options.{protocol} and the network")
    if isinstance(error, FileNotFoundError):
        return f"not found ({detail})"
    return detail


# -- reading ------------------------------------------------------------------------------


def read_shard(
    shard: Shard,
    *,
    fields: Mapping[str, Any] | None = None,
    template: str | None = None,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any] | UndecodableRow]:
    """The canonical prompt rows of one shard, in file order.

    ``fields`` maps canonical fields (``id``, ``prompt``, ``messages``,
    ``prompt_token_ids`` and the sampling fields) to input columns; unmapped fields
    are read from columns of their own name.  ``template`` (a :meth:`str.format`
    string such as ``"Summarize: {text}"``) builds the prompt from all of a record's
    columns instead.  A row holds ``id`` and the canonical fields that are present and
    not None.  A record that cannot be decoded or used becomes an
    :class:`UndecodableRow` naming the file and the line, byte or row.  ``text``
    records are ``{"prompt": ...}`` and ignore ``fields``.
    """
    if shard.format not in FORMATS:
        raise InputError(f"unknown input format {shard.format!r}; use one of {', '.join(FORMATS)}")
    mapping = _field_mapping(None if shard.format == "text" else fields)
    named = _check_template(template) if template is not None else set()
    opts = options_for(shard.url, storage_options)
    reader = functools.partial(_READERS[shard.format], shard=shard)
    if shard.format == "parquet":  # only the columns rows are built from
        reader = functools.partial(reader, columns={*mapping.values(), *named}, id_column=mapping["id"])
    with _storage_errors("read", shard.url), fsspec.open(shard.url, "rb", compression=shard.compression, **opts) as f:
        records = list(reader(f))
    return [
        _canonical(record, pos, where, shard.key, mapping, template, shard.format == "csv")
        for pos, where, record in records
    ]


def _field_mapping(fields: Mapping[str, Any] | None) -> dict[str, str]:
    mapping = {name: name for name in _FIELDS}
    for name, column in (fields or {}).items():
        if name not in mapping:
            raise InputError(f"unknown field {name!r} in the field mapping; use {', '.join(_FIELDS)}")
        if not isinstance(column, str):
            raise InputError(f"fields.{name} must be a column name, not {column!r}")
        mapping[name] = column
    return mapping


def _check_template(template: str) -> set[str]:  # the columns it names ({doc.title}: doc)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise InputError(f"invalid template {template!r}: {e}; write {{{{ and }}}} for literal braces") from e
    if not names:
        raise InputError(f"the template {template!r} uses no field: name columns like {{text}}")
    if any(name == "" or name[0].isdigit() for name in names):
        raise InputError(f"the template {template!r} has positional fields: name columns like {{text}}")
    return {re.split(r"[.\[]", name, maxsplit=1)[0] for name in names}


def _stable_id(key: str, pos: int, content: Any) -> str:
    """The id of a row without one: its file key, position and a hash of its content."""
    if isinstance(content, bytes):
        return f"{key}:{pos}-{hashlib.sha256(content).hexdigest()[:12]}"
    return f"{key}:{stable_row_id(pos, content)}"


def _canonical(
    record: Any, pos: int, where: str, key: str, mapping: dict[str, str], template: str | None, cells: bool
) -> dict[str, Any] | UndecodableRow:
    """A record as a canonical row; ``cells``: values are CSV text, empty means absent."""
    if isinstance(record, UndecodableRow):
        return record
    original = record
    if isinstance(record, str):  # a JSON string is a prompt
        record, mapping = {"prompt": record}, _field_mapping(None)
    if not isinstance(record, Mapping):
        return UndecodableRow(
            _stable_id(key, pos, record),
            f"{where}: a row must be a string or an object, not {type(record).__name__}",
        )

    def value(name: str) -> Any:
        v = record.get(mapping[name])
        if cells and v == "":
            return None
        if cells and name in _CSV_JSON_FIELDS:
            try:
                return json.loads(v)
            except (TypeError, ValueError):
                return v
        return v

    rid = value("id")
    if rid is None:
        rid = _stable_id(key, pos, original)
    elif isinstance(rid, (str, int)) and not isinstance(rid, bool):
        rid = str(rid)
    row: dict[str, Any] = {"id": rid}
    if template is not None:
        try:
            row["prompt"] = template.format_map(record)
        except KeyError as e:
            message = f'template needs field "{e.args[0]}", which the row does not have'
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            message = f"template cannot be applied to this row ({e})"
        else:
            message = None
        if message is not None:
            return UndecodableRow(rid if isinstance(rid, str) else _stable_id(key, pos, original),
                                  f"{where}: {message}")
    for name in (() if template is not None else _CONTENT_FIELDS) + _SAMPLING_FIELDS:
        v = value(name)
        if v is not None:
            row[name] = v
    return row


# Readers yield (position, where, record): ``where`` locates the record in messages;
# a record that cannot be decoded is already an UndecodableRow.
_Records = Iterator[tuple[int, str, Any]]


def _lines(f: IO[bytes], shard: Shard) -> Iterator[tuple[int, str, bytes]]:
    """(byte offset, where, line without its end) of each non-blank line that starts in
    the shard's range."""
    start = max(shard.offset - 1, 0)
    f.seek(start)
    data = f.read() if shard.length is None else f.read(shard.offset + shard.length - start)
    begin = 0
    if shard.offset > 0:  # skip to the first line that starts at or after offset
        begin = data.find(b"\n") + 1
        if begin == 0:
            return
    if shard.length is not None and data and not data.endswith(b"\n"):  # finish the last line
        tail = []
        while chunk := f.read(_READ_CHUNK):
            end = chunk.find(b"\n")
            tail.append(chunk if end < 0 else chunk[: end + 1])
            if end >= 0:
                break
        data += b"".join(tail)
    lineno = 0
    while begin < len(data):
        end = data.find(b"\n", begin)
        end = len(data) if end < 0 else end + 1
        line, pos = data[begin:end].rstrip(b"\n").removesuffix(b"\r"), start + begin
        lineno, begin = lineno + 1, end
        if pos == 0:
            line = line.removeprefix(codecs.BOM_UTF8)
        if line.strip():
            yield pos, f"{shard.key} line {lineno}" if shard.offset == 0 else f"{shard.key} at byte {pos}", line


def _jsonl_records(f: IO[bytes], shard: Shard) -> _Records:
    for pos, where, line in _lines(f, shard):
        try:
            yield pos, where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield pos, where, UndecodableRow(_stable_id(shard.key, pos, line), f"{where}: not UTF-8 ({e.reason})")
        except json.JSONDecodeError as e:
            yield pos, where, UndecodableRow(_stable_id(shard.key, pos, line), f"{where}: not valid JSON ({e.msg})")


def _decode(raw: bytes, key: str) -> str | UndecodableRow:
    """A whole file as text, or the UndecodableRow that replaces it."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return UndecodableRow(_stable_id(key, 0, raw), f"{key}: not UTF-8 ({e.reason} at byte {e.start})")


def _text_records(f: IO[bytes], shard: Shard) -> _Records:
    if shard.text_mode == "file":
        text = _decode(f.read(), shard.key)
        yield 0, shard.key, text if isinstance(text, UndecodableRow) else {"prompt": text}
        return
    for pos, where, line in _lines(f, shard):
        try:
            yield pos, where, {"prompt": line.decode("utf-8")}
        except UnicodeDecodeError as e:
            yield pos, where, UndecodableRow(_stable_id(shard.key, pos, line), f"{where}: not UTF-8 ({e.reason})")


def _csv_records(f: IO[bytes], shard: Shard) -> _Records:
    text = _decode(f.read(), shard.key)
    if isinstance(text, UndecodableRow):
        yield 0, shard.key, text
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    index = 0
    try:
        for index, row in enumerate(reader):
            where = f"{shard.key} line {reader.line_num}"
            if None in row:  # more cells than the header has columns
                yield index, where, UndecodableRow(
                    _stable_id(shard.key, index, list(row.values())),
                    f"{where}: {len(row) - 1 + len(row[None])} cells but the header has {len(row) - 1} columns",
                )
            else:
                yield index, where, row
    except csv.Error as e:  # the parser cannot go on: the rest of the file is one bad row
        where = f"{shard.key} line {reader.line_num}"
        yield index, where, UndecodableRow(_stable_id(shard.key, index, str(e)), f"{where}: not valid CSV ({e})")


_READERS = {"jsonl": _jsonl_records, "text": _text_records, "csv": _csv_records, "parquet": shard_records}
