#!/usr/bin/env python
"""A run waiting for KV beside a run of one micro-batch that holds all of it, with and
without that micro-batch shrinking for it.

On an embedded cluster of one dense and one attention worker process and the embedded
SmolLM2-135M-Instruct model, with slots of ``--max-seq-len`` positions (few fit the
attention worker), greedy and EOS ignored:

* run A: ``--batch-a`` prompts x ``--new-tokens-a`` tokens as one micro-batch holding
  every slot of the attention worker (its size fixed to all of them);
* run B, started ``--b-after`` seconds after A made its first token: ``--batch-b``
  prompts x ``--new-tokens-b`` tokens, auto plans.

``keeps``: A keeps its slots (``glinthawk.engine.grow-every`` 0), so B waits for it to
end.  ``shrinks``: as configured; A shrinks to its share for B, and grows back in place
once B ends.  Each is run ``--rounds`` times in turn, after A and B each alone once (the
tokens every run is compared with).  It prints, per run, when B was placed and ended
(seconds after A started), both runs' tokens/s and A's plan as it changed, the
machine's CPU shares, and the medians: B's time to its last token and the time to both
ends, ``shrinks`` against ``keeps``.

Usage::

    python benchmarks/bench_shrink.py [--batch-a 96] [--new-tokens-a 64] [--batch-b 16]
        [--new-tokens-b 32] [--max-seq-len 2048] [--b-after 1] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
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
from glinthawk_dask.engine.request import Request  # noqa: E402
from glinthawk_dask.model.resolve import DEFAULT_MODEL, resolve_checkpoint  # noqa: E402
from glinthawk_dask.sampling import SamplingParams  # noqa: E402
from glinthawk_dask.tokenizer import Tokenizer  # noqa: E402

KINDS = ("keeps", "shrinks")


def _generate(llm: LLM, prompt_ids: Sequence[list[int]], new_tokens: int, max_seq_len: int) -> list[list[int]]:
    """Greedy completions of ``new_tokens`` tokens each in slots of ``max_seq_len``."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    requests = [Request(str(i), list(ids), params) for i, ids in enumerate(prompt_ids)]
    out = {c.id: c.completion_token_ids for c in llm.engine.generate(requests, max_seq_len=max_seq_len)}
    return [out[str(i)] for i in range(len(prompt_ids))]


