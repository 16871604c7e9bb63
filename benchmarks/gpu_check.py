#!/usr/bin/env python3
"""One prepared check of the two-tier engine on a machine with one NVIDIA GPU.

It starts a two-tier cluster of processes (1 dense worker, ``GPU=1``, on CUDA; N CPU-only
attention workers with ``CUDA_VISIBLE_DEVICES=""`` and ``cores // N`` torch threads each)
and, within a hard time budget (default 270 s):

1. strict correctness: greedy tokens of the two-tier engine with float32 on CUDA must be
   identical to a float32 CPU in-process run of the same prompts (exit 1 if not);
2. bfloat16 agreement: two-tier with bfloat16 on CUDA against the same CPU reference;
   bf16 rounding changes some greedy choices, so the criterion is the common prefix:
   on average >= 90% of the first 8 tokens of each prompt match;
3. throughput: two-tier tokens/s at a larger batch (default 256 prompts x 64 tokens),
   next to two measured ceilings: the dense tier alone (every layer's pre/post-attention
   ops plus embedding and head, timed on CUDA with synchronisation) and the attention
   tier (decode attention on CPU over a KV cache, on all attention workers at once,
   with their thread count: GB/s and the tokens/s it implies).

Phases that would not fit the remaining budget are skipped, and said so.  The model is
the embedded SmolLM2-135M-Instruct when installed, else random weights of its shapes
(``--check-model``/``--model`` choose others, e.g. ``--model random:llama-3-8b
--new-tokens 16``).  ``--cpu-smoke`` runs everything at tiny sizes on a machine without
a GPU (the dense tier then runs on the CPU) to check the plumbing.

Exit status: 0 strict check passed, 1 strict check failed, 2 it could not run (no GPU,
an error, or no time left), 3 the watchdog stopped a phase that overran the budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import sys
import threading
import time
import traceback

T0 = time.monotonic()

EMBEDDED = "smollm2-135m-instruct"
BF16_PREFIX = 8  # tokens the bf16 criterion looks at
BF16_THRESHOLD = 0.90  # mean share of those that must match

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one paragraph.",
    "List three prime numbers greater than 100:",
    "Once upon a time, in a small village at the edge of a forest,",
    "Translate to German: The weather is nice today.",
    "What is 17 multiplied by 23?",
    "Summarize the plot of Romeo and Juliet.",
    "import numpy as np\n# compute the mean of a list\n",
    "The three laws of thermodynamics are",
    "Q: Who wrote 'Pride and Prejudice'?\nA:",
    "A recipe for pancakes: ingredients:",
    "In machine learning, overfitting means",
    "SELECT name, age FROM users WHERE",
    "The quick brown fox",
    "Give me five tips for better sleep.",
    "The history of the Roman Empire began",
    "Describe a cat to someone who has never seen one.",
    "Photosynthesis is the process by which",
]


def now() -> float:
    return time.monotonic() - T0


def say(msg: str = "") -> None:
    print(f"[{now():6.1f}s] {msg}" if msg else "", flush=True)


# -- budget --------------------------------------------------------------------------------
class Budget:
    """Hard wall-clock budget: phases run only if their estimate fits what is left; a
    watchdog ends the process (after printing what is known) if a phase overruns."""

    def __init__(self, seconds: float, report: Report) -> None:
        self.seconds = seconds
        self.report = report
        self.phase = "start"
        self._timer = threading.Timer(seconds + 15, self._expired)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self.seconds - now()

    def fits(self, name: str, estimate: float) -> bool:
        if self.left() >= estimate:
            self.phase = name
            say(f"== {name} (estimate {estimate:.0f}s, {self.left():.0f}s left)")
            return True
        self.report.skipped.append(f"{name}: needs ~{estimate:.0f}s, {max(0, self.left()):.0f}s left")
        say(f"== SKIPPED {name}: needs ~{estimate:.0f}s, {max(0, self.left()):.0f}s of the budget left")
        return False

    def _expired(self) -> None:
        say(f"WATCHDOG: the {self.seconds:.0f}s budget is over and phase {self.phase!r} is still running")
        self.report.skipped.append(f"{self.phase}: stopped by the watchdog")
        try:
            self.report.finish(watchdog=True)
        finally:
            _kill_children()
            os._exit(3)

    def cancel(self) -> None:
        self._timer.cancel()


def _kill_children() -> None:
    """End the worker processes this script started (its own descendants, by pid)."""
    try:
        import psutil

        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001, S110 - best effort on the way out
        pass


# -- report --------------------------------------------------------------------------------
class Report:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data: dict = {"args": vars(args)}
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.strict: bool | None = None  # None: did not run
        self.bf16: bool | None = None

    def finish(self, watchdog: bool = False) -> int:
        d, a = self.data, self.args
        print(flush=True)
        print("=" * 78)
        print("SUMMARY" + ("  (stopped by the watchdog: partial)" if watchdog else ""))
        print("=" * 78)
        env = d.get("env", {})
        print(f"machine: {env.get('device', '?')}, {env.get('cores', '?')} cores; torch {env.get('torch', '?')}; "
              f"mode: {'CPU smoke test' if a.cpu_smoke else 'GPU check'}")
        cl = d.get("cluster")
        if cl:
            print(f"cluster: 1 dense worker ({cl.get('dense_device', '?')}), {cl['n_attention']} attention workers "
                  f"x {cl['attention_threads']} torch threads, CPU only: {cl.get('attention_cpu_only', '?')}")
        for key, title in (("strict", "strict check (two-tier float32 on the dense device vs CPU float32)"),
                           ("bf16", "bf16 check (two-tier bfloat16 vs CPU float32)")):
            r = d.get(key)
            if r is None:
                print(f"{title}: NOT RUN")
                continue
            verdict = "PASS" if r["passed"] else "FAIL"
            line = f"{title}: {verdict} - {r['exact']}/{r['n']} prompts identical"
            if key == "bf16":
                line += " (informational: random weights)" if r.get("random_weights") else ""
                line += (f"; mean share of the first {BF16_PREFIX} tokens matching {r['prefix_share']:.3f} "
                         f"(criterion >= {BF16_THRESHOLD:.2f}); mean common prefix "
                         f"{r['mean_prefix']:.1f}/{r['tokens']} tokens")
            print(line)
        t = d.get("throughput")
        if t:
            print(f"two-tier throughput ({t['model']}, {t['dtype']}, {t['prompts']} prompts x {t['new_tokens']} "
                  f"tokens, micro-batches {t['n_micro_batches']} x {t['micro_batch_size']}): "
                  f"{t['tokens_per_s']:.0f} tokens/s ({t['generated']} tokens in {t['seconds']:.2f}s); "
                  f"dense busy {t['overlap']['dense_busy']:.2f}s, attention busy "
                  f"{t['overlap']['attention_busy']:.2f}s, overlap {t['overlap']['overlap']:.2f}s"
                  + (" (on CUDA the dense timeline holds kernel launch time, not GPU time)"
                     if env.get("device", "no GPU") != "no GPU" else ""))
        dc = d.get("dense_ceiling")
        if dc:
            for row in dc["rows"]:
                print(f"dense ceiling ({dc['device']}, {dc['dtype']}): batch {row['batch']}: step "
                      f"{row['step_ms']:.2f} ms -> {row['tokens_per_s']:.0f} tokens/s")
        ab = d.get("attention_bw")
        if ab:
            for row in ab["rows"]:
                print(f"attention ceiling (CPU, {ab['dtype']}, context {row['context']}, {row['slots']} seqs/worker): "
                      f"1 worker {row['one']['gbps']:.1f} GB/s; all {row['n_workers']} at once "
                      f"{row['all_gbps']:.1f} GB/s -> {row['all_tokens_per_s']:.0f} tokens/s")
        if t and dc and ab:
            mb = [r for r in dc["rows"] if r["batch"] == t["micro_batch_size"]]
            ctx = [r for r in ab["rows"] if r["kind"] == "run"]
            if mb and ctx:
                bound = min(mb[0]["tokens_per_s"], ctx[0]["all_tokens_per_s"])
                print(f"=> measured {t['tokens_per_s']:.0f} tokens/s vs bound min(dense {mb[0]['tokens_per_s']:.0f}, "
                      f"attention {ctx[0]['all_tokens_per_s']:.0f}) = {bound:.0f} tokens/s "
                      f"({100 * t['tokens_per_s'] / bound:.0f}% of it)")
        for s in self.skipped:
            print(f"skipped: {s}")
        for e in self.errors:
            print(f"error: {e}")
        if self.strict is True:
            rc = 0
        elif self.strict is False:
            rc = 1
        else:
            rc = 2
        print(f"exit status {rc}: " + {0: "strict check passed", 1: "STRICT CHECK FAILED",
                                       2: "strict check did not run"}[rc]
              + (" (bf16 criterion failed)" if self.bf16 is False else ""))
        d.update(skipped=self.skipped, errors=self.errors, exit_status=rc, seconds=now())
        if a.json:
            with open(a.json, "w") as f:
                json.dump(d, f, indent=1, default=str)
            print(f"report written to {a.json}")
        sys.stdout.flush()
        return rc


# -- worker-side functions (run with Client.run; self-contained) ---------------------------
def _probe_worker() -> dict:
    import os as _os

    import torch as _torch

    from glinthawk_dask import config as _config

    cuda = _torch.cuda.is_available()
    return {
        "pid": _os.getpid(),
        "torch_threads": _torch.get_num_threads(),
        "cuda": cuda,
        "device_name": _torch.cuda.get_device_name(0) if cuda else "cpu",
        "CUDA_VISIBLE_DEVICES": _os.environ.get("CUDA_VISIBLE_DEVICES"),
        "attention_threads_config": _config.get("attention.threads"),
        "allow_tf32": bool(_torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": _torch.get_float32_matmul_precision(),
    }


def _attention_bandwidth(cfg: dict, dtype: str, n_slots: int, context: int, n_layers: int, model_layers: int,
                         seconds: float, start_at: float) -> dict:
    """Decode attention over a KV cache, as an attention worker runs it (append k/v, attend
    every slot), for ``seconds``; all workers start at ``start_at`` (wall clock)."""
    import time as _time

    import torch as _torch

    from glinthawk_dask.model.attention import AttentionBatch
    from glinthawk_dask.model.config import ModelConfig
    from glinthawk_dask.model.kv_cache import KVCache

    c = ModelConfig(**cfg).replace(n_layers=n_layers)
    dt = getattr(_torch, dtype)
    # zeroed: every page committed, as the slots of a long run are; values do not change the speed
    cache = KVCache(c, n_slots, context, dtype=dt, zeroed=True)
    g = _torch.Generator().manual_seed(0)
    for s in range(n_slots):
        cache.allocate(f"s{s}", s)
    cache.lengths[:] = context - 1
    batch = AttentionBatch.build(list(range(n_slots)), [context - 1] * n_slots, [1] * n_slots)
    q = _torch.randn(n_slots, c.n_heads, c.head_dim, generator=g).to(dt)
    kv = _torch.randn(n_slots, c.n_kv_heads, c.head_dim, generator=g).to(dt)
    calls = 0
    with _torch.inference_mode():
        for li in range(n_layers):  # warm-up
            cache.attend(li, q, kv, kv, batch)
        while _time.time() < start_at:
            _time.sleep(0.001)
        t0 = _time.perf_counter()
        while True:
            for li in range(n_layers):
                cache.attend(li, q, kv, kv, batch)
            calls += n_layers
            elapsed = _time.perf_counter() - t0
            if elapsed >= seconds:
                break
    per_call = elapsed / calls
    nbytes = 2 * n_slots * c.n_kv_heads * context * c.head_dim * cache.k.element_size()
    return {
        "threads": _torch.get_num_threads(),
        "per_layer_ms": per_call * 1e3,
        "gbps": nbytes / per_call / 1e9,
        "tokens_per_s": n_slots / (per_call * model_layers),
        "cache_mib": cache.capacity_bytes / 2**20,
    }


# -- helpers ---------------------------------------------------------------------------------
def make_requests(tokenizer, vocab: int, n: int, max_tokens: int, prefix: str, prompt_len: int | None,
                  seed: int = 0):
    from glinthawk_dask.engine.request import Request
    from glinthawk_dask.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # greedy
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if tokenizer is not None and prompt_len is None:
            text = PROMPTS[i % len(PROMPTS)]
            if i >= len(PROMPTS):
                text = f"{text} ({i // len(PROMPTS)})"
            ids = tokenizer.encode(text)
        else:
            length = prompt_len or rng.choice([3, 7, 12, 20, 33, 50])
            ids = [rng.randrange(vocab) for _ in range(length)]
        out.append(Request(f"{prefix}{i}", ids, params, None))
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ref_logits(weights, ids: list[int]):
    """CPU float32 logits of the token after ``ids`` (whole-prompt prefill)."""
    from glinthawk_dask.engine.runner import forward_step
    from glinthawk_dask.model.attention import AttentionBatch
    from glinthawk_dask.model.kv_cache import KVCache
    from glinthawk_dask.model.ops import RopeTable

    cfg = weights.config
    cache = KVCache(cfg, 1, len(ids), dtype=weights.dtype, device=weights.device)
    cache.allocate("x", 0)
    batch = AttentionBatch.build([0], [0], [len(ids)])
    rope = RopeTable.build(cfg, len(ids), dtype=weights.dtype, device=weights.device)
    return forward_step(weights, cache, rope, ids, batch, [len(ids) - 1])[0]


def compare(ref: dict, got: dict, requests, ref_weights=None, diagnose: int = 0, tie: float = 0.01) -> dict:
    """Per-prompt comparison; near-tie diagnosis of the first ``diagnose`` divergences: a
    divergence is a near-tie when the reference logits of the two tokens differ by less
    than ``tie`` x max(1, |logit|)."""
    n = len(ref)
    tokens = max(len(v) for v in ref.values())
    exact, prefixes, shares, diverged = 0, [], [], []
    for r in requests:
        a, b = ref[r.id], got.get(r.id, [])
        p = common_prefix(a, b)
        exact += int(a == b)
        prefixes.append(p)
        shares.append(min(p, BF16_PREFIX) / min(BF16_PREFIX, len(a)))
        if a != b:
            diverged.append((r, p))
    notes = []
    if ref_weights is not None:
        import torch

        for r, p in diverged[:diagnose]:
            a, b = ref[r.id], got.get(r.id, [])
            if p >= len(a) or p >= len(b):
                notes.append(f"{r.id}: lengths differ ({len(a)} vs {len(b)} tokens)")
                continue
            with torch.inference_mode():
                logits = ref_logits(ref_weights, list(r.prompt_token_ids) + a[:p])
            top2 = torch.topk(logits, 2).values
            la, lb = float(logits[a[p]]), float(logits[b[p]])
            margin = la - lb
            kind = "a near-tie (numerics)" if margin < tie * max(1.0, abs(la)) else "NOT a near-tie: suspect a bug"
            notes.append(f"{r.id}: first difference at token {p}: reference {a[p]} (logit {la:.5f}) vs two-tier "
                         f"{b[p]} (logit {lb:.5f}); margin {margin:.5f}, top-2 gap {float(top2[0] - top2[1]):.5f}: "
                         f"{kind}")
    return {
        "n": n, "tokens": tokens, "exact": exact, "prefixes": prefixes,
        "mean_prefix": statistics.mean(prefixes) if prefixes else 0.0,
        "prefix_share": statistics.mean(shares) if shares else 0.0,
        "diverged": [r.id for r, _ in diverged], "notes": notes,
    }


def gib(x: float) -> int:
    return int(x * 2**30)


# -- phases ----------------------------------------------------------------------------------
def start_cluster(n_attn: int, threads: int, total_mem: int):
    import dask.config
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from glinthawk_dask.runtime.cluster import ensure_plugins, tier_worker_options

    attn_mem = max(gib(2), min(gib(16), int(total_mem * 0.5 / n_attn)))
    dense_mem = max(gib(4), min(gib(48), int(total_mem * 0.3)))
    workers = {}
    opts = tier_worker_options("dense", dense_mem)
    workers["dense-0"] = {"cls": Nanny, "options": {**opts, "silence_logs": logging.WARNING}}
    for i in range(n_attn):
        opts = tier_worker_options("attention", attn_mem)
        opts["env"] = {**opts["env"], "CUDA_VISIBLE_DEVICES": "",
                       "DASK_GLINTHAWK__ATTENTION__THREADS": str(threads)}
        opts["config"] = {**opts["config"], "glinthawk.attention.threads": threads}
        workers[f"attention-{i}"] = {"cls": Nanny, "options": {**opts, "silence_logs": logging.WARNING}}
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0", "host": "127.0.0.1"}}
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = SpecCluster(workers=workers, scheduler=scheduler, name="glinthawk-gpu-check",
                              silence_logs=logging.WARNING)
    client = Client(cluster)
    client.wait_for_workers(1 + n_attn, timeout=120)
    ensure_plugins(client)
    return cluster, client, attn_mem, dense_mem


def tiers(client) -> tuple[list[str], list[str]]:
    info = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else \
        client.scheduler_info()["workers"]
    dense = sorted(a for a, w in info.items() if w.get("resources", {}).get("GPU"))
    attn = sorted(a for a, w in info.items() if w.get("resources", {}).get("KV"))
    return dense, attn


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def run_two_tier(client, model: str, cfg, requests, dtype: str, mbs: int, nmb, label: str):
    from glinthawk_dask.runtime.client import DaskEngine

    engine = DaskEngine(client, model, mode="two-tier", micro_batch_size=mbs, n_micro_batches=nmb,
                        dtype=dtype, model_config=cfg)
    t = time.perf_counter()
    got = {c.id: list(c.completion_token_ids) for c in engine.generate(requests)}
    seconds = time.perf_counter() - t
    s = engine.last_summary
    say(f"{label}: {len(got)} completions, {s.generated_tokens} tokens in {seconds:.2f}s "
        f"({s.generated_tokens / seconds:.0f} tokens/s), micro-batches {s.n_micro_batches} x {s.micro_batch_size}")
    return got, seconds, engine


def _dense_step(cfg, w: dict, ids, cos, sin, o):
    """Embedding, every layer's dense ops (``o`` stands in for attention), head, argmax."""
    import torch
    import torch.nn.functional as F

    from glinthawk_dask.model.ops import (
        post_attention,
        post_pre_attention,
        pre_attention,
        rms_norm,
    )

    layers, n = w["layers"], cfg.n_layers
    with torch.inference_mode():
        x = F.embedding(ids, w["embed"])
        pre_attention(cfg, layers[0], x, cos, sin)  # q, k, v would go to the attention tier
        for i in range(n):
            layer, nxt = layers[i % len(layers)], layers[(i + 1) % len(layers)]
            if i + 1 < n:
                x = post_pre_attention(cfg, layer, nxt, x, o, cos, sin)[0]
            else:
                x = post_attention(cfg, layer, x, o)
        logits = F.linear(rms_norm(x, w["final_norm"], cfg.norm_eps), w["lm_head"]).float()
        return logits.argmax(-1)


