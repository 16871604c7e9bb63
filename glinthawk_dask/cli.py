"""The ``glinthawk`` command line.

User mistakes (a missing file, a bad option, an unknown model) end with one line on
stderr and a non-zero exit code; a row that cannot be processed becomes an error
record in the output and the run goes on.
"""

from __future__ import annotations

import functools
import json
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glinthawk-dask")
def main() -> None:
    """glinthawk: high-throughput LLM batch inference, attention and KV caches on a CPU tier."""


@main.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True,
              help="Preset name, GGUF file, Hugging Face directory, or random:<preset>.")
@click.option("--input", "-i", "input_path", type=click.File("rb"),
              help='JSONL prompts: {"prompt": ...} or {"messages": [...]} per line; - for stdin.')
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
@_user_errors
def generate(
    model: str, input_path: BinaryIO | None, prompts: tuple[str, ...], output: TextIO,
    max_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float,
    seed: int | None, stop: tuple[str, ...], chat: bool, mode: str | None, scheduler: str | None,
    micro_batch_size: int | None, micro_batches: str | None, slices: int | None,
    latency: float | None, device: str | None, dtype: str | None,
) -> None:
    """Complete prompts and write one JSON line per prompt.

    Each output line has id, prompt, completion, completion_token_ids (without the
    EOS that ended it), finish_reason ("stop", "length" or "error") and token counts.
    """
    from . import config
    from .api import LLM
    from .engine.engine import EngineConfig
    from .errors import InvalidRequestError
    from .sampling import SamplingParams

    if input_path is None and not prompts:
        raise click.UsageError("give prompts with --input FILE (JSONL) or --prompt TEXT")
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

    t0 = time.perf_counter()
    with LLM(model, mode=mode, scheduler=scheduler, device=device, dtype=dtype, engine_config=engine_config,
             n_micro_batches=n_mb, n_slices=slices,
             latency=latency) as llm:
        if llm.dashboard_link:
            click.echo(f"dask dashboard: {llm.dashboard_link}", err=True)
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
@click.option("--output", "output_url", default=None, metavar="URL", help="Write here instead of the spec's output.url.")
@click.option("--overwrite", is_flag=True, help="Delete an existing output and start over.")
@click.option("--force", is_flag=True, help="Continue an output started by a different spec or model.")
@click.option("--mode", type=click.Choice(["two-tier", "single-tier", "in-process"]), default=None,
              help="Override topology.mode.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@_user_errors
def run(spec_path: str, scheduler: str | None, output_url: str | None, overwrite: bool, force: bool,
        mode: str | None, quiet: bool) -> None:
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
    show = None if quiet else _progress_line
    report = run_pipeline(spec, scheduler=scheduler, overwrite=overwrite, force=force, progress=show)
    if not quiet:
        click.echo("", err=True)
    click.echo(
        f"{spec.name}: {report.rows_done} rows written ({report.errors} errors, {report.skipped} already done), "
        f"{report.generated_tokens} tokens in {report.seconds:.1f} s ({report.tokens_per_s:.1f} tok/s); "
        f"{report.rows_in_output} rows in {report.output}",
        err=True,
    )
    for line in report.error_examples:
        click.echo(f"  error {line}", err=True)


def _progress_line(p: Any) -> None:
    eta = "" if p.eta_seconds is None else f", ETA {p.eta_seconds:.0f} s"
    click.echo(
        f"\r{p.rows_done} rows, {p.errors} errors, {p.tokens_per_s:.1f} tok/s, "
        f"shards {p.shards_read}/{p.shards_total}{eta}   ",
        err=True, nl=False,
    )


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
