"""The attention worker's per-run choice of torch threads: measured step by step."""

from __future__ import annotations

import pytest
from distributed.utils_test import gen_cluster

from glinthawk_dask.engine.request import Request
from glinthawk_dask.runtime.thread_tuner import ThreadTuner
from glinthawk_dask.sampling import SamplingParams

from test_two_tier import ATTN, DENSE, _check, _setup


def _drive(tuner, step_s, rounds, micro_batches=(0,), decode=lambda r: True):
    """Feed ``rounds`` rounds whose interval is ``step_s[threads]`` for the threads in use;
    the thread counts used, round by round."""
    now, used = 0.0, []
    for r in range(rounds):
        threads = None
        for mb in micro_batches:
            threads = tuner.layout(mb, now, decode(r))
        used.append(threads)
        now += step_s[threads]
    return used


def test_tuner_alternates_then_keeps_the_faster_count_and_measures_again():
    tuner = ThreadTuner((1, 2), samples=3, hold=5)
    used = _drive(tuner, {1: 2.0, 2: 1.0}, 20)
    # 1 and 2 take turns until each has timed 3 rounds (a round's interval ends as the next begins)
    assert used[:6] == [1, 2, 1, 2, 1, 2]
    assert tuner.history[0] == {1: 2.0, 2: 1.0}
    assert used[6:11] == [2] * 5  # held for 5 rounds
    assert used[11:17] == [1, 2, 1, 2, 1, 2]  # then measured again, from fresh samples
    assert len(tuner.history) == 2 and tuner.chosen == 2


def test_tuner_keeps_one_thread_when_more_are_slower():
    tuner = ThreadTuner((1, 2), samples=2, hold=100)
    used = _drive(tuner, {1: 1.0, 2: 3.0}, 30)
    assert tuner.chosen == 1 and used[-20:] == [1] * 20


def test_rounds_with_prefill_are_not_counted():
    tuner = ThreadTuner((1, 2), samples=2, hold=100)
    # every third round admits a prompt and takes 10 s, whatever the threads
    now = 0.0
    for r in range(40):
        threads = tuner.layout(0, now, decode=r % 3 != 0)
        now += 10.0 if r % 3 == 0 else {1: 1.0, 2: 2.0}[threads]
    assert tuner.history[0] == {1: 1.0, 2: 2.0}


def test_a_round_is_one_step_of_every_micro_batch_held():
    tuner = ThreadTuner((1, 2), samples=2, hold=100)
    used = _drive(tuner, {1: 1.0, 2: 0.5}, 12, micro_batches=(3, 5))
    assert tuner.chosen == 2 and tuner.history[0] == {1: 1.0, 2: 0.5}
    assert used[-4:] == [2] * 4


def test_a_tuner_needs_a_choice():
    with pytest.raises(ValueError, match="two or more"):
        ThreadTuner((1,))


def _requests(n, max_tokens):
    return [Request(f"t{i}", [(5 * i + j) % 200 + 1 for j in range(4 + i)],
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for i in range(n)]


@gen_cluster(client=True, nthreads=[DENSE, ATTN], timeout=120, config={"glinthawk.attention.try-threads": 2})
async def test_a_run_one_deep_tries_more_threads_and_keeps_its_tokens(c, s, a, b):
    """With try-threads, a run one micro-batch deep times its steps on 1 and 2 threads and
    picks one (tokens identical to in-process either way); a run two deep does not try."""
    await _setup(c)
    await _check(c, _requests(6, 24), micro_batch_size=8, n_micro_batches=1)
    picks = (await c.rpc(b.address).glinthawk_kv_info())["thread_picks"]
    assert len(picks) >= 1
    assert picks[0]["threads"] in (1, 2) and set(picks[0]["step_s"]) == {"1", "2"}
    assert all(v > 0 for v in picks[0]["step_s"].values())
    await _check(c, _requests(6, 24), micro_batch_size=3, n_micro_batches=2)
    assert (await c.rpc(b.address).glinthawk_kv_info())["thread_picks"] == picks
