"""A run's plan chosen by the planner: the run's requests simulated on the cluster's
profile (measured once per cluster and model, kept on the scheduler), the fastest
micro-batch size, depth and (hybrid) split kept."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import torch

from .. import config
from ..engine.request import Request
from ..model.config import ModelConfig
from .messages import DTYPES

__all__ = ["AutoPlan", "GrowOption", "PlanCheck", "auto_plan", "grow_options", "sample_of", "weight_bytes"]

logger = logging.getLogger(__name__)


class AutoPlan(NamedTuple):
    """What the planner chose (or the fallback when it could not choose)."""

    micro_batch_size: int
    n_micro_batches: int
    local_micro_batches: int  # hybrid: micro-batches with their KV on the dense workers
    prediction: Any  # the planner's Prediction, or None for a fallback
    profile_seconds: float  # spent measuring the cluster's profile (0: it was kept)
    check: "PlanCheck | None" = None  # to predict the plan again on the lengths its rows stopped at


class PlanCheck:
    """What an auto plan was simulated on, kept to simulate it again once the sampled
    requests have finished, on the lengths they stopped at.  A plan counts on
    ``max_tokens`` (or on the lengths of earlier rows); rows that stop early (EOS, a stop
    string) generate fewer tokens in emptier steps, and this tells that apart from a
    cost the profile got wrong."""

    def __init__(self, profile: Any, model_config: ModelConfig, prediction: Any, sample: list[Request],
                 workload: Any, lengths_seen: int = 0) -> None:
        self.profile, self.model_config, self.prediction = profile, model_config, prediction
        self.lengths_seen = lengths_seen  # earlier rows whose lengths the plan expected (0: max_tokens)
        self.prompt_lens = {r.id: p for r, p in zip(sample, workload.prompt_lens)}
        self.asked = sum(workload.output_lens)
        self.stopped: dict[str, int] = {}

    def record(self, request_id: str, generated: int) -> None:
        """A finished request's generated tokens (kept if it is one of the sample)."""
        if request_id in self.prompt_lens:
            self.stopped[request_id] = generated

    def predicted_for_lengths(self) -> float | None:
        """Tokens/s predicted for the same plan on the lengths the sample stopped at; None
        until every sampled request finished, or when they generated (nearly) the tokens
        the plan expected."""
        off = abs(sum(self.stopped.values()) - self.asked)
        if len(self.stopped) < len(self.prompt_lens) or off < 0.05 * self.asked:
            return None
        from ..planner.simulate import Workload, simulate

        ids = list(self.prompt_lens)
        workload = Workload(tuple(self.prompt_lens[i] for i in ids), tuple(max(1, self.stopped[i]) for i in ids))
        pred = simulate(self.profile, self.model_config, workload, self.prediction.config)
        return pred.tokens_per_s if pred.feasible else None


def sample_of(requests: list[Request]) -> list[Request]:
    """The requests a plan is simulated on: all of them, or 256 spread over them."""
    n = len(requests)
    return requests if n <= 256 else requests[:: math.ceil(n / 256)]


class _Inputs(NamedTuple):
    """What a plan of a run's requests is chosen on."""

    profile: Any  # the cluster's profile, each attention worker's KV as free now
    alone: Any  # the same, as if no other run held KV
    workload: Any  # the sampled requests' prompt and output lengths
    sample: list[Request]
    knobs: dict  # the sweep's settings
    seconds: float  # spent measuring the profile (0: it was kept)


