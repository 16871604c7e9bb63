#!/usr/bin/env python
"""How long the embedded cluster's idle OpenMP threads spin (and how many threads attention
computes on), two or more settings in one run.

The embedded cluster's tiers share this machine's cores, and an idle OpenMP thread of
libgomp (torch's OpenMP on Linux) spins about 300,000 turns before it sleeps: the dense
worker's helper thread holds a core through each attention round trip.  This starts one
embedded cluster per setting, side by side (one dense and one attention worker each), each with its
``GOMP_SPINCOUNT`` (``--spins``: libgomp's default and 10,000 turns, after which the
helper sleeps within a fraction of a millisecond of the dense job's end) and, after a
colon, its attention worker's torch threads (``glinthawk.attention.threads``, default 1:
``10000:2`` lets attention use both cores while the dense helper sleeps), after another
the threads its runs try (``glinthawk.attention.try-threads``: ``10000:1:2`` times steps on
1 and 2 threads and keeps the faster, see ``ThreadTuner``; the picks are printed), and runs
``--batch`` prompts x ``--new-tokens`` greedy tokens (EOS ignored) two-tier at plan
``batch x 1`` on each, in ``--rounds`` rounds: the in-process engine in this process first (the reference of the
round's ratios), then the clusters, their order reversed every other round.  An idle
cluster costs the others about 1% of the machine.  It prints each run's tokens/s, its
ratio to in-process and the machine's CPU shares, then the medians and how many rounds
each setting won, and checks every run's tokens against in-process.

Usage::

    python benchmarks/bench_spin.py [--batch 64] [--new-tokens 64] [--rounds 4] [--spins 300000,10000:2]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

import dask

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

from bench_planner import timed_generate  # noqa: E402

from glinthawk_dask import LLM, SamplingParams  # noqa: E402
from glinthawk_dask.engine.engine import EngineConfig  # noqa: E402
from glinthawk_dask.model.resolve import DEFAULT_MODEL  # noqa: E402


def _worker_settings() -> tuple[str | None, int, int | None]:
    """A worker's GOMP_SPINCOUNT, attention threads and the threads its runs one deep
    try (run on each worker)."""
    from glinthawk_dask import config

    try_threads = config.get("attention.try-threads")
    return (os.environ.get("GOMP_SPINCOUNT"), int(config.get("attention.threads")),
            int(try_threads) if try_threads else None)


def _thread_picks(dask_worker=None) -> list[dict]:
    """The thread counts an attention worker's runs picked (see ThreadTuner)."""
    plugin = dask_worker.plugins.get("glinthawk-attention")
    service = getattr(plugin, "service", None)
    return list(service.thread_picks) if service is not None else []


