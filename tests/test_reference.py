"""The embedded SmolLM2-135M-Instruct: greedy tokens identical to HF transformers, and
batch invariance of greedy and seeded completions."""

from __future__ import annotations

import pytest
import torch

from glinthawk_dask import LLM, EngineConfig, SamplingParams

RAW_PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the mountains,",
    "The three laws of thermodynamics are",
    "To make a cup of tea, first",
    "In 1969, the Apollo 11 mission",
    "The best way to learn a new language is",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash table is."}],
    [{"role": "user", "content": "List three prime numbers."},
     {"role": "assistant", "content": "2, 3 and 5."},
     {"role": "user", "content": "Three more, please."}],
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def llm():
    return LLM(mode="in-process", engine_config=EngineConfig(micro_batch_size=8, n_micro_batches=2, max_step_tokens=64))


def _hf_greedy(model, prompt_ids, eos_ids, n):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, eos_token_id=list(eos_ids), pad_token_id=eos_ids[0],
        )[0, len(prompt_ids):].tolist()
    for i, t in enumerate(out):
        if t in eos_ids:
            return out[:i], "stop"
    return out, "length"


def test_greedy_tokens_identical_to_transformers(llm, hf_reference_model):
    rows = [{"prompt": p} for p in RAW_PROMPTS] + [{"messages": m} for m in CHAT_PROMPTS]
    results = llm.generate(rows, SamplingParams(max_tokens=NEW_TOKENS))
    eos = llm.tokenizer.eos_token_ids
    long_enough = 0
    for row, c in zip(rows, results):
        assert c.error is None
        ref, reason = _hf_greedy(hf_reference_model, c.prompt_token_ids, eos, NEW_TOKENS)
        assert c.completion_token_ids == ref, row
        assert c.finish_reason == ("length" if reason == "length" else "stop")
        long_enough += len(ref) == NEW_TOKENS
    # the comparison covers long completions, not just early EOS
    assert long_enough >= 8
    # chat rows went through the template: the prompt ids start with <|im_start|>
    start = llm.tokenizer.encode("<|im_start|>")
    assert all(c.prompt_token_ids[: len(start)] == start for c in results[len(RAW_PROMPTS):])


def test_batch_invariance_on_the_real_model(llm):
    filler = "The history of the city is long and full of surprising events. "
    prompts = [f"{filler * (i * 7 % 30)}Question {i}: what is {i} plus {i}?" for i in range(32)]
    greedy = SamplingParams(max_tokens=12)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=1234)
    lengths = [len(llm.tokenizer.encode(p)) for p in prompts]
    assert max(lengths) > 10 * min(lengths)
    rows = [{"prompt": p, "id": f"g{i}"} for i, p in enumerate(prompts)]
    rows[5] = {"prompt": prompts[5], "id": "s5", **{"temperature": 0.8, "top_p": 0.9, "seed": 1234}}
    together = {c.id: c.completion_token_ids for c in llm.generate(rows, greedy)}
    for i in (0, 9, 17, 31):
        (alone,) = llm.generate([prompts[i]], greedy)
        assert alone.completion_token_ids == together[f"g{i}"], i
    (alone,) = llm.generate([prompts[5]], seeded)
    assert alone.completion_token_ids == together["s5"]
