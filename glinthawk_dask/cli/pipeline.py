"""``glinthawk run``, ``export`` and ``inspect``: dataset pipelines and their Zarr output."""

from __future__ import annotations

import json
from typing import Any

import click

from ._group import Interrupted, main
from .options import ProgressLine, recovered_note, scheduler_reachable, security_from, tls_client, tls_options, user_errors


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--scheduler", default=None, metavar="ADDRESS", callback=scheduler_reachable,
              help="Dask scheduler of a running cluster [default: start a local one].")
@click.option("--output", "output_url", default=None, metavar="URL",
              help="Write here instead of the spec's output.url.")
@click.option("--overwrite", is_flag=True, help="Delete an existing output and start over.")
@click.option("--force", is_flag=True, help="Continue an output started by a different spec or model.")
@click.option("--mode", type=click.Choice(["two-tier", "single-tier", "hybrid", "in-process"]), default=None,
              help="Override topology.mode.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@click.option("--detach", is_flag=True,
              help="Run the pipeline's driver on the cluster (needs --scheduler) and return once it generates; "
                   "follow it with `glinthawk attach`, stop it with `glinthawk cancel`.")
@tls_options("client")
@user_errors
def run(spec_path: str, scheduler: str | None, output_url: str | None, overwrite: bool, force: bool,
        mode: str | None, quiet: bool, detach: bool, tls_ca_file: str | None, tls_cert: str | None,
        tls_key: str | None) -> None:
    """Run the pipeline SPEC (a YAML file): read its prompts, generate, commit to Zarr.

    Rerunning the same spec resumes: rows already in the output are skipped.  With
    --detach the run goes on without this command: its driver is a task on the cluster,
    and prompts and completions go between the workers and storage, not through here.
    """
    import dataclasses

    from ..pipeline.run import run_pipeline
    from ..pipeline.spec import load_spec

    spec = load_spec(spec_path)
    if output_url:
        spec = spec.replace(output=dataclasses.replace(spec.output, url=output_url))
    if mode:
        spec = spec.replace(topology=dataclasses.replace(spec.topology, mode=mode))
    security = security_from("client", tls_ca_file, tls_cert, tls_key)
    if detach:
        from .detached import detach_run

        if scheduler is None:
            raise click.UsageError("--detach needs --scheduler ADDRESS: a local cluster would end with this command "
                                   "(start one that stays with `glinthawk cluster`)")
        if spec.topology.mode == "in-process":
            raise click.UsageError("--detach runs on a cluster: topology.mode in-process has none (--mode two-tier)")
        detach_run(spec, scheduler, security, overwrite=overwrite, force=force)
        return
    show = ProgressLine(run_text, quiet=quiet)
    try:
        with tls_client(scheduler, security) as client:
            report = run_pipeline(spec, scheduler=scheduler, client=client, overwrite=overwrite, force=force,
                                  progress=show)
    except KeyboardInterrupt:
        show.end()
        raise Interrupted(_left_behind(spec)) from None
    show.end()
    click.echo("\n".join(report_lines(spec.name, report)), err=True)


def report_lines(name: str, report: Any) -> list[str]:
    """What a finished run prints: its :func:`run_line`, plan and error examples (or
    that it had nothing to do)."""
    if report.complete:
        return [f"{name}: nothing to run: every row of its input is already in {report.output} "
                f"({report.rows_in_output} rows; the input files are unchanged since the run that finished "
                "them). --overwrite starts over."]
    lines = [run_line(name, report)]
    if report.plan is not None:
        lines.append(f"  plan {plan_text(report.plan)}")
    return lines + [f"  error {line}" for line in report.error_examples]


def run_line(name: str, report: Any) -> str:
    """The line a finished run ends with: rows, tokens and the seconds they took, apart
    from the start-up, a wait for KV other runs held, and the close."""
    waited = f"waited {report.waited_seconds:.1f} s for KV other runs held, " if report.waited_seconds >= 0.05 else ""
    return (f"{name}: {report.rows_done} rows written ({report.errors} errors, {report.skipped} already done), "
            f"{report.generated_tokens} tokens in {report.seconds:.1f} s ({report.tokens_per_s:.1f} tok/s; "
            f"started in {report.startup_seconds:.1f} s, {waited}closed in {report.shutdown_seconds:.1f} s); "
            f"{report.rows_in_output} rows in {report.output}" + recovered_note(len(report.recoveries)))


def plan_text(plan: dict[str, Any]) -> str:
    """A run's plan (:func:`~glinthawk_dask.pipeline.run.plan_record`) in words."""
    local = plan.get("local") or 0
    text = (f"{plan['mode']}, {plan['micro_batch_size']} x {plan['micro_batches']} micro-batches"
            + (f" ({local} of them on the dense worker)" if local and plan["mode"] == "hybrid" else ""))
    changes = sorted([(g["after_s"], f"grew to {g['to']} after {g['after_s']:.1f} s") for g in plan.get("grew") or ()]
                     + [(g["after_s"], f"gave up KV for runs waiting for it after {g['after_s']:.1f} s, "
                                       f"keeping {g['to']}") for g in plan.get("yielded") or ()])
    grew_text = ""  # (a prediction is the last plan's)
    if changes:
        first = min([*(plan.get("grew") or ()), *(plan.get("yielded") or ())], key=lambda g: g["after_s"])
        grew_text = (f"; it started as {first['from']}, " + ", ".join(text for _, text in changes)
                     + ("" if plan.get("yielded") else " as other runs freed KV"))
    if not plan.get("planned"):
        return text + ", as the spec sets them" + grew_text
    predicted = plan.get("predicted_tokens_per_s")
    text += ", chosen by the planner"
    if plan.get("planned_on_rows"):
        text += f" for rows as long as {plan['planned_on_rows']} committed before"
    beside = plan.get("runs_beside") or 0
    stopped = plan.get("predicted_for_lengths")
    if predicted:  # for every row running to max_tokens, the only length known beforehand
        text += f": predicted {predicted:.1f} tok/s" + (" for the cluster alone" if beside else "")
        if stopped:
            text += f" ({stopped:.1f} for the lengths the rows stopped at)"
        text += f", ran at {plan['tokens_per_s']:.1f}"
        if beside:  # the planner predicts a run that has the cluster to itself
            text += f" while {beside} other run{'s' if beside > 1 else ''} shared it"
    profiled = plan.get("profile_seconds") or 0.0
    text += f" (the cluster profiled first, in {profiled:.1f} s)" if profiled else ""
    return text + grew_text


