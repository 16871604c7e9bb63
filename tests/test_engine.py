"""The in-process engine on tiny random models: continuous batching, chunked prefill,
finishing rules, batch invariance."""

from __future__ import annotations

import random

import pytest
import torch

from glinthawk_dask.engine.engine import EngineConfig, InProcessEngine
from glinthawk_dask.engine.request import Request
from glinthawk_dask.engine.scheduler import BatchScheduler
from glinthawk_dask.model import from_name, load_slice
from glinthawk_dask.model.synthetic import SyntheticCheckpoint
from glinthawk_dask.sampling import SamplingParams


@pytest.fixture(scope="module", params=["tiny-mha", "tiny-gqa"])
def tiny_weights(request):
    return load_slice(SyntheticCheckpoint(from_name(request.param), seed=3))


def _prompts(n, vocab, seed=0, lo=1, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _run(weights, prompts, params, **config):
    engine = InProcessEngine(weights, config=EngineConfig(**config))
    reqs = [Request(str(i), p, params[i] if isinstance(params, list) else params) for i, p in enumerate(prompts)]
    out = {c.id: c for c in engine.generate(reqs)}
    assert len(engine.cache) == 0, "every slot is freed at the end"
    return [out[str(i)] for i in range(len(prompts))], engine


def test_continuous_batching_equals_one_at_a_time(tiny_weights):
    vocab = tiny_weights.config.vocab_size
    prompts = _prompts(23, vocab, lo=1, hi=70)
    rng = random.Random(1)
    params = [SamplingParams(max_tokens=rng.randint(1, 25), ignore_eos=True) for _ in prompts]
    together, engine = _run(tiny_weights, prompts, params, micro_batch_size=4, n_micro_batches=2,
                            max_step_tokens=40)
    assert engine.cache.n_slots == 8 < len(prompts)
    for i, p in enumerate(prompts):
        alone, _ = _run(tiny_weights, [p], params[i], micro_batch_size=1, max_step_tokens=512)
        assert together[i].completion_token_ids == alone[0].completion_token_ids, i
        assert len(together[i].completion_token_ids) == params[i].max_tokens
        assert together[i].finish_reason == "length"


def test_chunked_prefill_budget_does_not_change_tokens(tiny_weights):
    prompts = _prompts(6, tiny_weights.config.vocab_size, seed=5, lo=30, hi=90)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    big, _ = _run(tiny_weights, prompts, params, micro_batch_size=6, max_step_tokens=1024)
    small, engine = _run(tiny_weights, prompts, params, micro_batch_size=6, max_step_tokens=7)
    assert [c.completion_token_ids for c in big] == [c.completion_token_ids for c in small]
    # 6 prompts of >= 30 tokens with a budget of 7 tokens per step: many prefill steps.
    assert engine.stats["steps"] > sum(len(p) for p in prompts) // 7


def test_seeded_sampling_is_batch_invariant(tiny_weights):
    prompts = _prompts(12, tiny_weights.config.vocab_size, seed=9)
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=100 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    together, _ = _run(tiny_weights, prompts, params, micro_batch_size=5, n_micro_batches=2)
    for i in (0, 7, 11):
        alone, _ = _run(tiny_weights, [prompts[i]], params[i], micro_batch_size=1)
        assert together[i].completion_token_ids == alone[0].completion_token_ids
    # Different seeds give different samples (the seed is used).
    assert len({tuple(c.completion_token_ids) for c in together}) > 1


def _greedy_tokens(weights, prompt, n):
    out, _ = _run(weights, [prompt], SamplingParams(max_tokens=n, ignore_eos=True), micro_batch_size=1)
    return out[0].completion_token_ids


def test_eos_and_stop_token_ids_end_without_the_token(tiny_weights):
    prompt = _prompts(1, tiny_weights.config.vocab_size, seed=11)[0]
    free_run = _greedy_tokens(tiny_weights, prompt, 12)
    target = free_run[5]
    first = free_run.index(target)
    engine = InProcessEngine(tiny_weights, eos_token_ids=[target])
    (c,) = engine.generate([Request("a", prompt, SamplingParams(max_tokens=12))])
    assert c.finish_reason == "stop" and c.completion_token_ids == free_run[:first]
    (c,) = engine.generate([Request("b", prompt, SamplingParams(max_tokens=12, ignore_eos=True))])
    assert c.completion_token_ids == free_run and c.finish_reason == "length"
    engine = InProcessEngine(tiny_weights)
    (c,) = engine.generate([Request("c", prompt, SamplingParams(max_tokens=12, stop_token_ids=[target]))])
    assert c.finish_reason == "stop" and c.completion_token_ids == free_run[:first]


def test_stop_strings_cut_the_text(tiny_weights):
    vocab = tiny_weights.config.vocab_size
    prompt = _prompts(1, vocab, seed=12)[0]
    free_run = _greedy_tokens(tiny_weights, prompt, 15)

    def detok(ids):
        return "".join(f"<{i}>" for i in ids)

    stop = f"{free_run[6]}><{free_run[7]}"  # spans two tokens
    engine = InProcessEngine(tiny_weights, detokenize=detok)
    (c,) = engine.generate([Request("a", prompt, SamplingParams(max_tokens=15, stop=[stop], ignore_eos=True))])
    full = detok(free_run)
    assert c.finish_reason == "stop"
    assert c.completion == full[: full.index(stop)]
    n = min(n for n in range(len(free_run) + 1) if stop in detok(free_run[:n]))
    assert c.completion_token_ids == free_run[:n]


def test_context_limit_finishes_with_length():
    cfg = from_name("tiny-gqa").replace(max_seq_len=40)
    weights = load_slice(SyntheticCheckpoint(cfg, seed=1))
    prompt = list(range(1, 31))
    engine = InProcessEngine(weights)
    (c,) = engine.generate([Request("a", prompt, SamplingParams(max_tokens=100, ignore_eos=True))])
    assert c.finish_reason == "length"
    assert len(prompt) + len(c.completion_token_ids) == 40


def test_scheduler_frees_slot_for_next_request_at_once():
    sched = BatchScheduler(n_micro_batches=1, micro_batch_size=2, max_step_tokens=16, max_seq_len=32)
    for i in range(3):
        sched.add(Request(str(i), [1, 2, 3], SamplingParams(max_tokens=1 + 2 * i, ignore_eos=True)))
    step = sched.schedule(0)
    assert [s.id for s in step.seqs] == ["0", "1"] and step.counts == [3, 3]
    done = sched.update(step, [7, 7])
    assert [c.id for c in done] == ["0"]
    step = sched.schedule(0)
    # request 2 took request 0's slot in the very next step, next to 1's decode token
    assert [s.id for s in step.admitted] == ["2"]
    assert step.admitted[0].slot == 0
    assert sorted(zip((s.id for s in step.seqs), step.counts)) == [("1", 1), ("2", 3)]


def test_sampled_rows_only_for_finished_prompts():
    sched = BatchScheduler(n_micro_batches=1, micro_batch_size=2, max_step_tokens=4, max_seq_len=64)
    sched.add(Request("long", list(range(10)), SamplingParams(max_tokens=2)))
    step = sched.schedule(0)
    assert step.counts == [4] and step.sample_rows == []
    sched.update(step, [])
    step = sched.schedule(0)
    assert step.starts == [4] and step.counts == [4] and step.sample_rows == []
    sched.update(step, [])
    step = sched.schedule(0)
    assert step.starts == [8] and step.counts == [2] and step.sample_rows == [1]


def test_bfloat16_weights_run(tiny_weights):
    weights = load_slice(SyntheticCheckpoint(tiny_weights.config, seed=3), dtype=torch.bfloat16)
    prompts = _prompts(4, weights.config.vocab_size)
    out, engine = _run(weights, prompts, SamplingParams(max_tokens=5, ignore_eos=True), micro_batch_size=4)
    assert engine.cache.k.dtype == torch.bfloat16
    assert all(len(c.completion_token_ids) == 5 for c in out)


def test_requests_are_pulled_lazily_with_a_fixed_slot_size(tiny_weights):
    """With max_seq_len given, the engine reads requests only a round of slots ahead
    (back-pressure for inputs larger than memory), with the same tokens."""
    vocab = tiny_weights.config.vocab_size
    prompts = _prompts(40, vocab, hi=20)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    reqs = [Request(str(i), p, params) for i, p in enumerate(prompts)]
    pulled = []

    def feed():
        for r in reqs:
            pulled.append(r.id)
            yield r

    engine = InProcessEngine(tiny_weights, config=EngineConfig(micro_batch_size=4, n_micro_batches=2))
    ahead = []
    got = {}
    for c in engine.generate(feed(), max_seq_len=64):
        ahead.append(len(pulled) - len(got))
        got[c.id] = c.completion_token_ids
    assert max(ahead) <= 2 * 8 + 1  # slots in use + one round queued
    assert got == {c.id: c.completion_token_ids for c in InProcessEngine(
        tiny_weights, config=EngineConfig(micro_batch_size=4, n_micro_batches=2)).generate(reqs)}
    assert engine.cache.max_seq_len == 64


def test_closing_the_generation_mid_step_frees_every_slot(tiny_weights):
    """A consumer that stops at the first completion of a step in which several sequences
    finish (a pipeline whose commit failed) closes the generation there: every slot is
    freed, also those of the sequences that finished in that step and were not yielded
    yet, and the next generation of the same requests on the engine runs as before."""
    prompts = _prompts(6, tiny_weights.config.vocab_size, hi=8)
    params = SamplingParams(max_tokens=3, ignore_eos=True)  # the same length: they finish together
    reqs = [Request(str(i), p, params) for i, p in enumerate(prompts)]
    engine = InProcessEngine(tiny_weights, config=EngineConfig(micro_batch_size=8, n_micro_batches=1))
    completions = engine.generate(reqs, max_seq_len=32)
    next(completions)
    assert len(engine.cache) == 5  # held by the rest of the step
    completions.close()
    assert len(engine.cache) == 0
    again = {c.id: c.completion_token_ids for c in engine.generate(reqs, max_seq_len=32)}
    assert again == {c.id: c.completion_token_ids for c in InProcessEngine(
        tiny_weights, config=EngineConfig(micro_batch_size=8, n_micro_batches=1)).generate(reqs, max_seq_len=32)}


def test_rebuild_readmits_a_micro_batch_and_prefills_its_tokens_so_far():
    """A lost cache: the micro-batch's sequences are admitted again and prefill prompt +
    generated tokens, keeping their slots and their sampled tokens."""
    sched = BatchScheduler(n_micro_batches=2, micro_batch_size=2, max_step_tokens=64, max_seq_len=32)
    for i in range(4):
        sched.add(Request(f"s{i}", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True)))
    for mb in (0, 1):
        step = sched.schedule(mb)
        sched.update(step, [7] * len(step.sample_seqs))
    before = {s.id: (s.slot, list(s.token_ids)) for s in sched.running[0].values()}
    assert sched.rebuild(0) == sum(len(t) for _, t in before.values())
    step = sched.schedule(0)
    assert {s.id for s in step.admitted} == set(before)  # re-admitted, same slots
    assert {s.id: (s.slot, list(s.token_ids)) for s in step.seqs} == before
    assert step.starts == [0, 0] and step.counts == [4, 4]  # prompt + the token generated so far
    assert sched.schedule(1).admitted == []  # the other micro-batch goes on


