#!/usr/bin/env python
"""The compiled CPU decode-attention kernel against torch's, alone and in both engines, in one run.

1. **Kernel.**  One layer's decode attention of ``B`` sequences with ``ctx`` cached
   tokens each (SmolLM2's 9 query and 3 KV heads of 64), read from a KV cache's slots the
   way :class:`~glinthawk_dask.model.kv_cache.KVCache` reads them, on 1 and 2 threads:
   torch's batched matmuls (:func:`~glinthawk_dask.model.attention.decode_attention`
   over the slot range, masked) against the compiled kernel
   (:func:`~glinthawk_dask.model.cpu_attention.decode_attention_slots`).  Sequences of a
   batch have between half and all of ``ctx`` tokens, as in a run.
2. **Engines.**  One embedded cluster (one dense and one attention worker, plan
   ``batch x 1``) and the in-process engine in this process generate ``--batch`` random
   prompts of ``--prompt-tokens`` tokens x ``--new-tokens`` greedy tokens (EOS ignored),
   in ``--rounds`` rounds; each round runs both kernels in turn (the order swapped every
   round), switched in this process and on the live workers with
   ``GLINTHAWK_TORCH_ATTENTION`` (read as each run opens its caches), and under each the in-process
   engine, then two-tier.  It prints tokens/s, the two-tier / in-process ratio of each
   kernel and the machine's CPU shares, then the medians, and checks that every run's
   tokens equal in-process's with the same kernel (and says whether the kernels agree).

Usage::

    python benchmarks/bench_attention_kernel.py [--batch 64] [--prompt-tokens 140] [--new-tokens 64]
        [--rounds 3] [--parts 1,2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_planner, bench_spin
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

import torch  # noqa: E402

from bench_planner import timed_generate  # noqa: E402
from bench_spin import one_deep_workload  # noqa: E402
from glinthawk_dask import LLM  # noqa: E402
from glinthawk_dask.model import cpu_attention  # noqa: E402
from glinthawk_dask.model.attention import _masked, decode_attention  # noqa: E402
from glinthawk_dask.model.resolve import DEFAULT_MODEL  # noqa: E402

SWITCH = "GLINTHAWK_TORCH_ATTENTION"
KERNELS = {"compiled": "0", "torch": "1"}
SHAPES = ((16, 64), (16, 200), (64, 64), (64, 140), (64, 200), (64, 400))


def _best_of(fn, seconds: float = 0.3) -> float:
    """Median seconds of ``fn()`` over about ``seconds`` of calls, after warming."""
    for _ in range(3):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_part(shapes, heads=(9, 3, 64)) -> list[dict]:
    h, kvh, d = heads
    rows = []
    print(f"== one layer's decode attention, {h} query / {kvh} KV heads of {d}, float32 ==")
    print(f"{'seqs':>5} {'ctx':>5} {'threads':>7} | {'torch us':>9} {'compiled us':>11} {'speed-up':>8}")
    saved = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b, ctx in shapes:
            gen = torch.Generator().manual_seed(b * 1000 + ctx)
            slots_n, max_len = b + 4, 2 * ctx
            k_cache = torch.randn(slots_n, kvh, max_len, d, generator=gen)  # [S, KVH, L, D]
            v_cache = torch.randn(slots_n, kvh, max_len, d, generator=gen)
            lengths = torch.randint(ctx // 2, ctx + 1, (b,), generator=gen)
            lengths[0] = ctx
            slots = torch.arange(b)
            masked = _masked(lengths, ctx)
            q = torch.randn(b, h, d, generator=gen)
            t_torch = _best_of(lambda: decode_attention(q, k_cache[:b, :, :ctx], v_cache[:b, :, :ctx], lengths,
                                                        masked))
            t_comp = _best_of(lambda: cpu_attention.decode_attention_slots(q, k_cache, v_cache, slots, lengths,
                                                                           threads=threads))
            rows.append({"sequences": b, "context": ctx, "threads": threads, "torch_us": t_torch * 1e6,
                         "compiled_us": t_comp * 1e6, "speedup": t_torch / t_comp})
            print(f"{b:>5} {ctx:>5} {threads:>7} | {t_torch * 1e6:>9.0f} {t_comp * 1e6:>11.0f} "
                  f"{t_torch / t_comp:>7.2f}x", flush=True)
    torch.set_num_threads(saved)
    return rows


def _switch(kernel: str, dask_worker=None) -> str:
    os.environ[SWITCH] = KERNELS[kernel]
    return os.environ[SWITCH]


def engine_part(args) -> dict:
    engine, in_process, rows, params, warm = one_deep_workload(args.model, args.batch, args.prompt_tokens,
                                                               args.new_tokens)
    llm = LLM(args.model, mode="two-tier", dtype="float32", local_workers=(1, 1), engine_config=engine,
              n_micro_batches=1)
    for kernel in KERNELS:
        _switch(kernel)
        llm.client.run(_switch, kernel)
        in_process.generate(rows, warm)
        llm.generate(rows, warm)  # weights onto the workers, the data plane connected, kernels compiled
    print(f"\n== {args.model}, plan {args.batch} x 1, {args.batch} random prompts of {args.prompt_tokens} tokens x "
          f"{args.new_tokens} new; os.cpu_count() = {os.cpu_count()} ==")
    tokens_of: dict[str, list] = {}
    identical, rounds = True, []
    for r in range(args.rounds):
        row = {}
        for kernel in (list(KERNELS) if r % 2 == 0 else list(KERNELS)[::-1]):
            _switch(kernel)
            if set(llm.client.run(_switch, kernel).values()) != {KERNELS[kernel]}:
                raise SystemExit("the workers did not take the kernel switch")
            out, s_in, n_in, cpu_in = timed_generate(in_process, rows, params)
            reference = [c.completion_token_ids for c in out]
            tokens_of.setdefault(kernel, reference)
            out, s_two, n_two, cpu_two = timed_generate(llm, rows, params)
            identical &= [c.completion_token_ids for c in out] == reference
            row[kernel] = {"in_process_tokens_per_s": n_in / s_in, "two_tier_tokens_per_s": n_two / s_two,
                           "ratio": (n_two / s_two) / (n_in / s_in), "machine_cpu_busy_in_process": cpu_in,
                           "machine_cpu_busy_two_tier": cpu_two}
        rounds.append(row)
        print(f"round {r + 1}: " + "; ".join(
            f"{k}: in-process {v['in_process_tokens_per_s']:.1f} tok/s (CPU {v['machine_cpu_busy_in_process']:.0%}), "
            f"two-tier {v['two_tier_tokens_per_s']:.1f} (CPU {v['machine_cpu_busy_two_tier']:.0%}), "
            f"{v['ratio']:.2f}x" for k, v in row.items()), flush=True)
    llm.close()
    os.environ.pop(SWITCH, None)
    summary = {}
    for kernel in KERNELS:
        summary[kernel] = {key: statistics.median(row[kernel][key] for row in rounds)
                           for key in ("in_process_tokens_per_s", "two_tier_tokens_per_s", "ratio")}
    for kernel, s in summary.items():
        print(f"{kernel:>8}: medians in-process {s['in_process_tokens_per_s']:.1f} tok/s, two-tier "
              f"{s['two_tier_tokens_per_s']:.1f}, two-tier / in-process {s['ratio']:.2f}x")
    for engine_key, name in (("in_process_tokens_per_s", "in-process"), ("two_tier_tokens_per_s", "two-tier")):
        gains = [row["compiled"][engine_key] / row["torch"][engine_key] for row in rounds]
        print(f"{name}: compiled / torch by round " + ", ".join(f"{g:.2f}x" for g in gains))
    agree = tokens_of["compiled"] == tokens_of["torch"]
    print(f"two-tier tokens identical to in-process with the same kernel in every run: {'yes' if identical else 'NO'}; "
          f"the two kernels' tokens identical: {'yes' if agree else 'no'}")
    return {"rounds": rounds, "summary": summary, "identical": identical, "kernels_agree": agree}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=140)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="1,2", help="1: the kernel alone, 2: the engines")
    p.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES),
                   help="part 1's sequences x context, comma-separated")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if not cpu_attention.available():
        raise SystemExit("the compiled kernel is not available here (pip install numba; unset "
                         f"{SWITCH})")
    parts = {int(x) for x in args.parts.split(",")}
    report: dict = {"argv": sys.argv[1:] if argv is None else argv}
    if 1 in parts:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        report["kernel"] = kernel_part(shapes)
    if 2 in parts:
        report["engines"] = engine_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.get("engines", {}).get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
