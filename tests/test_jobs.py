"""Job handles for notebooks: non-blocking submit, progress, results, cancel, DataFrames, reprs."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask.engine.engine import EngineConfig
from glinthawk_dask.errors import GlinthawkError
from glinthawk_dask.jobs import COLUMNS, JobCancelledError, JobProgress, submit, submit_prompts
from glinthawk_dask.pipeline.sink import read_output
from glinthawk_dask.pipeline.spec import SpecError
from helpers import story_rows

MODEL = "smollm2-135m-instruct"


def _rows(n: int) -> list[dict]:
    """Prompts of different lengths and budgets, so that they finish at different steps."""
    return story_rows(n, chat=(7, 5), commas=4, budget=(2, 5))


ROWS = _rows(16)
PARAMS = SamplingParams(max_tokens=10)


@pytest.fixture(scope="module")
def llm():
    # small micro-batches: completions arrive one step at a time, so progress and cancel have room
    with LLM(MODEL, mode="in-process", engine_config=EngineConfig(micro_batch_size=4)) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(llm) -> dict:
    """Completions of ROWS with PARAMS by id, uninterrupted (a job's result equals llm.generate's:
    see the first test)."""
    return {c.id: c for c in submit_prompts(llm, ROWS, PARAMS).result(timeout=300)}


def _spec(tmp_path: Path, rows: list[dict], max_tokens: int = 10, chunk_rows: int = 4) -> dict:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "name": "jobs", "model": MODEL, "input": {"urls": str(src)},
        "sampling": {"max_tokens": max_tokens, "temperature": 0},
        "topology": {"mode": "in-process", "micro_batch_size": 4, "max_seq_len": 128},
        "output": {"url": str(tmp_path / "out.zarr"), "chunk_rows": chunk_rows},
    }


def _watch(job, until=lambda p: p.done) -> list:
    """Progress snapshots of ``job`` until ``until`` holds (or a minute passes)."""
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        p = job.progress
        seen.append(p)
        if until(p) or p.done:
            break
        time.sleep(0.01)
    return seen


def test_progress_arithmetic():
    p = JobProgress(status="running", rows_done=2, rows_total=10, generated_tokens=30, seconds=4.0)
    assert p.tokens_per_s == 7.5 and p.eta_seconds == 16.0 and p.rows_text() == "2/10" and not p.done
    pipe = JobProgress(status="running", rows_done=5, shards_read=0, shards_total=4, seconds=3.0)
    assert pipe.eta_seconds is None and pipe.rows_text() == "5"  # nothing read yet: unknown
    # a shard read: the rows estimated from it, the ETA from the tokens left at the rate so far
    pipe = dataclasses.replace(pipe, shards_read=1, rows_total=40, rows_total_exact=False, generated_tokens=60,
                               tokens_left=420)
    assert pipe.rows_text() == "5/~40" and pipe.eta_seconds == pytest.approx(21.0)
    assert dataclasses.replace(pipe, shards_read=4, rows_total_exact=True).rows_text() == "5/40"
    assert JobProgress(status="running").eta_seconds is None and JobProgress().tokens_per_s == 0.0
    assert JobProgress(status="finished", rows_done=1, rows_total=1).eta_seconds == 0.0


def test_generation_job_runs_in_the_background_and_equals_generate(llm):
    rows = [*_rows(8), {"id": "bad", "prompt": ""}]
    params = SamplingParams(max_tokens=6)
    t0 = time.perf_counter()
    job = submit_prompts(llm, rows, params)
    submitted = time.perf_counter() - t0
    assert not job.done()
    seen = _watch(job)
    assert job.wait(120) and job.done() and job.status == "finished"
    # it returned at once, not after the work (a ratio: the machine's speed moves both alike)
    assert submitted < 0.25 * (time.perf_counter() - t0), submitted
    done = [p.rows_done for p in seen]
    assert done == sorted(done) and len({d for d in done if 0 < d < len(rows)}) >= 2, done  # it advanced

    got = job.result()
    expected = llm.generate(rows, params)
    assert [c.id for c in got] == [c.id for c in expected] == [r["id"] for r in rows]
    assert [c.completion_token_ids for c in got] == [c.completion_token_ids for c in expected]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in expected]

    p = job.progress
    assert (p.rows_done, p.rows_total, p.errors) == (9, 9, 1)
    assert p.generated_tokens == sum(len(c.completion_token_ids) for c in got) and p.tokens_per_s > 0

    df = job.to_pandas()
    assert tuple(df.columns) == COLUMNS and list(df["id"]) == [r["id"] for r in rows]
    assert list(df["completion"]) == [c.completion for c in got]
    assert df.loc[8, "finish_reason"] == "error" and "empty" in df.loc[8, "error"]
    assert df["error"][:8].isna().all() and (df["time_to_first_token"][:8] > 0).all()
    assert list(df["prompt_tokens"]) == [len(c.prompt_token_ids) for c in got]

    assert repr(job).startswith("<GenerationJob finished: 9/9 rows,") and "1 errors" in repr(job)
    assert "tok/s" in repr(job)
    html = job._repr_html_()
    assert html.startswith("<table") and "finished" in html and "9/9" in html
    assert job.cancel() is False  # already over


def test_show_progress_prints_a_bar_until_the_job_ends(llm, capsys):
    job = submit_prompts(llm, ["The capital of France is", "Once upon a time"], SamplingParams(max_tokens=4))
    assert job.show_progress() is job and job.done()
    err = capsys.readouterr().err
    assert "GenerationJob" in err and "2/2" in err and "finished" in err


def test_cancelling_a_generation_job_stops_it_and_keeps_the_finished_completions(llm, reference):
    job = submit_prompts(llm, ROWS, PARAMS)
    _watch(job, until=lambda p: p.rows_done >= 3)
    assert job.cancel() is True
    assert job.wait(60) and job.status == "cancelled"
    assert 3 <= job.progress.rows_done < len(ROWS)
    with pytest.raises(JobCancelledError, match="cancelled after"):
        job.result()
    finished = job.completions()
    assert len(finished) == job.progress.rows_done == len(job.to_pandas())
    assert all(c.completion_token_ids == reference[c.id].completion_token_ids for c in finished)
    # the engine's run was closed: the LLM works as before
    assert [c.completion_token_ids for c in llm.generate(ROWS[:2], PARAMS)] == [
        reference[r["id"]].completion_token_ids for r in ROWS[:2]]


def test_pipeline_job_runs_in_the_background(tmp_path, llm, reference):
    rows = ROWS[:10]
    job = submit(_spec(tmp_path, rows), llm=llm)
    assert not job.done() and job.progress.rows_total is None
    assert job.output == str(tmp_path / "out.zarr")
    seen = _watch(job)
    report = job.result(timeout=120)
    assert report.rows_done == 10 and report.errors == 0 and not report.cancelled and report.rows_in_output == 10
    assert len({p.rows_done for p in seen if 0 < p.rows_done < 10}) >= 1  # it advanced
    p = job.progress
    assert p.status == "finished" and p.rows_done == 10 and (p.shards_read, p.shards_total) == (1, 1)
    assert (p.rows_total, p.rows_total_exact) == (10, True) and p.rows_text() == "10/10"
    # while it ran, the shard's ten rows were known before the engine had taken them all
    assert any(q.rows_total == 10 and q.rows_done < 10 and q.eta_seconds for q in seen), seen

    df = job.to_pandas()
    assert tuple(df.columns) == COLUMNS and len(df) == 10 and df["error"].isna().all()
    assert dict(zip(df["id"], df["completion"])) == {r["id"]: reference[r["id"]].completion for r in rows}

    table = read_output(job.output)
    full = table.to_pandas()
    assert list(full["id"]) == list(df["id"])
    assert list(full["completion_token_ids"]) == [r["completion_token_ids"] for r in table.records()]
    assert full.set_index("id").loc["r5", "prompt"] == ROWS[5]["messages"]  # chat prompts decoded
    assert repr(job).startswith("<PipelineJob 'jobs' finished: 10/10 rows,") and repr(job).endswith(f"-> {job.output}>")
    assert "shards 1/1" in repr(job) and job.output in job._repr_html_()

    again = submit(_spec(tmp_path, rows), llm=llm).result(timeout=120)
    assert again.rows_done == 0 and again.skipped == 10


def test_cancelled_pipeline_keeps_complete_rows_and_a_rerun_finishes_them(tmp_path, llm, reference):
    rows, expected = ROWS, reference
    d = _spec(tmp_path, rows, chunk_rows=4)
    job = submit(d, llm=llm)
    _watch(job, until=lambda p: p.rows_done >= 5)
    assert job.cancel()
    report = job.result(timeout=120)
    assert report.cancelled and job.status == "cancelled"
    assert 5 <= report.rows_in_output < len(rows) and report.rows_in_output == report.rows_done

    partial = list(read_output(job.output).records())
    assert len(partial) == report.rows_in_output == len(job.to_pandas())
    for r in partial:  # committed rows are whole completions
        assert r["completion_token_ids"] == expected[r["id"]].completion_token_ids, r["id"]
        assert r["finish_reason"] == expected[r["id"]].finish_reason

    rest = submit(d, llm=llm).result(timeout=120)
    assert not rest.cancelled and rest.skipped == len(partial) and rest.rows_done == len(rows) - len(partial)
    final = list(read_output(job.output).records())
    assert sorted(r["id"] for r in final) == sorted(expected)
    assert {r["id"]: r["completion_token_ids"] for r in final} == {
        k: c.completion_token_ids for k, c in expected.items()}


def test_jobs_on_one_llm_take_turns_and_a_queued_job_can_be_cancelled(tmp_path, llm, reference):
    first = submit_prompts(llm, ROWS[:8], PARAMS)
    second = submit_prompts(llm, ROWS[8:11], PARAMS)
    third = submit(_spec(tmp_path, ROWS[:3]), llm=llm)
    _watch(first, until=lambda p: p.status == "running")
    assert second.status == "queued" and third.status == "queued"
    assert third.cancel()
    report = third.result(timeout=10)  # cancelled while waiting: ends without running
    assert report.cancelled and report.rows_done == 0 and third.status == "cancelled"
    assert [c.completion_token_ids for c in second.result(timeout=120)] == [
        reference[r["id"]].completion_token_ids for r in ROWS[8:11]]
    assert [c.completion_token_ids for c in first.result(timeout=120)] == [
        reference[r["id"]].completion_token_ids for r in ROWS[:8]]


def test_errors_are_raised_again_by_result(tmp_path, llm, monkeypatch):
    # in the job's thread: the input matches nothing
    d = _spec(tmp_path, _rows(2))
    d["input"] = {"urls": str(tmp_path / "missing-*.jsonl"), "format": "jsonl"}
    job = submit(d, llm=llm)
    with pytest.raises(GlinthawkError, match="missing-"):
        job.result(timeout=60)
    assert job.status == "failed" and isinstance(job.exception(), GlinthawkError)
    assert "failed" in repr(job) and "missing-" in repr(job)

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(llm.engine, "generate", broken)
    gen = submit_prompts(llm, ["Hello"], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="boom"):
        gen.result(timeout=60)
    assert gen.status == "failed"
    monkeypatch.undo()

    # at submit: a bad spec, or an LLM of another model
    with pytest.raises(SpecError, match="sampling"):
        submit({**_spec(tmp_path, _rows(1)), "sampling": {"temperature": -1}})
    with pytest.raises(GlinthawkError, match="random:tiny-mha"):
        submit({**_spec(tmp_path, _rows(1)), "model": "random:tiny-mha"}, llm=llm)


EXIT_SCRIPT = """
import atexit, json, sys, time
from glinthawk_dask import LLM, SamplingParams, submit, submit_prompts
from glinthawk_dask.engine.engine import EngineConfig

spec = json.loads(sys.argv[1])
llm = LLM(spec["model"], mode="in-process", engine_config=EngineConfig(micro_batch_size=4))
running = submit(spec, llm=llm)
queued = submit_prompts(llm, ["Hello"], SamplingParams(max_tokens=2))
atexit.register(lambda: print("at exit:", running.status, queued.status, running.result().rows_done, flush=True))
while running.progress.rows_done < 2:
    time.sleep(0.01)
"""


def test_at_interpreter_exit_running_jobs_stop_and_commit_and_queued_ones_do_not_run(tmp_path):
    import subprocess
    import sys

    rows = _rows(48)
    spec = _spec(tmp_path, rows, max_tokens=20)
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    status = done.stdout.split("at exit:")[1].split()
    assert status[:2] == ["cancelled", "cancelled"]  # before atexit handlers (which close clusters)
    committed = len(read_output(spec["output"]["url"]))
    assert 2 <= committed == int(status[2]) < len(rows)


def test_no_job_threads_are_left_behind():
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("glinthawk-") and t.is_alive()]
