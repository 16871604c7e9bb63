"""``glinthawk profile`` (measure a cluster) and ``glinthawk plan`` (choose a configuration)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from ..errors import GlinthawkError
from ._group import main
from .options import parse_size, scheduler_reachable, security_from, tls_client, tls_options, user_errors

#: requests of a plan when none are given, and the rows of a --prompts-from dataset sampled
_SAMPLE_ROWS = 256


@main.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True,
              help="Preset name, GGUF file, Hugging Face directory, or random:<preset> (only its shape is used).")
@click.option("--scheduler", default=None, metavar="ADDRESS", callback=scheduler_reachable,
              help="Dask scheduler of the cluster to profile [default: start a local one].")
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Where to write the profile (JSON).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--name", default=None, help="A name for the profile [default: measured-<device>].")
@click.option("--quick", is_flag=True, help="Fewer points and shorter contention runs (what auto plans use).")
@tls_options("client")
@user_errors
def profile(model: str, scheduler: str | None, out: str, dtype: str, name: str | None, quick: bool,
            tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Measure a cluster's costs on its own workers and write them as a profile.

    A dense worker times one layer's dense half against tokens per step, the LM head
    against rows, the driver's bookkeeping, and what a wait of 2 to 50 ms adds to a
    layer; an attention worker times attention
    against sequences and context; the data plane's round trip is timed against bytes;
    the KV memory free on both tiers' workers is read from the scheduler.  Random
    weights of the model's shape are used, so nothing is loaded.  `glinthawk plan
    --profile FILE` predicts runs from it.
    """
    from ..model.resolve import resolve_checkpoint
    from ..runtime.cluster import connect
    from ..runtime.profiler import measure_profile

    model_config = resolve_checkpoint(model).config
    security = security_from("client", tls_ca_file, tls_cert, tls_key)
    t0 = time.perf_counter()
    with tls_client(scheduler, security) as tls:
        client, cluster = (tls, None) if tls is not None else connect(scheduler)
        try:
            from ..runtime.cluster import ensure_plugins

            ensure_plugins(client)
            prof = client.sync(measure_profile, client, model_config, model=model, dtype=dtype, quick=quick,
                               name=name)
        finally:
            if tls is None:
                client.close()
                if cluster is not None:
                    cluster.close()
    prof.save(out)
    d = prof.dense
    click.echo(f"profile {prof.name!r} written to {out} in {time.perf_counter() - t0:.1f} s")
    kv = (f"; {d.kv_bytes / 2**30:.2f} GiB KV free per worker" if d.kv_bytes is not None
          else f"; {d.memory_bytes / 2**30:.2f} GiB free per worker for weights and KV" if d.memory_bytes is not None
          else "")
    click.echo(f"  dense ({d.device}, {d.threads} threads): one layer {1e3 * d.layer_s(1):.2f} ms at 1 token, "
               f"{1e3 * d.layer_s(64):.2f} ms at 64; head {1e3 * d.head_s(1):.2f} ms at 1 row{kv}")
    if d.idle_excess:
        click.echo("  a dense job after the worker idled: "
                   + ", ".join(f"+{1e3 * e:.2f} ms after {1e3 * g:g} ms" for g, e in d.idle_excess))
    a = prof.attention.cost
    click.echo(f"  attention: {1e3 * a.overhead_s:.2f} ms + KV at {a.kv_GBps:.1f} GB/s"
               + (f"; {prof.attention.kv_bytes / 2**30:.2f} GiB KV free per worker" if prof.attention.kv_bytes else ""))
    click.echo(f"  data plane: {1e3 * prof.rtt_s:.2f} ms round trip; tiers share a host: {prof.shared_host}")


@main.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True,
              help="Preset name, GGUF file, Hugging Face directory, or random:<preset> (only its shape is used).")
@click.option("--profile", "profile_name", required=True, metavar="FILE|NAME",
              help="A profile from `glinthawk profile`, or a shipped one by name (vm-2core, t4, h200).")
@click.option("--dense", type=click.IntRange(min=1), default=1, show_default=True,
              help="Dense workers available (plans use 1..N of them, one layer slice each).")
@click.option("--attention", type=click.IntRange(min=1), default=2, show_default=True,
              help="Attention workers available per dense worker (plans use 1..M).")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=None,
              help="Requests in the run [default: 256, or every usable row of a --prompts-from dataset of "
                   "fewer].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens of every prompt (unless --prompts-from gives a sample).")
@click.option("--output-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated for every request.")
@click.option("--prompts-from", default=None, metavar="URL",
              help="A prompt dataset (any fsspec URL): prompt lengths from a sample of its rows.")
