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

__all__ = ["AutoPlan", "PlanCheck", "auto_plan", "weight_bytes"]

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
    from ..planner.plan import best, candidates, sweep, sweep_hybrid
    from ..planner.simulate import Workload
    from .profiler import cluster_profile

    mb_size, depth_asked = micro_batch_size, n_micro_batches
    n = len(requests)
    fallback_size, fallback_depth = mb_size or min(32, n), depth_asked or 1
    elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    info = await client.scheduler.glinthawk_cluster_info(weight_bytes=sum(weight_bytes(
        model_config, elem, model_config.n_layers)))
    if not info["dense"] or (mode == "two-tier" and not info["attention"]):
        return AutoPlan(fallback_size, fallback_depth, 0, None, 0.0)  # placement will say what is missing
    if mode == "hybrid" and not info["attention"]:  # nowhere else to put KV
        return AutoPlan(fallback_size, fallback_depth, fallback_depth, None, 0.0)
    profile, seconds = await cluster_profile(client, model_config, model=model, dtype=dtype)
    k = min(n_slices or len(info["dense"]), len(info["dense"]))
    per_slice = max(1, len(info["attention"]) // k)
    sample = requests if n <= 256 else requests[:: math.ceil(n / 256)]
    budgets = [max(1, min(r.params.max_tokens, seq_len - len(r.prompt_token_ids))) for r in sample]
    if output_lengths:  # rows stop as those before them did (spread over the sample, in order)
        budgets = [max(1, min(b, output_lengths[j * len(output_lengths) // len(sample)]))
                   for j, b in enumerate(budgets)]
    workload = Workload(tuple(len(r.prompt_token_ids) for r in sample), tuple(budgets))
    dense_kv = min(info["dense_kv_free"].values())
    if dense_kv_budget is not None:
        dense_kv = min(dense_kv, dense_kv_budget)
    scale = len(sample) / n  # a sample of the requests stands for all: so does its share of the KV

    def room(kv: dict[str, int]) -> Any:  # each attention worker's KV, roomiest first, in the sample's share
        return dataclasses.replace(profile, attention=dataclasses.replace(
            profile.attention, kv_free=tuple(sorted((float(b) * scale for b in kv.values()), reverse=True)) or None))

    alone = room(info["kv_budget"])  # the cluster as if no other run held KV
    profile = room(info["kv_free"])  # as placement will find it: other runs' KV held
    knobs = dict(dense=[k], attention=[per_slice], micro_batch_size=mb_size and min(mb_size, len(sample)),
                 micro_batches=depth_asked, max_depth=int(config.get("engine.max-micro-batches")),
                 max_seq_len=seq_len, latency=latency, dtype_bytes=elem,
                 max_step_tokens=max_step_tokens, dense_kv_budget=dense_kv * scale)
    loop = asyncio.get_running_loop()

    async def choose(profile: Any) -> Any:
        if mode == "hybrid":  # every split, of the sizes and depths that plan well
            preds = await loop.run_in_executor(None, functools.partial(
                sweep_hybrid, profile, model_config, workload, **knobs))
        else:
            configs = candidates(len(sample), modes=(mode,), **knobs)
            preds = await loop.run_in_executor(None, sweep, profile, model_config, workload, configs)
        return best(preds)

    used = profile
    chosen = await choose(profile)
    if chosen is None and info["kv_free"] != info["kv_budget"]:  # nothing fits beside the other runs:
        used = alone  # plan for the cluster alone, and placement waits for room
        chosen = await choose(alone)
    if chosen is None:
        return AutoPlan(fallback_size, fallback_depth, 0 if info["attention"] else fallback_depth, None, seconds)
    size = chosen.micro_batch_size if mb_size is None else mb_size
    if n > len(sample) and mb_size is None:  # the sample stood for more requests: scale the slots
        size = min(n, round(chosen.micro_batch_size * n / len(sample)))
    n_local = chosen.local_micro_batches if mode == "hybrid" else 0
    logger.info("glinthawk auto plan: %d x %d micro-batches%s, %.1f tok/s predicted (%s bound)%s", size,
                chosen.micro_batches, f" ({n_local} with KV on the dense workers)" if mode == "hybrid" else "",
                chosen.tokens_per_s, chosen.bottleneck,
                f"; profiled the cluster in {seconds:.1f} s" if seconds else "")
    return AutoPlan(size, chosen.micro_batches, n_local, chosen, seconds,
                    PlanCheck(used, model_config, chosen, sample, workload, len(output_lengths or ())))


def weight_bytes(cfg: ModelConfig, elem: int, layers: int | None = None) -> tuple[int, int]:
    """Weight bytes of one layer and of the embedding and head (or, with ``layers``,
    ``(layers' bytes, ends' bytes)``)."""
    from ..planner.simulate import weight_bytes as simulated

    ends = int(simulated(cfg, 0, elem, ends=True))
    per_layer = int(simulated(cfg, 1, elem, ends=True)) - ends
    return (per_layer if layers is None else per_layer * layers), ends
