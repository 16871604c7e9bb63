"""Input sources: listing files into shards and reading them as canonical prompt rows.

Local files, ``memory://`` and S3 through a real moto server on loopback (s3fs).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import random
import pickle
import re
import socket
import urllib.request
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glinthawk_dask.errors import GlinthawkError
from glinthawk_dask.pipeline.sources import InputError, Shard, list_shards, read_shard
from glinthawk_dask.prompts import UndecodableRow


def read_all(urls, *, fields=None, template=None, storage_options=None, **kwargs) -> list:
    """Every row of every shard, in order."""
    shards = list_shards(urls, storage_options=storage_options, **kwargs)
    return [row for s in shards
            for row in read_shard(s, fields=fields, template=template, storage_options=storage_options)]


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def row_id(row) -> str:
    return row.id if isinstance(row, UndecodableRow) else row["id"]


def expected_id(key: str, pos: int, record) -> str:
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
    return f"{key}:{pos}-{hashlib.sha256(blob).hexdigest()[:12]}"


@pytest.fixture
def memdir():
    """A fresh ``memory://`` directory, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/sources-{uuid.uuid4().hex[:12]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# -- reading formats ----------------------------------------------------------------------


def test_jsonl_rows_ids_and_sampling_fields(tmp_path):
    records = [
        {"id": "a", "prompt": "x", "top_k": 3},
        {"prompt": "y", "max_tokens": 5, "temperature": None, "colour": "red"},
        "a bare string",
        {"id": 7, "messages": [{"role": "user", "content": "hi"}], "prompt_token_ids": [1, 2]},
    ]
    data = jsonl(*records)
    (tmp_path / "p.jsonl").write_bytes(data)
    [shard] = list_shards([str(tmp_path / "p.jsonl")], format="jsonl")
    assert shard.version is not None  # the listed mtime's: a rerun knows whether the file changed
    assert shard == Shard(0, f"file://{tmp_path}/p.jsonl", "p.jsonl", "jsonl", None, version=shard.version)
    rows = read_shard(shard)
    second, third = data.index(b"\n") + 1, data.index(b'"a bare')
    assert rows == [
        {"id": "a", "prompt": "x", "top_k": 3},
        {"id": expected_id("p.jsonl", second, records[1]), "prompt": "y", "max_tokens": 5},
        {"id": expected_id("p.jsonl", third, records[2]), "prompt": "a bare string"},
        {"id": "7", "messages": [{"role": "user", "content": "hi"}], "prompt_token_ids": [1, 2]},
    ]


def test_gzip_is_inferred_and_never_split(tmp_path):
    lines = [{"prompt": f"p{i}"} for i in range(50)]
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(jsonl(*lines)))
    shards = list_shards([str(tmp_path / "p.jsonl.gz")], format="jsonl", blocksize=16)
    assert [(s.compression, s.offset, s.length) for s in shards] == [("gzip", 0, None)]
    rows = read_shard(shards[0])
    assert [r["prompt"] for r in rows] == [f"p{i}" for i in range(50)]
    assert rows[1]["id"] == expected_id("p.jsonl.gz", len(jsonl(lines[0])), lines[1])  # decompressed offset
    [plain] = list_shards([str(tmp_path / "p.jsonl.gz")], format="jsonl", compression=None)
    assert plain.compression is None


def test_csv_header_cells_and_bad_rows(tmp_path):
    (tmp_path / "p.csv").write_text(
        'id,text,max_tokens,stop\r\n'
        'a,"hello, world",5,###\r\n'
        ',"multi\nline",,\r\n'
        'c,too,many,cells,here\r\n'
        'd,last,"[1]",\r\n',
        encoding="utf-8-sig",
    )
    rows = read_all([str(tmp_path / "p.csv")], format="csv", fields={"prompt": "text"})
    assert rows[0] == {"id": "a", "prompt": "hello, world", "max_tokens": 5, "stop": "###"}
    record = {"id": "", "text": "multi\nline", "max_tokens": "", "stop": ""}
    assert rows[1] == {"id": expected_id("p.csv", 1, record), "prompt": "multi\nline"}
    assert isinstance(rows[2], UndecodableRow)
    assert rows[2].message == "p.csv line 5: 5 cells but the header has 4 columns"
    assert rows[3] == {"id": "d", "prompt": "last", "max_tokens": [1]}  # the validator rejects it