@click.option("--lengths-from", default=None, metavar="OUT",
              help="A pipeline's output (a Zarr URL, e.g. of a pilot run): prompt and completion lengths from a "
                   "sample of its rows, instead of --prompt-tokens and --output-tokens.")
@click.option("--format", "fmt", default="jsonl", show_default=True,
              type=click.Choice(["jsonl", "csv", "parquet", "text"]), help="Format of --prompts-from.")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None,
              help="KV slot capacity [default: the longest prompt + output].")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Milliseconds added to every inter-tier message.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["two-tier", "single-tier", "hybrid"]),
              help="Modes to consider (repeatable) [default: all three].  Hybrid runs keep the KV of their first "
                   "micro-batches on the dense worker (every split is tried) and send the rest to attention workers.")
@click.option("--dense-kv-budget", default=None, metavar="SIZE",
              help="KV bytes one dense worker may hold (single-tier and hybrid local micro-batches shrink to fit), "
                   "e.g. 180MB or 2GiB [default: what the profile's dense memory leaves].")
@click.option("--prices", default=None, metavar="dense=X,attention=Y",
              help="$/hour of one dense and one attention worker [default: the profile's].")
@click.option("--by", type=click.Choice(["speed", "cost"]), default="speed", show_default=True,
              help="Rank by tokens/s or by $ per million tokens (needs prices).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Rows of the table.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranked predictions as JSON.")
@user_errors
def plan(model: str, profile_name: str, dense: int, attention: int, n_requests: int, prompt_tokens: int,
         output_tokens: int, prompts_from: str | None, lengths_from: str | None, fmt: str,
         max_seq_len: int | None, latency: float,
         modes: tuple[str, ...], dense_kv_budget: str | None, prices: str | None, by: str, top: int,
         as_json: bool) -> None:
    """Predict the best configurations of a run from a hardware profile.

    Every combination of mode, dense workers, attention workers per dense worker,
    micro-batch size, micro-batches in flight and, for hybrid runs, how many of them are
    local is simulated (continuous batching, chunked prefill, the pipeline between the
    tiers, the latency); the fastest (or cheapest, with --by cost) come first, with the
    options and spec fields that run them.
    """
    from tqdm import tqdm

    from ..model.resolve import resolve_checkpoint
    from ..planner.plan import (
        Prices, best, candidates, format_table, mixes_pay, options_of, size_text, spec_fields, sweep,
    )
    from ..planner.profile import load_profile
    from ..planner.simulate import Workload

    budget = parse_size(dense_kv_budget, "--dense-kv-budget") if dense_kv_budget is not None else None
    prof = load_profile(profile_name)
    source = resolve_checkpoint(model)
    model_config = source.config
    try:
        price = Prices.parse(prices, prof)
    except ValueError as e:
        raise GlinthawkError(str(e)) from None
    if by == "cost" and price.dense is None:
        raise GlinthawkError("--by cost needs prices: give --prices dense=X,attention=Y or a priced profile")
    outputs = f"{output_tokens} new tokens each"
    if prompts_from and lengths_from:
        raise GlinthawkError("give --prompts-from or --lengths-from, not both")
    if lengths_from:
        n_requests = n_requests or _SAMPLE_ROWS
        workload, where = _lengths_of_output(lengths_from, n_requests)
        outputs = "completions as long as theirs"
    elif prompts_from:
        lengths, whole = _sample_prompt_lengths(source, prompts_from, fmt)
        if n_requests is None:  # a dataset read whole is the run's requests
            n_requests = len(lengths) if whole else _SAMPLE_ROWS
        workload = Workload.resample(lengths, output_tokens, n_requests)
        where = f"prompt lengths from {'all ' if whole else ''}{len(lengths)} rows of {prompts_from}"
    else:
        n_requests = n_requests or _SAMPLE_ROWS
        workload = Workload.uniform(n_requests, prompt_tokens, output_tokens)
        where = f"prompts of {prompt_tokens} tokens"
    if max_seq_len is not None and max_seq_len <= min(workload.prompt_lens):
        raise GlinthawkError(f"--max-seq-len {max_seq_len} leaves no room for prompts of "
                             f"{min(workload.prompt_lens)} tokens")
    elem = {"float32": 4}.get(prof.dense.dtype, 2)
    configs = candidates(n_requests, modes=modes or ("two-tier", "single-tier", "hybrid"), dense=dense,
                         attention=attention, max_seq_len=max_seq_len, latency=latency / 1e3, dtype_bytes=elem,
                         dense_kv_budget=budget, mixes=mixes_pay(prof))  # (see sweep_hybrid)
    t0 = time.perf_counter()
    # a bar on stderr while a long sweep runs (none when stderr is not a terminal)
    with tqdm(total=len(configs), desc="simulating", unit="config", file=sys.stderr, disable=None, delay=1.0,
              leave=False) as bar:
        preds = sweep(prof, model_config, workload, configs, progress=bar.update)
    seconds = time.perf_counter() - t0
    chosen = best(preds, price, by)
    if as_json:
        click.echo(json.dumps({
            "profile": prof.name, "model": model, "requests": n_requests, "workload": where,
            "simulated": len(preds), "seconds": seconds,
            "best": _pred_json(chosen, price) if chosen else None,
            "predictions": [_pred_json(p, price) for p in preds[: max(top, 1)]],
        }, indent=1))
        return
    click.echo(f"{model} on profile {prof.name!r}: {n_requests} requests, {where}, {outputs}"
               f"{f', {latency:g} ms latency' if latency else ''}"
               f"{f', dense KV budget {size_text(budget)}' if budget is not None else ''}; {len(preds)} configurations "
               f"simulated in {seconds:.1f} s")
    click.echo(format_table(preds, price, top))
    if chosen is None:
        reasons = sorted({p.reason for p in preds if not p.feasible})
        raise GlinthawkError("no configuration fits: " + "; ".join(reasons[:3]))
    split = ""
    if chosen.config.mode == "hybrid":
        lm, remote = chosen.local_micro_batches, chosen.micro_batches - chosen.local_micro_batches
        split = (f"; {lm} local micro-batch{'es' if lm != 1 else ''}"
                 + (f" of {chosen.local_batch_size}" if lm else "") + " (KV on the dense worker), "
                 f"{remote} remote of {chosen.micro_batch_size}")
    click.echo(f"\nbest: {chosen.tokens_per_s:.1f} tok/s predicted ({chosen.bottleneck} bound){split}")
    click.echo(f"  CLI:  {options_of(chosen)}")
    click.echo("  spec: topology: " + ", ".join(f"{k}: {v}" for k, v in spec_fields(chosen).items()))


