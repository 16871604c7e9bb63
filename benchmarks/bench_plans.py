#!/usr/bin/env python
"""Plans measured against each other and against the one the planner picks, on one cluster.

On the embedded cluster (one dense and two attention worker processes) and the embedded
SmolLM2-135M-Instruct model, ``--batch`` prompts (``bench_inprocess``'s) x
``--new-tokens`` new tokens each, greedy with EOS ignored, it runs

* the in-process engine (one micro-batch of the whole batch, as ``bench_two_tier``
  runs it), then
* the two-tier engine with each plan of ``--plans`` (micro-batch size x micro-batches in
  flight) and with the plan ``"auto"`` picks (both knobs "auto": the planner on the
  cluster's kept profile),

``--rounds`` times, alternating (in-process first in each round, the plans in the
opposite order every other round: this VM's speed drifts by minutes).  Each run prints
its tokens/s, its ratio to the in-process run of its round, the machine's CPU shares
during it and the planner's prediction for its plan (simulated on the profile the
cluster keeps, as ``auto`` sees it).  The summary gives each plan's median, whether its
greedy tokens equal the in-process engine's, and the auto plan's median against the
fastest plan measured: the planner's choice checked by measurement, not by its own
model.

Usage::

    python benchmarks/bench_plans.py [--batch 64] [--new-tokens 128] [--plans 64x1,32x2,16x4]
        [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the workers read it as they start

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_inprocess, bench_two_tier
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

import bench_inprocess as bi  # noqa: E402  (also sets the offline HF environment)
import bench_two_tier as bt  # noqa: E402

from glinthawk_dask import LLM  # noqa: E402
from glinthawk_dask.engine.engine import EngineConfig  # noqa: E402
from glinthawk_dask.model.resolve import DEFAULT_MODEL, resolve_checkpoint  # noqa: E402
from glinthawk_dask.tokenizer import Tokenizer  # noqa: E402

AUTO = "auto"
NEAR = 0.95  # the auto plan counts as the fastest within this share of the fastest plan measured


def parse_plans(text: str) -> list[tuple[int, int]]:
    """``"64x1,32x2"`` → ``[(64, 1), (32, 2)]``."""
    plans = []
    for part in text.split(","):
        try:
            size, depth = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--plans takes SIZExDEPTH pairs like 64x1,32x2, not {part!r}")
        if size < 1 or depth < 1:
            raise argparse.ArgumentTypeError(f"a plan's size and depth must be at least 1, not {part!r}")
        plans.append((size, depth))
    return plans


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="prompts (default 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated for each (default 128)")
    p.add_argument("--plans", type=parse_plans, default=parse_plans("64x1,32x2,16x4"),
                   help="plans to measure beside the auto one, SIZExDEPTH comma-separated (default 64x1,32x2,16x4)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every run (default 2)")
    p.add_argument("--json", metavar="OUT", help="write the runs and the summary to this JSON file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.new_tokens < 1 or args.rounds < 1:
        p.error("--batch, --new-tokens and --rounds must be at least 1")

    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(DEFAULT_MODEL))
    prompt_ids = [tokenizer.encode(t) for t in bi.prompt_texts(args.batch)]
    n_tokens = args.batch * args.new_tokens
    print(f"model {DEFAULT_MODEL} ({bt.DTYPE}), {args.batch} prompts x {args.new_tokens} new tokens, greedy, "
          f"ignore_eos; {args.rounds} rounds", flush=True)

    ip_steps = bt.step_tokens_for(prompt_ids, args.batch)
    inproc = LLM(DEFAULT_MODEL, mode="in-process", device="cpu", dtype=bt.DTYPE,
                 engine_config=EngineConfig(micro_batch_size=args.batch, max_step_tokens=ip_steps))
    bi.engine_generate(inproc, [prompt_ids[0][:4]], 2)  # warm-up
    base = LLM(DEFAULT_MODEL, mode="two-tier", dtype=bt.DTYPE, n_micro_batches=AUTO, micro_batch_size=AUTO,
               engine_config=EngineConfig(micro_batch_size=args.batch, max_step_tokens=ip_steps))
    report: dict[str, Any] = {"model": DEFAULT_MODEL, "dtype": bt.DTYPE, "batch": args.batch,
                              "new_tokens": args.new_tokens, "runs": []}
    try:
        bi.engine_generate(base, [prompt_ids[0][:4]], 2)  # weights onto the workers; the profile measured or read
        engines: dict[str, tuple[LLM, int]] = {"in-process": (inproc, ip_steps), AUTO: (base, ip_steps)}
        for size, depth in args.plans:
            steps = bt.step_tokens_for(prompt_ids, size)
            engines[f"{size}x{depth}"] = (bt.two_tier_on(base, mb_size=size, step_tokens=steps,
                                                         n_micro_batches=depth), steps)
        plans = [name for name in engines if name != "in-process"]
        reference: list[list[int]] | None = None
        for r in range(args.rounds):
            order = ["in-process"] + (plans if r % 2 == 0 else plans[::-1])
            ip_rate = None
            for name in order:
                llm, steps = engines[name]
                (outputs, seconds), cpu = bt.with_cpu(lambda llm=llm: bi.timed(
                    lambda: bi.engine_generate(llm, prompt_ids, args.new_tokens)))
                rate = n_tokens / seconds
                run = {"round": r + 1, "plan": name, "tokens_per_s": rate, "seconds": seconds, "cpu": cpu}
                if name == "in-process":
                    ip_rate = rate
                    reference = reference or outputs
                    line = f"in-process {rate:7.1f} tok/s"
                else:
                    s = llm.engine.last_summary
                    run.update(size=s.micro_batch_size, depth=s.n_micro_batches, ratio=rate / ip_rate,
                               predicted_tokens_per_s=bt.predicted_pair(llm, prompt_ids, args.new_tokens, s,
                                                                        ip_steps, steps)["two_tier"],
                               identical=sum(list(a) == list(b) for a, b in zip(outputs, reference)))
                    line = (f"{name:>10} {rate:7.1f} tok/s ({s.micro_batch_size} x {s.n_micro_batches}): "
                            f"{run['ratio']:.2f}x in-process, predicted {run['predicted_tokens_per_s']:.1f}, "
                            f"identical {run['identical']}/{args.batch}")
                report["runs"].append(run)
                print(f"round {r + 1}: {line}; machine CPU {bt.cpu_text(cpu)}", flush=True)
    finally:
        base.close()

    def med(plan: str, key: str = "tokens_per_s") -> float:
        return statistics.median(run[key] for run in report["runs"] if run["plan"] == plan)

    summary = {name: {"tokens_per_s": med(name), "ratio": med(name, "ratio"),
                      "predicted_tokens_per_s": med(name, "predicted_tokens_per_s"),
                      "identical": min(run["identical"] for run in report["runs"] if run["plan"] == name)}
               for name in plans}
    auto_run = next(run for run in report["runs"] if run["plan"] == AUTO)
    fastest = max((n for n in plans if n != AUTO), key=lambda n: summary[n]["tokens_per_s"], default=None)
    print(f"\nmedians (in-process {med('in-process'):.1f} tok/s):")
    for name in plans:
        m = summary[name]
        print(f"  {name:>10} {m['tokens_per_s']:7.1f} tok/s, {m['ratio']:.2f}x in-process, predicted "
              f"{m['predicted_tokens_per_s']:.1f}, identical {m['identical']}/{args.batch}")
    out = {"in_process_tokens_per_s": med("in-process"), "plans": summary,
           "auto_plan": f"{auto_run['size']}x{auto_run['depth']}"}
    if fastest is not None:
        share = summary[AUTO]["tokens_per_s"] / summary[fastest]["tokens_per_s"]
        out.update(fastest_plan=fastest, auto_over_fastest=share)
        print(f"auto planned {out['auto_plan']}: {share:.2f}x the fastest plan measured ({fastest}); "
              f"{'as fast' if share >= NEAR else 'SLOWER'} (within {1 - NEAR:.0%} counts as as fast)")
    report["summary"] = out
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
