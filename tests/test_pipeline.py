"""Dataset pipelines end to end: spec in, Zarr out, resumable, exactly once, bad rows recorded."""

from __future__ import annotations

import gzip
import io
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zarr
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask.cli import main
from glinthawk_dask.engine.engine import EngineConfig
from glinthawk_dask.pipeline.run import run_pipeline
from glinthawk_dask.pipeline.sink import read_output
from glinthawk_dask.pipeline.spec import parse_spec
from helpers import story_rows

MODEL = "smollm2-135m-instruct"
PIPELINES = Path(__file__).parent.parent / "pipelines"


def _rows(n: int) -> list[dict]:
    """Prompts of different lengths, some chat, some with their own max_tokens."""
    return story_rows(n, chat=(4, 3), commas=5)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(tmp_path: Path, inputs, out: str, **extra) -> dict:
    d = {
        "name": "t", "model": MODEL, "input": {"urls": inputs},
        "sampling": {"max_tokens": 12, "temperature": 0},
        "topology": {"mode": "in-process", "micro_batch_size": 8, "max_seq_len": 256},
        "output": {"url": out, "chunk_rows": 4},
    }
    for k, v in extra.items():
        d[k] = {**d[k], **v} if isinstance(d.get(k), dict) else v
    return d


def _table(url: str, storage_options=None) -> dict[str, dict]:
    """Output rows by id (each id asserted once)."""
    out = {}
    for r in read_output(url, storage_options=storage_options).records():
        assert r["id"] not in out, f"{r['id']} written twice"
        out[r["id"]] = r
    return out


def _tokens(table: dict[str, dict]) -> dict[str, list[int]]:
    return {k: r["completion_token_ids"] for k, r in table.items()}


@pytest.fixture(scope="module")
def llm():
    with LLM(MODEL, mode="in-process", engine_config=EngineConfig(micro_batch_size=8)) as llm:
        yield llm


def test_pipeline_matches_llm_generate_and_reads_with_plain_zarr(tmp_path, llm):
    rows = _rows(14)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "out.zarr")
    report = run_pipeline(parse_spec(_spec(tmp_path, str(src), out)), llm=llm)
    assert report.rows_done == 14 and report.errors == 0 and report.rows_in_output == 14

    g = zarr.open_group(out, mode="r")
    ids = list(g["id"][:])
    assert sorted(ids) == sorted(r["id"] for r in rows)
    attrs = g.attrs["glinthawk"]
    assert attrs["rows"] == 14 and attrs["model"] == MODEL
    assert attrs["sampling"]["max_tokens"] == 12
    flat, offsets, counts = g["completion_token_ids"][:], g["completion_offsets"][:], g["completion_tokens"][:]
    expected = {c.id: c for c in llm.generate(rows, SamplingParams(max_tokens=12))}
    for i, rid in enumerate(ids):
        c = expected[rid]
        assert list(flat[offsets[i]: offsets[i] + counts[i]]) == c.completion_token_ids, rid
        assert g["completion"][i] == c.completion and g["finish_reason"][i] == c.finish_reason
        assert g["prompt_tokens"][i] == len(c.prompt_token_ids)
        assert g["time_to_first_token"][i] > 0
    # the chat rows went through the chat template
    chat = [i for i, rid in enumerate(ids) if "messages" in rows[int(rid[1:])]]
    assert chat and all(g["prompt_tokens"][i] > 15 for i in chat)


def test_rerun_skips_committed_rows_and_refuses_a_changed_spec(tmp_path, llm):
    src = _write_jsonl(tmp_path / "in.jsonl", _rows(6))
    out = str(tmp_path / "out.zarr")
    spec = parse_spec(_spec(tmp_path, str(src), out))
    first = run_pipeline(spec, llm=llm)
    again = run_pipeline(spec, llm=llm)
    assert first.rows_done == 6 and again.rows_done == 0 and again.skipped == 6
    # more input: only the new rows are generated
    _write_jsonl(tmp_path / "in.jsonl", _rows(9))
    more = run_pipeline(spec, llm=llm)
    assert more.rows_done == 3 and more.skipped == 6 and len(_table(out)) == 9

    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(_spec(tmp_path, str(src), out, sampling={"max_tokens": 5})))
    res = CliRunner().invoke(main, ["run", str(changed), "-q"])
    assert res.exit_code == 1 and "different spec" in res.output and "--overwrite" in res.output
    assert "Traceback" not in res.output