def _lengths_of_output(url: str, n_requests: int) -> tuple[Any, str]:
    """A workload of ``n_requests`` drawn from the (prompt, completion) lengths of a
    sample of the rows of the pipeline output at ``url``, and its description."""
    import random

    from ..pipeline.table import read_output
    from ..planner.simulate import Workload

    pairs = read_output(url).lengths(_SAMPLE_ROWS)
    if not pairs:
        raise GlinthawkError(f"{url} holds no finished rows to take lengths from")
    rng = random.Random(0)
    drawn = [rng.choice(pairs) for _ in range(n_requests)]
    return (Workload(tuple(p for p, _ in drawn), tuple(o for _, o in drawn)),
            f"prompt and completion lengths from {len(pairs)} rows of {url}")


def _pred_json(p: Any, prices: Any) -> dict:
    from ..planner.plan import options_of, spec_fields

    c = p.config
    return {"mode": c.mode, "dense": c.dense, "attention_per_dense": c.attention,
            "micro_batch_size": p.micro_batch_size, "micro_batches": p.micro_batches,
            "local_micro_batches": p.local_micro_batches, "local_batch_size": p.local_batch_size,
            "dense_kv_budget": c.dense_kv_budget,
            "tokens_per_s": p.tokens_per_s, "seconds": p.seconds, "dense_util": p.dense_util,
            "attention_util": p.attention_util, "kv_bytes_attention": p.kv_bytes_attention,
            "kv_bytes_dense": p.kv_bytes_dense, "bottleneck": p.bottleneck, "feasible": p.feasible,
            "reason": p.reason, "cost_per_million_tokens": p.cost_per_million(prices.dense, prices.attention),
            "options": options_of(p), "spec": spec_fields(p)}


def _sample_prompt_lengths(source: Any, url: str, fmt: str, limit: int = _SAMPLE_ROWS) -> tuple[list[int], bool]:
    """Token counts of up to ``limit`` prompts of a dataset, and whether they are all of
    its usable rows (it had no more)."""
    from ..pipeline.sources import list_shards, read_shard
    from ..prompts import RequestBuilder, UndecodableRow, parse_row
    from ..tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(source)
    builder = RequestBuilder(tokenizer, vocab_size=source.config.vocab_size, max_seq_len=source.config.max_seq_len,
                             model=str(source))
    lengths: list[int] = []
    for shard in list_shards([url], format=fmt):
        for i, row in enumerate(read_shard(shard)):
            if isinstance(row, UndecodableRow):
                continue
            try:
                lengths.append(len(builder.tokenize(parse_row(row, i))))
            except Exception:  # a row the run would reject: not part of its work
                continue
            if len(lengths) >= limit:
                return lengths, False
    if not lengths:
        raise GlinthawkError(f"{url}: no usable prompt rows to sample lengths from")
    return lengths, True
