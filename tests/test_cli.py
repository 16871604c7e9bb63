"""``glinthawk generate``: the output contract and every user-error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from glinthawk_dask.cli import main
from glinthawk_dask.model import from_name


def _invoke(*args, input=None):
    result = CliRunner().invoke(main, ["generate", *args], input=input)
    return result


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in result.output, result.output


def test_generate_token_ids_on_a_synthetic_model(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "prompt_token_ids": [1, 2, 3, 4]},
        {"prompt_token_ids": [5, 6], "max_tokens": 3},
        {"id": "c", "prompt_token_ids": [7] * 300},  # beyond tiny-gqa's context of 256
        {"id": "d", "prompt": "text needs a tokenizer"},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "out.jsonl"
    result = _invoke("--model", "random:tiny-gqa", "--input", str(src), "--output", str(out),
                     "--max-tokens", "5", "--temperature", "0.7", "--seed", "3")
    assert result.exit_code == 0, result.output
    got = _lines(out.read_text())
    assert [g["id"] for g in got][:1] == ["a"] and len(got) == 5
    a, b, c, d, bad = got
    assert a["finish_reason"] == "length" and len(a["completion_token_ids"]) == 5
    assert a["prompt"] == [1, 2, 3, 4]
    assert len(b["completion_token_ids"]) == 3 and b["id"]  # a stable id was made up
    assert c["finish_reason"] == "error" and "context is 256" in c["error"]
    assert d["finish_reason"] == "error" and "no tokenizer" in d["error"]
    assert bad["finish_reason"] == "error" and "line 5: not valid JSON" in bad["error"]
    assert "3 rows failed" in result.output


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write: no space left)")
def test_an_output_that_cannot_be_written_is_one_line_saying_what_it_holds(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": [1 + i, 2]}) + "\n" for i in range(3)))
    result = _invoke("--model", "random:tiny-gqa", "--mode", "in-process", "--input", str(src), "--output",
                     "/dev/full", "--max-tokens", "2", "--quiet")
    _assert_one_line_error(result, "cannot write /dev/full (No space left on device): it holds at most the first",
                           "of 3 rows", "make room and rerun")


def test_rows_are_written_in_input_order_as_soon_as_those_before_them_finished():
    import io

    from glinthawk_dask.cli.generate import _InOrder
    from glinthawk_dask.engine.request import Completion, Request

    entries = [Request(f"r{i}", [1, 2]) for i in range(5)]
    flushed = []

    class Out(io.StringIO):
        def flush(self):
            flushed.append(self.getvalue().count("\n"))

    out = Out()
    w = _InOrder(out, entries)

    def done(i):
        return Completion(f"r{i}", [1, 2], [1, 2], "x", [7] * i, "length")

    w.add(done(1))  # r0 still running: r1 waits
    assert out.getvalue() == "" and flushed == []
    w.add(done(0))
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == ["r0", "r1"] and flushed == [2]
    w.add(done(3))
    assert flushed == [2]
    assert w.finish() == 3  # interrupted: r3 written after r1, r2 and r4 never finished
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == ["r0", "r1", "r3"]
    assert (w.written, w.tokens, w.errors) == (3, 0 + 1 + 3, 0)


def test_generate_writes_rows_while_the_run_goes(tmp_path):
    """The output grows as rows finish (whole lines, in input order), not at the end."""
    import time

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": [1 + i % 50, 2, 3]}) + "\n"
                           for i in range(400)))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "glinthawk_dask", "generate", "--model", "random:tiny-gqa",
                             "--mode", "in-process", "--micro-batch-size", "4", "--micro-batches", "1",
                             "--max-tokens", "48", "--input", str(src), "--output", str(out), "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    partial = []
    while proc.poll() is None:
        if out.exists():
            text = out.read_text()
            lines = text[:text.rfind("\n") + 1].splitlines()  # whole lines
            if 0 < len(lines) < 400:
                partial = lines
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    assert partial, "nothing was written before the run ended"
    assert [json.loads(line)["id"] for line in partial] == [f"r{i}" for i in range(len(partial))]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"r{i}" for i in range(400)]


def test_generate_is_reproducible_with_a_seed(tmp_path):
    args = ["--model", "random:tiny-mha", "--input", "-", "--max-tokens", "6",
            "--temperature", "1.0", "--seed", "11"]
    stdin = json.dumps({"id": "x", "prompt_token_ids": [3, 1, 4, 1, 5]}) + "\n"
    first = _lines(_invoke(*args, input=stdin).output)
    second = _lines(_invoke(*args, input=stdin).output)
    assert first[0]["completion_token_ids"] == second[0]["completion_token_ids"]


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--model", "no-such-model", "--prompt", "hi"], ["unknown", "smollm2-135m-instruct"]),
        (["--model", "/nonexistent/model.gguf", "--prompt", "hi"], ["/nonexistent/model.gguf"]),
        (["--model", "llama-2-7b", "--prompt", "hi"], ["random:llama-2-7b"]),
        (["--prompt", "hi", "--temperature", "-1"], ["temperature"]),
        (["--prompt", "hi", "--top-p", "0"], ["top_p"]),
        ([], ["--input", "--prompt"]),
        (["--input", "/nonexistent.jsonl"], ["/nonexistent.jsonl"]),
        (["--prompt", "hi", "--dtype", "float64"], ["dtype"]),
    ],
)
def test_user_errors_are_one_line(args, fragments):
    _assert_one_line_error(_invoke(*args), *fragments)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    _assert_one_line_error(_invoke("--model", str(bad), "--prompt", "hi"), "broken.gguf")


def test_hf_directory_missing_a_tensor_is_a_clear_error(tmp_path, make_hf_dir):
    directory, _ = make_hf_dir(from_name("tiny-gqa"))
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    result = _invoke("--model", str(directory), "--prompt", "hi")
    _assert_one_line_error(result, "model.layers.1.mlp.up_proj.weight")


@pytest.mark.slow
def test_generate_subprocess_on_the_embedded_model(tmp_path):
    """The real command on the default model: text, chat, an empty prompt, a prompt longer
    than the context."""
    src = tmp_path / "in.jsonl"
    rows = [
        {"id": "fr", "prompt": "The capital of France is"},
        {"id": "chat", "messages": [{"role": "user", "content": "Say hello."}]},
        {"id": "empty", "prompt": ""},
        {"id": "long", "prompt": "word " * 9000},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "glinthawk_dask", "generate", "--input", str(src), "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    got = {r["id"]: r for r in _lines(proc.stdout)}
    assert got["fr"]["completion"].startswith(" Paris")
    assert got["fr"]["finish_reason"] == "length" and len(got["fr"]["completion_token_ids"]) == 8
    assert got["chat"]["completion"] and got["chat"]["prompt_tokens"] > 10
    assert got["empty"]["finish_reason"] == "error" and "empty prompt" in got["empty"]["error"]
    assert got["long"]["finish_reason"] == "error" and "context is 8192" in got["long"]["error"]
    assert "Traceback" not in proc.stderr and "2 rows failed" in proc.stderr


def test_generate_takes_prompts_as_arguments_and_reads_stdin_without_them():
    # PROMPT arguments come first, then --prompt (a random model has no tokenizer: error rows keep the prompt)
    result = _invoke("--model", "random:tiny-gqa", "--mode", "in-process", "first", "second", "--prompt", "third")
    assert result.exit_code == 0, result.output
    assert [r["prompt"] for r in _lines(result.output)] == ["first", "second", "third"]
    # no prompt given and stdin is not a terminal: JSONL rows from stdin
    stdin = "".join(json.dumps({"id": i, "prompt_token_ids": [1, 2, 3]}) + "\n" for i in ("a", "b"))
    result = _invoke("--model", "random:tiny-gqa", "--mode", "in-process", "--max-tokens", "2", input=stdin)
    assert result.exit_code == 0, result.output
    got = _lines(result.output)
    assert [r["id"] for r in got] == ["a", "b"] and all(len(r["completion_token_ids"]) == 2 for r in got)
    # an argument means stdin is not read
    result = _invoke("--model", "random:tiny-gqa", "--mode", "in-process", "only", input=stdin)
    assert [r["prompt"] for r in _lines(result.output)] == ["only"]
    # nothing anywhere: one line
    _assert_one_line_error(_invoke("--model", "random:tiny-gqa", input=""), "no prompts", "--input")


def test_generate_refuses_a_file_given_as_a_prompt(tmp_path):
    # a JSONL file passed where the prompts go would have its path completed as text
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    _assert_one_line_error(_invoke("--model", "random:tiny-gqa", "--mode", "in-process", str(path)),
                           "is a file", f"--input {path}")
    # the same text through --prompt is completed as written
    result = _invoke("--model", "random:tiny-gqa", "--mode", "in-process", "--prompt", str(path))
    assert result.exit_code == 0, result.output
    assert [r["prompt"] for r in _lines(result.output)] == [str(path)]


def test_generate_takes_latency_in_milliseconds_as_plan_and_bench_do(monkeypatch):
    """`--latency 10` is 10 ms in every command (the API takes seconds)."""
    import glinthawk_dask.api as api

    seen = []
    real = api.LLM

    class Recording(real):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("latency"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(api, "LLM", Recording)
    for extra, latency in ((["--latency", "10"], 0.01), ([], None)):
        result = _invoke("--model", "random:tiny-gqa", "--mode", "in-process", "--max-tokens", "2", *extra, "hi")
        assert result.exit_code == 0, result.output
        assert seen.pop() == latency
    _assert_one_line_error(_invoke("--model", "random:tiny-gqa", "--latency", "-1", "hi"), "--latency")


def test_a_lost_worker_is_told_as_it_happens_quiet_or_not(capsys):
    """Each recovery in the progress gets one stderr line when first seen; the progress
    line itself follows --quiet."""
    from types import SimpleNamespace

    from glinthawk_dask.cli.options import ProgressLine, recovered_note

    moved = {"kind": "moved micro-batch", "cause": "attention worker tcp://a:1 (slice 0, micro-batch 1): gone",
             "micro_batch": 1, "to": "tcp://b:2", "requests": 3, "rebuilt_tokens": 1234, "seconds": 0.3}
    restarted = {"kind": "restarted run", "cause": "WorkerFailure: dense worker left", "new_run": "run-2",
                 "requests": 5, "rebuilt_tokens": 40, "rebuilt_tokens_exact": False, "seconds": 2.0}
    for quiet in (False, True):
        show = ProgressLine(lambda p: f"{len(p.recoveries)} so far", every=0.0, quiet=quiet)
        for recs in ((), (moved,), (moved,), (moved, restarted)):
            show(SimpleNamespace(recoveries=recs))
        show.end()
        err = capsys.readouterr().err
        told = [line for line in err.splitlines() if line.startswith("glinthawk: ")]
        assert told == [
            "glinthawk: lost attention worker tcp://a:1 (slice 0, micro-batch 1): gone; micro-batch 1 moved to "
            "tcp://b:2, 3 requests' KV rebuilt from 1,234 tokens in 0.3 s",
            "glinthawk: lost a worker (WorkerFailure: dense worker left); the run restarted on the workers left as "
            "run-2, 5 requests' KV rebuilt from about 40 tokens in 2.0 s",
        ], err
        assert ("so far" in err) is not quiet
    assert recovered_note(0) == ""
    assert recovered_note(2) == "; recovered from 2 lost workers, every row computed once (see above)"