def one_deep_workload(model: str, batch: int, prompt_tokens: int, new_tokens: int):
    """What a one-deep comparison runs: the engine config of plan ``batch x 1``, the
    in-process engine with it, ``batch`` random prompts of ``prompt_tokens`` tokens (seed
    0), greedy sampling of ``new_tokens`` (EOS ignored) and a 4-token warm-up."""
    rng = random.Random(0)
    engine = EngineConfig(micro_batch_size=batch, max_step_tokens=max(256, batch * prompt_tokens))
    in_process = LLM(model, mode="in-process", device="cpu", dtype="float32", engine_config=engine)
    vocab = in_process.config.vocab_size
    rows = [{"id": str(i), "prompt_token_ids": [rng.randrange(1, vocab) for _ in range(prompt_tokens)]}
            for i in range(batch)]
    return (engine, in_process, rows, SamplingParams(max_tokens=new_tokens, ignore_eos=True),
            SamplingParams(max_tokens=4, ignore_eos=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--spins", default="300000,10000",
                   help="each cluster's GOMP_SPINCOUNT[:attention threads[:threads a run tries]], comma-separated")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args(argv)

    engine, in_process, rows, params, warm = one_deep_workload(args.model, args.batch, args.prompt_tokens,
                                                               args.new_tokens)
    in_process.generate(rows, warm)
    clusters = {}
    for setting in args.spins.split(","):
        spins, threads, tries = (setting.split(":") + ["", ""])[:3]
        threads, tries = int(threads or 1), (int(tries) if tries else None)
        os.environ["GOMP_SPINCOUNT"] = spins  # the environment its worker processes spawn with
        # the workers take the config of this process as their nannies start
        with dask.config.set({"glinthawk.attention.threads": threads, "glinthawk.attention.try-threads": tries}):
            llm = LLM(args.model, mode="two-tier", dtype="float32", local_workers=(1, 1), engine_config=engine,
                      n_micro_batches=1)
        got = set(llm.client.run(_worker_settings).values())
        if got != {(spins, threads, tries)}:
            raise SystemExit(f"the workers started with (GOMP_SPINCOUNT, attention threads, tried) {got}, not "
                             f"{(spins, threads, tries)}")
        llm.generate(rows, warm)  # weights onto the workers, the data plane connected
        clusters[f"spin {spins}" + (f", attention on {threads} threads" if threads != 1 else "")
                 + (f", runs try {tries} threads" if tries else "")] = llm
    names = list(clusters)
    print(f"{args.model}, plan {args.batch} x 1, {args.batch} prompts of {args.prompt_tokens} tokens x "
          f"{args.new_tokens} new; os.cpu_count() = {os.cpu_count()}")

    reference, identical, rounds = None, True, []
    for r in range(args.rounds):
        out, seconds, tokens, cpu = timed_generate(in_process, rows, params)
        reference = reference or [c.completion_token_ids for c in out]
        row = {"in-process": {"tokens_per_s": tokens / seconds, "machine_cpu_busy": cpu}}
        for name in (names if r % 2 == 0 else names[::-1]):
            out, seconds, tokens, cpu = timed_generate(clusters[name], rows, params)
            identical &= [c.completion_token_ids for c in out] == reference
            row[name] = {"tokens_per_s": tokens / seconds, "machine_cpu_busy": cpu,
                         "ratio": tokens / seconds / row["in-process"]["tokens_per_s"]}
        rounds.append(row)
        print(f"round {r + 1}: in-process {row['in-process']['tokens_per_s']:.1f} tok/s "
              f"(CPU {row['in-process']['machine_cpu_busy']:.0%}); "
              + "; ".join(f"{name}: {row[name]['tokens_per_s']:.1f} ({row[name]['ratio']:.2f}x, CPU "
                          f"{row[name]['machine_cpu_busy']:.0%})" for name in names), flush=True)
    medians = {name: statistics.median(row[name]["ratio"] for row in rounds) for name in names}
    cpu = {name: statistics.median(row[name]["machine_cpu_busy"] for row in rounds) for name in names}
    wins = {name: sum(max(names, key=lambda n: row[n]["tokens_per_s"]) == name for row in rounds) for name in names}
    for name in names:
        print(f"{name}: median ratio to in-process {medians[name]:.2f}x, machine CPU {cpu[name]:.0%}, "
              f"fastest in {wins[name]} of {len(rounds)} rounds")
    print(f"greedy tokens of every two-tier run identical to in-process: {'yes' if identical else 'NO'}")
    picks = {}
    for name, llm in clusters.items():
        picks[name] = [p for ps in llm.client.run(_thread_picks).values() for p in ps]
        if picks[name]:
            chosen = [p["threads"] for p in picks[name]]
            print(f"{name}: attention threads picked {len(chosen)} times: "
                  + ", ".join(f"{n} threads {chosen.count(n)}x" for n in sorted(set(chosen)))
                  + "; last medians " + ", ".join(f"{k} threads {v * 1e3:.1f} ms a step"
                                                  for k, v in picks[name][-1]["step_s"].items()))
    for llm in clusters.values():
        llm.close()
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "batch": args.batch, "new_tokens": args.new_tokens, "rounds": rounds,
            "median_ratio": medians, "median_cpu": cpu, "wins": wins, "identical": identical,
            "thread_picks": picks, "prompt_tokens": args.prompt_tokens,
        }, indent=1) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
