#!/usr/bin/env python
"""How long `glinthawk plan` takes to simulate its configurations, rounds in Python
against rounds compiled with Numba, in one run.

A sweep costs each configuration its continuous-batching steps (Python, as sums per
micro-batch) and the pipeline rounds it has not met before (an event simulation each).
Every case is swept four ways on a cold round cache: with the rounds in Python, with
them compiled (Numba's on-disk cache loaded beforehand, its time printed apart) in one
thread and in as many threads as ``plan`` uses (the cores, at most 8: the compiled
rounds run without the GIL), and as ``plan`` does by default (Python, compiled once the
sweep has run 2 s, threads from then on).  The predictions must be the same, bit for
bit, every way.  The machine's CPU shares are printed beside each time.

Usage::

    python benchmarks/bench_plan_sweep.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

from bench_two_tier import cpu_text, with_cpu  # noqa: E402

from glinthawk_dask.model.config import ModelConfig  # noqa: E402
from glinthawk_dask.planner.plan import candidates, sweep, sweep_threads  # noqa: E402
from glinthawk_dask.planner.profile import load_profile  # noqa: E402
from glinthawk_dask.planner.workload import Workload  # noqa: E402

rounds = importlib.import_module("glinthawk_dask.planner.rounds")

# (profile, model, requests, prompt tokens, output tokens, dense workers, attention workers per dense)
CASES = [
    ("vm-2core", "smollm2-135m-instruct", 256, 128, 128, 1, 2),
    ("vm-2core", "smollm2-135m-instruct", 5000, 64, 64, 1, 2),
    ("vm-2core", "smollm2-135m-instruct", 1024, 128, 128, 4, 4),
    ("h200", "llama-2-7b", 1024, 128, 128, 2, 4),
]
QUICK = [("vm-2core", "smollm2-135m-instruct", 48, 16, 16, 2, 2)]
THREADS = sweep_threads()  # as plan's sweeps


def _key(preds) -> list:
    return [(p.config, p.feasible, p.seconds, p.generated_tokens, p.dense_util, p.attention_util) for p in preds]


def run_case(profile: str, model: str, n: int, prompt: int, output: int, dense: int, attention: int) -> dict:
    prof, cfg = load_profile(profile), ModelConfig.from_name(model)
    workload = Workload.uniform(n, prompt, output)
    configs = candidates(n, dense=dense, attention=attention, modes=("two-tier", "single-tier"),
                         dtype_bytes=4 if prof.dense.dtype == "float32" else 2)

    def timed(compile_after_s, threads=None):
        t0 = time.perf_counter()
        preds = sweep(prof, cfg, workload, configs, compile_after_s=compile_after_s, threads=threads)
        return preds, time.perf_counter() - t0

    rounds._compiled = None
    (python, t_python), cpu_python = with_cpu(lambda: timed(None))
    t0 = time.perf_counter()
    rounds.compile_kernel()
    load_s = time.perf_counter() - t0
    (compiled, t_compiled), cpu_compiled = with_cpu(lambda: timed(None, threads=1))
    (threaded, t_threaded), cpu_threaded = with_cpu(lambda: timed(None))
    rounds._compiled = None
    (default, t_default), cpu_default = with_cpu(lambda: timed(2.0))
    return {"case": f"{profile} {model}, {n} requests of {prompt} + {output} tokens, up to {dense} dense x "
                    f"{attention} attention workers", "configurations": len(configs),
            "python_s": t_python, "compiled_s": t_compiled, "threaded_s": t_threaded, "threads": THREADS,
            "default_s": t_default, "compile_load_s": load_s, "default_compiled": rounds._compiled is not None,
            "same": _key(python) == _key(compiled) == _key(threaded) == _key(default),
            "cpu": {"python": cpu_text(cpu_python), "compiled": cpu_text(cpu_compiled),
                    "threaded": cpu_text(cpu_threaded), "default": cpu_text(cpu_default)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small case (the tests run it)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    results = []
    for case in QUICK if args.quick else CASES:
        r = run_case(*case)
        results.append(r)
        print(f"{r['case']}: {r['configurations']} configurations", flush=True)
        print(f"  rounds in Python   {r['python_s']:7.2f} s  (machine {r['cpu']['python']})")
        print(f"  rounds compiled    {r['compiled_s']:7.2f} s  (machine {r['cpu']['compiled']}; "
              f"compiling or loading it took {r['compile_load_s']:.2f} s before)")
        print(f"    in {r['threads']} threads    {r['threaded_s']:7.2f} s  (machine {r['cpu']['threaded']})")
        print(f"  as plan does       {r['default_s']:7.2f} s  (machine {r['cpu']['default']}; "
              f"{'compiled after 2 s' if r['default_compiled'] else 'in Python throughout'})")
        print(f"  compiled / Python: {r['python_s'] / r['compiled_s']:.1f}x faster, {r['threads']} threads / one: "
              f"{r['compiled_s'] / r['threaded_s']:.2f}x; the same predictions every way: "
              f"{'yes' if r['same'] else 'NO'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": results}, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(r["same"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