def test_csv_not_utf8_is_one_bad_row(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"prompt\nok\n\xff\xfe\n")
    [row] = read_all([str(tmp_path / "p.csv")], format="csv")
    assert isinstance(row, UndecodableRow) and row.message.startswith("p.csv: not UTF-8")


def test_parquet_rows_as_plain_python(memdir):
    fs, root = memdir
    table = pa.table({
        "id": pa.array([1, None, 3], pa.int64()),
        "messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], None],
        "prompt": [None, None, "c"],
        "temperature": pa.array([0.5, None, 1.0], pa.float32()),
    })
    fs.pipe(f"{root}/t.parquet", parquet_bytes(table, row_group_size=2))
    rows = read_all([f"memory://{root}/t.parquet"], format="parquet")
    assert rows[0] == {"id": "1", "messages": [{"role": "user", "content": "a"}], "temperature": 0.5}
    assert type(rows[0]["temperature"]) is float
    assert rows[1]["id"] == expected_id("t.parquet", 1, table.to_pylist()[1])
    assert rows[2] == {"id": "3", "prompt": "c", "temperature": 1.0}


def test_a_big_parquet_file_is_read_as_ranges_of_row_groups(memdir):
    """Row groups of about ``blocksize`` uncompressed bytes per shard; every row once, in
    order, with the same made-up ids as a whole-file read."""
    fs, root = memdir
    table = pa.table({"prompt": [f"prompt number {i} " + "x" * (i % 7) for i in range(50)],
                      "max_tokens": pa.array([i % 5 + 1 for i in range(50)], pa.int64())})
    fs.pipe(f"{root}/t.parquet", parquet_bytes(table, row_group_size=6))  # 9 groups
    url = f"memory://{root}/t.parquet"
    whole = read_all([url], format="parquet", blocksize=None)
    meta = pq.ParquetFile(io.BytesIO(fs.cat(f"{root}/t.parquet"))).metadata
    group_bytes = meta.row_group(0).total_byte_size
    shards = list_shards([url], format="parquet", blocksize=2 * group_bytes)
    assert len(shards) > 2 and [(s.offset, s.length) for s in shards][0] == (0, 2)
    assert sum(s.length for s in shards) == meta.num_row_groups and [s.index for s in shards] == list(
        range(len(shards)))
    split = [row for s in shards for row in read_shard(s)]
    assert split == whole and len(split) == 50
    assert split[13]["id"] == expected_id("t.parquet", 13, table.to_pylist()[13])
    assert len(list_shards([url], format="parquet", blocksize=10 ** 9)) == 1  # smaller than blocksize: whole


class _Counting(io.BytesIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, n=-1):
        out = super().read(n)
        self.read_bytes += len(out)
        return out

    def readinto(self, b):
        n = super().readinto(b)
        self.read_bytes += n
        return n


@pytest.mark.parametrize("statistics", [True, False])
def test_parquet_reads_only_the_columns_rows_are_built_from(memdir, statistics):
    """A dataset's other columns (here a 100 KB document a row) are not read; a range
    where an id is null is read whole, so the id made up for that row hashes the whole
    row as before."""
    from glinthawk_dask.pipeline.parquet import parquet_records

    fs, root = memdir
    docs = [random.Random(i).randbytes(50_000).hex() for i in range(12)]
    ids = [f"r{i}" for i in range(12)]
    ids[9] = None  # in the third row group of four rows
    table = pa.table({"id": ids, "document": docs, "text": [f"question {i}" for i in range(12)],
                      "max_tokens": pa.array([i + 1 for i in range(12)], pa.int64())})
    data = parquet_bytes(table, row_group_size=4, write_statistics=statistics, compression="none")
    fs.pipe(f"{root}/t.parquet", data)
    url = f"memory://{root}/t.parquet"
    shards = list_shards([url], format="parquet", blocksize=1)  # one shard a row group
    assert len(shards) == 3
    rows = [row for s in shards for row in read_shard(s, template="Q: {text}")]
    full = table.to_pylist()
    assert rows == [{"id": ids[i] if ids[i] else expected_id("t.parquet", i, full[i]), "prompt": f"Q: question {i}",
                     "max_tokens": i + 1} for i in range(12)]

    def read(groups, columns):
        f = _Counting(data)
        records = list(parquet_records(f, url, "t.parquet", groups, columns=columns))
        return records, f.read_bytes

    projected, few = read((0, 1), {"id", "text", "max_tokens"})
    whole, every = read((0, 1), None)
    assert [r for _, _, r in projected] == [{k: r[k] for k in ("id", "text", "max_tokens")} for _, _, r in whole]
    assert every > 4 * 100_000 > 5 * few, (every, few)  # the documents left unread
    nulls, _ = read((2, 1), {"id", "text", "max_tokens"})
    assert [r for _, _, r in nulls] == full[8:]  # a null id: the range read whole
    assert [r for _, _, r in read(None, {"text"})[0]] == full  # no id column asked for: whole rows


