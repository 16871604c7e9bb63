"""The Zarr output: layout, chunk-wise exactly-once commits, crash recovery, reading, export."""

from __future__ import annotations

import itertools
import json
import math
import os
import uuid
from contextlib import contextmanager
from unittest import mock

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glinthawk_dask.pipeline.export import export_output
from glinthawk_dask.pipeline.sink import OutputError, ZarrSink, read_output

RUN = {"fingerprint": "fp-1", "model": "tiny", "spec": {"name": "test"}, "sampling": {"max_tokens": 8}}


def open_sink(url: str, **kw) -> ZarrSink:
    return ZarrSink.open(url, **{**RUN, **kw})


def memory_url() -> str:
    return f"memory://glinthawk-tests/{uuid.uuid4().hex}/out.zarr"


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path) -> str:
    return str(tmp_path / "out.zarr") if request.param == "local" else memory_url()


def record(i: int, **fields) -> dict:
    """A completion record; every fourth one is an error record."""
    if i % 4 == 3:
        base = {"id": f"row-{i}", "prompt": None, "completion": "", "completion_token_ids": [],
                "finish_reason": "error", "error": f"prompt {i} is too long"}
    else:
        base = {
            "id": f"row-{i}",
            "prompt": [f"prompt {i} ✓", [{"role": "user", "content": f"hi {i}"}], [1, 2, i]][i % 3],
            "completion": "é" * i,
            "completion_token_ids": list(range(i, 2 * i)),
            "finish_reason": "length" if i % 2 else "stop",
            "error": None,
            "prompt_tokens": 3 + i,
            "time_to_first_token": 0.125 * i,
            "time_per_token": None if i % 3 == 0 else 0.01,
        }
    return {**base, **fields}


def stored(rec: dict) -> dict:
    """What reading back ``rec`` gives: float32 seconds, None for NaN, "" for a None prompt."""

    def seconds(x):
        return None if x is None or math.isnan(x) else float(np.float32(x))

    ids = list(rec.get("completion_token_ids") or [])
    return {
        "id": rec["id"],
        "prompt": "" if rec.get("prompt") is None else rec["prompt"],
        "completion": rec.get("completion") or "",
        "completion_token_ids": ids,
        "finish_reason": rec["finish_reason"],
        "error": rec.get("error") or None,
        "prompt_tokens": rec.get("prompt_tokens") or 0,
        "completion_tokens": len(ids),
        "time_to_first_token": seconds(rec.get("time_to_first_token")),
        "time_per_token": seconds(rec.get("time_per_token")),
    }


def token_count(records: list[dict]) -> int:
    return sum(len(r.get("completion_token_ids") or []) for r in records)


class Crash(BaseException):
    """Stands in for the process dying."""


@contextmanager
def crash_on(cls: type, method: str, after: int = 0):
    """Calls of ``cls.method`` beyond the first ``after`` raise :class:`Crash`."""
    original = getattr(cls, method)
    calls = itertools.count()

    def failing(self, *args, **kwargs):
        if next(calls) >= after:
            raise Crash(method)
        return original(self, *args, **kwargs)

    with mock.patch.object(cls, method, failing):
        yield


def assert_truncated(url: str, rows: int, tokens: int) -> None:
    """Every array of the output holds exactly the committed entries."""
    group = zarr.open_group(url, mode="r")
    meta = group.attrs["glinthawk"]
    assert (meta["rows"], meta["tokens"]) == (rows, tokens)
    for name, array in group.arrays():
        assert array.shape == ((tokens,) if name == "completion_token_ids" else (rows,)), name


# -- layout and round trip ---------------------------------------------------------------------