def _slots(llm: LLM, max_seq_len: int) -> int:
    """The slots of ``max_seq_len`` positions the attention worker holds."""
    cfg = llm.engine.model_config
    info = llm.client.sync(llm.client.scheduler.glinthawk_cluster_info)
    return min(info["kv_budget"].values()) // (cfg.kv_bytes_per_token(4, 1) * cfg.n_layers * max_seq_len)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-a", type=int, default=96, help="run A's prompts (default 96)")
    p.add_argument("--new-tokens-a", type=int, default=64, help="tokens generated for each of A's (default 64)")
    p.add_argument("--batch-b", type=int, default=16, help="run B's prompts (default 16)")
    p.add_argument("--new-tokens-b", type=int, default=32, help="tokens generated for each of B's (default 32)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="positions of a KV slot (default 2048)")
    p.add_argument("--b-after", type=float, default=1.0,
                   help="seconds after A's first token when B starts (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the two kinds (default 2)")
    p.add_argument("--json", metavar="OUT", help="write the runs and the summary to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch_a, args.new_tokens_a, args.batch_b, args.new_tokens_b, args.rounds) < 1:
        p.error("the batches, token counts and --rounds must be at least 1")

    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(DEFAULT_MODEL))
    prompts = [tokenizer.encode(t) for t in bi.prompt_texts(args.batch_a + args.batch_b)]
    a_ids, b_ids = prompts[:args.batch_a], prompts[args.batch_a:]
    ec = EngineConfig(max_step_tokens=bt.step_tokens_for(prompts, args.batch_a))
    base = LLM(DEFAULT_MODEL, mode="two-tier", dtype=bt.DTYPE, local_workers=(1, 1), engine_config=ec,
               n_micro_batches=1, micro_batch_size=1)
    report: dict[str, Any] = {"model": DEFAULT_MODEL, **{k: v for k, v in vars(args).items() if k != "json"},
                              "runs": []}
    try:
        slots = _slots(base, args.max_seq_len)
        a = LLM(DEFAULT_MODEL, mode="two-tier", dtype=bt.DTYPE, client=base.client, engine_config=ec,
                n_micro_batches=1, micro_batch_size=slots)
        b = LLM(DEFAULT_MODEL, mode="two-tier", dtype=bt.DTYPE, client=base.client, engine_config=ec,
                n_micro_batches="auto", micro_batch_size="auto")
        report["slots"] = slots
        print(f"model {DEFAULT_MODEL} ({bt.DTYPE}); one attention worker of {slots} slots of {args.max_seq_len} "
              f"positions; A: {args.batch_a} prompts x {args.new_tokens_a} tokens as {slots} x 1 (every slot); "
              f"B: {args.batch_b} x {args.new_tokens_b}, auto, {args.b_after:g} s after A's first token; greedy, "
              f"ignore_eos; {args.rounds} rounds", flush=True)
        bi.engine_generate(base, [a_ids[0][:4]], 2)  # weights onto the workers; the profile measured or read
        ref_a = _generate(a, a_ids, args.new_tokens_a, args.max_seq_len)
        ref_b = _generate(b, b_ids, args.new_tokens_b, args.max_seq_len)
        for r in range(args.rounds):
            for kind in KINDS:
                run = _pair(a, b, a_ids, b_ids, args, ref_a, ref_b, kind)
                run["round"] = r + 1
                report["runs"].append(run)
                path = run["a_plan"] + "".join(f", {c}" for c in run["a_changes"])
                print(f"round {r + 1}: {kind:>7}: B placed at {run['b_placed_s']:5.1f} s (waited "
                      f"{run['b_wait_s']:4.1f} s), ended at {run['b_end_s']:5.1f} s ({run['b_tokens_per_s']:6.1f} "
                      f"tok/s of its own); A ended at {run['a_end_s']:5.1f} s ({run['a_tokens_per_s']:6.1f} tok/s), "
                      f"plan {path}; identical A {run['identical_a']}/{args.batch_a}, B {run['identical_b']}/"
                      f"{args.batch_b}; machine CPU {bt.cpu_text(run['cpu'])}", flush=True)
    finally:
        base.close()

    def med(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in report["runs"] if run["kind"] == kind)

    summary = {kind: {key: med(kind, key) for key in ("b_end_s", "b_wait_s", "a_end_s", "both_end_s",
                                                      "a_tokens_per_s")} for kind in KINDS}
    summary.update(b_end_ratio=summary["shrinks"]["b_end_s"] / summary["keeps"]["b_end_s"],
                   both_end_ratio=summary["shrinks"]["both_end_s"] / summary["keeps"]["both_end_s"],
                   identical=min(min(run["identical_a"] / args.batch_a, run["identical_b"] / args.batch_b)
                                 for run in report["runs"]) == 1.0)
    k, s = summary["keeps"], summary["shrinks"]
    print(f"\nmedians: B's last token {k['b_end_s']:.1f} s after A started when A keeps its slots, "
          f"{s['b_end_s']:.1f} s when it shrinks ({summary['b_end_ratio']:.2f}x); both done at "
          f"{k['both_end_s']:.1f} and {s['both_end_s']:.1f} s ({summary['both_end_ratio']:.2f}x); A at "
          f"{k['a_tokens_per_s']:.1f} and {s['a_tokens_per_s']:.1f} tok/s; every token identical: "
          f"{summary['identical']}")
    report["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


def _pair(a: LLM, b: LLM, a_ids, b_ids, args, ref_a, ref_b, kind: str) -> dict[str, Any]:
    """A, and B once A makes tokens, as ``kind`` says; when each was placed and ended."""
    out: dict[str, Any] = {}

    def run_a() -> None:
        out["a"] = _generate(a, a_ids, args.new_tokens_a, args.max_seq_len)
        out["a_end"] = time.perf_counter()

    with dask.config.set({"glinthawk.engine.grow-every": 0} if kind == "keeps" else {}):
        def both() -> None:
            out["t0"] = time.perf_counter()
            thread = threading.Thread(target=run_a)
            thread.start()
            while a.engine.generated_tokens == 0 and thread.is_alive():
                time.sleep(0.02)
            time.sleep(args.b_after)
            out["b_start"] = time.perf_counter()
            out["b"] = _generate(b, b_ids, args.new_tokens_b, args.max_seq_len)
            out["b_end"] = time.perf_counter()
            thread.join()

        _, cpu = bt.with_cpu(both)
    t0, sa, sb = out["t0"], a.engine.last_summary, b.engine.last_summary
    changes = [f"{g['kind']} to {g['to']} at {g['after_s']:.1f} s" for g in sa.growths
               if g["kind"] in ("yielded", "grew")]
    return {
        "kind": kind, "cpu": cpu, "a_end_s": out["a_end"] - t0, "b_end_s": out["b_end"] - t0,
        "both_end_s": max(out["a_end"], out["b_end"]) - t0, "b_start_s": out["b_start"] - t0,
        "b_wait_s": b.engine.placement_wait_s, "b_placed_s": out["b_start"] - t0 + b.engine.placement_wait_s,
        "a_tokens_per_s": sa.tokens_per_s, "b_tokens_per_s": sb.tokens_per_s,
        "a_plan": sa.growths[0]["from"] if sa.growths else f"{sa.micro_batch_size} x {sa.n_micro_batches}",
        "a_changes": changes, "b_plan": f"{sb.micro_batch_size} x {sb.n_micro_batches}",
        "identical_a": sum(x == y for x, y in zip(out["a"], ref_a)),
        "identical_b": sum(x == y for x, y in zip(out["b"], ref_b)),
    }


if __name__ == "__main__":
    main()