def test_a_rerun_of_a_finished_run_does_nothing_until_its_input_changes(tmp_path, llm, monkeypatch):
    """A run that committed every row of its inputs records them (the spec's fingerprint
    and each file's listed version): a rerun returns at once, without a cluster or a
    model, until a file changes; a cancelled run, or an input store that lists no
    version, is never taken as finished."""
    import threading

    import glinthawk_dask.pipeline.run as run_mod
    from glinthawk_dask.pipeline import versions

    src = _write_jsonl(tmp_path / "in.jsonl", _rows(5))
    out = str(tmp_path / "out.zarr")
    spec = parse_spec(_spec(tmp_path, str(src), out))
    assert not run_pipeline(spec, llm=llm).complete

    def no_cluster(*args, **kwargs):
        raise AssertionError("a finished run started an LLM")

    monkeypatch.setattr(run_mod, "pipeline_llm", no_cluster)
    again = run_pipeline(spec)  # no llm given: one would be made, were there work
    assert again.complete and again.rows_done == 0 and again.skipped == 5 and again.rows_in_output == 5
    res = CliRunner().invoke(main, ["run", str(_spec_file(tmp_path, spec)), "-q"])
    assert res.exit_code == 0 and "nothing to run" in res.output and "--overwrite" in res.output, res.output

    _write_jsonl(tmp_path / "in.jsonl", _rows(7))  # rewritten: two more rows
    more = run_pipeline(spec, llm=llm)
    assert not more.complete and more.rows_done == 2 and more.skipped == 5
    assert run_pipeline(spec).complete and len(_table(out)) == 7

    other = parse_spec(_spec(tmp_path, str(src), str(tmp_path / "cancelled.zarr")))
    cancel = threading.Event()
    first = run_pipeline(other, llm=llm, progress=lambda p: p.rows_done >= 2 and cancel.set(), cancel=cancel)
    assert first.cancelled and first.rows_done < 7
    rest = run_pipeline(other, llm=llm)
    assert not rest.complete and rest.rows_done == 7 - first.rows_done

    monkeypatch.setattr(versions, "_VERSION_MARKS", ())  # a store listing sizes alone
    unversioned = parse_spec(_spec(tmp_path, str(src), str(tmp_path / "unversioned.zarr")))
    assert run_pipeline(unversioned, llm=llm).rows_done == 7
    again = run_pipeline(unversioned, llm=llm)
    assert not again.complete and again.skipped == 7


def _spec_file(tmp_path: Path, spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    return path


def test_killed_and_resumed_runs_give_the_uninterrupted_rows_once(tmp_path, llm):
    rows = _rows(40)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    d = _spec(tmp_path, str(src), "unused", sampling={"max_tokens": 16})
    whole = str(tmp_path / "whole.zarr")
    run_pipeline(parse_spec({**d, "output": {"url": whole, "chunk_rows": 4}}), llm=llm)

    out = tmp_path / "resumed.zarr"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**d, "output": {"url": str(out), "chunk_rows": 4}}))
    cmd = [sys.executable, "-m", "glinthawk_dask", "run", str(spec_file), "-q"]
    committed = []
    for kill_at in (4, 16, 28):  # kill the driver at several points, resuming each time
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        n = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                n = zarr.open_group(str(out), mode="r").attrs["glinthawk"]["rows"]
            except Exception:  # not created yet
                n = 0
            if n >= kill_at:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        partial = _table(str(out))  # committed rows intact, none twice
        assert kill_at <= len(partial) < 40, len(partial)
        committed.append(len(partial))
    assert committed == sorted(committed)

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already done" in done.stderr
    resumed, reference = _table(str(out)), _table(whole)
    assert sorted(resumed) == sorted(r["id"] for r in rows)
    assert _tokens(resumed) == _tokens(reference)
    for k in reference:
        assert resumed[k]["completion"] == reference[k]["completion"]
        assert resumed[k]["finish_reason"] == reference[k]["finish_reason"]


