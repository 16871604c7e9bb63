"""The ``glinthawk`` command line.

User mistakes (a missing file, a bad option, an unknown model) end with one line on
stderr and a non-zero exit code; a row that cannot be processed becomes an error
record in the output and the run goes on.

Commands: ``generate`` (prompts in, JSONL out), ``run``/``export``/``inspect`` (dataset
pipelines and their Zarr output), ``bench`` (a throughput number), and the long-running
processes of a cluster: ``scheduler``, ``worker --tier dense|attention`` and ``cluster``
(all of it on this machine).  Those run until SIGINT or SIGTERM, then close cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import math
import signal
import sys
import time
from typing import Any, BinaryIO, Callable, Iterator, TextIO

import click

from .errors import GlinthawkError

__all__ = ["main"]


def _user_errors(fn: Callable) -> Callable:
    """Turn :class:`GlinthawkError` into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GlinthawkError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _micro_batches(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.UsageError(f"--micro-batches must be a positive integer or auto, not {value!r}")
    return n


def _read_rows(stream: BinaryIO, name: str) -> Iterator[Any]:
    """Rows of a JSONL stream; a line that is not UTF-8 JSON becomes an error record."""
    from .prompts import UndecodableRow

    for lineno, raw in enumerate(stream, 1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield UndecodableRow(f"line-{lineno}", f"{name} line {lineno}: not UTF-8 ({e.reason})")
        except json.JSONDecodeError as e:
            yield UndecodableRow(f"line-{lineno}", f"{name} line {lineno}: not valid JSON ({e.msg})")


def _tls_options(role: str) -> Callable:
    """``--tls-ca-file``, ``--tls-cert`` and ``--tls-key``, like ``dask scheduler`` and ``dask worker``."""
    pem = click.Path(exists=True, dir_okay=False, resolve_path=True)
    options = [
        click.option("--tls-ca-file", type=pem, default=None, metavar="PEM", help="CA certificate(s) for TLS."),
        click.option("--tls-cert", type=pem, default=None, metavar="PEM", help=f"This {role}'s TLS certificate."),
        click.option("--tls-key", type=pem, default=None, metavar="PEM", help=f"This {role}'s TLS private key."),
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _security(role: str, tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> Any:
    """A ``distributed.Security`` from the TLS options, or None (Dask's configuration applies)."""
    from .runtime.tls import security

    return security(role, tls_ca_file, tls_cert, tls_key)


@contextlib.contextmanager
def _tls_client(scheduler: str | None, security: Any) -> Iterator[Any]:
    """A client of ``scheduler`` that uses ``security`` (closed at the end), or None without TLS options."""
    if security is None:
        yield None
        return
    from .runtime.cluster import connect

    if scheduler is None:
        raise GlinthawkError("the --tls-* options need --scheduler tls://HOST:PORT")
    client, _ = connect(scheduler, security=security)
    try:
        yield client
    finally:
        client.close()


def _size(value: str, flag: str) -> int:
    """Bytes from ``4GiB``, ``500MB``, ``1e9`` or ``123``."""
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(value)
    except (ValueError, TypeError):
        n = -1
    if n < 0:
        raise GlinthawkError(f"{flag} {value!r} is not a size; use bytes like 4GiB, 500MB or 1e9")
    return n


def _memory_limit(value: str) -> int | float:
    """``--memory-limit``: auto (this machine's or container's memory), 0 (none), a fraction, or a size."""
    from distributed.system import MEMORY_LIMIT

    if value == "auto":
        return int(MEMORY_LIMIT)
    try:
        number = float(value)
    except ValueError:
        return _size(value, "--memory-limit")
    if number < 0 or math.isnan(number):
        raise GlinthawkError(f"--memory-limit {value!r} must not be negative")
    return number if 0 < number <= 1 else int(number)  # like Dask: at most 1 is a share of the machine


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glinthawk-dask")
def main() -> None:
    """glinthawk: high-throughput LLM batch inference, attention and KV caches on a CPU tier."""


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
@click.option("--mode", type=click.Choice(["two-tier", "single-tier", "in-process"]), default=None,
              help="Where the model runs [default: two-tier, from glinthawk.engine.mode].")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler of a running cluster [default: start a local one].")
@click.option("--micro-batch-size", type=int, default=None, help="Slots per micro-batch [default: 32].")
@click.option("--micro-batches", default=None, metavar="N|auto",
              help="Micro-batches in flight per dense worker [default: auto; 1 in-process].")
@click.option("--slices", type=int, default=None, help="Dense workers to split the layers over.")
@click.option("--latency", type=float, default=None, help="Seconds added to every inter-tier message.")
@click.option("--device", default=None, help="cpu, cuda, ... [default: cuda if available]")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 [default: by device]")
@_tls_options("client")
@_user_errors
def generate(
    prompt_args: tuple[str, ...], model: str, input_path: BinaryIO | None, prompts: tuple[str, ...],
    output: TextIO, max_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float,
    seed: int | None, stop: tuple[str, ...], chat: bool, mode: str | None, scheduler: str | None,
    micro_batch_size: int | None, micro_batches: str | None, slices: int | None,
    latency: float | None, device: str | None, dtype: str | None,
    tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None,
) -> None:
    """Complete prompts and write one JSON line per prompt.

    Prompts are the PROMPT arguments, --prompt options and the lines of --input; with
    none of them, JSONL lines are read from stdin (when it is not a terminal).  Each
    output line has id, prompt, completion, completion_token_ids (without the EOS that
    ended it), finish_reason ("stop", "length" or "error") and token counts.
    """
    from . import config
    from .api import LLM
    from .engine.engine import EngineConfig
    from .errors import InvalidRequestError
    from .sampling import SamplingParams

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
        n_mb = _micro_batches(micro_batches)
        mb_size = micro_batch_size or (64 if mode == "in-process" else config.get("engine.micro-batch-size"))
        engine_config = EngineConfig(
            micro_batch_size=mb_size, n_micro_batches=n_mb if isinstance(n_mb, int) else 1,
            max_step_tokens=max(config.get("engine.max-step-tokens"), mb_size),
        )
    except (InvalidRequestError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    rows: list[Any] = [{"prompt": p} for p in prompts]
    if input_path is not None:
        rows.extend(_read_rows(input_path, getattr(input_path, "name", "<stdin>")))
    if not rows:
        raise click.UsageError(f"no prompts: {no_prompts}")
    security = _security("client", tls_ca_file, tls_cert, tls_key)

    t0 = time.perf_counter()
    with _tls_client(scheduler, security) as client, LLM(
        model, mode=mode, scheduler=scheduler, client=client, device=device, dtype=dtype,
        engine_config=engine_config, n_micro_batches=n_mb, n_slices=slices, latency=latency,
    ) as llm:
        if llm.dashboard_link:
            click.echo(f"dask dashboard: {llm.dashboard_link} (glinthawk page: {llm.dashboard_page})", err=True)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_tokens = n_errors = 0
        results = llm.generate(rows, params, chat=chat)
        elapsed = time.perf_counter() - t0
    for c in results:
        output.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        n_tokens += len(c.completion_token_ids)
        n_errors += c.error is not None
    output.flush()
    click.echo(
        f"{len(results)} rows, {n_errors} errors, {n_tokens} tokens generated in {elapsed:.1f} s "
        f"({n_tokens / max(elapsed, 1e-9):.1f} tok/s; model loaded in {t_load:.1f} s)",
        err=True,
    )
    if n_errors:
        click.echo(f"{n_errors} rows failed: see their \"error\" field", err=True)


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler of a running cluster [default: start a local one].")
@click.option("--output", "output_url", default=None, metavar="URL",
              help="Write here instead of the spec's output.url.")
@click.option("--overwrite", is_flag=True, help="Delete an existing output and start over.")
@click.option("--force", is_flag=True, help="Continue an output started by a different spec or model.")
@click.option("--mode", type=click.Choice(["two-tier", "single-tier", "in-process"]), default=None,
              help="Override topology.mode.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@_tls_options("client")
@_user_errors
def run(spec_path: str, scheduler: str | None, output_url: str | None, overwrite: bool, force: bool,
        mode: str | None, quiet: bool, tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Run the pipeline SPEC (a YAML file): read its prompts, generate, commit to Zarr.

    Rerunning the same spec resumes: rows already in the output are skipped.
    """
    import dataclasses

    from .pipeline.run import run_pipeline
    from .pipeline.spec import load_spec

    spec = load_spec(spec_path)
    if output_url:
        spec = spec.replace(output=dataclasses.replace(spec.output, url=output_url))
    if mode:
        spec = spec.replace(topology=dataclasses.replace(spec.topology, mode=mode))
    show = None if quiet else _ProgressLine()
    security = _security("client", tls_ca_file, tls_cert, tls_key)
    with _tls_client(scheduler, security) as client:
        report = run_pipeline(spec, scheduler=scheduler, client=client, overwrite=overwrite, force=force,
                              progress=show)
    if show is not None and show.shown:
        click.echo("", err=True)
    click.echo(
        f"{spec.name}: {report.rows_done} rows written ({report.errors} errors, {report.skipped} already done), "
        f"{report.generated_tokens} tokens in {report.seconds:.1f} s ({report.tokens_per_s:.1f} tok/s; "
        f"started in {report.startup_seconds:.1f} s); {report.rows_in_output} rows in {report.output}",
        err=True,
    )
    for line in report.error_examples:
        click.echo(f"  error {line}", err=True)


class _ProgressLine:
    """Rows, errors, tokens/s and ETA on stderr: one line rewritten in place on a
    terminal (at most 4 times a second), a new line every 10 s otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.every = 0.25 if self.tty else 10.0
        self.last = 0.0
        self.shown = False

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        eta = "" if p.eta_seconds is None else f", ETA {p.eta_seconds:.0f} s"
        text = (f"{p.rows_done} rows, {p.errors} errors, {p.tokens_per_s:.1f} tok/s, "
                f"shards {p.shards_read}/{p.shards_total}{eta}")
        click.echo(f"\r{text}   " if self.tty else text, err=True, nl=not self.tty)
        self.shown = self.tty


@main.command()
@click.argument("output_url", metavar="OUT")
@click.option("--to", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True)
@click.option("--dest", "-o", default=None, metavar="URL",
              help="Where to write [default: OUT with the extension of the format].")
@_user_errors
def export(output_url: str, fmt: str, dest: str | None) -> None:
    """Convert the Zarr output OUT of a pipeline to JSONL or Parquet."""
    from .pipeline.export import export_output

    if dest is None:
        dest = output_url.rstrip("/").removesuffix(".zarr") + "." + fmt
    n = export_output(output_url, dest, to=fmt)
    click.echo(f"{n} rows written to {dest}", err=True)


# -- inspecting an output ----------------------------------------------------------------------


@main.command()
@click.argument("output_url", metavar="OUT")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@_user_errors
def inspect(output_url: str, as_json: bool) -> None:
    """Summarize the Zarr output OUT of a pipeline: rows, errors, tokens, timings, provenance."""
    from .pipeline.sink import read_output

    info = _output_info(read_output(output_url))
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(info["finish_reasons"].items())) or "none"
    throughput = ("unknown (too short)" if info["tokens_per_s"] is None else
                  f"{info['tokens_per_s']:.1f} completion tokens/s over {info['seconds']:.0f} s "
                  "(created to last commit, pauses between resumed runs included)")
    lines = [
        info["url"],
        f"  spec         {info['spec_name']} (fingerprint {info['fingerprint']})",
        f"  model        {info['model']}",
        f"  written by   glinthawk-dask {info['version']}, output format {info['format']}",
        f"  created      {info['created']}, last commit {info['updated']}",
        f"  rows         {info['rows']} ({info['errors']} errors)",
        f"  finished     {reasons}",
        f"  tokens       {info['prompt_tokens']} prompt, {info['completion_tokens']} completion",
        (f"  latency      {_duration(info['mean_time_to_first_token'])} to the first token, "
         f"{_duration(info['mean_time_per_token'])} per token (means)"),
        f"  throughput   {throughput}",
    ]
    lines += [f"  error        {e}" for e in info["error_examples"]]
    click.echo("\n".join(lines))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1000:.3g} ms"


def _output_info(table: Any) -> dict[str, Any]:
    """``OutputTable.summary()`` with the provenance, error examples and lifetime throughput."""
    from datetime import datetime

    attrs = table.attrs
    info: dict[str, Any] = {
        "url": table.url, "model": attrs.get("model"), "spec_name": (attrs.get("spec") or {}).get("name"),
        "fingerprint": attrs.get("fingerprint"), "version": attrs.get("version"), "format": attrs.get("format"),
        "created": attrs.get("created"), "updated": attrs.get("updated"), "sampling": attrs.get("sampling"),
        **table.summary(),
    }
    examples: list[str] = []
    if info["errors"]:
        for batch in table.batches():
            for rid, reason, error in zip(batch["id"], batch["finish_reason"], batch["error"]):
                if str(reason) == "error" and len(examples) < 5:
                    examples.append(f"{rid}: {error}")
            if len(examples) >= 5:
                break
    info["error_examples"] = examples
    try:
        seconds = (datetime.fromisoformat(info["updated"]) - datetime.fromisoformat(info["created"])).total_seconds()
    except (TypeError, ValueError):
        seconds = None
    info["seconds"] = seconds
    info["tokens_per_s"] = info["completion_tokens"] / seconds if seconds else None
    return info


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
@click.option("--mode", type=click.Choice(["two-tier", "single-tier", "in-process"]), default=None,
              help="Where the model runs [default: two-tier, from glinthawk.engine.mode].")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler of a running cluster [default: start a local one].")
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=None, help="Slots per micro-batch.")
@click.option("--micro-batches", default=None, metavar="N|auto", help="Micro-batches in flight per dense worker.")
@click.option("--device", default=None, help="cpu, cuda, ... [default: cuda if available]")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 [default: by device]")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
@_tls_options("client")
@_user_errors
def bench(model: str, n_prompts: int, prompt_tokens: int, max_tokens: int, mode: str | None,
          scheduler: str | None, micro_batch_size: int | None, micro_batches: str | None, device: str | None,
          dtype: str | None, as_json: bool, tls_ca_file: str | None, tls_cert: str | None,
          tls_key: str | None) -> None:
    """Generation throughput: N synthetic prompts, greedy, a fixed number of new tokens each.

    The model is loaded and warmed up on one short prompt first; only the timed
    generate call counts (prefill included).  benchmarks/ has the fuller scripts.
    """
    import random

    from . import config
    from .api import LLM
    from .engine.engine import EngineConfig
    from .model.resolve import resolve_checkpoint
    from .sampling import SamplingParams

    model_config = resolve_checkpoint(model).config
    if prompt_tokens + max_tokens > model_config.max_seq_len:
        raise GlinthawkError(f"--prompt-tokens + --max-tokens = {prompt_tokens + max_tokens} is beyond the "
                             f"model's context of {model_config.max_seq_len}")
    rng = random.Random(0)
    rows = [{"id": f"bench-{i}",
             "prompt_token_ids": [rng.randrange(1, model_config.vocab_size) for _ in range(prompt_tokens)]}
            for i in range(n_prompts)]
    n_mb = _micro_batches(micro_batches)
    in_process = (mode or config.get("engine.mode")) == "in-process"
    mb_size = micro_batch_size or (64 if in_process else config.get("engine.micro-batch-size"))
    engine_config = EngineConfig(micro_batch_size=mb_size, n_micro_batches=n_mb if isinstance(n_mb, int) else 1,
                                 max_step_tokens=max(config.get("engine.max-step-tokens"), mb_size))
    security = _security("client", tls_ca_file, tls_cert, tls_key)
    t0 = time.perf_counter()
    with _tls_client(scheduler, security) as client, LLM(
        model, mode=mode, scheduler=scheduler, client=client, device=device, dtype=dtype,
        engine_config=engine_config, n_micro_batches=n_mb,
    ) as llm:
        llm.generate(rows[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up: weights, kernels
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = llm.generate(rows, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        elapsed = time.perf_counter() - t0
        where = llm.mode if llm.client is None else f"{llm.mode} on {llm.client.scheduler.address}"
    failed = [c for c in results if c.error is not None]
    if failed:
        raise GlinthawkError(f"{len(failed)} of {len(results)} prompts failed, e.g. {failed[0].error}")
    generated = sum(len(c.completion_token_ids) for c in results)
    numbers = {
        "model": model, "mode": llm.mode, "prompts": n_prompts, "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens, "micro_batch_size": mb_size, "generated_tokens": generated,
        "seconds": elapsed, "tokens_per_s": generated / elapsed, "load_seconds": t_load,
    }
    if as_json:
        click.echo(json.dumps(numbers))
        return
    click.echo(f"{model}, {where}: {n_prompts} prompts x ({prompt_tokens} prompt + {max_tokens} new) tokens: "
               f"{generated} tokens in {elapsed:.2f} s = {generated / elapsed:.1f} tok/s "
               f"(load and warm-up {t_load:.1f} s)")


# -- the processes of a cluster ------------------------------------------------------------------


async def _signalled() -> int:
    """Wait for SIGINT or SIGTERM and return its number."""
    loop = asyncio.get_running_loop()
    caught: asyncio.Future[int] = loop.create_future()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: caught.done() or caught.set_result(s))
    try:
        return await caught
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve(server: Any, started: Callable[[Any], None], close: Callable[[str], Any]) -> int | None:
    """Start a Dask ``server``, report it, and run it until it finishes or a signal comes.

    Returns the signal that stopped it (None when it finished by itself).  ``close(reason)``
    closes the server.
    """
    stop = asyncio.ensure_future(_signalled())
    start = asyncio.ensure_future(server.start())
    try:
        await asyncio.wait({stop, start}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.done():
            start.result()  # raises what went wrong
            started(server)
            finished = asyncio.ensure_future(server.finished())
            await asyncio.wait({stop, finished}, return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            signum = stop.result()
            await close(f"signal-{signal.Signals(signum).name}")
            return signum
        return None
    finally:
        for task in (stop, start):
            if not task.done():
                task.cancel()


def _start_failure(e: BaseException) -> BaseException | None:
    """What made a Dask server or cluster fail to start (distributed wraps it in a
    RuntimeError "... failed to start"); None for any other error."""
    if isinstance(e, (OSError, TimeoutError, asyncio.TimeoutError)):
        return e
    if isinstance(e, RuntimeError) and "failed to start" in str(e):
        cause = e.__cause__
        return e if cause is None else (_start_failure(cause) or cause)
    return None


def _stopped_by(signum: int | None, what: str) -> None:
    reason = "it finished" if signum is None else signal.Signals(signum).name
    click.echo(f"{what} closed ({reason})", err=True)


def _dashboard_link(scheduler: Any) -> str | None:
    from distributed.comm import get_address_host
    from distributed.utils import format_dashboard_link

    server = scheduler.services.get("dashboard")
    if server is None:
        return None
    try:
        return format_dashboard_link(get_address_host(scheduler.address), server.port)
    except (KeyError, ValueError):
        return None


def _timeout(value: str, flag: str) -> float | None:
    from dask.utils import parse_timedelta

    if value.strip().lower() in ("0", "none", "never"):
        return None
    try:
        seconds = parse_timedelta(value, default="seconds")
    except (ValueError, KeyError, TypeError):
        seconds = -1
    if seconds is None or seconds < 0:
        raise GlinthawkError(f"{flag} {value!r} is not a duration; use e.g. 60s, 5m or 0 for never")
    return seconds


def _scheduler_address(value: str) -> str:
    """Check SCHEDULER up front, so that a typo is a one-line error rather than a worker that never starts."""
    from distributed.comm import get_address_host, parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        get_address_host(value)  # an unknown scheme
        protocol, loc = parse_address(value)
        if protocol in ("tcp", "tls"):
            parse_host_port(loc)
    except (ValueError, TypeError) as e:
        raise GlinthawkError(f"bad scheduler address {value!r} ({e}); use e.g. tcp://HOST:8786 or tls://HOST:8786")
    return value


@main.command()
@click.option("--host", default=None,
              help="Address or interface IP to listen on [default: every interface; 127.0.0.1 for this machine only].")
@click.option("--port", type=click.IntRange(0, 65535), default=8786, show_default=True, help="0 picks a free port.")
@click.option("--dashboard-address", default=":8787", show_default=True, help="The dashboard's [host]:port.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True, help="Serve the dashboard.")
@click.option("--scheduler-file", default=None, type=click.Path(dir_okay=False),
              help="Also write the address as JSON here (like dask scheduler).")
@_tls_options("scheduler")
@_user_errors
def scheduler(host: str | None, port: int, dashboard_address: str, dashboard: bool, scheduler_file: str | None,
              tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """A Dask scheduler with the glinthawk control plane, until SIGINT or SIGTERM.

    Prints its address and dashboard URL.  With the TLS options it listens on
    tls:// only and accepts peers with a certificate of the same CA.  Start workers
    with: glinthawk worker --tier dense|attention ADDRESS.
    """
    from distributed import Scheduler

    from .runtime.plugins import GlinthawkSchedulerPlugin

    security = _security("scheduler", tls_ca_file, tls_cert, tls_key)

    async def main_() -> int | None:
        server = Scheduler(
            host=host, port=port, protocol="tls" if security is not None else None, security=security,
            dashboard=dashboard, dashboard_address=dashboard_address, scheduler_file=scheduler_file,
            plugins=[GlinthawkSchedulerPlugin()],
        )

        def started(s: Any) -> None:
            click.echo(f"glinthawk scheduler at {s.address}")
            link = _dashboard_link(s)
            if link:
                click.echo(f"dashboard at {link}")

        return await _serve(server, started, lambda reason: server.close(reason=reason))

    try:
        signum = asyncio.run(main_())
    except Exception as e:
        cause = _start_failure(e)  # the port is taken, the host is not ours, ...
        if cause is None:
            raise
        raise GlinthawkError(f"cannot start the scheduler on {host or '*'}:{port} "
                             f"({type(cause).__name__}: {cause})") from None
    _stopped_by(signum, "glinthawk scheduler")


# `<entrypoint> dask-scheduler ...`, as the dask/dask Helm chart runs it
_dask_scheduler = copy.copy(scheduler)
_dask_scheduler.hidden = True
main.add_command(_dask_scheduler, "dask-scheduler")


@main.command()
@click.argument("scheduler", metavar="SCHEDULER")
@click.option("--tier", type=click.Choice(["dense", "attention"]), required=True,
              help="dense: carries GPU=1 and runs the layers' dense math; attention: carries KV and holds KV caches.")
@click.option("--kv-bytes", default=None, metavar="SIZE",
              help="Attention tier: the KV cache budget, like 8GiB, or 1 for a share "
                   "(glinthawk.attention.kv-memory-fraction) of the memory limit [default: 1].")
@click.option("--nthreads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Dask task threads (the tier's compute has a thread of its own).")
@click.option("--memory-limit", default="auto", show_default=True, metavar="SIZE|FRACTION|auto|0",
              help="Memory of this worker: bytes like 6GiB, a share of the machine like 0.5, "
                   "auto (the machine's or container's memory) or 0 (no limit).")
@click.option("--name", default=None, help="A unique worker name [default: its address].")
@click.option("--host", default=None,
              help="IP or hostname to listen on and advertise [default: the interface that reaches the scheduler].")
@click.option("--worker-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the worker (0: any free port).")
@click.option("--nanny-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the nanny (0: any free port).")
@click.option("--interface", default=None, help="Network interface to listen on, like eth0 or ib0 (instead of --host).")
@click.option("--dashboard-address", default=":0", show_default=True, help="The worker dashboard's [host]:port.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True, help="Serve the worker's dashboard.")
@click.option("--nanny/--no-nanny", default=True, show_default=True,
              help="Run the worker in a child process that a nanny restarts when it dies.")
@click.option("--death-timeout", default="60s", show_default=True, metavar="DURATION",
              help="Give up when the scheduler cannot be reached for this long (0: never).")
@click.option("--local-directory", default=None, type=click.Path(file_okay=False),
              help="Directory for the worker's files [default: Dask's temporary directory].")
@_tls_options("worker")
@_user_errors
def worker(scheduler: str, tier: str, kv_bytes: str | None, nthreads: int, memory_limit: str, name: str | None,
           host: str | None, worker_port: int, nanny_port: int, interface: str | None, dashboard_address: str,
           dashboard: bool, nanny: bool, death_timeout: str, local_directory: str | None,
           tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """A Dask worker of one tier, attached to SCHEDULER, until SIGINT or SIGTERM.

    It carries the tier's resources and memory thresholds, and brings the glinthawk
    worker plugins, so it needs nothing registered by a client.
    """
    import os

    import dask.config
    from distributed import Nanny, Worker

    from .runtime.cluster import tier_worker_options
    from .runtime.plugins import AttentionWorkerPlugin, DenseWorkerPlugin

    _scheduler_address(scheduler)
    if kv_bytes is not None and tier != "attention":
        raise GlinthawkError("--kv-bytes is for --tier attention")
    kv = _size(kv_bytes, "--kv-bytes") if kv_bytes is not None else 1
    if kv < 1:
        raise GlinthawkError("--kv-bytes must be at least 1 (1: a share of the memory limit)")
    limit = _memory_limit(memory_limit)
    timeout = _timeout(death_timeout, "--death-timeout")
    security = _security("worker", tls_ca_file, tls_cert, tls_key)
    if security is None and scheduler.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file"):
        raise GlinthawkError(f"the scheduler at {scheduler} uses TLS: give --tls-ca-file, --tls-cert and --tls-key "
                             "(or set distributed.comm.tls.* in Dask's configuration)")
    opts = tier_worker_options(tier, kv_bytes=kv)
    env, memory_config = opts.pop("env"), opts.pop("config")
    if host and interface:
        raise GlinthawkError("give --host or --interface, not both")
    opts.update(nthreads=nthreads, memory_limit=limit, name=name, host=host, interface=interface,
                dashboard=dashboard, dashboard_address=dashboard_address, death_timeout=timeout,
                local_directory=local_directory, security=security, plugins=(DenseWorkerPlugin(), AttentionWorkerPlugin()))

    async def main_() -> int | None:
        if nanny:
            server = Nanny(scheduler, port=nanny_port, worker_port=worker_port, env=env, config=memory_config, **opts)
        else:
            os.environ.update(env)
            dask.config.set(memory_config)
            server = Worker(scheduler, port=worker_port, **opts)

        def started(s: Any) -> None:
            address = s.worker_address if nanny else s.address
            click.echo(f"glinthawk {tier} worker at {address} ({_resources_text(opts['resources'])}), "
                       f"scheduler {scheduler}", err=True)

        close = (lambda reason: server.close(timeout=10, reason=reason)) if nanny else \
            (lambda reason: server.close(reason=reason))
        return await _serve(server, started, close)

    try:
        signum = asyncio.run(main_())
    except Exception as e:
        cause = _start_failure(e)
        if cause is None:
            raise
        raise GlinthawkError(f"the {tier} worker could not start and join the scheduler at {scheduler} "
                             f"({type(cause).__name__}: {cause or 'timed out'}); is it running, and reachable "
                             "from here?") from None
    _stopped_by(signum, f"glinthawk {tier} worker")


def _resources_text(resources: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in resources.items())


@main.command()
@click.option("--dense", "n_dense", type=click.IntRange(min=1), default=1, show_default=True,
              help="Dense worker processes.")
@click.option("--attention", "n_attention", type=click.IntRange(min=0), default=None,
              help="Attention worker processes (0: only --mode single-tier runs) "
                   "[default: glinthawk.local-cluster.attention-workers, 2].")
@click.option("--dashboard-address", default=":8787", show_default=True, help="The dashboard's [host]:port.")
@_user_errors
def cluster(n_dense: int, n_attention: int | None, dashboard_address: str) -> None:
    """The two-tier cluster on this machine, until Ctrl-C or SIGTERM.

    Prints the scheduler address (for --scheduler of generate and run, or a Client)
    and the dashboard URL, then waits; on the signal it stops every worker.
    """
    import threading

    from distributed import Client

    from .runtime.cluster import ensure_plugins, local_cluster
    from .runtime.dashboard import page_link

    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        caught.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            local = local_cluster(n_attention, n_dense, dashboard_address=dashboard_address)
        except Exception as e:
            cause = _start_failure(e)
            if cause is None:
                raise
            raise GlinthawkError(f"the local cluster failed to start ({type(cause).__name__}: {cause})") from None
        with local, Client(local) as client:
            ensure_plugins(client)
            if not stop.is_set():
                click.echo(f"glinthawk scheduler at {local.scheduler_address}")
                click.echo(f"dashboard at {client.dashboard_link}")
                click.echo(f"glinthawk page at {page_link(client)}")
                click.echo(f"{n_dense} dense and {len(local.workers) - n_dense} attention workers; "
                           "Ctrl-C stops them", err=True)
            while not stop.wait(1.0):
                pass
            click.echo("stopping the cluster", err=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _stopped_by(caught[0] if caught else None, "glinthawk cluster")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
