"""Tests for glinthawk_dask.sampling: parameters, filters, per-row determinism, stops."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glinthawk_dask.errors import InvalidRequestError
from glinthawk_dask.sampling import (
    SamplingParams,
    argmax_rows,
    find_stop,
    make_generator,
    sample,
    sampling_probs,
)

GREEDY = SamplingParams()


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()  # [V]


def _draw_many(row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` independent draws of one logits row: a batch of n copies, each its own generator."""
    logits = row[None, :].expand(n, -1).contiguous()  # [n, V]
    gens = [make_generator(seed * 1_000_003 + i) for i in range(n)]
    return sample(logits, [params] * n, gens)  # [n]


def _drawn_set(row: torch.Tensor, params: SamplingParams, n: int = 4000) -> set[int]:
    return set(_draw_many(row, params, n).tolist())


# -- SamplingParams -----------------------------------------------------------------------
class TestParams:
    def test_defaults_are_greedy(self):
        p = SamplingParams()
        assert p.is_greedy and p.max_tokens == 128 and p.stop == () and p.seed is None
        assert not SamplingParams(temperature=0.7).is_greedy

    @pytest.mark.parametrize(
        "kwargs, field",
        [
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_tokens": 2.5}, "max_tokens"),
            ({"max_tokens": True}, "max_tokens"),
            ({"temperature": -0.1}, "temperature"),
            ({"temperature": float("nan")}, "temperature"),
            ({"temperature": float("inf")}, "temperature"),
            ({"temperature": "hot"}, "temperature"),
            ({"top_k": -1}, "top_k"),
            ({"top_k": 1.5}, "top_k"),
            ({"top_p": 0.0}, "top_p"),
            ({"top_p": 1.01}, "top_p"),
            ({"top_p": float("nan")}, "top_p"),
            ({"min_p": -0.01}, "min_p"),
            ({"min_p": 1.5}, "min_p"),
            ({"seed": -1}, "seed"),
            ({"seed": 1.0}, "seed"),
            ({"seed": 2**63}, "seed"),
            ({"stop": [1, 2]}, "stop"),
            ({"stop": [""]}, "stop"),
            ({"stop": 5}, "stop"),
            ({"stop_token_ids": [-1]}, "stop_token_ids"),
            ({"stop_token_ids": 7}, "stop_token_ids"),
            ({"ignore_eos": "yes"}, "ignore_eos"),
        ],
    )
    def test_validation_names_field(self, kwargs, field):
        with pytest.raises(InvalidRequestError, match=field) as info:
            SamplingParams(**kwargs)
        assert isinstance(info.value, ValueError)

    def test_range_in_message(self):
        with pytest.raises(InvalidRequestError, match=r"0 < top_p <= 1"):
            SamplingParams(top_p=2.0)
        with pytest.raises(InvalidRequestError, match=r">= 1"):
            SamplingParams(max_tokens=0)

    def test_normalisation(self):
        p = SamplingParams(temperature=1, top_p=1, stop=["a", "bc"], stop_token_ids=[3, 4])
        assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
        assert p.stop == ("a", "bc") and p.stop_token_ids == (3, 4)
        assert SamplingParams(stop="###").stop == ("###",)
        hash(p)  # frozen and hashable after list -> tuple conversion

    def test_from_dict_and_replace(self):
        p = SamplingParams.from_dict({"temperature": 0.5, "top_k": None, "stop": "x"})
        assert p == SamplingParams(temperature=0.5, stop=("x",))
        assert SamplingParams.from_dict(None) == SamplingParams()
        q = p.replace(top_k=5, temperature=None)
        assert q.top_k == 5 and q.temperature == 0.5 and q.stop == ("x",)
        assert p.replace() is p
        with pytest.raises(InvalidRequestError, match="top_p"):
            p.replace(top_p=0)

    def test_unknown_keys_list_known(self):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams.from_dict({"temprature": 0.5})
        msg = str(info.value)
        assert "temprature" in msg
        for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop"):
            assert name in msg
        with pytest.raises(InvalidRequestError, match="known"):
            SamplingParams().replace(beam_width=2)
        with pytest.raises(InvalidRequestError, match="mapping"):
            SamplingParams.from_dict([("temperature", 1.0)])


def test_make_generator():
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    c, d = make_generator(None), make_generator(None)
    assert not torch.equal(torch.rand(5, generator=c), torch.rand(5, generator=d))
    assert c.device.type == "cpu"