def dense_ceiling(cfg, dtype_name: str, device: str, batches: list[int], context: int, iters: int,
                  max_gib: float = 24.0) -> dict:
    """Time one dense decode step (embedding, every layer's pre/post-attention ops with a
    stand-in attention output, final norm, head, argmax) for each batch size."""
    import torch

    from glinthawk_dask.model.ops import RopeTable
    from glinthawk_dask.model.weights import LayerWeights

    dt = getattr(torch, dtype_name)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(dt)

    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    per_layer = (d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * f) * torch.tensor([], dtype=dt).element_size()
    n_alloc = cfg.n_layers if per_layer * cfg.n_layers <= max_gib * 2**30 else max(2, min(cfg.n_layers, 4))
    layers = [LayerWeights(attn_norm=torch.ones(d, device=dev, dtype=dt), wqkv=rnd(cfg.q_size + 2 * cfg.kv_size, d),
                           wo=rnd(d, cfg.q_size), ffn_norm=torch.ones(d, device=dev, dtype=dt),
                           w_gate_up=rnd(2 * f, d), w_down=rnd(d, f)) for _ in range(n_alloc)]
    embed = rnd(v, d)
    lm_head = embed if cfg.tie_embeddings else rnd(v, d)
    final_norm = torch.ones(d, device=dev, dtype=dt)
    rope = RopeTable.build(cfg, context, dtype=dt, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    w = {"layers": layers, "embed": embed, "lm_head": lm_head, "final_norm": final_norm}
    rows = []
    for b in batches:
        ids = torch.randint(v, (b,), generator=g, device=dev)
        pos = torch.randint(context, (b,), generator=g, device=dev)
        inputs = (ids, rope.cos[pos], rope.sin[pos], rnd(b, cfg.n_heads, cfg.head_dim))
        for _ in range(2):
            _dense_step(cfg, w, *inputs)
        sync()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            _dense_step(cfg, w, *inputs)
            sync()
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        rows.append({"batch": b, "step_ms": ms, "tokens_per_s": b / (ms / 1e3)})
        say(f"dense ceiling: batch {b}: {ms:.2f} ms per step -> {b / (ms / 1e3):.0f} tokens/s")
    return {"device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
            "dtype": dtype_name, "layers_allocated": n_alloc, "rows": rows}


def attention_ceiling(client, attn: list[str], cfg, dtype: str, slots: int, contexts: list[tuple[str, int]],
                      seconds: float, max_mib: float) -> dict:
    import dataclasses

    cfg_d = dataclasses.asdict(cfg)
    elem = 2 if dtype in ("bfloat16", "float16") else 4
    rows = []
    for kind, context in contexts:
        per_layer = 2 * slots * cfg.n_kv_heads * context * cfg.head_dim * elem
        n_layers = max(1, min(cfg.n_layers, int(max_mib * 2**20 // per_layer)))
        args = (cfg_d, dtype, slots, context, n_layers, cfg.n_layers, seconds)
        one = client.run(_attention_bandwidth, *args, time.time() + 0.5, workers=attn[:1])[attn[0]]
        res = client.run(_attention_bandwidth, *args, time.time() + 1.0, workers=attn)
        all_gbps = sum(r["gbps"] for r in res.values())
        all_tps = sum(r["tokens_per_s"] for r in res.values())
        rows.append({"kind": kind, "context": context, "slots": slots, "layers_in_cache": n_layers,
                     "n_workers": len(attn), "one": one, "per_worker": list(res.values()),
                     "all_gbps": all_gbps, "all_tokens_per_s": all_tps})
        say(f"attention ceiling: context {context}, {slots} seqs/worker, {n_layers} layers "
            f"({one['cache_mib']:.0f} MiB/worker), {one['threads']} threads: 1 worker {one['gbps']:.1f} GB/s "
            f"({one['per_layer_ms']:.2f} ms/layer); all {len(attn)} at once {all_gbps:.1f} GB/s -> "
            f"{all_tps:.0f} tokens/s over {cfg.n_layers} layers")
    return {"dtype": dtype, "rows": rows}


# -- main ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                   help="tiny sizes, no GPU needed (the dense tier runs on the CPU): checks the plumbing")
    p.add_argument("--budget", type=float, default=None, help="seconds (default 270; smoke 240)")
    p.add_argument("--attention-workers", type=int, default=None, help="default max(1, min(4, cores // 4))")
    p.add_argument("--attention-threads", type=int, default=None, help="torch threads each (default cores // N)")
    p.add_argument("--check-model", default=None,
                   help=f"model of the correctness checks (default {EMBEDDED}, else random:{EMBEDDED})")
    p.add_argument("--check-prompts", type=int, default=None, help="default 16 (smoke 4)")
    p.add_argument("--check-tokens", type=int, default=None, help="greedy tokens per prompt (default 32; smoke 8)")
    p.add_argument("--skip-bf16-check", action="store_true")
    p.add_argument("--model", default=None, help="model of the throughput run (default: the check model), "
                   "e.g. random:llama-3-8b with --new-tokens 16")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="throughput dtype")
    p.add_argument("--prompts", type=int, default=None, help="throughput prompts (default 256; smoke 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="throughput tokens per prompt (default 64; smoke 8)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="random prompt ids of this length (default: text prompts, or 32 ids for random: models)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default 64 (smoke 8)")
    p.add_argument("--micro-batches", default=None, help="int or auto (default: the attention workers, >= 2)")
    p.add_argument("--kv-context", type=int, default=None,
                   help="context of the second attention-bandwidth measurement (default 1024; smoke 128)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    for name, full, small in (("budget", 270.0, 240.0), ("check_prompts", 16, 4), ("check_tokens", 32, 8),
                              ("prompts", 256, 16), ("new_tokens", 64, 8), ("micro_batch_size", 64, 8),
                              ("kv_context", 1024, 128)):
        if getattr(a, name) is None:
            setattr(a, name, small if smoke else full)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args)
    budget = Budget(args.budget, report)
    try:
        _main(args, report, budget)
    except Exception as e:  # noqa: BLE001 - report what was learnt, then fail
        traceback.print_exc()
        report.errors.append(f"{budget.phase}: {type(e).__name__}: {e}")
    budget.cancel()
    return report.finish()


def _main(args, report: Report, budget: Budget) -> int:
    say("importing torch and glinthawk_dask")
    import psutil
    import torch

    from glinthawk_dask import LLM
    from glinthawk_dask.engine.engine import EngineConfig
    from glinthawk_dask.model.resolve import embedded_gguf_path, resolve_checkpoint

    cores = os.cpu_count() or 1
    cuda = torch.cuda.is_available()
    total_mem = psutil.virtual_memory().total
    report.data["env"] = env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cores": cores,
        "memory_gib": round(total_mem / 2**30, 1),
        "device": torch.cuda.get_device_name(0) if cuda else "no GPU",
        "cuda_runtime": torch.version.cuda,
    }
    say(f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda_runtime']}), {cores} cores, "
        f"{env['memory_gib']} GiB, GPU: {env['device']}")
    if not cuda and not args.cpu_smoke:
        report.errors.append("torch sees no GPU: run with --cpu-smoke for the CPU-only plumbing check")
        return 2
    dense_device = "cuda" if cuda else "cpu"

    try:
        embedded_gguf_path()
        have_embedded = True
    except Exception:  # noqa: BLE001 - ModelLoadError, or anything else: not installed
        have_embedded = False
    check_model = args.check_model or (EMBEDDED if have_embedded else f"random:{EMBEDDED}")
    if not have_embedded and args.check_model is None:
        say(f"NOTE: the embedded weights are not installed: the checks use {check_model} "
            "(random weights, same shapes, no tokenizer)")
    tp_model = args.model or check_model
    report.data["models"] = {"check": check_model, "throughput": tp_model, "embedded_installed": have_embedded}

    n_attn = args.attention_workers or max(1, min(4, cores // 4))
    threads = args.attention_threads or max(1, cores // n_attn)
    check_mbs = max(1, math.ceil(args.check_prompts / 2))

    # 1. the CPU float32 reference ----------------------------------------------------------
    ref_llm = ref = check_reqs = None
    if budget.fits("CPU float32 in-process reference", 25 if not args.cpu_smoke else 40):
        torch.set_num_threads(cores)
        t = time.perf_counter()
        ref_llm = LLM(check_model, mode="in-process", device="cpu", dtype="float32",
                      engine_config=EngineConfig(micro_batch_size=check_mbs, n_micro_batches=2))
        say(f"loaded {check_model} on the CPU in {time.perf_counter() - t:.1f}s")
        check_reqs = make_requests(ref_llm.tokenizer, ref_llm.config.vocab_size, args.check_prompts,
                                   args.check_tokens, "c", None)
        t = time.perf_counter()
        ref = {c.id: list(c.completion_token_ids) for c in ref_llm.engine.generate(check_reqs)}
        say(f"reference: {len(ref)} prompts x {args.check_tokens} tokens in {time.perf_counter() - t:.1f}s")

    # 2. the cluster ----------------------------------------------------------------------------
    if not budget.fits(f"start the cluster: 1 dense + {n_attn} attention workers x {threads} threads", 30):
        return 2
    t = time.perf_counter()
    cluster, client, attn_mem, dense_mem = start_cluster(n_attn, threads, total_mem)
    try:
        dense, attn = tiers(client)
        say(f"cluster up in {time.perf_counter() - t:.1f}s: dense {dense}, attention {attn}")
        probes = client.run(_probe_worker)
        for addr in dense + attn:
            say(f"  {'dense    ' if addr in dense else 'attention'} {addr}: {probes[addr]}")
        cpu_only = all(not probes[a]["cuda"] for a in attn)
        thr_ok = all(probes[a]["torch_threads"] == threads for a in attn)
        report.data["cluster"] = {
            "n_attention": len(attn), "attention_threads": threads, "attention_memory_limit": attn_mem,
            "dense_memory_limit": dense_mem, "dense_device": probes[dense[0]]["device_name"],
            "attention_cpu_only": cpu_only, "attention_threads_ok": thr_ok, "probes": probes,
        }
        if not cpu_only:
            report.errors.append("an attention worker sees a GPU (CUDA_VISIBLE_DEVICES not applied)")
        if not thr_ok:
            report.errors.append(f"attention workers' torch threads are not {threads}: "
                                 f"{[probes[a]['torch_threads'] for a in attn]}")
        if cuda and not probes[dense[0]]["cuda"]:
            report.errors.append("the dense worker does not see the GPU")
        _phases(args, report, budget, client, attn, ref_llm, ref, check_reqs, check_model, tp_model, check_mbs)
    finally:
        say("closing the cluster")
        try:
            client.close(timeout=20)
            cluster.close(timeout=20)
        except Exception as e:  # noqa: BLE001 - closing is best effort
            say(f"cluster close: {type(e).__name__}: {e}")
            _kill_children()

    # 6. dense ceiling, in this process, once the workers are gone ------------------------------
    tp = report.data.get("throughput_plan")
    if tp and budget.fits("dense ceiling (dense ops alone on the dense device)", 20):
        cfg = resolve_checkpoint(tp_model).config
        batches = sorted({tp["micro_batch_size"], tp["prompts"]})
        report.data["dense_ceiling"] = guarded(report, "dense ceiling", dense_ceiling, cfg, args.dtype, dense_device,
                                               batches, tp["context"], iters=20 if cuda else 3)
    return 0


def guarded(report: Report, name: str, fn, *args, **kwargs):
    """Run one phase; an error is reported and the next phases still run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, the check goes on
        traceback.print_exc()
        say(f"ERROR in {name}: {type(e).__name__}: {e}")
        report.errors.append(f"{name}: {type(e).__name__}: {e}")
        return None


def _strict(report, client, ref_llm, ref, reqs, model, mbs) -> None:
    got, _, _ = run_two_tier(client, model, ref_llm.config, reqs, "float32", mbs, 2, "two-tier float32")
    r = compare(ref, got, reqs, ref_llm.weights, diagnose=4)
    r["passed"] = r["exact"] == r["n"]
    report.data["strict"] = r
    report.strict = r["passed"]
    say(f"strict check: {r['exact']}/{r['n']} prompts token-identical -> {'PASS' if r['passed'] else 'FAIL'}")
    for note in r["notes"]:
        say(f"  {note}")


def _bf16(report, client, ref_llm, ref, reqs, model, mbs) -> None:
    got, _, _ = run_two_tier(client, model, ref_llm.config, reqs, "bfloat16", mbs, 2, "two-tier bfloat16")
    r = compare(ref, got, reqs, ref_llm.weights, diagnose=2, tie=0.05)
    r["passed"] = r["prefix_share"] >= BF16_THRESHOLD
    r["random_weights"] = model.startswith("random:")
    report.data["bf16"] = r
    report.bf16 = r["passed"]
    say(f"bf16 check: {r['exact']}/{r['n']} identical; common prefix per prompt {r['prefixes']}; mean share "
        f"of the first {BF16_PREFIX} tokens {r['prefix_share']:.3f} (criterion >= {BF16_THRESHOLD}) -> "
        f"{'PASS' if r['passed'] else 'FAIL'}")
    if r["random_weights"]:
        say("  (random weights have many near-ties: for them this criterion is informational)")
    for note in r["notes"]:
        say(f"  {note}")


def _throughput(args, report, client, model, cfg, tok, reqs, prompt_len, mbs, nmb) -> None:
    warm = make_requests(tok, cfg.vocab_size, min(len(reqs), mbs), 2, "w", prompt_len, seed=2)
    t = time.perf_counter()
    run_two_tier(client, model, cfg, warm, args.dtype, mbs, 1, "warm-up (loads the weights)")
    say(f"warm-up took {time.perf_counter() - t:.1f}s")
    _, seconds, engine = run_two_tier(client, model, cfg, reqs, args.dtype, mbs, nmb, "throughput run")
    s = engine.last_summary
    report.data["throughput"] = {
        "model": model, "dtype": args.dtype, "prompts": len(reqs), "new_tokens": args.new_tokens,
        "generated": s.generated_tokens, "seconds": seconds, "tokens_per_s": s.generated_tokens / seconds,
        "summary_seconds": s.seconds, "n_steps": s.n_steps, "micro_batch_size": s.micro_batch_size,
        "n_micro_batches": s.n_micro_batches, "overlap": engine.tier_overlap(),
        "attention_of_micro_batches": s.plan.get("attention"),
    }
    report.data["throughput_plan"].update(micro_batch_size=s.micro_batch_size, n_micro_batches=s.n_micro_batches)
    say(f"tier overlap: {engine.tier_overlap()}")


def _phases(args, report, budget, client, attn, ref_llm, ref, check_reqs, check_model, tp_model, check_mbs) -> None:
    from glinthawk_dask.model.resolve import resolve_checkpoint

    # 3. strict: float32 two-tier on the dense device vs the CPU reference ------------------------
    # 4. bf16 two-tier vs the CPU reference ------------------------------------------------------
    if ref is None:
        report.skipped.append("strict and bf16 checks: no reference")
    else:
        if budget.fits("strict check: two-tier float32", 40):
            guarded(report, "strict check", _strict, report, client, ref_llm, ref, check_reqs, check_model,
                    check_mbs)
        if args.skip_bf16_check:
            report.skipped.append("bf16 check: --skip-bf16-check")
        elif budget.fits("bf16 check: two-tier bfloat16", 35):
            guarded(report, "bf16 check", _bf16, report, client, ref_llm, ref, check_reqs, check_model, check_mbs)

    # 5. throughput at a larger batch ---------------------------------------------------------------
    cfg = resolve_checkpoint(tp_model).config
    tok = ref_llm.tokenizer if (ref_llm is not None and tp_model == check_model) else None
    prompt_len = args.prompt_len or (None if tok is not None else 32)
    reqs = make_requests(tok, cfg.vocab_size, args.prompts, args.new_tokens, "t", prompt_len, seed=1)
    mbs = min(args.micro_batch_size, len(reqs))
    nmb = args.micro_batches or str(max(2, len(attn)))
    nmb = nmb if nmb == "auto" else int(nmb)
    context = max(len(r.prompt_token_ids) for r in reqs) + args.new_tokens
    report.data["throughput_plan"] = {"micro_batch_size": mbs, "n_micro_batches": nmb, "prompts": len(reqs),
                                      "context": context}
    big = cfg.n_params() > 2e9
    if args.skip_throughput:
        report.skipped.append("throughput run: --skip-throughput")
    elif budget.fits(f"throughput: two-tier {args.dtype} {tp_model}, {len(reqs)} prompts x {args.new_tokens} "
                     "tokens", 150 if big else 45):
        guarded(report, "throughput run", _throughput, args, report, client, tp_model, cfg, tok, reqs, prompt_len,
                mbs, nmb)

    # attention ceiling on the attention workers (all at once, their own thread count) ---------------
    plan = report.data["throughput_plan"]
    slots = plan["micro_batch_size"]
    if isinstance(plan["n_micro_batches"], int):
        slots = math.ceil(slots * plan["n_micro_batches"] / len(attn))
    contexts = [("run", context)] + ([("long", args.kv_context)] if args.kv_context != context else [])
    if budget.fits("attention ceiling (decode attention on the attention workers)", 10 * len(contexts)):
        report.data["attention_bw"] = guarded(
            report, "attention ceiling", attention_ceiling, client, attn, cfg, args.dtype, slots, contexts,
            seconds=0.5 if args.cpu_smoke else 2.0, max_mib=256 if args.cpu_smoke else 1536)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
