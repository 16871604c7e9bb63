"""``glinthawk generate`` (prompts in, JSONL out) and ``glinthawk bench`` (a throughput number)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, BinaryIO, Iterator, TextIO

import click

from ..errors import GlinthawkError
from ._group import Interrupted, main
from .options import (
    ProgressLine, option_group, parse_micro_batches, parse_size, recovered_note, scheduler_reachable, security_from,
    tls_client, tls_options, user_errors,
)


_mode_options = option_group([  # generate and bench
    click.option("--mode", type=click.Choice(["two-tier", "single-tier", "hybrid", "in-process"]), default=None,
                 help="Where the model runs [default: two-tier, from glinthawk.engine.mode]; hybrid keeps as "
                      "much KV on the dense workers as pays and fits, the rest on attention workers."),
    click.option("--dense-kv-budget", default=None, metavar="SIZE",
                 help="KV bytes a run may keep on each dense worker (single-tier and hybrid), like 200MB "
                      "[default: the dense workers' own budget]."),
    click.option("--local-micro-batches", type=click.IntRange(min=0), default=None, metavar="N",
                 help="Hybrid: micro-batches whose KV stays on the dense worker [default: the planner's "
                      "choice]."),
])


@main.command()
@click.argument("prompt_args", nargs=-1, metavar="[PROMPT]...")
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True,
              help="Preset name, GGUF file, Hugging Face directory, or random:<preset>.")
@click.option("--input", "-i", "input_path", type=click.File("rb"),
              help='JSONL prompts: {"prompt": ...} or {"messages": [...]} per line; - for stdin '
                   '[default: stdin when no prompt is given and stdin is not a terminal].')
@click.option("--prompt", "-p", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--output", "-o", type=click.File("w", encoding="utf-8"), default="-",
              help="Where to write JSONL completions [default: stdout].")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables top-k.")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed of every sampled request.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="Apply the model's chat template to prompts.")
@_mode_options
@click.option("--scheduler", default=None, metavar="ADDRESS", callback=scheduler_reachable,
              help="Dask scheduler of a running cluster [default: start a local one].")
@click.option("--micro-batch-size", default=None, metavar="N|auto",
              help="Slots per micro-batch; auto: planned from the cluster's profile [default: 32].")
@click.option("--micro-batches", default=None, metavar="N|auto",
              help="Micro-batches in flight per dense worker [default: auto; 1 in-process].")
@click.option("--slices", type=int, default=None, help="Dense workers to split the layers over.")
@click.option("--latency", type=click.FloatRange(min=0), default=None, metavar="MS",
              help="Milliseconds added to every inter-tier message (as `plan` and `bench` take it) "
                   "[default: glinthawk.engine.induced-latency].")
@click.option("--device", default=None, help="cpu, cuda, ... [default: cuda if available]")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 [default: by device]")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@tls_options("client")
@user_errors
def generate(
    prompt_args: tuple[str, ...], model: str, input_path: BinaryIO | None, prompts: tuple[str, ...],
    output: TextIO, max_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float,
    seed: int | None, stop: tuple[str, ...], chat: bool, mode: str | None, scheduler: str | None,
    micro_batch_size: str | None, micro_batches: str | None, slices: int | None,
    latency: float | None, device: str | None, dtype: str | None, quiet: bool, dense_kv_budget: str | None,
    local_micro_batches: int | None, tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None,
) -> None:
    """Complete prompts and write one JSON line per prompt.

    Prompts are the PROMPT arguments, --prompt options and the lines of --input; with
    none of them, JSONL lines are read from stdin (when it is not a terminal).  Each
    output line has id, prompt, completion, completion_token_ids (without the EOS that
    ended it), finish_reason ("stop", "length" or "error") and token counts.  While it
    runs, a progress line on stderr shows rows, errors, tokens/s over the last 10 s and
    the time left at that rate (--quiet: none).
    """
    from ..api import LLM
    from ..errors import InvalidRequestError
    from ..sampling import SamplingParams

    for text in prompt_args:  # a path given where the prompts go: its text would be completed, quietly
        if "\n" not in text and len(text) < 4096 and os.path.isfile(text):
            raise click.UsageError(f"the argument {text!r} is a file: read its prompts with --input {text} "
                                   "(JSONL), or pass the text itself with --prompt to complete it as written")
    prompts = prompt_args + prompts
    no_prompts = "give prompts as arguments, with --prompt TEXT or with --input FILE (JSONL)"
    if input_path is None and not prompts:
        stdin = sys.stdin.buffer
        if stdin.isatty():
            raise click.UsageError(no_prompts)
        input_path = stdin
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, min_p=min_p, seed=seed, stop=stop)
        n_mb = parse_micro_batches(micro_batches)
        asked = parse_micro_batches(micro_batch_size, "--micro-batch-size")
        dense_kv = _dense_kv_budget(dense_kv_budget, mode)
    except (InvalidRequestError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    rows: list[Any] = [{"prompt": p} for p in prompts]
    if input_path is not None:
        rows.extend(read_rows(input_path, getattr(input_path, "name", "<stdin>")))
    if not rows:
        raise click.UsageError(f"no prompts: {no_prompts}")
    security = security_from("client", tls_ca_file, tls_cert, tls_key)

    t0 = time.perf_counter()
    with tls_client(scheduler, security) as client, LLM(
        model, mode=mode, scheduler=scheduler, client=client, device=device, dtype=dtype,
        micro_batch_size=asked, n_micro_batches=n_mb, n_slices=slices,
        latency=None if latency is None else latency / 1e3, dense_kv_budget=dense_kv,
        local_micro_batches=_local_micro_batches(local_micro_batches, mode),
    ) as llm:
        if llm.dashboard_link:
            click.echo(f"dask dashboard: {llm.dashboard_link} (glinthawk page: {llm.dashboard_page})", err=True)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        show = ProgressLine(_progress_text, quiet=quiet)
        entries = llm.make_requests(rows, params, chat=chat)
        out = _InOrder(output, entries)
        completions = llm.stream_built(entries, progress=show)
        try:
            with contextlib.closing(completions):  # (leaving early closes the run and frees its KV)
                for c in completions:
                    out.add(c)
        except KeyboardInterrupt:  # the run is closed: keep what finished
            show.end()
            written = out.finish()
            raise Interrupted(f"{written} of {len(entries)} rows written to {_output_name(output)}: those that "
                              f"had finished, in input order; the other {len(entries) - written} were not") from None
        show.end()
        out.finish()
        elapsed = time.perf_counter() - t0
        n_recovered = len(llm.recoveries)
    click.echo(
        f"{out.written} rows, {out.errors} errors, {out.tokens} tokens generated in {elapsed:.1f} s "
        f"({out.tokens / max(elapsed, 1e-9):.1f} tok/s; model loaded in {t_load:.1f} s)" + recovered_note(n_recovered),
        err=True,
    )
    if out.errors:
        click.echo(f"{out.errors} rows failed: see their \"error\" field", err=True)


class _InOrder:
    """Writes completions as JSON lines in input order, each as soon as it and every row
    before it have finished (those after a slow row wait here), flushed as they go: the
    output grows while the run goes, and a crash or a full disk loses only what had
    not been written."""

    def __init__(self, output: TextIO, entries: list) -> None:
        self.output = output
        self.index = {e.id: i for i, e in enumerate(entries)}
        self.waiting: dict[int, Any] = {}
        self.written = self.errors = self.tokens = 0

    def add(self, c: Any) -> None:
        self.waiting[self.index[c.id]] = c
        if self.written in self.waiting:
            while self.written in self.waiting:
                self._write(self.waiting.pop(self.written))
            self._flush()

    def finish(self) -> int:
        """Write the rows still waiting (an interrupted run's, in input order, with gaps);
        returns the rows written."""
        for i in sorted(self.waiting):
            self._write(self.waiting.pop(i))
        self._flush()
        return self.written

    def _write(self, c: Any) -> None:
        try:
            self.output.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        except OSError as e:
            self._failed(e)
        self.written += 1
        self.tokens += len(c.completion_token_ids)
        self.errors += c.error is not None

    def _flush(self) -> None:
        try:
            self.output.flush()
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        """A full disk: say what the file holds (the rest is lost with this process)."""
        with contextlib.suppress(OSError):
            self.output.close()  # (what it could not write is dropped: closing again later raises nothing)
        raise GlinthawkError(
            f"cannot write {_output_name(self.output)} ({e.strerror or e}): it holds at most the first "
            f"{self.written} of {len(self.index)} rows, the last possibly cut short; make room and rerun "
            "(greedy and seeded sampling give the same rows again)")


# -- a throughput number -------------------------------------------------------------------------


@main.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True,
              help="Preset name, GGUF file, Hugging Face directory, or random:<preset>.")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1), default=32, show_default=True,
              help="Synthetic prompts to complete.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens of every prompt (random ids, seeded).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated for every prompt (EOS ignored).")
@_mode_options
@click.option("--scheduler", default=None, metavar="ADDRESS", callback=scheduler_reachable,
              help="Dask scheduler of a running cluster [default: start a local one].")
@click.option("--micro-batch-size", default=None, metavar="N|auto",
              help="Slots per micro-batch; auto: planned from the cluster's profile.")
@click.option("--micro-batches", default=None, metavar="N|auto", help="Micro-batches in flight per dense worker.")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None,
              help="KV slot capacity [default: prompt + new tokens].")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Milliseconds added to every inter-tier message.")
@click.option("--device", default=None, help="cpu, cuda, ... [default: cuda if available]")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 [default: by device]")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
@tls_options("client")
@user_errors
def bench(model: str, n_prompts: int, prompt_tokens: int, max_tokens: int, mode: str | None,
          dense_kv_budget: str | None, local_micro_batches: int | None, scheduler: str | None, micro_batch_size: str | None,
          micro_batches: str | None, max_seq_len: int | None, latency: float, device: str | None,
          dtype: str | None, as_json: bool, tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Generation throughput: N synthetic prompts, greedy, a fixed number of new tokens each.

    The model is loaded and warmed up on one short prompt first; only the timed
    generate call counts (prefill included).  Distributed runs also print the planner's
    prediction for the plan they ran (from the cluster's profile, measured once and
    kept on the scheduler).  benchmarks/ has the fuller scripts.
    """
    import random

    from ..api import LLM
    from ..engine.engine import EngineConfig
    from ..model.resolve import resolve_checkpoint
    from ..sampling import SamplingParams

    model_config = resolve_checkpoint(model).config
    if prompt_tokens + max_tokens > model_config.max_seq_len:
        raise GlinthawkError(f"--prompt-tokens + --max-tokens = {prompt_tokens + max_tokens} is beyond the "
                             f"model's context of {model_config.max_seq_len}")
    rng = random.Random(0)
    rows = [{"id": f"bench-{i}",
             "prompt_token_ids": [rng.randrange(1, model_config.vocab_size) for _ in range(prompt_tokens)]}
            for i in range(n_prompts)]
    if max_seq_len is not None and max_seq_len <= prompt_tokens:
        raise GlinthawkError(f"--max-seq-len {max_seq_len} leaves no room after prompts of {prompt_tokens} tokens")
    n_mb = parse_micro_batches(micro_batches)
    asked = parse_micro_batches(micro_batch_size, "--micro-batch-size")
    dense_kv = _dense_kv_budget(dense_kv_budget, mode)
    engine_config = EngineConfig.from_options(mode=mode, max_seq_len=max_seq_len)
    security = security_from("client", tls_ca_file, tls_cert, tls_key)
    t0 = time.perf_counter()
    with tls_client(scheduler, security) as client, LLM(
        model, mode=mode, scheduler=scheduler, client=client, device=device, dtype=dtype,
        engine_config=engine_config, micro_batch_size=asked, n_micro_batches=n_mb, latency=latency / 1e3,
        dense_kv_budget=dense_kv,
        local_micro_batches=_local_micro_batches(local_micro_batches, mode),
    ) as llm:
        llm.generate(rows[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up: weights, kernels
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = llm.generate(rows, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        elapsed = time.perf_counter() - t0
        where = llm.mode if llm.client is None else f"{llm.mode} on {llm.client.scheduler.address}"
        summary = llm.last_summary
        predicted = _predicted(llm, summary, rows, prompt_tokens, max_tokens, max_seq_len, latency / 1e3)
    failed = [c for c in results if c.error is not None]
    if failed:
        raise GlinthawkError(f"{len(failed)} of {len(results)} prompts failed, e.g. {failed[0].error}")
    generated = sum(len(c.completion_token_ids) for c in results)
    ec = llm.engine_config
    numbers = {
        "model": model, "mode": llm.mode, "prompts": n_prompts, "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens, "micro_batch_size": summary.micro_batch_size if summary else ec.micro_batch_size,
        "micro_batches": summary.n_micro_batches if summary else ec.n_micro_batches,
        "max_seq_len": max_seq_len, "latency_ms": latency, "generated_tokens": generated,
        "seconds": elapsed, "tokens_per_s": generated / elapsed, "predicted_tokens_per_s": predicted,
        "load_seconds": t_load, "dense_kv_budget": dense_kv,
    }
    if summary is not None:
        numbers.update(local_micro_batches=summary.local_micro_batches, micro_batch_sizes=summary.plan["sizes"],
                       attention_of=summary.attention_of(), kv_bytes=summary.kv_bytes)
    if as_json:
        click.echo(json.dumps(numbers))
        return
    click.echo(f"{model}, {where}: {n_prompts} prompts x ({prompt_tokens} prompt + {max_tokens} new) tokens: "
               f"{generated} tokens in {elapsed:.2f} s = {generated / elapsed:.1f} tok/s "
               f"(load and warm-up {t_load:.1f} s)")
    if summary is not None:
        local = (f", {summary.local_micro_batches} of them local ({summary.plan['sizes'][0]} slots each)"
                 if summary.local_micro_batches and summary.mode == "hybrid" else "")
        kv = summary.kv_bytes
        click.echo(f"plan: {summary.micro_batch_size} x {summary.n_micro_batches} micro-batches{local}; KV "
                   f"{kv['dense'] / 2**20:.1f} MiB dense, {kv['attention'] / 2**20:.1f} MiB attention; predicted "
                   + (f"{predicted:.1f} tok/s" if predicted else "n/a"))


def _output_name(output: TextIO) -> str:
    return "stdout" if getattr(output, "name", "-") in ("-", "<stdout>") else output.name


def _progress_text(p: Any) -> str:
    from ..engine.progress import eta_part

    eta = eta_part(p.eta_seconds)
    return (f"{p.rows_done}/{p.rows_total} rows, {p.errors} errors, {p.generated_tokens} tokens, "
            f"{p.tokens_per_s:.1f} tok/s{eta}")


def _predicted(llm: Any, summary: Any, rows: list, prompt_tokens: int, max_tokens: int, max_seq_len: int | None,
               latency: float) -> float | None:
    """The planner's tokens/s for the plan a distributed run used (None in-process)."""
    if summary is None or llm.client is None:
        return None
    if summary.predicted_tokens_per_s:
        return summary.predicted_tokens_per_s
    from ..planner.simulate import RunConfig, Workload, simulate
    from ..runtime.profiler import cluster_profile

    profile, _ = llm.client.sync(cluster_profile, llm.client, llm.config, model=llm.model, dtype=llm.dtype_name)
    plan = summary.plan
    local = [size for size, is_local in zip(plan["sizes"], plan["local"]) if is_local]
    cfg = RunConfig(mode=plan["mode"], micro_batch_size=max(plan["sizes"]),
                    micro_batches=summary.n_micro_batches, dense=len(plan["dense"]),
                    attention=max(1, len({a for s in plan["attention"] for a in s if a}) // max(1, len(plan["dense"]))),
                    local_micro_batches=len(local), local_batch_size=local[0] if local else None,
                    max_seq_len=plan["max_seq_len"], max_step_tokens=llm.max_step_tokens, latency=latency,
                    dtype_bytes=llm.dtype.itemsize)
    return simulate(profile, llm.config, Workload.uniform(len(rows), prompt_tokens, max_tokens), cfg).tokens_per_s


def _dense_kv_budget(value: str | None, mode: str | None) -> int | None:
    """--dense-kv-budget in bytes (None: not given)."""
    if value is None:
        return None
    if mode in ("two-tier", "in-process"):
        raise GlinthawkError(f"--dense-kv-budget is for --mode single-tier or hybrid, not {mode}")
    budget = parse_size(value, "--dense-kv-budget")
    if budget < 1:
        raise GlinthawkError("--dense-kv-budget must be at least 1 byte")
    return budget


def _local_micro_batches(value: int | None, mode: str | None) -> int | None:
    if value is not None and mode != "hybrid":
        raise GlinthawkError("--local-micro-batches is for --mode hybrid")
    return value


def read_rows(stream: BinaryIO, name: str) -> Iterator[Any]:
    """Rows of a JSONL stream; a line that is not UTF-8 JSON becomes an error record."""
    from ..prompts import UndecodableRow

    for lineno, raw in enumerate(stream, 1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield UndecodableRow(f"line-{lineno}", f"{name} line {lineno}: not UTF-8 ({e.reason})")
        except json.JSONDecodeError as e:
            yield UndecodableRow(f"line-{lineno}", f"{name} line {lineno}: not valid JSON ({e.msg})")
