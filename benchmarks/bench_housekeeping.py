#!/usr/bin/env python
"""What Dask's periodic housekeeping costs the tiers of the embedded cluster, in one run.

The embedded cluster's processes (the scheduler and nannies in this process, the worker
processes beside it) share this machine's cores with the tiers' compute.  Dask wakes
each of them on timers: a stack sample every 10 ms in every worker, an event-loop tick
every 20 ms and a memory poll every 100 ms in every server, a system monitor every
500 ms.  ``glinthawk.housekeeping: quiet`` (the default) stretches them
(:data:`glinthawk_dask.runtime.cluster.QUIET_HOUSEKEEPING`); ``dask`` keeps Dask's own.

One cluster is started with Dask's intervals (so every timer exists), then switched
between the two sets of intervals in place, alternating, so both see the machine of the
same minutes:

1. **Idle.**  The machine's busy share while the cluster idles, ``--idle-seconds`` each
   way, twice.
2. **Runs.**  ``--rounds`` rounds; each runs both settings (in turn, the order swapped
   every round), and under each the in-process engine (in this process, beside the
   cluster) and then the two-tier engine generate ``--prompts`` random prompts of 16
   tokens x ``--new-tokens`` new tokens, greedy, EOS ignored.  It prints tokens/s of
   both and the machine's CPU shares, then the medians and how many rounds each
   setting won.

Usage::

    python benchmarks/bench_housekeeping.py [--prompts 16] [--new-tokens 48] [--rounds 5]
        [--idle-seconds 8] [--model NAME] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_two_tier (cpu shares)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

import dask
from dask.utils import parse_timedelta

from bench_two_tier import cpu_share, cpu_text, cpu_ticks
from glinthawk_dask import LLM
from glinthawk_dask.engine.engine import EngineConfig
from glinthawk_dask.model.resolve import DEFAULT_MODEL
from glinthawk_dask.runtime.cluster import QUIET_HOUSEKEEPING
from glinthawk_dask.sampling import SamplingParams

# Dask's periodic callbacks (on workers, nannies and the scheduler) and the config keys
# that set their intervals; None: the callback runs only while the key is true.
_CALLBACKS = {
    "profile": ("distributed.worker.profile.enabled", "distributed.worker.profile.interval"),
    "profile-cycle": ("distributed.worker.profile.enabled", "distributed.worker.profile.cycle"),
    "tick": (None, "distributed.admin.tick.interval"),
    "monitor": (None, "distributed.admin.system-monitor.interval"),
    "memory_monitor": (None, "distributed.worker.memory.monitor-interval"),
}


def intervals(settings: dict) -> dict[str, float | None]:
    """Milliseconds of each callback under ``settings`` (Dask's config where they say
    nothing); None: the callback is off."""
    out: dict[str, float | None] = {}
    for name, (switch, key) in _CALLBACKS.items():
        on = settings.get(switch, dask.config.get(switch)) if switch else True
        out[name] = parse_timedelta(settings.get(key, dask.config.get(key)), default="ms") * 1e3 if on else None
    return out


def apply(server, table: dict[str, float | None]) -> list[str]:
    """Set ``server``'s periodic callbacks to ``table``'s intervals (on its event loop)."""
    done = []
    for name, pc in server.periodic_callbacks.items():
        if name in table:
            pc.stop()
            if table[name] is not None:
                pc.callback_time = table[name]
                pc.start()
            done.append(name)
    return sorted(done)


def switch(llm: LLM, table: dict[str, float | None]) -> None:
    """Every server of the embedded cluster to ``table``: workers, scheduler, nannies."""
    client = llm.client
    client.run(lambda dask_worker: apply(dask_worker, table))
    client.run_on_scheduler(lambda dask_scheduler: apply(dask_scheduler, table))
    for nanny in client.cluster.workers.values():  # in this process, on the cluster's loop
        client.cluster.loop.add_callback(apply, nanny, table)
    time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--idle-seconds", type=float, default=8.0)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args(argv)

    tables = {"quiet": intervals(QUIET_HOUSEKEEPING), "dask": intervals({})}
    for name, table in tables.items():
        print(f"{name:5s}: " + ", ".join(f"{k} {'off' if v is None else f'{v:g} ms'}" for k, v in table.items()))
    with dask.config.set({"glinthawk.housekeeping": "dask"}):  # every timer exists
        llm = LLM(args.model, mode="two-tier", dtype="float32")
    rng = random.Random(0)
    rows = [{"id": f"p{i}", "prompt_token_ids": [rng.randrange(1, llm.config.vocab_size) for _ in range(16)]}
            for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(rows, params)  # weights on the workers, the plan measured
    inproc = LLM(args.model, mode="in-process", dtype="float32",
                 engine_config=EngineConfig(micro_batch_size=args.prompts))
    reference = {c.id: c.completion_token_ids for c in inproc.generate(rows, params)}

    report: dict = {"tables": tables, "idle": {"quiet": [], "dask": []}, "rounds": []}
    print("\n== the cluster idle ==")
    for name in ("quiet", "dask") * 2:
        switch(llm, tables[name])
        before = cpu_ticks()
        time.sleep(args.idle_seconds)
        share = cpu_share(before, cpu_ticks())
        report["idle"][name].append(share)
        print(f"{name:5s}: {cpu_text(share)}", flush=True)

    print("\n== runs, alternating ==")
    same = True
    for r in range(args.rounds):
        for name in (("quiet", "dask") if r % 2 == 0 else ("dask", "quiet")):
            switch(llm, tables[name])
            t = time.perf_counter()
            inproc.generate(rows, params)
            t_in = time.perf_counter() - t
            before, t = cpu_ticks(), time.perf_counter()
            out = llm.generate(rows, params)
            t_two = time.perf_counter() - t
            share = cpu_share(before, cpu_ticks())
            n = sum(len(c.completion_token_ids) for c in out)
            same = same and all(c.completion_token_ids == reference[c.id] for c in out)
            row = {"round": r, "housekeeping": name, "two_tier_tokens_per_s": n / t_two,
                   "in_process_tokens_per_s": n / t_in, "cpu": share}
            report["rounds"].append(row)
            print(f"round {r} {name:5s}: two-tier {n / t_two:6.1f} tok/s ({cpu_text(share)}), in-process "
                  f"{n / t_in:6.1f}: {t_in / t_two:.2f}x", flush=True)
    llm.close()

    print()
    summary = {}
    for name in ("quiet", "dask"):
        rows_ = [x for x in report["rounds"] if x["housekeeping"] == name]
        idle = statistics.median(s["busy"] for s in report["idle"][name] if s) if any(report["idle"][name]) else None
        summary[name] = {
            "idle_busy": idle,
            "two_tier_tokens_per_s": statistics.median(x["two_tier_tokens_per_s"] for x in rows_),
            "in_process_tokens_per_s": statistics.median(x["in_process_tokens_per_s"] for x in rows_),
            "ratio": statistics.median(x["two_tier_tokens_per_s"] / x["in_process_tokens_per_s"] for x in rows_),
        }
        s = summary[name]
        print(f"{name:5s}: idle cluster busy {'n/a' if idle is None else f'{idle:.1%}'} of the machine; medians: "
              f"two-tier {s['two_tier_tokens_per_s']:.1f} tok/s, in-process {s['in_process_tokens_per_s']:.1f}, "
              f"two-tier / in-process {s['ratio']:.2f}x")
    tps = {(x["round"], x["housekeeping"]): x["two_tier_tokens_per_s"] for x in report["rounds"]}
    wins = sum(tps[r, "quiet"] > tps[r, "dask"] for r in range(args.rounds))
    print(f"two-tier faster with quiet housekeeping in {wins} of {args.rounds} rounds; "
          f"two-tier tokens identical to in-process in every run: {same}")
    report.update(summary=summary, quiet_wins=wins, identical=same)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