# -- progress while generating ----------------------------------------------------------------


def test_progress_tracker_rates_over_a_window_and_eta_from_tokens_left():
    from glinthawk_dask.engine.progress import ProgressTracker

    now = [0.0]
    t = ProgressTracker(rows_total=4, expected_tokens=400, window=10.0, clock=lambda: now[0])
    for second in range(1, 31):  # 10 tok/s for 20 s, then 2 tok/s
        now[0] = float(second)
        t.tokens(t.generated + (10 if second <= 20 else 2))
    p = t.snapshot()
    assert p.generated_tokens == 220 and p.tokens_per_s == pytest.approx(2.0)  # the last 10 s only
    assert p.eta_seconds == pytest.approx((400 - 220) / 2.0)
    t.tokens(100)  # a running total never goes back
    assert t.snapshot().generated_tokens == 220
    for _ in range(4):
        t.row(error=False)
    assert t.snapshot().eta_seconds == 0.0 and t.snapshot().rows_done == 4


def test_progress_tracker_gives_back_what_finished_rows_left_unused_and_scales_by_their_share():
    """Rows that stop early (EOS) leave most of their max_tokens unused: a finished row's
    unused budget is no longer counted; the rows the engine holds count their whole
    budget (the long ones are those still running); and once as many rows have finished
    as are in flight (and 32), the rows not taken yet count the share of their budget the
    finished ones used."""
    from glinthawk_dask.engine.progress import ProgressTracker

    t = ProgressTracker(rows_total=100, expected_tokens=100 * 50, clock=lambda: 0.0)
    assert t.tokens_left() == 100 * 50
    t.pulled, t.budget_pulled = 60, 60 * 50  # the engine holds 60 requests
    for _ in range(20):
        t.row(False, budget=50, tokens=10)
    t.tokens(20 * 10 + 40 * 5)  # and the 40 running have 5 tokens each
    # 20 finished, fewer than the 40 in flight: every unfinished row's budget, less what they have
    assert t.tokens_left() == 80 * 50 - 40 * 5
    t.pulled, t.budget_pulled = 70, 70 * 50
    for _ in range(20):
        t.row(False, budget=50, tokens=10)
    t.tokens(40 * 10 + 30 * 5)
    # 40 finished, 30 in flight: those 30 at their whole budget, the 30 not taken at a fifth of theirs
    assert t.tokens_left() == 30 * 50 + 30 * 50 // 5 - 30 * 5
    t.row(True)  # an error row (never a request) changes neither
    assert t.tokens_left() == 30 * 50 + 30 * 50 // 5 - 30 * 5
    t.tokens(40 * 10 + 30 * 60)  # the rows in flight have as many tokens as the estimate leaves:
    assert t.tokens_left() == 100 - 41  # each unfinished row still has a token to go