# -- greedy and filters -------------------------------------------------------------------
def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 300)  # [B, V]
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # tie: first index wins
    out = sample(logits, [GREEDY] * 16, [None] * 16)
    assert out.dtype == torch.long and out.shape == (16,)
    assert torch.equal(out, logits.argmax(-1))
    assert out[3] == 10


def test_greedy_rows_beside_sampled_rows_at_a_models_vocab_take_the_first_maximum():
    """Greedy rows among sampled ones (the gathered path), at a real vocabulary's width
    where the reduction runs in chunks: ties far apart still go to the first index, as
    ``argmax``."""
    torch.manual_seed(2)
    logits = torch.randn(6, 49152)  # [B, V]
    for row, (a, b) in enumerate([(5, 40000), (30000, 30001), (100, 49151)]):
        logits[2 * row, a] = logits[2 * row, b] = logits[2 * row].max() + 1.0  # even rows: greedy, tied
    params = [GREEDY if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(6)]
    gens = [make_generator(i) for i in range(6)]
    out = sample(logits, params, gens)
    assert out[0::2].tolist() == [5, 30000, 100] == logits[0::2].argmax(-1).tolist()
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))


def test_greedy_does_not_touch_generator():
    g = make_generator(3)
    state = g.get_state()
    sample(torch.randn(1, 50), [GREEDY], [g])
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("temperature", [0.01, 0.5, 1.0, 3.0, 100.0])
def test_top_k_1_is_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(64, 500)  # [B, V]
    logits[0, 7] = logits[0, 9] = logits[0].max() + 0.5  # tie resolved like argmax
    p = SamplingParams(temperature=temperature, top_k=1)
    gens = [make_generator(i) for i in range(64)]
    assert torch.equal(sample(logits, [p] * 64, gens), logits.argmax(-1))


