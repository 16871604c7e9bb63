#!/usr/bin/env python
"""The planner's predictions against measured runs, on this machine, in one run.

It starts the embedded local cluster (1 dense + 3 attention worker processes), loads
the embedded SmolLM2-135M-Instruct (fp32) on it, measures the cluster's profile with
``glinthawk profile``'s code, then runs a set of configurations (micro-batch sizes,
depths, 1-3 attention workers, 0/10/50 ms of induced latency, single-tier and
in-process) and prints, for each, the simulator's predicted tokens/s next to the
measured one and the error.  The in-process engine runs in this script's process, not
on a dense worker: its predictions use a profile measured here (``local_profile``), the
others the cluster's.  Every run is greedy with EOS ignored, on random prompts of
``--prompt-tokens`` tokens, ``--new-tokens`` new tokens each (fewer under 50 ms).  The
profiles are measured once, at the start, as a user's would be.  ``--profile-each``
brackets every run instead: a profile right before it and one right after, and the
prediction is the mean of the two profiles' predictions (each is printed too).  This
VM's speed drifts by a third or more between minutes, and a profile of a few seconds
from other minutes counts that drift as the simulator's error; the bracket measures the
machine as it was around the run, so what error is left is the simulator's.

Usage::

    python benchmarks/bench_planner.py [--prompts 32] [--prompt-tokens 16] [--new-tokens 32]
        [--profile-each] [--profile-out FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

import dask
import torch

from glinthawk_dask import LLM
from glinthawk_dask.engine.engine import EngineConfig
from glinthawk_dask.model.resolve import DEFAULT_MODEL
from glinthawk_dask.planner.microbench import local_profile
from glinthawk_dask.planner.simulate import RunConfig, Workload, simulate
from glinthawk_dask.runtime.profiler import measure_profile
from glinthawk_dask.sampling import SamplingParams

TARGET_ERROR = 0.15
TARGET_COUNT = 6


def configs(n: int, new: int) -> list[tuple[str, RunConfig, int]]:
    """(label, config, new tokens) of every run."""
    half, third = -(-n // 2), -(-n // 3)
    return [
        ("in-process", RunConfig(mode="in-process", micro_batch_size=n), new),
        ("single-tier", RunConfig(mode="single-tier", micro_batch_size=n), new),
        ("two-tier, 1 attention worker", RunConfig(micro_batch_size=n, micro_batches=1), new),
        ("two-tier, 2 attention workers", RunConfig(micro_batch_size=half, micro_batches=2, attention=2), new),
        ("two-tier, 3 attention workers", RunConfig(micro_batch_size=third, micro_batches=3, attention=3), new),
        ("two-tier, 10 ms latency", RunConfig(micro_batch_size=half, micro_batches=2, attention=2, latency=0.010),
         max(4, new // 4)),
        ("two-tier, 50 ms latency", RunConfig(micro_batch_size=max(1, n // 8), micro_batches=8, attention=3,
                                              latency=0.050), 4),
    ]


def cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def timed_generate(llm, rows: list, params) -> tuple[list, float, int, float]:
    """``llm.generate(rows, params)`` timed: its completions, seconds, generated tokens
    and the machine's busy CPU share meanwhile."""
    busy0, total0 = cpu_times()
    t = time.perf_counter()
    out = llm.generate(rows, params)
    seconds = time.perf_counter() - t
    busy1, total1 = cpu_times()
    return out, seconds, sum(len(c.completion_token_ids) for c in out), (busy1 - busy0) / max(total1 - total0, 1e-9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--profile-out", help="also write the measured profile here")
    p.add_argument("--profile-each", action="store_true",
                   help="measure the profiles right before and right after each run and predict from both, not "
                        "from one profile at the start (this VM's speed drifts between minutes; a profile from "
                        "other minutes counts that drift as the simulator's error)")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args(argv)

    print(f"python {platform.python_version()}, torch {torch.__version__}, os.cpu_count() = {os.cpu_count()}")
    rng = random.Random(0)
    with dask.config.set({"glinthawk.local-cluster.attention-workers": 3}):
        base = LLM(DEFAULT_MODEL, mode="two-tier", dtype="float32", local_workers=(1, 3))
    vocab = base.config.vocab_size
    rows = [{"id": f"p{i}", "prompt_token_ids": [rng.randrange(1, vocab) for _ in range(args.prompt_tokens)]}
            for i in range(args.prompts)]
    base.generate(rows[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # weights onto the workers

    def cluster_profile():
        t0 = time.perf_counter()
        profile = base.client.sync(measure_profile, base.client, base.config, model=DEFAULT_MODEL, dtype="float32")
        print(f"  profile measured in {time.perf_counter() - t0:.1f} s: dense layer at 16 tokens "
              f"{profile.dense.layer_s(16) * 1e3:.2f} ms, head at 16 rows {profile.dense.head_s(16) * 1e3:.2f} ms, "
              f"round trip {profile.rtt_s * 1e3:.2f} ms, shared host: {profile.shared_host} (dense "
              f"x{profile.dense_slowdown:.2f}, attention x{profile.attention_slowdown:.2f} while both compute two "
              f"micro-batches deep, x{profile.slowdowns(3)[0]:.2f} and x{profile.slowdowns(3)[1]:.2f} three deep), "
              f"cold cost x{profile.dense.cold_factor:.2f} + {profile.dense.cold_s * 1e3:.2f} ms; after idle gaps "
              + ", ".join(f"{g * 1e3:g} ms +{e * 1e3:.2f}" for g, e in profile.dense.idle_excess or ()))
        return profile

    def here_profile():
        t0 = time.perf_counter()
        here = local_profile(base.config, torch.float32)
        print(f"  in-process profile measured here in {time.perf_counter() - t0:.1f} s: dense layer at 16 tokens "
              f"{here.dense.layer_s(16) * 1e3:.2f} ms, head at 16 rows {here.dense.head_s(16) * 1e3:.2f} ms")
        return here

    profile, here = (None, None) if args.profile_each else (cluster_profile(), here_profile())
    if args.profile_out:
        # named after its file, as `glinthawk plan --profile NAME` finds a shipped one
        dataclasses.replace(profile or cluster_profile(), name=Path(args.profile_out).stem).save(args.profile_out)
    in_process = None
    results = []
    for label, cfg, new in configs(args.prompts, args.new_tokens):
        workload = Workload.uniform(args.prompts, args.prompt_tokens, new)
        measure = here_profile if cfg.mode == "in-process" else cluster_profile
        used = measure() if args.profile_each else (here if cfg.mode == "in-process" else profile)
        predicted = simulate(used, base.config, workload, cfg)
        if cfg.mode == "in-process":
            in_process = in_process or LLM(DEFAULT_MODEL, mode="in-process", dtype="float32",
                                           engine_config=EngineConfig(micro_batch_size=cfg.micro_batch_size))
            llm = in_process
        else:
            llm = LLM(DEFAULT_MODEL, mode=cfg.mode, client=base.client, dtype="float32",
                      engine_config=EngineConfig(micro_batch_size=cfg.micro_batch_size,
                                                 max_step_tokens=cfg.max_step_tokens),
                      n_micro_batches=cfg.micro_batches, latency=cfg.latency)
        params = SamplingParams(max_tokens=new, ignore_eos=True)
        llm.generate(rows[:1], SamplingParams(max_tokens=1, ignore_eos=True))  # weights (single-tier: its slice)
        out, seconds, generated, cpu = timed_generate(llm, rows, params)
        measured = generated / seconds
        before = after = predicted.tokens_per_s
        bracket = {}
        if args.profile_each:  # the machine right after the run, too: predict from both sides
            after_profile = measure()
            after = simulate(after_profile, base.config, workload, cfg).tokens_per_s
            bracket = {"predicted_before": before, "predicted_after": after, "profile_after": after_profile.to_json()}
        predicted_tps = (before + after) / 2
        err = predicted_tps / measured - 1
        busy = llm.engine.tier_overlap() if cfg.mode != "in-process" else {}
        results.append({"label": label, "mode": cfg.mode, "profile": used.to_json(),
                        "micro_batch_size": predicted.micro_batch_size, "micro_batches": predicted.micro_batches,
                        "attention_workers": cfg.attention,
                        "latency_ms": cfg.latency * 1e3, "prompts": args.prompts,
                        "prompt_tokens": args.prompt_tokens, "new_tokens": new,
                        "measured_tokens_per_s": measured, "predicted_tokens_per_s": predicted_tps, **bracket,
                        "error": err, "machine_cpu_busy": cpu, "bottleneck": predicted.bottleneck,
                        "dense_busy": busy.get("dense_busy", 0.0) / seconds,
                        "attention_busy": busy.get("attention_busy", 0.0) / seconds,
                        "predicted_dense_busy": predicted.dense_util,
                        "predicted_attention_busy": predicted.attention_util})
        sides = f" (before {before:.1f}, after {after:.1f})" if args.profile_each else ""
        print(f"{label:32s} {predicted.micro_batch_size:3d} x {predicted.micro_batches}: measured "
              f"{measured:7.1f} tok/s, predicted {predicted_tps:7.1f}{sides} ({err:+.0%}); dense busy "
              f"{results[-1]['dense_busy']:.0%} (predicted {predicted.dense_util:.0%}); machine CPU busy {cpu:.0%}",
              flush=True)
    base.close()
    within = [r for r in results if abs(r["error"]) <= TARGET_ERROR]
    print(f"\nwithin {TARGET_ERROR:.0%}: {len(within)} of {len(results)} configurations "
          f"(target: at least {TARGET_COUNT}) {'PASS' if len(within) >= TARGET_COUNT else 'SHORT'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"profile_each": args.profile_each, "runs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
