#!/usr/bin/env python
"""Generation throughput of the in-process engine against Hugging Face ``generate``.

Both run the embedded SmolLM2-135M-Instruct model in float32 on this machine, greedy,
on the same prompt token ids (a fixed list of natural-language prompts, encoded with the
model's tokenizer, no chat template), and each sequence generates exactly
``--new-tokens`` tokens:

* the in-process engine (:class:`glinthawk_dask.LLM`) with ``micro_batch_size =
  --batch`` and ``SamplingParams(max_tokens=N, ignore_eos=True)``;
* ``transformers`` ``LlamaForCausalLM.generate`` (default attention, sdpa) on batches of
  ``--batch`` left-padded prompts with an attention mask, ``do_sample=False`` and
  ``min_new_tokens = max_new_tokens = N`` (EOS is suppressed, so nothing is padded).

Only ``generate`` is timed (not model loading), after one warm-up of each on a tiny
input.  Throughput counts the tokens actually generated: the summed lengths of the
engine's completions, and the non-pad new tokens of HF's outputs.  A separate run with
one new token per sequence (not part of the timed total) estimates the prefill time,
from which the decode throughput follows (an estimate: total minus prefill).

Usage::

    python benchmarks/bench_inprocess.py [--batch 64] [--new-tokens 128] [--prompts N]
                                         [--skip-hf] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from glinthawk_dask import LLM, SamplingParams
from glinthawk_dask.engine.engine import EngineConfig
from glinthawk_dask.model.resolve import (
    DEFAULT_MODEL,
    embedded_gguf_path,
    resolve_checkpoint,
)
from glinthawk_dask.tokenizer import Tokenizer

# Varied prompts: questions, instructions, story and code openings, lists, dialogue.
PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Write a short poem about the sea at night.",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Once upon a time, in a village at the edge of a great forest,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three benefits of regular exercise:",
    "What is the difference between weather and climate?",
    "Translate to French: The cat is sleeping on the warm windowsill.",
    "The most important invention of the twentieth century was",
    "Give me a recipe for a quick vegetarian pasta dinner.",
    "Why is the sky blue?",
    "Dear hiring manager, I am writing to apply for the position of",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "In mathematics, a prime number is",
    "Here are five tips for learning a new language:",
    "The train left the station at dawn, and the only passenger was",
    "How do vaccines train the immune system?",
    "Write a haiku about autumn leaves.",
    "SELECT name, email FROM users WHERE",
    "The history of the Roman Empire can be divided into",
    "What are the main causes of inflation?",
    "My favourite thing about living in a big city is",
    "Describe the water cycle step by step.",
    "A good night's sleep is important because",
    "Q: What is photosynthesis?\nA:",
    "Compose a friendly reminder email about tomorrow's team meeting.",
    "The detective opened the door slowly and saw",
    "What should I pack for a week-long hiking trip in the mountains?",
    "Python lists and tuples differ in that",
    "The year is 2150. Humanity has just landed on",
    "Explain what a black hole is to a ten-year-old.",
    "Three reasons why bees are important for agriculture are",
    "How does a computer store numbers in binary?",
    "Write a limerick about a cat who loves cheese.",
    "The best way to prepare for a job interview is",
    "What happened during the French Revolution?",
    "import numpy as np\n\n# Compute the mean of each column\n",
    "A balanced breakfast usually includes",
    "Give a one-paragraph review of a fictional restaurant called The Blue Lantern.",
    "The old lighthouse keeper had a secret:",
    "Why do we have seasons on Earth?",
    "Steps to change a flat tire:\n1.",
    "The main difference between a virus and a bacterium is",
    "Write a dialogue between a robot and a gardener.",
    "Electric cars are becoming more popular because",
    "What is machine learning, in one paragraph?",
    "The museum's newest exhibit features",
    "Suggest a name for a coffee shop that also sells books.",
    "How do airplanes stay in the air?",
    "If I could travel anywhere in the world, I would go to",
    "Explain the rules of chess briefly.",
    "The ingredients for a classic pancake batter are",
    "What are the planets of the solar system, in order from the Sun?",
    "Write the opening line of a mystery novel.",
    "Good software documentation should",
    "Why is it important to recycle plastic?",
    "The mountain village celebrated its annual festival with",
    "Describe the taste of a ripe mango.",
    "How can I improve my handwriting?",
    "The scientific method consists of the following steps:",
    "Tell me a fun fact about octopuses.",
    "A short speech for a friend's wedding could begin:",
    "What is the Pythagorean theorem and why does it matter?",
    "When the power went out across the city,",
)


@dataclass
class Result:
    """Timings and token counts of one engine's run."""

    engine: str
    batch: int
    new_tokens: int
    sequences: int
    generated_tokens: int
    seconds: float
    prefill_seconds: float | None = None  # estimate: a run with one new token per sequence
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first of each sequence over the time after the prefill (estimate)."""
        if self.prefill_seconds is None or self.seconds <= self.prefill_seconds:
            return None
        return (self.generated_tokens - self.sequences) / (self.seconds - self.prefill_seconds)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "outputs"}
        d["tokens_per_s"] = self.tokens_per_s
        d["decode_tokens_per_s_est"] = self.decode_tokens_per_s
        return d


def prompt_texts(n: int) -> list[str]:
    """The first ``n`` benchmark prompts (the list repeats if ``n`` is larger)."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)`` by the wall clock."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -- in-process engine --------------------------------------------------------------------