def test_round_trip_readable_by_plain_zarr(url):
    records = [record(i) for i in range(10)]
    with open_sink(url, chunk_rows=4) as sink:
        assert sink.append(records) == 8
    assert (sink.rows, sink.tokens, sink.n_errors) == (10, token_count(records), 2)

    group = zarr.open_group(url, mode="r")
    meta = group.attrs["glinthawk"]
    assert {k: meta[k] for k in RUN} == RUN
    assert (meta["format"], meta["rows"], meta["tokens"], meta["errors"]) == (1, 10, sink.tokens, 2)
    assert {"version", "created", "updated"} <= meta.keys()
    assert group["completion"][:].tolist() == [r["completion"] for r in records]
    assert group["id"].metadata.dimension_names == ("row",)
    assert group["completion_token_ids"].metadata.dimension_names == ("token",)
    assert_truncated(url, 10, sink.tokens)

    table = read_output(url)
    assert len(table) == 10
    assert list(table.records()) == [stored(r) for r in records]
    assert table.token_ids(5) == list(range(5, 10))
    assert table.columns["prompt_is_json"].tolist() == [i % 3 != 0 and i % 4 != 3 for i in range(10)]
    summary = table.summary()
    assert summary["finish_reasons"] == {"stop": 5, "length": 3, "error": 2}
    assert summary["errors"] == 2
    assert summary["prompt_tokens"] == sum(r.get("prompt_tokens", 0) for r in records)
    assert summary["mean_time_to_first_token"] == pytest.approx(np.mean([0.125 * i for i in range(10) if i % 4 != 3]))


def test_one_row_schema_from_completion_to_output_to_dataframes(tmp_path):
    from glinthawk_dask.engine.request import ROW_FIELDS, Completion
    from glinthawk_dask.jobs import COLUMNS
    from glinthawk_dask.pipeline.export import PARQUET_SCHEMA
    from glinthawk_dask.pipeline.layout import FIELD_DTYPES

    done = Completion("a", "hi", [1, 2], "yo", [3], "stop", time_to_first_token=0.5)
    failed = Completion("b", "x" * 9, [], "", [], "error", error="prompt too long")
    assert tuple(done.to_row()) == ROW_FIELDS == tuple(FIELD_DTYPES)
    assert done.to_dict() == {k: v for k, v in done.to_row().items() if k not in ("error", "time_per_token")}
    assert failed.to_dict()["error"] == "prompt too long" and "time_to_first_token" not in failed.to_dict()
    assert COLUMNS == tuple(f for f in ROW_FIELDS if f != "completion_token_ids")
    assert [f.name for f in PARQUET_SCHEMA if f.name != "prompt_is_json"] == list(ROW_FIELDS)

    url = str(tmp_path / "out.zarr")
    with open_sink(url) as sink:
        sink.append([done.to_row(), failed.to_row()])
    table = read_output(url)
    assert [tuple(r) for r in table.records()] == [ROW_FIELDS] * 2
    assert tuple(table.to_pandas().columns) == ROW_FIELDS
    assert next(table.records()) == {**done.to_row(), "time_to_first_token": 0.5}


def test_commits_a_chunk_at_a_time():
    url = memory_url()
    sink = open_sink(url, chunk_rows=4)
    assert sink.append(record(i) for i in range(7)) == 4
    assert len(read_output(url)) == 4
    assert zarr.open_group(url, mode="r")["id"].shape == (4,)
    assert sink.flush() == 3
    assert len(read_output(url)) == 7
    assert sink.append([record(7)]) == 1  # completes the partial chunk
    assert sink.append(record(i) for i in range(8, 11)) == 0
    assert repr(sink) == f"ZarrSink({url!r}, rows=8, tokens={sink.tokens}, errors=2, buffered=3)"


def test_the_lengths_of_committed_rows_to_plan_by():
    url = memory_url()
    sink = open_sink(url, chunk_rows=4)
    sink.append(record(i) for i in range(40))  # rows 3, 7, ... are errors; even rows stopped at a stop token
    good = [(3 + i, i + (i % 2 == 0)) for i in range(40) if i % 4 != 3]
    assert sink.rows == 40 and sink.lengths(1000) == read_output(url).lengths(1000) == good
    spread = sink.lengths(4)  # evenly over the good rows, the first and the last included
    assert spread[0] == good[0] and spread[-1] == good[-1] and len(spread) == 4 and set(spread) <= set(good)
    assert open_sink(memory_url()).lengths() == []