def test_top_k_support():
    row = _logits_from_probs([0.05, 0.4, 0.1, 0.3, 0.15])
    assert _drawn_set(row, SamplingParams(temperature=1.0, top_k=3)) == {1, 3, 4}
    assert _drawn_set(row, SamplingParams(temperature=1.0, top_k=5)) == {0, 1, 2, 3, 4}
    assert _drawn_set(row, SamplingParams(temperature=1.0, top_k=99)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "top_p, nucleus",
    [
        (0.3, {1}),  # the top token alone already covers 0.3
        (0.5, {1, 3}),  # 0.4 < 0.5 -> need the second
        (0.75, {1, 3, 4}),  # 0.7 < 0.75 -> third
        (0.9, {1, 3, 4, 2}),  # 0.85 < 0.9 -> fourth
        (0.97, {0, 1, 2, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_nucleus(top_p, nucleus):
    row = _logits_from_probs([0.05, 0.4, 0.1, 0.3, 0.15])
    assert _drawn_set(row, SamplingParams(temperature=1.0, top_p=top_p)) == nucleus


def test_top_p_keeps_at_least_one_and_renormalises_after_top_k():
    row = _logits_from_probs([0.05, 0.4, 0.1, 0.3, 0.15])
    assert _drawn_set(row, SamplingParams(temperature=1.0, top_p=1e-6)) == {1}
    # top_k=2 leaves {1: 0.4/0.7, 3: 0.3/0.7}; top_p=0.55 < 0.571 keeps only token 1.
    assert _drawn_set(row, SamplingParams(temperature=1.0, top_k=2, top_p=0.55)) == {1}
    assert _drawn_set(row, SamplingParams(temperature=1.0, top_k=2, top_p=0.6)) == {1, 3}


@pytest.mark.parametrize(
    "min_p, support",
    [
        (0.0, {0, 1, 2, 3, 4}),
        (0.2, {1, 2, 3, 4}),  # threshold 0.08: drops 0.05
        (0.3, {1, 3, 4}),  # threshold 0.12: drops 0.1
        (0.5, {1, 3}),  # threshold 0.2
        (0.9, {1}),  # threshold 0.36
        (1.0, {1}),
    ],
)
def test_min_p_support(min_p, support):
    row = _logits_from_probs([0.05, 0.4, 0.1, 0.3, 0.15])
    assert _drawn_set(row, SamplingParams(temperature=1.0, min_p=min_p)) == support


def test_min_p_uses_temperature_scaled_probs():
    # At T=2 the probabilities flatten (p ~ sqrt(p0)); 0.05 -> ratio sqrt(0.05/0.4) ~ 0.354.
    row = _logits_from_probs([0.05, 0.4, 0.1, 0.3, 0.15])
    assert _drawn_set(row, SamplingParams(temperature=2.0, min_p=0.3)) == {0, 1, 2, 3, 4}
    assert _drawn_set(row, SamplingParams(temperature=2.0, min_p=0.4)) == {1, 2, 3, 4}


def test_masked_vocab_never_drawn():
    row = torch.randn(40)
    row[::3] = float("-inf")
    drawn = _drawn_set(row, SamplingParams(temperature=5.0), n=3000)
    assert all(t % 3 for t in drawn)


# -- distribution -------------------------------------------------------------------------
# Upper 0.9999 quantiles of chi-square: df -> critical value.
_CHI2_9999 = {5: 25.74, 7: 29.88}


@pytest.mark.parametrize(
    "temperature, params_extra", [(1.0, {}), (0.6, {}), (2.5, {}), (1.3, {"top_k": 6})]
)
def test_temperature_frequencies_match_softmax(temperature, params_extra):
    torch.manual_seed(5)
    v = 8
    row = torch.randn(v) * 1.5  # [V]
    p = SamplingParams(temperature=temperature, **params_extra)
    n = 20000
    counts = torch.bincount(_draw_many(row, p, n, seed=11), minlength=v).double()  # [V]
    scaled = (row.double() / temperature)
    if "top_k" in params_extra:
        kth = scaled.sort(descending=True).values[params_extra["top_k"] - 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    expected = torch.softmax(scaled, -1) * n  # [V]
    keep = expected > 0
    assert counts[~keep].sum() == 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert chi2 < _CHI2_9999[df], (chi2, counts.tolist(), expected.tolist())


def test_sampling_probs_matches_softmax_and_one_hot():
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    params = [GREEDY, SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=4)]
    probs = sampling_probs(logits, params)  # [3, V]
    assert torch.equal(probs[0], torch.nn.functional.one_hot(logits[0].argmax(), 30).float())
    torch.testing.assert_close(probs[1], torch.softmax(logits[1] / 0.7, -1))
    assert int((probs[2] > 0).sum()) == 4
    torch.testing.assert_close(probs[2].sum(), torch.tensor(1.0))


# -- determinism and batch invariance -----------------------------------------------------
def _steps(rows_fn, params, seeds, steps=20):
    """Run ``steps`` sampling steps with generators seeded once; returns [steps, B] tokens."""
    gens = [make_generator(s) for s in seeds]
    return torch.stack([sample(rows_fn(t), params, gens) for t in range(steps)])


@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9),
        SamplingParams(temperature=1.2, min_p=0.05),
        SamplingParams(temperature=0.7, top_p=0.95, min_p=0.02),
    ],
    ids=["plain", "topk-topp", "minp", "topp-minp"],
)
def test_row_independent_of_batch(target):
    v, steps = 1000, 6
    gen = torch.Generator().manual_seed(123)
    target_logits = torch.randn(steps, v, generator=gen) * 3  # [T, V]
    alone = _steps(lambda t: target_logits[t : t + 1], [target], [42], steps)[:, 0]  # [T]

    others = [
        GREEDY,
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=5),
        SamplingParams(temperature=2.0, top_p=0.3),
        SamplingParams(temperature=1.0, min_p=0.5),
        SamplingParams(temperature=0.9, top_k=100, top_p=0.8, min_p=0.1),
    ]
    for pos in (0, 13, 31):
        other_logits = torch.randn(steps, 32, v, generator=gen) * 5  # [T, 32, V]
        other_logits[:, pos] = target_logits
        params = [others[(i + pos) % len(others)] for i in range(32)]
        params[pos] = target
        seeds = [1000 + i for i in range(32)]
        seeds[pos] = 42
        batched = _steps(lambda t: other_logits[t], params, seeds, steps)[:, pos]  # [T]
        assert torch.equal(alone, batched), (pos, alone, batched)


def test_same_seed_same_sequence_different_seeds_differ():
    v = 5000
    row_gen = torch.Generator().manual_seed(9)
    logits = torch.randn(20, 1, v, generator=row_gen)  # [T, 1, V], flat-ish distribution
    p = [SamplingParams(temperature=1.0, top_p=0.99)]
    a = _steps(lambda t: logits[t], p, [7])
    b = _steps(lambda t: logits[t], p, [7])
    c = _steps(lambda t: logits[t], p, [8])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.flatten().tolist())) > 10  # actually random, not stuck


