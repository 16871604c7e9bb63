#!/usr/bin/env python
"""A run placed beside another run's KV, with and without growing into it once freed.

On the embedded cluster (one dense and two attention worker processes) and the embedded
SmolLM2-135M-Instruct model, ``--batch`` prompts (``bench_inprocess``'s) x
``--new-tokens`` new tokens each (greedy, EOS ignored, both knobs of the plan "auto"),
``--rounds`` times in turn:

* ``alone``: the run with the cluster to itself (what growing can at most reach);
* ``beside``: first another run's placement takes every attention worker's KV but
  ``--free-slots`` slots (a reservation through the scheduler's own ``glinthawk_plan``,
  whose caches are never opened: it holds KV and computes nothing, so the runs measured
  do not share the cores with it), released ``--release-after`` seconds after the run
  starts; the run plans within the free slots and keeps that plan
  (``glinthawk.engine.grow-every`` 0);
* ``grows``: the same, with growth as configured (a look every 2 s by default): the run grows
  into the released KV.

It prints each run's tokens/s, its plan and when it grew, the machine's CPU shares, and
the medians: ``grows`` against ``beside`` (what growing gains) and against ``alone``.
Greedy tokens are compared with the ``alone`` run's.

Usage::

    python benchmarks/bench_growth.py [--batch 96] [--new-tokens 32] [--free-slots 8]
        [--release-after 3] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the workers read it as they start

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_inprocess, bench_two_tier
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

import dask  # noqa: E402

import bench_inprocess as bi  # noqa: E402  (also sets the offline HF environment)
import bench_two_tier as bt  # noqa: E402

from glinthawk_dask import LLM  # noqa: E402
from glinthawk_dask.engine.engine import EngineConfig  # noqa: E402
from glinthawk_dask.model.resolve import DEFAULT_MODEL, resolve_checkpoint  # noqa: E402
from glinthawk_dask.tokenizer import Tokenizer  # noqa: E402

KINDS = ("alone", "beside", "grows")
HOLDER = "gh-bench-growth-other"  # the other run's id on the scheduler


def hold_kv(llm: LLM, seq_len: int, free_slots: int) -> int:
    """Reserve every attention worker's KV but ``free_slots`` slots of ``seq_len``
    positions (one micro-batch per worker); the slots reserved on each."""
    cfg = llm.engine.model_config
    bpt = cfg.kv_bytes_per_token(4, 1)  # float32, one layer
    info = llm.client.sync(llm.client.scheduler.glinthawk_cluster_info)
    slot = bpt * cfg.n_layers * seq_len
    held = min(info["kv_free"].values()) // slot - free_slots
    if held < 1:
        raise SystemExit(f"the attention workers hold fewer than {free_slots + 1} slots of {seq_len} positions")
    reply = llm.client.sync(llm.client.scheduler.glinthawk_plan, run_id=HOLDER, mode="two-tier",
                            n_layers=cfg.n_layers, kv_bytes_per_token_layer=bpt, max_seq_len=seq_len,
                            micro_batch_size=held, n_micro_batches=len(info["attention"]))
    if "error" in reply:
        raise SystemExit(f"could not reserve the other run's KV: {reply['error']}")
    return held


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=96, help="prompts (default 96)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated for each (default 32)")
    p.add_argument("--free-slots", type=int, default=8, help="slots left free on each attention worker (default 8)")
    p.add_argument("--release-after", type=float, default=3.0,
                   help="seconds into the run when the other run's KV is released (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three runs (default 2)")
    p.add_argument("--json", metavar="OUT", help="write the runs and the summary to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch, args.new_tokens, args.free_slots, args.rounds) < 1:
        p.error("--batch, --new-tokens, --free-slots and --rounds must be at least 1")

    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(DEFAULT_MODEL))
    prompt_ids = [tokenizer.encode(t) for t in bi.prompt_texts(args.batch)]
    seq_len = max(len(ids) for ids in prompt_ids) + args.new_tokens  # the slots the run sizes
    n_tokens = args.batch * args.new_tokens
    print(f"model {DEFAULT_MODEL} ({bt.DTYPE}), {args.batch} prompts x {args.new_tokens} new tokens, greedy, "
          f"ignore_eos, auto plans; the other run leaves {args.free_slots} slots of {seq_len} positions on each "
          f"attention worker and is released {args.release_after:g} s in; {args.rounds} rounds", flush=True)
    llm = LLM(DEFAULT_MODEL, mode="two-tier", dtype=bt.DTYPE, n_micro_batches="auto", micro_batch_size="auto",
              engine_config=EngineConfig(max_step_tokens=bt.step_tokens_for(prompt_ids, args.batch)))
    report: dict[str, Any] = {"model": DEFAULT_MODEL, "batch": args.batch, "new_tokens": args.new_tokens,
                              "free_slots": args.free_slots, "release_after": args.release_after, "runs": []}
    reference = None
    try:
        bi.engine_generate(llm, [prompt_ids[0][:4]], 2)  # weights onto the workers; the profile measured or read
        for r in range(args.rounds):
            for kind in KINDS:
                timer = None
                if kind != "alone":
                    held = hold_kv(llm, seq_len, args.free_slots)
                    timer = threading.Timer(args.release_after, lambda: llm.client.sync(
                        llm.client.scheduler.glinthawk_run_closed, run_id=HOLDER))
                    timer.start()
                with dask.config.set({"glinthawk.engine.grow-every": 0} if kind == "beside" else {}):
                    (outputs, seconds), cpu = bt.with_cpu(lambda: bi.timed(
                        lambda: bi.engine_generate(llm, prompt_ids, args.new_tokens)))
                if timer is not None:
                    timer.join()
                s = llm.engine.last_summary
                grew = [g for g in s.growths if g["kind"] == "grew"]
                first = grew[0]["from"] if grew else f"{s.micro_batch_size} x {s.n_micro_batches}"
                reference = reference or (outputs if kind == "alone" else None)
                run = {"round": r + 1, "kind": kind, "tokens_per_s": n_tokens / seconds, "seconds": seconds,
                       "cpu": cpu, "plan": first, "grew": grew, "held_slots": held if kind != "alone" else 0,
                       "identical": None if reference is None else sum(
                           list(a) == list(b) for a, b in zip(outputs, reference))}
                report["runs"].append(run)
                path = first + "".join(f" -> {g['to']} at {g['after_s']:.1f} s" for g in grew)
                print(f"round {r + 1}: {kind:>6} {run['tokens_per_s']:7.1f} tok/s in {seconds:5.1f} s, plan {path}, "
                      f"identical {run['identical']}/{args.batch}; machine CPU {bt.cpu_text(cpu)}", flush=True)
    finally:
        llm.close()

    def med(kind: str) -> float:
        return statistics.median(run["tokens_per_s"] for run in report["runs"] if run["kind"] == kind)

    summary = {kind: med(kind) for kind in KINDS}
    summary.update(grows_over_beside=summary["grows"] / summary["beside"],
                   grows_over_alone=summary["grows"] / summary["alone"],
                   identical=min(run["identical"] for run in report["runs"] if run["identical"] is not None))
    print(f"\nmedians: alone {summary['alone']:.1f} tok/s, beside (no growth) {summary['beside']:.1f}, "
          f"grows {summary['grows']:.1f}: growing {summary['grows_over_beside']:.2f}x keeping the plan, "
          f"{summary['grows_over_alone']:.2f}x alone; identical {summary['identical']}/{args.batch}")
    report["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