def test_bad_records_are_refused_whole():
    sink = open_sink(memory_url(), chunk_rows=2)
    sink.append([record(0), record(1)])
    sink.append([record(2)])
    for bad in ([record(0)], [record(2)], [record(4), record(4)], [{"prompt": "no id", "finish_reason": "stop"}],
                [record(5, finish_reason="done")], [record(6, completion_tokens=99)]):
        with pytest.raises(ValueError):
            sink.append([record(9), *bad])
    assert sink.flush() == 1
    assert sink.committed_ids() == {"row-0", "row-1", "row-2"}


# -- crash safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [(zarr.Array, "resize", 0), (zarr.Array, "resize", 5),
                                   (zarr.Group, "update_attributes", 0)],
                         ids=["after-data", "mid-resize", "at-commit-point"])
def test_crash_mid_commit_leaves_the_previous_commit(where):
    url = memory_url()
    records = [record(i) for i in range(9)]
    sink = open_sink(url, chunk_rows=4)
    sink.append(records[:4])
    tokens = sink.tokens
    with crash_on(*where), pytest.raises(Crash):
        sink.append(records[4:8])
    if where[1:] == ("resize", 0):  # the new rows' data is written but not visible
        assert zarr.open_group(url, mode="r")["completion"][:].tolist() == [r["completion"] for r in records[:4]]

    sink = open_sink(url)
    assert (sink.rows, sink.tokens) == (4, tokens)
    assert_truncated(url, 4, tokens)
    sink.append(records[4:])
    sink.close()
    assert list(read_output(url).records()) == [stored(r) for r in records]
    assert_truncated(url, 9, sink.tokens)


def test_failed_commit_is_retried_by_the_next_flush():
    url = memory_url()
    sink = open_sink(url, chunk_rows=4)
    with crash_on(zarr.Group, "update_attributes"), pytest.raises(Crash):
        sink.append(record(i) for i in range(5))
    assert (sink.rows, repr(sink).endswith("buffered=5)")) == (0, True)
    assert sink.flush() == 5
    assert [r["id"] for r in read_output(url).records()] == [f"row-{i}" for i in range(5)]


def test_a_store_that_refuses_a_commit_is_an_output_error_that_says_what_is_kept():
    """A full disk, lost credentials: the commit fails as an OutputError naming the rows
    kept and the rows not written; they stay buffered, and a later flush commits them."""
    url = memory_url()
    sink = open_sink(url, chunk_rows=4)
    sink.append(record(i) for i in range(4))

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with mock.patch.object(zarr.Array, "resize", full), pytest.raises(OutputError) as failed:
        sink.append(record(i) for i in range(4, 9))
    assert str(failed.value).startswith(f"cannot commit rows to {url} (OSError: [Errno 28] No space left on device): "
                                        "the 4 rows committed before are kept, the 5 finished since are not")
    assert isinstance(failed.value.__cause__, OSError) and "rerun to resume" in str(failed.value)
    assert sink.rows == 4 and read_output(url).summary()["rows"] == 4
    assert sink.flush() == 5
    assert [r["id"] for r in read_output(url).records()] == [f"row-{i}" for i in range(9)]


def test_rows_buffered_for_commit_seconds_are_committed_without_a_full_chunk(monkeypatch):
    """A slow run: rows that finished ``commit_seconds`` ago are committed at the next
    append, as a part of a chunk; the chunk is rewritten whole when it fills, and plain
    zarr and a reopened sink read every row once."""
    from glinthawk_dask.pipeline import sink as sink_mod

    now = [1000.0]
    monkeypatch.setattr(sink_mod.time, "monotonic", lambda: now[0])
    url = memory_url()
    sink = open_sink(url, chunk_rows=4, commit_seconds=30.0)
    assert sink.append([record(0)]) == 0 and sink.rows == 0  # a young row waits for its chunk
    now[0] += 31
    assert sink.append([record(1)]) == 2 and sink.rows == 2  # the first is 31 s old: both go
    assert sink.append([record(i) for i in (2, 3, 4)]) == 2 and sink.rows == 4  # the chunk fills: 2, 3
    now[0] += 10
    assert sink.append([record(5)]) == 0 and sink.rows == 4  # 4 and 5 buffered 10 s: not yet
    now[0] += 25
    assert sink.append([record(6)]) == 3 and sink.rows == 7
    sink.append([record(7), record(8)])  # fills the chunk with 7; 8 waits
    assert sink.commit_due() == 0 and sink.rows == 8
    now[0] += 60
    assert sink.commit_due() == 1 and sink.rows == 9  # no row finished since: the run's tick commits it
    sink.append([record(9)])
    sink.close()
    assert [r["id"] for r in read_output(url).records()] == [f"row-{i}" for i in range(10)]
    again = open_sink(url, chunk_rows=4)  # never by time without commit_seconds
    again.append([record(i) for i in (10, 11)])
    now[0] += 1000
    again.append([record(12)])
    assert again.commit_due() == 0 and again.rows == 12  # the chunk of 8..11 filled; 12 waits (or the close)
    again.close()
    assert list(read_output(url).records()) == [stored(record(i)) for i in range(13)]
    assert_truncated(url, 13, again.tokens)