def _left_behind(spec: Any) -> str:
    """What an interrupted run leaves in its output, and how to go on."""
    from ..pipeline.sink import read_output

    url = spec.output.url
    try:
        rows = len(read_output(url, storage_options=spec.storage_options))
    except Exception as e:  # (not created yet, or unreadable: say so, do not hide the interrupt)
        return f"{spec.name}: nothing committed to {url} ({type(e).__name__}: {e})"
    return (f"{spec.name}: {rows} rows are committed in {url}, every row finished before the interrupt; "
            "rerun the same command to resume")


def run_text(p: Any) -> str:
    """A running pipeline's progress line."""
    from ..engine.progress import eta_part, rows_of

    eta = eta_part(p.eta_seconds)
    return (f"{rows_of(p.rows_done, p.rows_total, p.rows_total_exact)} rows, {p.errors} errors, "
            f"{p.tokens_per_s:.1f} tok/s, shards {p.shards_read}/{p.shards_total}{eta}")


@main.command()
@click.argument("output_url", metavar="OUT")
@click.argument("dest_arg", metavar="[DEST]", required=False)
@click.option("--to", "fmt", type=click.Choice(["jsonl", "parquet"]), default=None,
              help="The format [default: the one DEST's name ends in (.jsonl, .jsonl.gz, .parquet), else jsonl].")
@click.option("--dest", "-o", default=None, metavar="URL", help="Where to write (the same as DEST).")
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists.")
@user_errors
def export(output_url: str, dest_arg: str | None, fmt: str | None, dest: str | None, overwrite: bool) -> None:
    """Convert the Zarr output OUT of a pipeline to JSONL or Parquet, written to DEST
    (any fsspec URL; - for standard output) [default: OUT with the extension of the
    format].  An existing DEST is left alone unless --overwrite."""
    from ..pipeline.export import export_output

    if dest_arg is not None and dest is not None and dest_arg != dest:
        raise click.UsageError(f"two destinations ({dest_arg} and --dest {dest}): give one")
    dest = dest or dest_arg
    if dest is None:
        dest = output_url.rstrip("/").removesuffix(".zarr") + "." + (fmt or "jsonl")
    n = export_output(output_url, dest, to=fmt, overwrite=overwrite, stdout=click.get_binary_stream("stdout"))
    click.echo(f"{n} rows written to {'standard output' if dest == '-' else dest}", err=True)


# -- inspecting an output ----------------------------------------------------------------------


@main.command()
@click.argument("output_url", metavar="OUT")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@user_errors
def inspect(output_url: str, as_json: bool) -> None:
    """Summarize the Zarr output OUT of a pipeline: rows, errors, tokens, timings, provenance."""
    from ..pipeline.table import read_output

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
        ("  writer       " + (f"last opened to write by pid {w['pid']} on {w['host']}, {w['since']}"
                              if (w := info["writer"]) else "unknown (an earlier version's output)")),
        f"  rows         {info['rows']} ({info['errors']} errors)",
        f"  finished     {reasons}",
        f"  tokens       {info['prompt_tokens']} prompt, {info['completion_tokens']} completion",
        (f"  latency      {_duration(info['mean_time_to_first_token'])} to the first token (the wait for a KV "
         f"slot included: the engine holds rows a round or two ahead), {_duration(info['mean_time_per_token'])} "
         "per token (means)"),
        f"  throughput   {throughput}",
        "  inputs       " + ("every row committed (a rerun has nothing to do while the files are unchanged)"
                             if info["inputs_complete"] else "not known to be all done (a rerun reads them and resumes)"),
    ]
    if info["last_plan"]:
        lines.append("  last plan    " + plan_text(info["last_plan"]))
    lines.append("  recoveries   " + _recoveries_text(info))
    lines += [f"  error        {e}" for e in info["error_examples"]]
    click.echo("\n".join(lines))


def _recoveries_text(info: dict[str, Any]) -> str:
    """How many workers the runs that wrote an output lost, and the last of them."""
    from datetime import datetime, timezone

    from ..engine.progress import lost_workers, recovery_text

    n, last = info["recoveries"], info["last_recovery"]
    if not n:
        return "none (no run writing it lost a worker)"
    text = f"{lost_workers(n)}, recovered; every row was computed once"
    if last:
        when = datetime.fromtimestamp(last["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") \
            if isinstance(last.get("time"), (int, float)) else "at an unknown time"
        text += f"; the last, {when}: {recovery_text(last)}"
    return text


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
        "inputs_complete": bool(attrs.get("complete_inputs")),  # a run committed every row of its inputs
        "writer": attrs.get("writer"),  # the run that opened it to write last: the one that may commit
        "recoveries": int(attrs.get("recoveries_total", 0)),  # workers lost by the runs that wrote it
        "last_recovery": (attrs.get("recoveries") or [None])[-1],
        "last_plan": attrs.get("last_plan"),  # how the last run on a cluster generated (None: in process)
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