def test_corrupt_parquet_is_an_input_error(memdir):
    fs, root = memdir
    fs.pipe(f"{root}/t.parquet", b"not parquet at all")
    [shard] = list_shards([f"memory://{root}/t.parquet"], format="parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_shard(shard)
    with pytest.raises(InputError, match="not a readable Parquet file"):  # bigger than blocksize: its footer is read
        list_shards([f"memory://{root}/t.parquet"], format="parquet", blocksize=4)


def test_text_lines_and_whole_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbffirst\r\n\n   \nsecond\nthird")
    (tmp_path / "b.txt").write_bytes(b"line one\nline two\n")
    rows = read_all([str(tmp_path / "a.txt")], format="text")
    assert [r["prompt"] for r in rows] == ["first", "second", "third"]
    assert rows[1]["id"] == expected_id("a.txt", 15, {"prompt": "second"})
    rows = read_all([str(tmp_path / "*.txt")], format="text", text_mode="file")
    assert [r["prompt"] for r in rows] == ["first\r\n\n   \nsecond\nthird", "line one\nline two\n"]
    assert rows[1]["id"] == expected_id("b.txt", 0, {"prompt": "line one\nline two\n"})


def test_text_ignores_field_mapping(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    [row] = read_all([str(tmp_path / "a.txt")], format="text", fields={"prompt": "text"})
    assert row["prompt"] == "hello"


def test_bad_records_become_undecodable_rows(tmp_path):
    (tmp_path / "shard-01.jsonl").write_bytes(
        b'{"prompt": "ok"}\n{"prompt": \n\xff\xfe\n42\n\n{"prompt": "fine"}\n'
    )
    rows = read_all([str(tmp_path / "shard-01.jsonl")], format="jsonl")
    assert [r["prompt"] for r in rows if isinstance(r, dict)] == ["ok", "fine"]
    bad = [r for r in rows if isinstance(r, UndecodableRow)]
    assert [r.message for r in bad] == [
        "shard-01.jsonl line 2: not valid JSON (Expecting value)",
        "shard-01.jsonl line 3: not UTF-8 (invalid start byte)",
        "shard-01.jsonl line 4: a row must be a string or an object, not int",
    ]
    assert bad[1].id == "shard-01.jsonl:29-" + hashlib.sha256(b"\xff\xfe").hexdigest()[:12]
    # In a later byte range, lines are located by byte offset.
    split = read_all([str(tmp_path / "shard-01.jsonl")], format="jsonl", blocksize=20)
    assert [r.message for r in split if isinstance(r, UndecodableRow)][1:] == [
        "shard-01.jsonl at byte 29: not UTF-8 (invalid start byte)",
        "shard-01.jsonl at byte 32: a row must be a string or an object, not int",
    ]
    assert [row_id(r) for r in split] == [row_id(r) for r in rows]


# -- field mapping and template -----------------------------------------------------------


def test_field_mapping(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(jsonl(
        {"uid": "u1", "text": "hello", "n": 8, "prompt": "ignored", "max_tokens": 99},
        {"uid": None, "text": "world"},
    ))
    rows = read_all([str(tmp_path / "p.jsonl")], format="jsonl",
                    fields={"id": "uid", "prompt": "text", "max_tokens": "n"})
    assert rows[0] == {"id": "u1", "prompt": "hello", "max_tokens": 8}
    assert rows[1]["prompt"] == "world" and rows[1]["id"].startswith("p.jsonl:")
    with pytest.raises(InputError, match="unknown field 'promt'"):
        read_all([str(tmp_path / "p.jsonl")], format="jsonl", fields={"promt": "text"})


def test_template(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(jsonl(
        {"id": "a", "text": "bonjour", "lang": "English", "prompt": "dropped", "seed": 1},
        {"id": "b", "text": "hallo"},
        "just a prompt",
        [1, 2],
    ))
    rows = read_all([str(tmp_path / "p.jsonl")], format="jsonl", template="Translate to {lang}: {text}")
    assert rows[0] == {"id": "a", "prompt": "Translate to English: bonjour", "seed": 1}
    assert rows[1] == UndecodableRow("b", 'p.jsonl line 2: template needs field "lang", which the row does not have')
    assert isinstance(rows[2], UndecodableRow) and 'needs field "lang"' in rows[2].message
    assert isinstance(rows[3], UndecodableRow) and "not list" in rows[3].message
    [row] = read_all([str(tmp_path / "p.jsonl")], format="jsonl", template="Say: {prompt}")[2:3]
    assert row["prompt"] == "Say: just a prompt"
    for bad, why in [("{", "invalid template"), ("{}", "positional"), ("plain", "uses no field")]:
        with pytest.raises(InputError, match=why):
            read_all([str(tmp_path / "p.jsonl")], format="jsonl", template=bad)


# -- listing ------------------------------------------------------------------------------


def test_globs_directories_keys_and_order(tmp_path):
    for name in ("a/x.jsonl", "a/sub/y.jsonl", "a/sub/deep/z.jsonl", "a/_SUCCESS", "a/.part.crc", "a/w.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(jsonl({"prompt": name}))

    def keys(shards):
        return [s.key for s in shards]

    assert keys(list_shards([f"{tmp_path}/a/**/*.jsonl"], format="jsonl")) == [
        "sub/deep/z.jsonl", "sub/y.jsonl", "x.jsonl"]
    assert keys(list_shards([f"{tmp_path}/a/**.jsonl"], format="jsonl")) == [
        "sub/deep/z.jsonl", "sub/y.jsonl", "x.jsonl"]
    assert keys(list_shards([f"{tmp_path}/a/sub/"], format="jsonl")) == ["deep/z.jsonl", "y.jsonl"]
    assert keys(list_shards([f"file://{tmp_path}/a"], format="jsonl")) == [
        "sub/deep/z.jsonl", "sub/y.jsonl", "w.csv", "x.jsonl"]
    # urls keep their order; a file matched twice is read once
    shards = list_shards([f"{tmp_path}/a/x.jsonl", f"{tmp_path}/a/sub/*.jsonl", f"{tmp_path}/a/*.jsonl"],
                         format="jsonl")
    assert keys(shards) == ["x.jsonl", "sub/y.jsonl"] and [s.index for s in shards] == [0, 1]
    assert keys(list_shards([f"{tmp_path}/a/sub/y.jsonl"], format="jsonl")) == ["y.jsonl"]


def test_memory_urls_keep_their_protocol(memdir):
    fs, root = memdir
    fs.pipe(f"{root}/in/a.jsonl", jsonl({"prompt": "a"}))
    fs.pipe(f"{root}/in/b.jsonl", jsonl({"prompt": "b"}))
    shards = list_shards([f"memory://{root}/in/*.jsonl"], format="jsonl")
    assert [s.url for s in shards] == [f"memory://{root}/in/a.jsonl", f"memory://{root}/in/b.jsonl"]
    assert [r["prompt"] for s in shards for r in read_shard(s)] == ["a", "b"]


def test_split_ranges_cover_the_file(tmp_path):
    data = jsonl(*({"prompt": f"prompt number {i}"} for i in range(100)))
    (tmp_path / "p.jsonl").write_bytes(data)
    shards = list_shards([str(tmp_path / "p.jsonl")], format="jsonl", blocksize=len(data) // 7)
    assert len(shards) in (7, 8) and shards[0].offset == 0
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(shards))
    assert shards[-1].offset + shards[-1].length == len(data)
    assert [r["prompt"] for r in read_all([str(tmp_path / "p.jsonl")], format="jsonl", blocksize=100)] == [
        f"prompt number {i}" for i in range(100)]
    assert len(list_shards([str(tmp_path / "p.jsonl")], format="jsonl", blocksize=None)) == 1
    assert len(list_shards([str(tmp_path / "p.jsonl")], format="text", text_mode="file", blocksize=100)) == 1


_LINE_CHARS = st.characters(codec="utf-8", exclude_characters="\n\ufeff")


@st.composite
def line_files(draw):
    """(format, lines): text lines, or JSONL lines mixing objects, strings, garbage and blanks."""
    fmt = draw(st.sampled_from(["jsonl", "text"]))
    text = st.text(_LINE_CHARS, max_size=12)
    if fmt == "text":
        line = st.one_of(text, st.sampled_from(["", " ", "\r", "\t\r"]))
    else:
        line = st.one_of(
            text.map(lambda s: json.dumps({"prompt": s}, ensure_ascii=False)),
            text.map(json.dumps),
            text,  # mostly not JSON
            st.sampled_from(["", "  ", "\r"]),
        )
    return fmt, draw(st.lists(line, max_size=25))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line_files(), st.booleans(), st.integers(1, 48))
def test_split_reading_reads_every_line_once(case, trailing_newline, blocksize):
    fmt, lines = case
    data = "\n".join(lines).encode() + (b"\n" if trailing_newline and lines else b"")
    url = "memory:///sources-split/input.data"
    fsspec.filesystem("memory").pipe(url, data)
    whole = read_all([url], format=fmt, blocksize=None)
    shards = list_shards([url], format=fmt, blocksize=blocksize)
    assert len(shards) == max(1, -(-len(data) // blocksize))
    split = [row for s in shards for row in read_shard(s)]
    kept = [line.removesuffix("\r") for line in lines if line.removesuffix("\r").encode().strip()]
    assert len(whole) == len(kept)
    if fmt == "text":
        assert [r["prompt"] for r in whole] == kept
    assert [r.id if isinstance(r, UndecodableRow) else r for r in split] == [
        r.id if isinstance(r, UndecodableRow) else r for r in whole]


# -- errors -------------------------------------------------------------------------------


def test_option_errors(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(jsonl({"prompt": "x"}))
    url = str(tmp_path / "p.jsonl")
    cases = [
        ({"format": "json"}, "unknown input format 'json'; use one of jsonl, parquet, csv, text"),
        ({"format": "jsonl", "compression": "rar"}, "unknown compression 'rar'; use infer, None or one of"),
        ({"format": "text", "text_mode": "para"}, "unknown text mode 'para'"),
        ({"format": "jsonl", "blocksize": 0}, "blocksize must be a positive"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            list_shards([url], **kwargs)
    with pytest.raises(InputError, match="no input given"):
        list_shards([], format="jsonl")
    with pytest.raises(InputError, match="cannot open nope://x: Protocol not known"):
        list_shards(["nope://x"], format="jsonl")
    assert issubclass(InputError, GlinthawkError)


def test_no_match_names_the_url_and_what_is_missing(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"no file matches {tmp_path}/*.jsonl; check the path")):
        list_shards([f"{tmp_path}/*.jsonl"], format="jsonl")
    with pytest.raises(InputError) as e:
        list_shards([f"{tmp_path}/missing/deeper/*.jsonl"], format="jsonl")
    assert f"file://{tmp_path}/missing does not exist" in str(e.value)
    with pytest.raises(InputError, match=f"file://{tmp_path}/p.jsonl does not exist"):
        list_shards([f"{tmp_path}/p.jsonl"], format="jsonl")


def test_file_gone_after_listing(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(jsonl({"prompt": "x"}))
    [shard] = list_shards([str(tmp_path / "p.jsonl")], format="jsonl")
    (tmp_path / "p.jsonl").unlink()
    with pytest.raises(InputError, match=r"cannot read file://.*p\.jsonl: not found") as e:
        read_shard(shard)
    assert e.value.missing and pickle.loads(pickle.dumps(e.value)).missing  # as a worker's error reaches the client


# -- S3 (moto server) ---------------------------------------------------------------------


def test_s3_glob_of_jsonl_shards_and_parquet(s3_bucket):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options["s3"])
    for i in range(3):
        fs.pipe(f"{bucket}/prompts/shard-{i:02d}.jsonl", jsonl({"prompt": f"s{i}-a"}, {"prompt": f"s{i}-b"}))
    fs.pipe(f"{bucket}/prompts/other.txt", b"not matched\n")
    fs.pipe(f"{bucket}/tables/t.parquet", parquet_bytes(pa.table({"id": ["p1", "p2"], "text": ["u", "v"]})))

    shards = list_shards([f"s3://{bucket}/prompts/shard-*.jsonl"], format="jsonl", storage_options=options)
    assert [(s.url, s.key) for s in shards] == [
        (f"s3://{bucket}/prompts/shard-{i:02d}.jsonl", f"shard-{i:02d}.jsonl") for i in range(3)]
    rows = [r for s in shards for r in read_shard(s, storage_options=options)]
    assert [r["prompt"] for r in rows] == ["s0-a", "s0-b", "s1-a", "s1-b", "s2-a", "s2-b"]
    assert rows[1]["id"] == expected_id("shard-00.jsonl", 19, {"prompt": "s0-b"})  # bucket-independent

    split = read_all([f"s3://{bucket}/prompts/shard-00.jsonl"], format="jsonl", blocksize=8,
                     storage_options=options)
    assert split == rows[:2]
    rows = read_all([f"s3://{bucket}/tables/"], format="parquet", fields={"prompt": "text"},
                    storage_options=options)
    assert rows == [{"id": "p1", "prompt": "u"}, {"id": "p2", "prompt": "v"}]


def test_s3_missing_bucket(s3_bucket):
    _, options = s3_bucket
    with pytest.raises(InputError, match=r"no file matches s3://no-such-bucket-x/p/\*\.jsonl: "
                                         r"s3://no-such-bucket-x does not exist"):
        list_shards(["s3://no-such-bucket-x/p/*.jsonl"], format="jsonl", storage_options=options)


def test_s3_unreachable_endpoint(s3_bucket):
    bucket, options = s3_bucket
    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {"s3": {**options["s3"], "endpoint_url": f"http://127.0.0.1:{port}",
                   "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}}
    with pytest.raises(InputError) as e:
        list_shards([f"s3://{bucket}/*.jsonl"], format="jsonl", storage_options=opts)
    assert str(e.value).startswith(f"cannot list s3://{bucket}/*.jsonl: cannot reach the storage service")
    assert "check endpoint_url in storage_options.s3" in str(e.value)


@contextlib.contextmanager
def moto_auth(endpoint_url: str):
    """Make the moto server check credentials (it accepts any by default)."""
    def post(count: str) -> None:
        request = urllib.request.Request(f"{endpoint_url}/moto-api/reset-auth", data=count.encode(),
                                         headers={"Content-Type": "text/plain"}, method="POST")
        urllib.request.urlopen(request).read()

    post("0")
    try:
        yield
    finally:
        post("inf")


def test_s3_wrong_credentials(s3_bucket, s3_server):
    bucket, options = s3_bucket
    wrong = {"s3": {**options["s3"], "key": "wrong", "secret": "wrong"}}
    with moto_auth(s3_server["endpoint_url"]), pytest.raises(InputError) as e:
        list_shards([f"s3://{bucket}/x*.jsonl"], format="jsonl", storage_options=wrong)
    assert str(e.value).startswith(f"cannot list s3://{bucket}/x*.jsonl: access denied (")
    assert str(e.value).endswith("check the credentials in storage_options.s3 or AWS_* environment variables")


def test_s3_no_credentials(s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    anonymous = {"s3": {k: v for k, v in options["s3"].items() if k not in ("key", "secret")}}
    with pytest.raises(InputError, match=rf"cannot list s3://{bucket}/\*\.jsonl: no credentials found; "
                                         r"check the credentials in storage_options\.s3"):
        list_shards([f"s3://{bucket}/*.jsonl"], format="jsonl", storage_options=anonymous)


def test_a_files_listed_version_changes_when_it_is_rewritten(tmp_path):
    """Shards carry their file's version from the listing (local mtime, a memory file's
    creation, an object store's ETag or modification time): the same file listed twice
    gives the same version, a rewrite another; a listing with no such property, none."""
    import os

    from glinthawk_dask.pipeline.versions import file_version

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    versions = [list_shards([str(path)], format="jsonl")[0].version for _ in range(2)]
    assert versions[0] is not None and versions[0] == versions[1]
    path.write_text('{"prompt": "b"}\n')  # the same size
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000_000))  # whatever the clock's resolution
    assert list_shards([str(path)], format="jsonl")[0].version != versions[0]
    assert file_version({"name": "x", "size": 3, "type": "file"}) is None
    assert file_version({"name": "x", "size": 3, "ETag": '"abc"'}) != file_version({"name": "x", "size": 3,
                                                                                    "ETag": '"abd"'})