seconds = st.one_of(st.none(), st.just(math.nan), st.floats(0, 100, width=32))
prompts = st.one_of(
    st.none(), st.text(max_size=8), st.lists(st.integers(0, 50_000), max_size=4),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=8)}),
             max_size=2),
)
completions = st.fixed_dictionaries({
    "prompt": prompts, "completion": st.text(max_size=10), "finish_reason": st.sampled_from(["stop", "length"]),
    "completion_token_ids": st.lists(st.integers(0, 2**31 - 1), max_size=6), "prompt_tokens": st.integers(0, 99),
    "time_to_first_token": seconds, "time_per_token": seconds,
})
errors = st.fixed_dictionaries({"prompt": prompts, "finish_reason": st.just("error"), "error": st.text(min_size=1)})
operations = st.one_of(
    st.tuples(st.just("append"), st.lists(st.one_of(completions, errors), max_size=6)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("crash")),  # the process dies between calls: the buffer is lost
    st.tuples(st.just("crash-in-commit"), st.sampled_from([("resize", 0), ("resize", 4), ("attrs", 0)])),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk_rows=st.integers(1, 5), ops=st.lists(operations, max_size=8))
def test_random_appends_flushes_and_crashes_commit_each_record_once(chunk_rows, ops):
    url = memory_url()
    sink = open_sink(url, chunk_rows=chunk_rows)
    committed: list[dict] = []  # what the output must hold, in order
    buffered: list[dict] = []
    ids = (f"id-{i}" for i in itertools.count())

    def commit(n: int) -> None:
        committed.extend(buffered[:n])
        del buffered[:n]

    def reopen() -> ZarrSink:
        # The run resumes: it reopens the output and appends again what was not committed.
        lost = list(buffered)
        buffered.clear()
        resumed = open_sink(url)
        assert (resumed.rows, resumed.committed_ids()) == (len(committed), {r["id"] for r in committed})
        assert_truncated(url, len(committed), token_count(committed))
        buffered.extend(lost)
        commit(resumed.append(lost))
        return resumed

    for op, *args in ops:
        if op == "append":
            new = [{"id": next(ids), **r} for r in args[0]]
            buffered.extend(new)
            commit(sink.append(new))
        elif op == "flush":
            commit(sink.flush())
        elif op == "crash":
            sink = reopen()
        else:
            method, after = args[0]
            target = (zarr.Array, "resize") if method == "resize" else (zarr.Group, "update_attributes")
            with crash_on(*target, after=after):
                try:
                    commit(sink.flush())
                except Crash:
                    pass
            sink = reopen()
    commit(sink.flush())

    assert not buffered
    assert list(read_output(url).records()) == [stored(r) for r in committed]
    assert_truncated(url, len(committed), token_count(committed))


# -- reopening ---------------------------------------------------------------------------------