# -- dtypes and devices -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    torch.manual_seed(4)
    logits = (torch.randn(8, 200) * 4).to(dtype)  # [B, V]
    greedy = sample(logits, [GREEDY] * 8, [None] * 8)
    assert torch.equal(greedy, logits.float().argmax(-1))
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01)] * 8
    a = sample(logits, params, [make_generator(i) for i in range(8)])
    b = sample(logits.float(), params, [make_generator(i) for i in range(8)])
    assert a.dtype == torch.long
    assert torch.equal(a, b)  # float32 maths: same draw as from upcast logits
    ranks = (logits.float() > logits.float().gather(1, a[:, None])).sum(-1)  # [B]
    assert (ranks < 20).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_with_cpu_generators():
    torch.manual_seed(6)
    logits = torch.randn(8, 1000)
    params = [GREEDY] + [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * 7
    cpu = sample(logits, params, [make_generator(i) for i in range(8)])
    gpu = sample(logits.cuda(), params, [make_generator(i) for i in range(8)])
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())


def test_argument_checks():
    with pytest.raises(ValueError):
        sample(torch.randn(2, 10), [GREEDY], [None])
    with pytest.raises(ValueError):
        sample(torch.randn(2, 10), [GREEDY] * 2, [None])
    with pytest.raises(ValueError):
        sample(torch.randn(10), [GREEDY], [None])


# -- property: drawn tokens stay inside top-k, nucleus and min-p sets ---------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v=st.integers(2, 60),
    data_seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 8.0),
    temperature=st.floats(0.05, 4.0),
    top_k=st.integers(0, 70),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    gen_seed=st.integers(0, 2**62),
)
def test_property_token_within_filters(
    v, data_seed, scale, temperature, top_k, top_p, min_p, gen_seed
):
    row = torch.randn(v, generator=torch.Generator().manual_seed(data_seed)) * scale  # [V]
    row = row.round(decimals=1)  # create ties on purpose
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tok = int(sample(row[None], [p], [make_generator(gen_seed)])[0])
    assert 0 <= tok < v

    x = row.double() / temperature  # [V]
    # Stable rank: strictly greater, plus equal logits with a lower id.
    ids = torch.arange(v)
    rank = int(((x > x[tok]) | ((x == x[tok]) & (ids < tok))).sum())
    if top_k > 0:
        assert rank < top_k
    k = top_k if 0 < top_k < v else v
    kept = x.sort(descending=True, stable=True).indices[:k]  # top-k ids
    probs = torch.zeros(v, dtype=torch.float64)
    probs[kept] = torch.softmax(x[kept], -1)  # renormalised over top-k
    # Nucleus: the mass ranked strictly before the token is below top_p (float slack).
    order = probs.argsort(descending=True, stable=True)
    mass_before = probs[order[: list(order.tolist()).index(tok)]].sum().item()
    assert mass_before < top_p + 1e-5 or top_p == 1.0
    # min-p relative to the top probability.
    assert probs[tok] >= min_p * probs.max() - 1e-5


# -- stop strings -------------------------------------------------------------------------
class TestFindStop:
    def test_basic(self):
        assert find_stop("hello world", ["wor"]) == 6
        assert find_stop("hello world", ["xyz"]) is None
        assert find_stop("hello", []) is None
        assert find_stop("a STOP b END", ["END", "STOP"]) == 2  # earliest across stops

    def test_spanning_token_boundary(self):
        # Previous text "Answer: 42<|e" was checked; the new token completes "<|end|>".
        old = "Answer: 42<|e"
        new = old + "nd|> trailing"
        assert find_stop(old, ["<|end|>"]) is None
        assert find_stop(new, ["<|end|>"], start=len(old)) == 10

    def test_incremental_loop_matches_full_search(self):
        tokens = ["The", " cat", " sa", "t\n", "\nUs", "er:", " hi", "\n\nUser:"]
        stops = ["\n\nUser:", "sat on"]
        text, checked, found = "", 0, None
        for tok in tokens:
            text += tok
            found = find_stop(text, stops, start=checked)
            if found is not None:
                break
            checked = len(text)
        assert found == find_stop(text, stops) == text.index("\n\nUser:")
        assert text[:found] == "The cat sat"

    def test_start_skips_old_text_only_beyond_window(self):
        text = "xxENDxxxxxxxx"
        # The match ends before the window: an incremental caller already saw it.
        assert find_stop(text, ["END"], start=10) is None
        # Window reaches back len(stop)-1 characters.
        assert find_stop("abcEND", ["END"], start=4) == 3
        assert find_stop("abcEND", ["END"], start=5) == 3
        # Everything up to 6 was checked already, and a match there would have been found.
        assert find_stop("abcEND", ["END"], start=6) is None

    def test_longest_stop_sets_window(self):
        text = "....<<STOP>>"
        assert find_stop(text, ["X", "<<STOP>>"], start=len(text) - 1) == 4