def test_ctrl_c_of_a_two_tier_run_commits_what_finished_and_says_how_to_resume(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the command and the embedded
    cluster's worker processes.  The run ends with one line (no tracebacks from the
    workers), exit code 130, its finished rows committed, and a rerun resumes."""
    import os

    import psutil

    rows = _rows(40)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.zarr"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(
        tmp_path, str(src), str(out), sampling={"max_tokens": 16},
        topology={"mode": "two-tier", "micro_batch_size": 4, "micro_batches": 2})))
    cmd = [sys.executable, "-m", "glinthawk_dask", "run", str(spec_file), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, n = time.monotonic() + 240, 0
    while time.monotonic() < deadline and proc.poll() is None and n < 4:
        try:
            n = zarr.open_group(str(out), mode="r").attrs["glinthawk"]["rows"]
        except Exception:  # not created yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the interrupt: {proc.stderr.read()}"
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C
    _, err = proc.communicate(timeout=120)
    committed = len(_table(str(out)))
    assert proc.returncode == 130, err
    assert f"Interrupted: t: {committed} rows are committed in {out}" in err and "rerun the same command" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert 4 <= committed < 40
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"processes outlived the interrupted run: {alive}"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f" {committed} already done)" in done.stderr, done.stderr
    assert sorted(_table(str(out))) == sorted(r["id"] for r in rows)


def test_s3_glob_of_jsonl_shards_and_parquet(tmp_path, llm, s3_bucket):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so["s3"], skip_instance_cache=True)
    rows = _rows(12)
    for k in range(3):
        blob = "".join(json.dumps(r) + "\n" for r in rows[4 * k: 4 * k + 4]).encode()
        fs.pipe(f"{bucket}/in/shard-{k}.jsonl" + (".gz" if k == 1 else ""), gzip.compress(blob) if k == 1 else blob)
    fs.pipe(f"{bucket}/in/notes.txt", b"not part of the glob")
    out = f"s3://{bucket}/out/run.zarr"
    spec = parse_spec(_spec(tmp_path, f"s3://{bucket}/in/shard-*.jsonl*", out,
                            storage_options=so, input={"format": "jsonl"}))
    report = run_pipeline(spec, llm=llm)
    assert report.rows_done == 12 and report.errors == 0 and report.shards_total == 3
    got = _table(out, storage_options=so)
    expected = {c.id: c.completion_token_ids for c in llm.generate(rows, SamplingParams(max_tokens=12))}
    assert _tokens(got) == expected

    table = pa.table({"key": [f"q{i}" for i in range(5)], "text": [f"Name a colour, {i}" for i in range(5)]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe(f"{bucket}/pq/data.parquet", buf.getvalue())
    spec = parse_spec(_spec(tmp_path, f"s3://{bucket}/pq/*.parquet", f"s3://{bucket}/out/pq.zarr",
                            storage_options=so, fields={"id": "key"}, template="Q: {text}\nA:"))
    assert run_pipeline(spec, llm=llm).rows_done == 5
    got = _table(f"s3://{bucket}/out/pq.zarr", storage_options=so)
    assert sorted(got) == [f"q{i}" for i in range(5)] and got["q3"]["prompt"] == "Q: Name a colour, 3\nA:"


def test_spec_level_problems_fail_before_the_model_loads(tmp_path, monkeypatch):
    import glinthawk_dask.api

    def no_model(*a, **k):
        raise AssertionError("the model must not load for a broken spec")

    monkeypatch.setattr(glinthawk_dask.api.LLM, "__init__", no_model)
    src = _write_jsonl(tmp_path / "in.jsonl", _rows(2))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        (_spec(tmp_path, str(src), str(tmp_path / "o.zarr"), model="no-such-model"), "no-such-model"),
        (_spec(tmp_path, str(tmp_path / "missing-*.jsonl"), str(tmp_path / "o.zarr")), "missing-*.jsonl"),
        (_spec(tmp_path, str(src), str(blocker / "o.zarr")), "o.zarr"),
    ]
    for d, needle in cases:
        f = tmp_path / "spec.yaml"
        f.write_text(yaml.safe_dump(d))
        res = CliRunner().invoke(main, ["run", str(f), "-q"])
        assert res.exit_code == 1, res.output
        assert needle in res.output and "Traceback" not in res.output
        assert res.output.strip().startswith("Error:") and len(res.output.strip().splitlines()) == 1


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_bad_or_good = st.one_of(
    st.builds(lambda t: json.dumps({"prompt": "Say " + t}), _text),  # good
    st.just(json.dumps({"prompt": ""})),  # empty prompt
    st.builds(lambda x: json.dumps({"prompt": x}), st.integers() | st.booleans() | st.lists(st.integers(), max_size=2)),
    st.just(json.dumps({"messages": "not a list"})),
    st.just(json.dumps({"messages": [{"role": "user"}]})),
    st.just(json.dumps({"text": "no prompt field"})),
    st.just(json.dumps({"prompt": "x", "temperature": -3})),
    st.just(json.dumps({"prompt": "x", "max_tokens": "many"})),
    st.just(json.dumps({"prompt": "word " * 300})),  # longer than max_seq_len
    st.just(json.dumps(17)),
    st.just('{"prompt": "unterminated'),
    st.just(b"\xff\xfe not utf-8"),
    st.builds(lambda t: json.dumps({"id": "same", "prompt": "Hi " + t}), _text),  # duplicate ids
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_bad_or_good, min_size=1, max_size=10))
def test_every_row_ends_as_a_completion_or_an_error_record(tmp_path_factory, llm, lines):
    d = tmp_path_factory.mktemp("rows")
    raw = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines)
    (d / "in.jsonl").write_bytes(raw + b"\n")
    spec = parse_spec(_spec(d, str(d / "in.jsonl"), str(d / "out.zarr"), sampling={"max_tokens": 2}))
    report = run_pipeline(spec, llm=llm)
    table = _table(str(d / "out.zarr"))
    assert len(table) == len(lines) == report.rows_done
    errors = [r for r in table.values() if r["finish_reason"] == "error"]
    assert len(errors) == report.errors
    for r in table.values():
        if r["finish_reason"] == "error":
            assert r["error"] and r["completion_token_ids"] == []
        else:
            assert not r["error"] and r["finish_reason"] in ("stop", "length")
    # a rerun finds every row committed
    assert run_pipeline(spec, llm=llm).rows_done == 0


def test_quickstart_spec_on_the_local_two_tier_cluster(tmp_path, llm):
    """The shipped quickstart, as a user runs it: a subprocess, the embedded cluster."""
    out = tmp_path / "quickstart.zarr"
    cmd = [sys.executable, "-m", "glinthawk_dask", "run", str(PIPELINES / "quickstart.yaml"), "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "8 rows written (0 errors" in proc.stderr, proc.stderr
    # the plan the planner chose (the spec says auto), told and kept in the output for inspect
    assert re.search(r"\n  plan two-tier, \d+ x \d+ micro-batches, chosen by the planner: predicted [\d.]+ tok/s"
                     r"( \([\d.]+ for the lengths the rows stopped at\))?, ran at [\d.]+", proc.stderr), proc.stderr

    g = zarr.open_group(str(out), mode="r")  # plain zarr
    assert g.attrs["glinthawk"]["rows"] == 8 and g["id"].shape == (8,)
    plan = g.attrs["glinthawk"]["last_plan"]
    assert plan["mode"] == "two-tier" and plan["planned"] and plan["predicted_tokens_per_s"] > 0
    assert sum(plan["sizes"]) >= 8 and plan["tokens_per_s"] > 0
    rows = [json.loads(line) for line in (PIPELINES / "prompts" / "quickstart.jsonl").read_text().splitlines()]
    expected = {c.id: c for c in llm.generate(rows, SamplingParams(max_tokens=64))}
    flat, offsets, counts = g["completion_token_ids"][:], g["completion_offsets"][:], g["completion_tokens"][:]
    for i, rid in enumerate(g["id"][:]):
        assert list(flat[offsets[i]: offsets[i] + counts[i]]) == expected[rid].completion_token_ids, rid
        assert g["completion"][i] == expected[rid].completion
    assert "Paris" in str(g["completion"][list(g["id"][:]).index("capital")])
    # rows that stop well short of max_tokens: the plan is predicted again on their lengths
    assert sum(len(c.completion_token_ids) for c in expected.values()) < 0.95 * 8 * 64
    assert plan["predicted_for_lengths"] > 0, plan
    assert f"({plan['predicted_for_lengths']:.1f} for the lengths the rows stopped at)" in proc.stderr
    # rerunning resumes: nothing left to do, known without starting anything
    again = subprocess.run(cmd + ["--mode", "in-process"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to run" in again.stderr and "(8 rows;" in again.stderr, again.stderr


def test_a_store_that_stops_taking_commits_ends_the_run_with_what_is_kept(tmp_path, llm, monkeypatch):
    """A full disk mid-run: the run ends with the commit's own error (not a second one from
    committing again on the way out), the committed rows stay, and a rerun once the store
    takes writes resumes after them: every row once, as an uninterrupted run gives."""
    from glinthawk_dask.pipeline.layout import OutputError

    rows = _rows(10)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "out.zarr")
    spec = parse_spec(_spec(tmp_path, str(src), out))
    update = zarr.Group.update_attributes

    def full_after_four_rows(self, new):
        if new.get("glinthawk", {}).get("rows", 0) > 4:
            raise OSError(28, "No space left on device")
        return update(self, new)

    monkeypatch.setattr(zarr.Group, "update_attributes", full_after_four_rows)
    with pytest.raises(OutputError) as failed:
        run_pipeline(spec, llm=llm)
    assert str(failed.value).startswith(f"cannot commit rows to {out} (OSError: [Errno 28] No space left on "
                                        "device): the 4 rows committed before are kept"), failed.value
    assert len(_table(out)) == 4
    monkeypatch.setattr(zarr.Group, "update_attributes", update)
    report = run_pipeline(spec, llm=llm)
    assert report.skipped == 4 and report.rows_done == 6
    expected = {c.id: c.completion_token_ids for c in llm.generate(rows, SamplingParams(max_tokens=12))}
    assert _tokens(_table(out)) == expected


def test_rows_are_committed_by_time_before_their_chunk_fills(tmp_path, llm):
    """With ``output.commit_seconds``, finished rows reach the output while the run goes,
    though no chunk is full; the output ends the same as with whole-chunk commits."""
    rows = _rows(10)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "out.zarr")
    spec = parse_spec(_spec(tmp_path, str(src), out, output={"url": out, "chunk_rows": 64, "commit_seconds": 1e-3}))
    seen = []
    report = run_pipeline(spec, llm=llm, progress=lambda p: seen.append(
        (p.rows_done, zarr.open_group(out, mode="r").attrs["glinthawk"]["rows"])))
    assert report.rows_done == 10
    assert any(0 < committed < 10 for _, committed in seen), seen  # before the end, with chunks of 64
    whole = str(tmp_path / "whole.zarr")
    run_pipeline(parse_spec(_spec(tmp_path, str(src), whole, output={"url": whole, "chunk_rows": 64,
                                                                      "commit_seconds": None})), llm=llm)
    assert _tokens(_table(out)) == _tokens(_table(whole)) and len(_table(out)) == 10


def test_progress_counts_tokens_of_running_rows_and_estimates_from_tokens_left(tmp_path):
    from glinthawk_dask.pipeline.run import Progress

    # by the tokens left at the rate so far
    p = Progress(shards_read=4, shards_total=4, seconds=10.0, generated_tokens=200, tokens_left=300)
    assert p.tokens_per_s == pytest.approx(20.0) and p.eta_seconds == pytest.approx(15.0)
    assert Progress(shards_read=4, shards_total=4).eta_seconds is None  # nothing generated yet
    # at the rate since the first token, once a second of it is known (the first came 6 s in: 200 in 4 s)
    p.first_token_seconds = 6.0
    assert p.tokens_per_s == pytest.approx(20.0) and p.eta_seconds == pytest.approx(6.0)
    p.first_token_seconds = 9.5  # (half a second of it: not known yet)
    assert p.eta_seconds is None
    assert Progress(shards_read=0, shards_total=4, seconds=10.0, generated_tokens=5).eta_seconds is None

    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Count to {i}:"} for i in range(6)])
    spec = parse_spec(_spec(tmp_path, str(src), str(tmp_path / "o.zarr"),
                            sampling={"max_tokens": 16, "ignore_eos": True},
                            topology={"micro_batch_size": 3}))
    seen = []
    report = run_pipeline(spec, progress=lambda s: seen.append((s.rows_done, s.generated_tokens, s.eta_seconds)))
    assert report.generated_tokens == 6 * 16 and report.rows_done == 6
    # mid-run, tokens of rows still running count (before this, only finished rows did)
    assert any(rows < 6 and tokens > 16 * rows for rows, tokens, _ in seen), seen
    assert any(eta is not None and eta > 0 for rows, _, eta in seen if rows < 6), seen
    assert 0 < report.first_token_seconds < report.seconds  # (when the first token came, in the run's seconds)


def test_tokens_left_scale_by_the_share_of_max_tokens_the_finished_rows_used():
    """Rows that stop early leave most of max_tokens unused: once as many rows have
    finished as are in flight (and 32), the rows not fed yet count the share of their
    budget the finished rows used; the rows in flight count their whole budget less what
    they have (the long ones are those still running)."""
    from glinthawk_dask.pipeline.run import _RequestFeed

    feed = _RequestFeed.__new__(_RequestFeed)  # its counts alone, as the run keeps them
    feed.shards = [None] * 2  # one of two shards read
    feed.shards_read, feed.budget_read, feed.token_budget = 1, 100 * 64, 100 * 64
    feed.fed, feed.running, feed.budget_done = 40, {f"r{i}": 64 for i in range(10)}, 30 * 64
    # 30 finished (< 32): 70 unfinished rows' 64 tokens and the unread shard's 6,400, less 50 running
    assert feed.tokens_left(running=50, done=30 * 16) == 70 * 64 + 100 * 64 - 50
    feed.fed, feed.running, feed.budget_done = 50, {f"r{i}": 64 for i in range(10)}, 40 * 64
    # 40 finished used a quarter of their budget: so will the 50 rows not fed and the unread shard
    assert feed.tokens_left(running=50, done=40 * 16) == round((50 * 64 + 100 * 64) / 4 + 10 * 64 - 50)
    # rows in flight each have at least one token to go
    feed.token_budget = feed.budget_done + 10 * 64
    feed.budget_read = 0
    assert feed.tokens_left(running=10_000, done=40 * 16) == 10


def test_progress_counts_the_rows_and_tokens_of_a_whole_shard_before_the_engine_takes_them(tmp_path):
    """One file of many rows is one shard: the engine pulls its requests a few at a time,
    but the run's rows and tokens left count the whole shard (before this, the ETA was
    the time to finish the rows the engine held: 21 s into a 514 s run), and shards not
    read yet are estimated from those read."""
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Count to {i}:"} for i in range(12)])
    spec = parse_spec(_spec(tmp_path, str(src), str(tmp_path / "o.zarr"),
                            sampling={"max_tokens": 8, "ignore_eos": True}, topology={"micro_batch_size": 2}))
    seen = []
    report = run_pipeline(spec, progress=lambda s: seen.append(
        (s.rows_done, s.rows_total, s.rows_total_exact, s.generated_tokens, s.tokens_left)))
    assert report.rows_done == 12 and report.rows_total == 12 and report.rows_total_exact
    early = [x for x in seen if x[0] == 0 and x[1] is not None]
    assert early, seen
    # nothing finished yet: every row's 8 tokens are either generated or left
    assert all(total == 12 and exact and tokens + left == 12 * 8 for _, total, exact, tokens, left in early), early
    assert [x[4] for x in seen if x[1] is not None] == sorted((x[4] for x in seen if x[1] is not None), reverse=True)

    # three shards of 4 rows, the first committed by an earlier run: while one shard is read,
    # the rest are taken to be like it
    shards = [_write_jsonl(tmp_path / f"s{k}.jsonl", [{"id": f"s{k}-{i}", "prompt": f"Say {i}"} for i in range(4)])
              for k in range(3)]
    out = str(tmp_path / "three.zarr")
    first = parse_spec(_spec(tmp_path, [str(shards[0])], out, sampling={"max_tokens": 8, "ignore_eos": True},
                             topology={"micro_batch_size": 2}))
    run_pipeline(first)
    spec = parse_spec(_spec(tmp_path, [str(x) for x in shards], out, sampling={"max_tokens": 8, "ignore_eos": True},
                            topology={"micro_batch_size": 2}))
    seen = []
    report = run_pipeline(spec, force=True, progress=lambda s: seen.append(
        (s.shards_read, s.rows_done, s.rows_total, s.rows_total_exact, s.generated_tokens, s.tokens_left)))
    assert report.skipped == 4 and report.rows_done == 8 and report.rows_total == 8
    # two shards read (the committed one holds nothing to do): the third is taken as their mean
    two = [x for x in seen if x[0] == 2 and x[1] == 0]
    assert two and all(total == 8 and not exact and tokens + left == 8 * 8
                       for _, _, total, exact, tokens, left in two), seen


def test_run_seconds_end_at_the_last_commit_and_the_close_is_reported_apart(tmp_path, monkeypatch):
    """The run's tokens/s is over generation and commits alone: closing the LLM made for
    the run (a whole local cluster, usually) is ``shutdown_seconds``, as start-up is
    ``startup_seconds``."""
    closed_at = []
    close = LLM.close

    def slow_close(self):
        closed_at.append(time.perf_counter())
        time.sleep(0.6)
        close(self)

    monkeypatch.setattr(LLM, "close", slow_close)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Count to {i}:"} for i in range(3)])
    spec = parse_spec(_spec(tmp_path, str(src), str(tmp_path / "o.zarr"), sampling={"max_tokens": 4}))
    before = time.perf_counter()
    report = run_pipeline(spec)
    assert report.rows_done == 3 and len(_table(str(tmp_path / "o.zarr"))) == 3
    assert len(closed_at) == 1 and report.shutdown_seconds >= 0.6
    assert before + report.startup_seconds + report.seconds <= closed_at[0]


def test_a_resumed_run_plans_on_the_lengths_of_the_rows_committed_before(tmp_path, llm, monkeypatch):
    """What the engine is given to plan by: nothing on a first run; on a resumed one the
    completion lengths of the rows already committed (which an auto plan expects rows to
    stop at, instead of max_tokens)."""
    asked = []
    stream = LLM.stream_requests

    def spy(self, requests, **kwargs):
        asked.append(kwargs.get("output_lengths"))
        return stream(self, requests, **kwargs)

    monkeypatch.setattr(LLM, "stream_requests", spy)
    src = _write_jsonl(tmp_path / "in.jsonl", _rows(6))
    out = str(tmp_path / "out.zarr")
    spec = parse_spec(_spec(tmp_path, str(src), out))
    run_pipeline(spec, llm=llm)
    done = [len(r["completion_token_ids"]) for r in _table(out).values() if not r["error"]]
    _write_jsonl(tmp_path / "in.jsonl", _rows(9))
    assert run_pipeline(spec, llm=llm).rows_done == 3
    assert asked[0] is None and sorted(asked[1]) == sorted(done) and len(done) >= 5


def test_a_wait_for_kv_other_runs_held_is_reported_apart_from_the_run(tmp_path, llm, monkeypatch):
    """A run placed only after other runs freed KV: the wait (as the LLM reports it) is
    not part of the run's seconds and rate, and its line says how long it waited."""
    from glinthawk_dask.cli.pipeline import run_line

    waited = [0.0]
    monkeypatch.setattr(LLM, "placement_wait_seconds", property(lambda self: waited[0]))
    stream = LLM.stream_requests

    def placed_late(self, *args, **kwargs):  # as a distributed run that waited 0.6 s to be placed
        time.sleep(0.6)
        waited[0] = 0.6
        yield from stream(self, *args, **kwargs)

    monkeypatch.setattr(LLM, "stream_requests", placed_late)
    src = _write_jsonl(tmp_path / "in.jsonl", _rows(4))
    before = time.perf_counter()
    report = run_pipeline(parse_spec(_spec(tmp_path, str(src), str(tmp_path / "o.zarr"))), llm=llm)
    took = time.perf_counter() - before
    assert report.rows_done == 4 and report.waited_seconds == 0.6
    assert report.startup_seconds + report.waited_seconds + report.seconds <= took
    assert report.tokens_per_s == report.generated_tokens / report.seconds
    line = run_line("p", report)
    assert f"started in {report.startup_seconds:.1f} s, waited 0.6 s for KV other runs held, closed in " in line
    assert "waited" not in run_line("p", dataclasses.replace(report, waited_seconds=0.0))