def test_reopen_checks_spec_and_model(url):
    with open_sink(url, chunk_rows=4) as sink:
        sink.append(record(i) for i in range(5))
    with pytest.raises(OutputError, match=r"different spec: to start over, pass overwrite=True \(--overwrite .*\); .* force=True \(--force"):
        open_sink(url, fingerprint="fp-2")
    with pytest.raises(OutputError, match="different model \\('tiny', now 'big'\\)"):
        open_sink(url, model="big")

    forced = open_sink(url, fingerprint="fp-2", spec={"name": "changed"}, force=True)
    assert forced.rows == 5
    assert read_output(url).attrs["spec"] == {"name": "changed"}
    forced.append([record(5)])
    forced.close()
    assert open_sink(url, fingerprint="fp-2").rows == 6  # the forced spec is now the output's

    fresh = open_sink(url, overwrite=True)
    assert (fresh.rows, fresh.committed_ids()) == (0, set())
    assert len(read_output(url)) == 0


def test_existing_foreign_data_is_refused_unless_overwrite(tmp_path):
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(3,), dtype="int32")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    array = tmp_path / "array.zarr"
    zarr.create_array(str(array), shape=(3,), dtype="int32")
    for path, message in [(other, "not a glinthawk output"), (junk, "not a Zarr group"), (array, "not a Zarr group")]:
        with pytest.raises(OutputError, match=message):
            open_sink(str(path))
        with pytest.raises(OutputError, match=message):
            read_output(str(path))
    assert open_sink(str(junk), overwrite=True).rows == 0
    assert not (junk / "notes.txt").exists()
    (tmp_path / "empty").mkdir()
    assert open_sink(str(tmp_path / "empty")).rows == 0  # an empty directory is a fine new output


def test_unwritable_location_fails_at_open(tmp_path):
    if os.geteuid() == 0:  # root ignores permissions: use a path that cannot be created
        (tmp_path / "afile").write_text("")
        url = str(tmp_path / "afile" / "out.zarr")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        url = str(tmp_path / "ro" / "out.zarr")
    with pytest.raises(OutputError, match="cannot write .*writable"):
        open_sink(url)


def test_reading_a_missing_output(tmp_path):
    with pytest.raises(OutputError, match="no glinthawk output"):
        read_output(str(tmp_path / "nothing.zarr"))


