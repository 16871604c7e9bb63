#!/usr/bin/env python
"""The paper's comparison, predicted: two-tier against single-tier on T4 GPUs and CPU VMs.

Reads ``benchmarks/inputs/paper-cluster.json`` (the model, the shipped ``t4`` profile
whose hardware figures and prices are stated inputs, the dense-worker counts to try,
attention VMs per T4, the workloads and the paper's own ratios), plans every
configuration with the simulator and prints, per workload and number of T4s, the best
two-tier and the best single-tier plan, their tokens/s, $ per million tokens and the
two ratios next to the paper's.  Change the inputs file (or the profile) and rerun.

Usage::

    python benchmarks/paper_cluster.py [--inputs FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glinthawk_dask.model.config import ModelConfig  # noqa: E402
from glinthawk_dask.planner.plan import Prices, best, sweep  # noqa: E402
from glinthawk_dask.planner.profile import load_profile  # noqa: E402
from glinthawk_dask.planner.simulate import RunConfig, Workload, weight_bytes  # noqa: E402


def configs(mode: str, dense: int, per_dense: int, sizes: list[int], max_depth: int, seq_len: int) -> list[RunConfig]:
    out = []
    for b in sizes:
        for m in sorted({1, dense, 2 * dense, 3 * dense, max_depth} if mode == "two-tier" else
                        {1, dense, 2 * dense}):
            if m > max_depth:
                continue
            out.append(RunConfig(mode=mode, micro_batch_size=b, micro_batches=m, dense=dense,
                                 attention=min(per_dense, m) if mode == "two-tier" else 1, max_seq_len=seq_len,
                                 dtype_bytes=2, max_step_tokens=max(512, b)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", default=str(ROOT / "benchmarks" / "inputs" / "paper-cluster.json"))
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    inp = json.loads(Path(args.inputs).read_text())
    prof = load_profile(inp["profile"])
    model = ModelConfig.from_name(inp["model"])
    prices = Prices(prof.dense.price_per_hour, prof.attention.price_per_hour)
    print(f"{inp['model']} on profile {prof.name!r} ({prof.source[:80]}...)")
    print(f"prices: ${prices.dense}/h per T4 VM, ${prices.attention}/h per CPU VM; "
          f"{inp['attention_per_dense']} CPU VMs per T4 for two-tier")
    report = {"inputs": inp, "results": []}
    for name, w in inp["workloads"].items():
        workload = Workload.uniform(w["requests"], w["prompt_tokens"], w["output_tokens"])
        seq_len = w["prompt_tokens"] + w["output_tokens"]
        paper = inp["paper"][name]
        print(f"\n== {name}: {w['requests']} requests, {w['prompt_tokens']} prompt + {w['output_tokens']} new "
              f"tokens (KV slots of {seq_len}) ==")
        for dense in inp["dense_workers"]:
            layers = -(-model.n_layers // dense)
            wb = weight_bytes(model, layers, 2, ends=dense == 1)
            t0 = time.perf_counter()
            row = {"workload": name, "dense": dense}
            for mode in ("two-tier", "single-tier"):
                cs = configs(mode, dense, inp["attention_per_dense"], inp["micro_batch_sizes"],
                             inp["max_micro_batches"], seq_len)
                preds = sweep(prof, model, workload, cs)
                chosen = best(preds)
                if chosen is None:
                    reason = next((q.reason for q in preds if not q.feasible), "nothing fits")
                    row[mode] = {"feasible": False, "reason": reason}
                    continue
                row[mode] = {"feasible": True, "tokens_per_s": chosen.tokens_per_s,
                             "micro_batch_size": chosen.micro_batch_size, "micro_batches": chosen.micro_batches,
                             "cost_per_million": chosen.cost_per_million(prices.dense, prices.attention),
                             "bottleneck": chosen.bottleneck, "kv_bytes_dense": chosen.kv_bytes_dense,
                             "kv_bytes_attention": chosen.kv_bytes_attention}
            secs = time.perf_counter() - t0
            tt, st = row["two-tier"], row["single-tier"]
            line = f"{dense:2d} T4s ({wb / 1e9:.1f} GB of weights each): "
            if tt["feasible"]:
                line += (f"two-tier {tt['tokens_per_s']:.0f} tok/s ({tt['micro_batch_size']} x "
                         f"{tt['micro_batches']}, ${tt['cost_per_million']:.2f}/M tok)")
            else:
                line += f"two-tier infeasible ({tt['reason']})"
            if st["feasible"]:
                line += (f"; single-tier {st['tokens_per_s']:.0f} tok/s ({st['micro_batch_size']} x "
                         f"{st['micro_batches']}, ${st['cost_per_million']:.2f}/M tok)")
            else:
                line += f"; single-tier infeasible ({st['reason']})"
            if tt["feasible"] and st["feasible"]:
                row["throughput_ratio"] = tt["tokens_per_s"] / st["tokens_per_s"]
                row["cost_ratio"] = st["cost_per_million"] / tt["cost_per_million"]
                line += (f"\n      two-tier / single-tier: throughput {row['throughput_ratio']:.1f}x "
                         f"(paper {paper['throughput_ratio']}x), cost per token {row['cost_ratio']:.1f}x lower "
                         f"(paper {paper['cost_ratio']}x)")
            print(line + f"  [{secs:.1f} s]", flush=True)
            report["results"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