def test_a_run_that_lost_workers_says_so_in_its_report_and_its_output(tmp_path, llm, monkeypatch):
    """Recoveries the LLM reports (faked here: test_faults loses real workers) reach the
    progress, the report and the output's attributes, which `inspect` shows."""
    recoveries: list[dict] = []
    monkeypatch.setattr(LLM, "recoveries", property(lambda self: list(recoveries)))
    seen = []

    def progress(p):
        seen.append(len(p.recoveries))
        if p.generated_tokens and not recoveries:  # lost mid-run
            recoveries.append({"kind": "moved micro-batch", "cause": "attention worker tcp://x:1 (slice 0, "
                               "micro-batch 0): gone", "micro_batch": 0, "to": "tcp://y:2", "requests": 2,
                               "rebuilt_tokens": 30, "seconds": 0.5, "time": 1764923400.0})

    src = _write_jsonl(tmp_path / "in.jsonl", _rows(6))
    out = str(tmp_path / "out.zarr")
    report = run_pipeline(parse_spec(_spec(tmp_path, str(src), out)), llm=llm, progress=progress)
    assert report.rows_done == 6 and report.recoveries == recoveries and seen[0] == 0 and seen[-1] == 1
    attrs = zarr.open_group(out, mode="r").attrs["glinthawk"]
    assert attrs["recoveries_total"] == 1 and attrs["recoveries"] == recoveries
    shown = CliRunner().invoke(main, ["inspect", out])
    assert shown.exit_code == 0, shown.output
    assert ("recoveries   1 lost worker, recovered; every row was computed once; the last, 2025-12-05 08:30:00 UTC: "
            "lost attention worker tcp://x:1") in shown.output, shown.output
    info = json.loads(CliRunner().invoke(main, ["inspect", out, "--json"]).output)
    assert info["recoveries"] == 1 and info["last_recovery"]["to"] == "tcp://y:2"