# -- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dest_kind", ["local", "memory"])
def test_export_jsonl_and_parquet(tmp_path, dest_kind):
    url = memory_url()
    records = [record(i) for i in range(10)]
    with open_sink(url, chunk_rows=3) as sink:
        sink.append(records)
    expected = [stored(r) for r in records]
    base = str(tmp_path / "export") if dest_kind == "local" else memory_url()

    assert export_output(url, base + ".jsonl") == 10
    with fsspec.open(base + ".jsonl", "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == expected

    assert export_output(url, base + ".parquet", to="parquet") == 10
    with fsspec.open(base + ".parquet", "rb") as f:
        parquet = pq.ParquetFile(f)
        assert parquet.metadata.num_row_groups == 4
        rows = parquet.read().to_pylist()
    for row in rows:
        is_json = row.pop("prompt_is_json")
        row["prompt"] = json.loads(row["prompt"]) if is_json else row["prompt"]
    assert rows == expected


def test_export_takes_its_format_and_compression_from_the_destination_name(tmp_path):
    """No format asked: the destination's name says it (``.parquet`` is Parquet, not
    JSON Lines under that name); ``.jsonl.gz`` is gzipped JSON Lines; a name of the other
    format, and Parquet under a compression suffix, are refused before anything is written."""
    import gzip

    url = memory_url()
    records = [record(i) for i in range(4)]
    with open_sink(url, chunk_rows=3) as sink:
        sink.append(records)
    expected = [stored(r) for r in records]
    assert export_output(url, str(tmp_path / "out.parquet")) == 4
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 4
    assert export_output(url, str(tmp_path / "out.jsonl.gz")) == 4
    with gzip.open(tmp_path / "out.jsonl.gz", "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == expected
    assert export_output(url, str(tmp_path / "out.txt")) == 4  # no format in the name: JSON Lines
    assert json.loads((tmp_path / "out.txt").read_text().splitlines()[0]) == expected[0]
    with pytest.raises(OutputError, match="named as parquet but the export is asked as jsonl"):
        export_output(url, str(tmp_path / "other.parquet"), to="jsonl")
    with pytest.raises(OutputError, match="drop the .gz ending"):
        export_output(url, str(tmp_path / "other.parquet.gz"))
    assert not (tmp_path / "other.parquet").exists() and not (tmp_path / "other.parquet.gz").exists()


def test_export_of_an_empty_output_and_bad_destinations(tmp_path):
    url = memory_url()
    open_sink(url).close()
    assert export_output(url, str(tmp_path / "empty.parquet"), to="parquet") == 0
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    with pytest.raises(OutputError, match="choose one of jsonl, parquet"):
        export_output(url, str(tmp_path / "out.csv"), to="csv")
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="cannot write"):
        export_output(url, str(tmp_path / "afile" / "out.jsonl"))
    if os.path.exists("/dev/full"):  # every write: no space left
        sink = open_sink(url)
        sink.append([record(0)])
        sink.close()
        with pytest.raises(OutputError, match=r"cannot write /dev/full \(OSError: \[Errno 28\] No space left on "
                                              r"device\): what it holds is incomplete; make room"):
            export_output(url, "/dev/full", to="jsonl", overwrite=True)
        with pytest.raises(OutputError, match="/dev/full exists: name another destination, or replace it"):
            export_output(url, "/dev/full", to="jsonl")


def test_recoveries_are_kept_beside_the_commits_and_survive_reopening(url):
    from glinthawk_dask.pipeline.sink import KEPT_RECOVERIES

    with open_sink(url, chunk_rows=4) as sink:
        sink.append(record(i) for i in range(3))
        updated = read_output(url).attrs["updated"]
        assert (sink.recoveries, sink.n_recoveries) == ([], 0)
        sink.record_recoveries([{"kind": "moved micro-batch", "cause": "gone", "micro_batch": 1, "time": 1.5}])
        sink.record_recoveries([])  # nothing new: nothing written
    attrs = read_output(url).attrs
    assert attrs["recoveries_total"] == 1 and attrs["recoveries"][0]["cause"] == "gone"
    assert attrs["rows"] == 3 and attrs["updated"] >= updated  # rows committed as before
    reopened = open_sink(url)
    assert reopened.n_recoveries == 1 and reopened.recoveries[0]["micro_batch"] == 1
    reopened.record_recoveries({"kind": "restarted run", "cause": f"#{i}"} for i in range(KEPT_RECOVERIES + 5))
    assert reopened.n_recoveries == KEPT_RECOVERIES + 6  # every one counted, the newest kept
    assert [r["cause"] for r in reopened.recoveries] == [f"#{i}" for i in range(5, KEPT_RECOVERIES + 5)]
    assert open_sink(url, overwrite=True).n_recoveries == 0


def test_the_last_run_to_open_an_output_writes_and_the_earlier_one_stops(url):
    """A run resumed while an earlier one on the same output still goes: the earlier
    one's next commit is refused (not interleaved with the new run's), and the output
    holds each row once."""
    first = open_sink(url, chunk_rows=2)
    first.append(record(i) for i in range(2))  # committed
    first.append([record(2)])  # buffered
    second = open_sink(url)  # takes over from the committed rows
    assert second.rows == 2 and second.committed_ids() == {"row-0", "row-1"}
    writer = read_output(url).attrs["writer"]
    assert writer["pid"] == os.getpid() and writer["host"] and writer["id"]
    with pytest.raises(OutputError, match=r"another run opened .* to write \(pid \d+ on .*, since .*\): this run "
                                          r"stops writing there, and the 2 rows it had not committed are left"):
        first.append([record(3)])
    first.close()  # nothing more from it, and no second error
    with pytest.raises(OutputError, match="another run opened"):
        first.mark_complete("inputs")
    with pytest.raises(OutputError, match="another run opened"):
        first.record_recoveries([{"kind": "moved micro-batch"}])
    second.append(record(i) for i in range(2, 5))
    second.close()
    assert sorted(r["id"] for r in read_output(url).records()) == [f"row-{i}" for i in range(5)]
    assert read_output(url).attrs["writer"]["id"] == writer["id"]