def test_llm_reports_progress_while_generating():
    from glinthawk_dask import LLM

    llm = LLM("random:tiny-gqa", mode="in-process", engine_config=EngineConfig(micro_batch_size=2))
    seen = []
    rows = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}, {"prompt_token_ids": []},
            {"prompt_token_ids": [6]}]
    out = llm.generate(rows, SamplingParams(max_tokens=5, ignore_eos=True), progress=seen.append)
    assert len(seen) > 3
    tokens = [p.generated_tokens for p in seen]
    assert tokens == sorted(tokens) and tokens[-1] == sum(len(c.completion_token_ids) for c in out) == 15
    last = seen[-1]
    assert (last.rows_done, last.rows_total, last.errors, last.expected_tokens) == (4, 4, 1, 15)
    assert last.eta_seconds == 0.0


def test_llm_builds_its_batching_config_from_its_options():
    """The plan options an LLM takes mean the same in every mode: in-process they were
    ignored unless an EngineConfig carried them."""
    from glinthawk_dask import LLM
    from glinthawk_dask.engine.engine import IN_PROCESS_MICRO_BATCH_SIZE

    llm = LLM("random:tiny-gqa", mode="in-process", micro_batch_size=3, n_micro_batches=2)
    assert (llm.engine_config.micro_batch_size, llm.engine_config.n_micro_batches) == (3, 2)
    assert llm.engine.config is llm.engine_config
    # "auto" keeps the config's, whose own default is the in-process one
    assert LLM("random:tiny-gqa", mode="in-process", micro_batch_size="auto",
               n_micro_batches="auto").engine_config.micro_batch_size == IN_PROCESS_MICRO_BATCH_SIZE
    # ints beside a config replace its fields; the step budget grows to hold a micro-batch
    given = EngineConfig(micro_batch_size=2, max_step_tokens=4, max_seq_len=32)
    cfg = LLM("random:tiny-gqa", mode="in-process", engine_config=given, micro_batch_size=8).engine_config
    assert (cfg.micro_batch_size, cfg.max_step_tokens, cfg.max_seq_len) == (8, 8, 32)
    reqs = [Request(f"r{i}", [1 + i, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(5)]
    assert all(len(c.completion_token_ids) == 3 for c in llm.engine.generate(reqs))


def test_the_engine_reopens_its_cache_when_the_attention_kernel_switches(tiny_weights, monkeypatch):
    """A cache the compiled kernel served was opened unwritten, so a later call with the
    torch kernel asked for (which reads past slots' lengths) gets a zeroed cache of its own,
    and the same tokens."""
    prompts = _prompts(5, tiny_weights.config.vocab_size, seed=7)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = InProcessEngine(tiny_weights, config=EngineConfig(micro_batch_size=4))

    def tokens():
        reqs = [Request(str(i), p, params) for i, p in enumerate(prompts)]
        return {c.id: c.completion_token_ids for c in engine.generate(reqs)}

    monkeypatch.setenv("GLINTHAWK_TORCH_ATTENTION", "0")
    compiled = tokens()
    first = engine.cache
    assert first.compiled
    assert tokens() == compiled and engine.cache is first  # kept while the kernel stays
    monkeypatch.setenv("GLINTHAWK_TORCH_ATTENTION", "1")
    assert tokens() == compiled
    assert engine.cache is not first and not engine.cache.compiled