def test_an_input_only_this_machine_sees_is_told_as_such(tmp_path):
    """Shards are read on the cluster's CPU workers: a path they do not see (here a
    memory:// file of this process, which the embedded cluster's worker processes do not
    share) fails with what to do, not only "not found"."""
    import fsspec

    from glinthawk_dask.errors import GlinthawkError

    url = f"memory://glinthawk-unseen-{time.time_ns()}/in.jsonl"
    with fsspec.open(url, "w") as f:
        f.write("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": [1 + i, 2, 3]}) + "\n" for i in range(4)))
    spec = parse_spec(_spec(tmp_path, url, str(tmp_path / "out.zarr"), model="random:tiny-gqa",
                            topology={"mode": "two-tier", "micro_batch_size": 4, "max_seq_len": 64}))
    with pytest.raises(GlinthawkError) as failed:
        run_pipeline(spec)
    message = str(failed.value)
    assert "cannot read memory:///glinthawk-unseen-" in message and "/in.jsonl: not found" in message, message
    assert "the file is on this machine, but the cluster's CPU workers, which read the input, do not see it" in message
    assert "a path on a filesystem they share" in message


def test_a_model_file_the_cpu_workers_do_not_find_is_told_as_such(tmp_path):
    """The CPU workers tokenize shards with the model's tokenizer: one that lacks a model
    file this machine has is told what to do (the dense side's twin is in test_two_tier)."""
    from types import SimpleNamespace

    from glinthawk_dask.errors import ModelLoadError
    from glinthawk_dask.pipeline.run import load_model

    here = tmp_path / "model.gguf"
    here.write_bytes(b"GGUF")

    def run(fn, model, workers):  # a CPU worker's host without the file
        raise ModelLoadError(f"no such file or directory: {model}; pass a .gguf file, ...")

    llm = SimpleNamespace(generate=lambda *a, **k: [], tier_workers=lambda: {"attention": ["tcp://cpu:1"]},
                          client=SimpleNamespace(run=run))
    with pytest.raises(ModelLoadError, match=f"the CPU workers, which tokenize the input, do not find the model "
                                             f"{here}, which is on this machine"):
        load_model(llm, str(here))
    with pytest.raises(ModelLoadError, match="^no such file or directory: /nowhere"):  # missing here too: as it was
        load_model(llm, "/nowhere/model.gguf")


def test_a_run_another_run_takes_over_stops_with_why_and_leaves_each_row_once(tmp_path, llm):
    from glinthawk_dask.pipeline.sink import OutputError, ZarrSink

    src = _write_jsonl(tmp_path / "in.jsonl", _rows(12))
    out = str(tmp_path / "out.zarr")
    spec = parse_spec(_spec(tmp_path, str(src), out))
    taken = []

    def progress(p):
        if p.rows_done >= 4 and not taken:  # the same spec started again elsewhere
            taken.append(ZarrSink.open(out, fingerprint="other", model="m", spec={}, sampling={}, force=True))

    with pytest.raises(OutputError, match="another run opened .* this run stops writing there"):
        run_pipeline(spec, llm=llm, progress=progress)
    assert 4 <= len(_table(out)) < 12  # what it committed before, each row once
