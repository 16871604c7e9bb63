#!/usr/bin/env python
"""Where one layer's round trip goes in a two-tier run, on the embedded local cluster.

Runs ``--batch`` prompts x ``--new-tokens`` greedy tokens (EOS ignored) two-tier at plan
``batch x 1`` (one micro-batch: each layer is dense math, a round trip to the attention
worker, its attention, and back), ``--rounds`` times.  For each run it reads the tiers'
timelines and two timing wrappers it installs on the dense worker for the benchmark
(around ``SliceLayers.resume``, the layer's math, and around the request's send), and
prints the medians over the layers after the first of:

- ``math``: the dense half of a layer (post-attention of one, pre-attention of the next);
- ``alone``: the same math back to back on the dense worker's compute stream, right
  after the run (is the math slower between round trips than alone?);
- ``send``: the request's encode and ``sendmsg`` as the dense thread sees it (it includes
  the time the thread waits for its core when the attention worker it woke runs there);
- ``to attention``: from the send's start to the attention worker's compute start;
- ``attention``: the attention worker's compute;
- ``to next``: from the attention's end to the dense worker's next job start;
- ``glue``: ``to attention`` + ``to next``, the round trip's cost beyond attention.

The dense and attention workers are processes on this machine, so their clocks agree.
The CPU shares of the machine during each run are printed beside it.

Usage::

    python benchmarks/bench_layer_cycle.py [--batch 16] [--new-tokens 48] [--rounds 3] [--dtype float32]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout

from bench_planner import timed_generate  # noqa: E402

from glinthawk_dask import LLM, SamplingParams  # noqa: E402
from glinthawk_dask.model.resolve import DEFAULT_MODEL  # noqa: E402

PARTS = ("math", "alone", "send", "to attention", "attention", "to next", "glue")


def _install(dask_worker) -> None:
    """Timing wrappers on the dense worker: (kind, layer, start, stop) into a list."""
    from glinthawk_dask.engine import runner
    from glinthawk_dask.runtime import slice_run

    if getattr(runner, "_bench_marks", None) is not None:
        return
    marks: list = []
    runner._bench_marks = marks
    resume, send = runner.SliceLayers.resume, slice_run._TwoTierStep._send

    def timed_resume(self, layer, o):
        t = time.time()
        out = resume(self, layer, o)
        marks.append(("math", layer, t, time.time()))
        return out

    def timed_send(self, layer, qkv):
        t = time.time()
        send(self, layer, qkv)
        marks.append(("send", layer, t, time.time()))

    runner.SliceLayers.resume, slice_run._TwoTierStep._send = timed_resume, timed_send


def _take(dask_worker) -> list:
    from glinthawk_dask.engine import runner

    marks = list(runner._bench_marks)
    runner._bench_marks.clear()
    return marks


def _alone(model: str, tokens: int, dtype: str = "float32", passes: int = 4, dask_worker=None) -> float:
    """Seconds of one layer's dense half back to back on the worker's compute stream
    (the model's own weights in ``dtype``, loaded once here)."""
    import threading

    import torch

    from glinthawk_dask.model import ops
    from glinthawk_dask.model.resolve import resolve_checkpoint
    from glinthawk_dask.model.weights import load_slice

    dt = getattr(torch, dtype)
    if getattr(dask_worker, "_bench_weights", None) is None:  # kept on the worker: loaded once
        src = resolve_checkpoint(model)
        dask_worker._bench_weights = load_slice(src, 0, src.config.n_layers, dtype=dt), src.config
    weights, cfg = dask_worker._bench_weights
    layers = weights.layers
    x = torch.randn(tokens, cfg.dim, dtype=dt)  # [T, dim]
    o = torch.randn(tokens, cfg.n_heads, cfg.head_dim, dtype=dt)  # [T, H, D]
    cos, sin = torch.ones(tokens, cfg.head_dim, dtype=dt), torch.zeros(tokens, cfg.head_dim, dtype=dt)  # [T, D]
    out: list[float] = []
    done = threading.Event()

    def job() -> None:
        times = []
        with torch.inference_mode():
            for _ in range(passes):
                for i in range(len(layers) - 1):
                    t = time.perf_counter()
                    ops.post_pre_attention(cfg, layers[i], layers[i + 1], x, o, cos, sin)
                    times.append(time.perf_counter() - t)
        out.append(statistics.median(times[len(layers) - 1:]))
        done.set()

    dask_worker.plugins["glinthawk-dense"].service.stream.push(0, job, kind=None)
    done.wait()
    return out[0]


def breakdown(events: dict[str, list], marks: list, n_layers: int) -> dict[str, list[float]]:
    """Seconds of each part (see the module docstring) for every layer's cycle after the
    first (math: but the last, whose job ends in post-attention alone)."""
    jobs = sorted((a, b) for ev in events.values() for k, a, b, _, _ in ev if k == "dense")
    attn = sorted((a, b) for ev in events.values() for k, a, b, _, _ in ev if k == "attention")
    sends = sorted((a, b, layer) for k, layer, a, b in marks if k == "send")
    math = [b - a for k, layer, a, b in marks if k == "math" and 1 <= layer < n_layers - 1]
    starts, attn_starts = [a for a, _ in jobs], [a for a, _ in attn]
    out: dict[str, list[float]] = {"math": math, "send": [], "to attention": [], "attention": [], "to next": [],
                                   "glue": []}
    for a, b, layer in sends:
        if layer < 1:  # the first layer's request leaves from the step's first job
            continue
        i = bisect.bisect_left(attn_starts, a)  # the attention this request started
        if i == len(attn):
            continue
        aa, ab = attn[i]
        j = bisect.bisect_left(starts, ab)  # the dense job its reply started
        if j == len(jobs):
            continue
        out["send"].append(b - a)
        out["to attention"].append(aa - a)
        out["attention"].append(ab - aa)
        out["to next"].append(starts[j] - ab)
        out["glue"].append(aa - a + starts[j] - ab)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's dtype on both tiers")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args(argv)

    rng = random.Random(0)
    llm = LLM(args.model, mode="two-tier", dtype=args.dtype, local_workers=(1, 1), micro_batch_size=args.batch,
              n_micro_batches=1)
    vocab, n_layers = llm.config.vocab_size, llm.config.n_layers
    rows = [{"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(args.prompt_tokens)]}
            for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(rows[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # weights onto the workers
    dense = [a for a, w in llm.client.scheduler_info()["workers"].items() if "GPU" in w.get("resources", {})]
    llm.client.run(_install, workers=dense)
    print(f"{args.model}, two-tier, plan {args.batch} x 1, {args.batch} prompts of {args.prompt_tokens} tokens x "
          f"{args.new_tokens} new; medians over the layers after the first, ms")
    print(f"{'round':>5} {'tok/s':>7} {'CPU':>5}  " + "  ".join(f"{k:>12}" for k in PARTS))
    results = []
    for r in range(args.rounds):
        _, seconds, tokens, cpu = timed_generate(llm, rows, params)
        marks = next(iter(llm.client.run(_take, workers=dense).values()))
        parts = breakdown(llm.engine.last_timeline, marks, n_layers)
        parts["alone"] = [next(iter(llm.client.run(_alone, args.model, args.batch, args.dtype, workers=dense).values()))]
        medians = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in parts.items()}
        results.append({"round": r, "tokens_per_s": tokens / seconds, "machine_cpu_busy": cpu,
                        "medians_ms": medians, "samples": {k: len(v) for k, v in parts.items()}})
        print(f"{r:>5} {tokens / seconds:7.1f} {cpu:5.0%}  " + "  ".join(f"{medians[k]:12.3f}" for k in PARTS),
              flush=True)
    llm.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch": args.batch,
                                               "new_tokens": args.new_tokens, "rounds": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