async def _inputs(client: Any, model_config: ModelConfig, requests: list[Request], *, model: str, mode: str,
                  dtype: str, seq_len: int, micro_batch_size: int | None, n_micro_batches: int | None,
                  n_slices: int | None, dense_kv_budget: int | None, latency: float, max_step_tokens: int,
                  output_lengths: list[int] | None) -> _Inputs | str:
    """The planner's inputs for a run, or what placement lacks (no dense workers,
    ``"no dense"``; no attention workers for a mode that uses them, ``"no attention"``)."""
    from .profiler import cluster_profile

    n = len(requests)
    elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    info = await client.scheduler.glinthawk_cluster_info(weight_bytes=sum(weight_bytes(
        model_config, elem, model_config.n_layers)))
    if not info["dense"]:
        return "no dense"
    if not info["attention"] and mode != "single-tier":
        return "no attention"
    profile, seconds = await cluster_profile(client, model_config, model=model, dtype=dtype)
    k = min(n_slices or len(info["dense"]), len(info["dense"]))
    per_slice = max(1, len(info["attention"]) // k)
    sample = sample_of(requests)
    budgets = [max(1, min(r.params.max_tokens, seq_len - len(r.prompt_token_ids))) for r in sample]
    if output_lengths:  # rows stop as those before them did (spread over the sample, in order)
        budgets = [max(1, min(b, output_lengths[j * len(output_lengths) // len(sample)]))
                   for j, b in enumerate(budgets)]
    from ..planner.simulate import Workload

    workload = Workload(tuple(len(r.prompt_token_ids) for r in sample), tuple(budgets))
    dense_kv = min(info["dense_kv_free"].values())
    if dense_kv_budget is not None:
        dense_kv = min(dense_kv, dense_kv_budget)
    scale = len(sample) / n  # a sample of the requests stands for all: so does its share of the KV

    def room(kv: dict[str, int]) -> Any:  # each attention worker's KV, roomiest first, in the sample's share
        return dataclasses.replace(profile, attention=dataclasses.replace(
            profile.attention, kv_free=tuple(sorted((float(b) * scale for b in kv.values()), reverse=True)) or None))

    knobs = dict(dense=[k], attention=[per_slice], micro_batch_size=micro_batch_size and min(micro_batch_size,
                                                                                             len(sample)),
                 micro_batches=n_micro_batches, max_depth=int(config.get("engine.max-micro-batches")),
                 max_seq_len=seq_len, latency=latency, dtype_bytes=elem,
                 max_step_tokens=max_step_tokens, dense_kv_budget=dense_kv * scale)
    # as placement will find it (other runs' KV held), and as if no other run held KV
    return _Inputs(room(info["kv_free"]), room(info["kv_budget"]), workload, sample, knobs, seconds)


async def _choose(mode: str, profile: Any, model_config: ModelConfig, workload: Any, knobs: dict) -> Any:
    """The best prediction of a sweep of ``mode``'s configurations (off the loop), or None."""
    from ..planner.plan import best, candidates, sweep, sweep_hybrid

    loop = asyncio.get_running_loop()
    if mode == "hybrid":  # every split, of the sizes and depths that plan well
        preds = await loop.run_in_executor(None, functools.partial(
            sweep_hybrid, profile, model_config, workload, **knobs))
    else:
        configs = candidates(len(workload.prompt_lens), modes=(mode,), **knobs)
        preds = await loop.run_in_executor(None, sweep, profile, model_config, workload, configs)
    return best(preds)


def _scaled_size(chosen: Any, n: int, n_sample: int, asked: int | None) -> int:
    """The micro-batch size for all ``n`` requests of the size chosen for a sample of them."""
    if asked is not None:
        return asked
    if n > n_sample:  # the sample stood for more requests: scale the slots
        return min(n, round(chosen.micro_batch_size * n / n_sample))
    return chosen.micro_batch_size


async def auto_plan(
    client: Any,
    model_config: ModelConfig,
    requests: list[Request],
    *,
    model: str,
    mode: str,
    dtype: str,
    seq_len: int,
    micro_batch_size: int | None,
    n_micro_batches: int | None,
    n_slices: int | None,
    dense_kv_budget: int | None,
    latency: float,
    max_step_tokens: int,
    output_lengths: list[int] | None = None,
) -> AutoPlan:
    """Micro-batch size (unless given), depth (unless given) and, in hybrid mode, how
    many micro-batches keep their KV on the dense workers, from the planner: the
    run's ``requests`` simulated on the cluster's profile, each generating its
    ``max_tokens`` or, with ``output_lengths`` (seen before), one of those within it."""
    mb_size, depth_asked = micro_batch_size, n_micro_batches
    n = len(requests)
    fallback_size, fallback_depth = mb_size or min(32, n), depth_asked or 1
    inputs = await _inputs(client, model_config, requests, model=model, mode=mode, dtype=dtype, seq_len=seq_len,
                           micro_batch_size=mb_size, n_micro_batches=depth_asked, n_slices=n_slices,
                           dense_kv_budget=dense_kv_budget, latency=latency, max_step_tokens=max_step_tokens,
                           output_lengths=output_lengths)
    if inputs == "no dense" or (inputs == "no attention" and mode == "two-tier"):
        return AutoPlan(fallback_size, fallback_depth, 0, None, 0.0)  # placement will say what is missing
    if inputs == "no attention":  # hybrid: nowhere else to put KV
        return AutoPlan(fallback_size, fallback_depth, fallback_depth, None, 0.0)
    used = inputs.profile
    chosen = await _choose(mode, used, model_config, inputs.workload, inputs.knobs)
    if chosen is None and inputs.alone != inputs.profile:  # nothing fits beside the other runs:
        used = inputs.alone  # plan for the cluster alone, and placement waits for room
        chosen = await _choose(mode, used, model_config, inputs.workload, inputs.knobs)
    if chosen is None:
        return AutoPlan(fallback_size, fallback_depth, 0, None, inputs.seconds)
    size = _scaled_size(chosen, n, len(inputs.sample), mb_size)
    n_local = chosen.local_micro_batches if mode == "hybrid" else 0
    logger.info("glinthawk auto plan: %d x %d micro-batches%s, %.1f tok/s predicted (%s bound)%s", size,
                chosen.micro_batches, f" ({n_local} with KV on the dense workers)" if mode == "hybrid" else "",
                chosen.tokens_per_s, chosen.bottleneck,
                f"; profiled the cluster in {inputs.seconds:.1f} s" if inputs.seconds else "")
    return AutoPlan(size, chosen.micro_batches, n_local, chosen, inputs.seconds,
                    PlanCheck(used, model_config, chosen, inputs.sample, inputs.workload, len(output_lengths or ())))


class GrowOption(NamedTuple):
    """A way for a run to grow: ``n_micro_batches`` new micro-batches of
    ``micro_batch_size`` slots, beside its live ones (``keep``) or instead of them."""

    micro_batch_size: int
    n_micro_batches: int
    keep: bool
    prediction: Any  # the planner's Prediction of the plan the run then has (None: a fixed plan)
    check: "PlanCheck | None" = None
    in_place: int | None = None  # instead: this micro-batch (the run's one) takes micro_batch_size slots


async def grow_options(
    client: Any,
    model_config: ModelConfig,
    requests: list[Request],
    current: Any,
    live_size: int,
    gain: float,
    in_place: tuple[int, int] | None = None,
    **kwargs: Any,
) -> tuple[list[GrowOption], float]:
    """The ways a two-tier run may grow that the planner predicts at least ``gain``
    times as fast as ``current`` (the planner's configuration of its live plan, of
    ``live_size``-slot micro-batches), fastest first, and ``current``'s tokens/s: the
    best plan for the KV free now (other runs' and its own held) instead of its own,
    its own with more micro-batches of its size, and, with ``in_place`` (``(micro-batch,
    most slots)``: a run of one micro-batch), that micro-batch with more slots (whether
    those fit the free KV, the scheduler tells).  ``requests`` and ``kwargs`` as
    :func:`auto_plan` took them."""
    from ..planner.simulate import simulate

    inputs = await _inputs(client, model_config, requests, mode="two-tier", **kwargs)
    if isinstance(inputs, str):
        return [], 0.0
    loop = asyncio.get_running_loop()
    # (the run's own plan holds its KV already: simulated on the workers' whole budgets)
    now = await loop.run_in_executor(None, simulate, inputs.alone, model_config, inputs.workload, current)
    if not now.feasible:
        return [], 0.0

    def check(pred: Any, profile: Any) -> PlanCheck:  # (simulated again on the profile it was predicted on)
        return PlanCheck(profile, model_config, pred, inputs.sample, inputs.workload,
                         len(kwargs.get("output_lengths") or ()))

    options = []
    chosen = await _choose("two-tier", inputs.profile, model_config, inputs.workload, inputs.knobs)
    if chosen is not None:
        size = _scaled_size(chosen, len(requests), len(inputs.sample), kwargs.get("micro_batch_size"))
        options.append(GrowOption(size, chosen.micro_batches, False, chosen, check(chosen, inputs.profile)))
    if kwargs.get("n_micro_batches") is None:  # (a depth the caller fixed stays)
        for k in range(1, int(config.get("engine.max-micro-batches")) - current.micro_batches + 1):
            depth = current.micro_batches + k  # (dealt over as many attention workers as a plan takes)
            more = dataclasses.replace(current, micro_batches=depth, attention=min(depth, inputs.knobs["attention"][0]))
            pred = await loop.run_in_executor(None, simulate, inputs.alone, model_config, inputs.workload, more)
            if pred.feasible and pred.micro_batches == more.micro_batches:  # (not clamped to the requests)
                options.append(GrowOption(live_size, k, True, pred, check(pred, inputs.alone)))
    if in_place is not None:  # (each of a few sizes up to the most: the free KV may be on other workers)
        mb, most = in_place
        scale = len(inputs.sample) / len(requests)
        for size in sorted({most - (most - live_size) // 2 ** i for i in range(4)} - {live_size}):
            more = dataclasses.replace(current, micro_batch_size=max(1, round(size * scale)))
            pred = await loop.run_in_executor(None, simulate, inputs.alone, model_config, inputs.workload, more)
            if pred.feasible:
                options.append(GrowOption(size, 1, False, pred, check(pred, inputs.alone), in_place=mb))
    options = [o for o in options if o.prediction.tokens_per_s >= gain * now.tokens_per_s]
    options.sort(key=lambda o: (-o.prediction.tokens_per_s, o.n_micro_batches))
    return options, now.tokens_per_s


def weight_bytes(cfg: ModelConfig, elem: int, layers: int | None = None) -> tuple[int, int]:
    """Weight bytes of one layer and of the embedding and head (or, with ``layers``,
    ``(layers' bytes, ends' bytes)``)."""
    from ..planner.simulate import weight_bytes as simulated

    ends = int(simulated(cfg, 0, elem, ends=True))
    per_layer = int(simulated(cfg, 1, elem, ends=True)) - ends
    return (per_layer if layers is None else per_layer * layers), ends