def engine_generate(llm: LLM, prompt_ids: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy completions of exactly ``new_tokens`` tokens each, through ``llm.generate``."""
    rows = [{"id": str(i), "prompt_token_ids": ids} for i, ids in enumerate(prompt_ids)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    completions = llm.generate(rows, params)
    errors = [c.error for c in completions if c.error]
    if errors:
        raise RuntimeError(f"the engine failed {len(errors)} request(s): {errors[0]}")
    return [c.completion_token_ids for c in completions]


def bench_engine(
    llm: LLM, prompt_ids: Sequence[list[int]], batch: int, new_tokens: int, prefill: bool = True
) -> Result:
    """Warm up, time the full run, then (optionally) estimate prefill with one new token."""
    engine_generate(llm, [prompt_ids[0][:4]], 2)  # warm-up
    outputs, seconds = timed(lambda: engine_generate(llm, prompt_ids, new_tokens))
    prefill_s = timed(lambda: engine_generate(llm, prompt_ids, 1))[1] if prefill else None
    return Result(
        engine="in-process", batch=batch, new_tokens=new_tokens, sequences=len(prompt_ids),
        generated_tokens=sum(len(o) for o in outputs), seconds=seconds,
        prefill_seconds=prefill_s, outputs=outputs,
    )


# -- Hugging Face transformers ---------------------------------------------------------------


def load_hf_model(gguf_path: Path):
    """``LlamaForCausalLM`` from the GGUF file: float32, eval, default attention (sdpa)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def left_pad(prompt_ids: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[B, L]``, padded on the left."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    return input_ids, mask


def hf_generate(
    model, prompt_ids: Sequence[list[int]], batch: int, new_tokens: int, pad_id: int
) -> list[list[int]]:
    """Greedy HF ``generate`` in batches of ``batch``; the non-pad new tokens of each prompt."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=pad_id, eos_token_id=model.generation_config.eos_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    outputs: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch):
        input_ids, mask = left_pad(prompt_ids[start:start + batch], pad_id)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        new = out[:, input_ids.shape[1]:]
        outputs.extend([t for t in row.tolist() if t != pad_id] for row in new)
    return outputs


def bench_hf(
    model, prompt_ids: Sequence[list[int]], batch: int, new_tokens: int, pad_id: int,
    prefill: bool = True,
) -> Result:
    """Warm up, time the full run, then (optionally) estimate prefill with one new token."""
    hf_generate(model, [ids[:4] for ids in prompt_ids[:2]], batch, 2, pad_id)  # warm-up
    outputs, seconds = timed(lambda: hf_generate(model, prompt_ids, batch, new_tokens, pad_id))
    prefill_s = timed(lambda: hf_generate(model, prompt_ids, batch, 1, pad_id))[1] if prefill else None
    return Result(
        engine="hf-transformers", batch=batch, new_tokens=new_tokens, sequences=len(prompt_ids),
        generated_tokens=sum(len(o) for o in outputs), seconds=seconds,
        prefill_seconds=prefill_s, outputs=outputs,
    )


# -- report -----------------------------------------------------------------------------------


def agreement(ours: list[list[int]], ref: list[list[int]], eos_ids: Sequence[int]) -> int:
    """Sequences whose greedy tokens equal HF's up to the engine's first EOS.

    HF suppresses EOS (``min_new_tokens``) while the engine ignores it and goes on, so
    the two can only be compared before the first EOS.
    """
    same = 0
    for a, b in zip(ours, ref):
        k = next((i for i, t in enumerate(a) if t in eos_ids), len(a))
        same += a[:k] == b[:k]
    return same


def print_table(results: list[Result]) -> None:
    """One row per engine: batch, new tokens, generated tokens, seconds, tokens/s."""
    header = f"{'engine':<16} {'batch':>5} {'new tokens':>10} {'generated':>9} {'seconds':>8} {'tokens/s':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.engine:<16} {r.batch:>5} {r.new_tokens:>10} {r.generated_tokens:>9} "
              f"{r.seconds:>8.2f} {r.tokens_per_s:>9.1f}")
    for r in results:
        if r.decode_tokens_per_s is not None:
            print(f"{r.engine}: prefill ~{r.prefill_seconds:.2f} s (one-token run), "
                  f"decode ~{r.decode_tokens_per_s:.1f} tokens/s (estimate)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="micro-batch size / HF batch size (default 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    p.add_argument("--prompts", type=int, default=None, help="number of prompts (default: the batch size)")
    p.add_argument("--max-step-tokens", type=int, default=None,
                   help="engine token budget per step (default: enough for one batch's whole prefill)")
    p.add_argument("--skip-hf", action="store_true", help="only run the in-process engine")
    p.add_argument("--no-prefill", action="store_true", help="skip the one-token prefill estimate runs")
    p.add_argument("--json", metavar="OUT", help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.new_tokens < 1:
        p.error("--batch and --new-tokens must be at least 1")
    args.prompts = args.batch if args.prompts is None else args.prompts
    if args.prompts < 1:
        p.error("--prompts must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"torch.get_num_threads() = {torch.get_num_threads()}, {platform.machine()} CPU")

    texts = prompt_texts(args.prompts)
    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(DEFAULT_MODEL))
    prompt_ids = [tokenizer.encode(t) for t in texts]
    # By default one step holds a whole batch's prompts, so prefill runs in one step as in HF.
    step_tokens = args.max_step_tokens or max(args.batch, sum(map(len, prompt_ids[: args.batch])))
    llm = LLM(
        DEFAULT_MODEL, mode="in-process", device="cpu", dtype="float32",
        engine_config=EngineConfig(micro_batch_size=args.batch, max_step_tokens=step_tokens),
    )
    lengths = [len(ids) for ids in prompt_ids]
    print(f"model {DEFAULT_MODEL} (fp32), {len(prompt_ids)} prompts of {min(lengths)}-{max(lengths)} "
          f"tokens ({sum(lengths)} in all), batch {args.batch}, {args.new_tokens} new tokens each, "
          f"engine max_step_tokens {step_tokens}")

    results = [bench_engine(llm, prompt_ids, args.batch, args.new_tokens, not args.no_prefill)]
    if not args.skip_hf:
        hf = load_hf_model(embedded_gguf_path())
        pad_id = tokenizer.hf.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_ids[0]
        results.append(bench_hf(hf, prompt_ids, args.batch, args.new_tokens, pad_id, not args.no_prefill))

    print()
    print_table(results)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "num_threads": torch.get_num_threads(),
        "model": DEFAULT_MODEL,
        "dtype": "float32",
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "prompts": len(prompt_ids),
        "prompt_tokens": sum(lengths),
        "engine_max_step_tokens": step_tokens,
        "results": {r.engine: r.to_dict() for r in results},
    }
    if len(results) == 2:
        ours, ref = results
        ratio = ours.tokens_per_s / ref.tokens_per_s
        same = agreement(ours.outputs, ref.outputs, tokenizer.eos_token_ids)
        print(f"\nratio in-process / HF (tokens/s): {ratio:.2f}x")
        print(f"greedy outputs identical to HF up to the engine's first EOS: {same}/{len(prompt_ids)}")
        report["ratio_inprocess_over_hf"] = ratio
        report["identical_outputs"] = same
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
