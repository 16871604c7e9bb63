"""A run as its caller sees it: the requests it reads as room frees up
(:class:`RequestFeed`), the state the client keeps while it goes (:class:`RunState`, the
same object across the restarts of a recovery) and what it did once it is over
(:class:`RunSummary`)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import time
from typing import Any, Iterable

from ..engine.request import Completion, Request, sampled_tokens
from .messages import Plan

__all__ = ["RequestFeed", "RunState", "RunSummary"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSummary:
    """What a finished run did."""

    run_id: str
    mode: str
    n_requests: int
    n_steps: int
    n_tokens: int
    generated_tokens: int
    seconds: float
    micro_batch_size: int
    n_micro_batches: int
    plan: dict
    recoveries: list[dict] = dataclasses.field(default_factory=list)  # one per lost worker: what it cost
    predicted_tokens_per_s: float | None = None  # the planner's prediction, when it chose the plan
    profile_seconds: float = 0.0  # spent measuring the cluster's profile for this run (0: it was kept)
    runs_beside: int = 0  # other runs that shared the cluster for a while (a prediction is for it alone)
    predicted_for_lengths: float | None = None  # the plan predicted again on the lengths its rows stopped at
    planned_on_rows: int = 0  # earlier rows (a resumed output's) whose lengths the plan expected
    growths: list[dict] = dataclasses.field(default_factory=list)  # grown into KV other runs freed (growth.py)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @functools.cached_property
    def placement(self) -> Plan:
        """:attr:`plan` as a :class:`~.messages.Plan` (read once)."""
        return Plan.from_wire(self.plan)

    @property
    def local_micro_batches(self) -> int:
        """Micro-batches whose KV and attention stayed on the dense workers."""
        return sum(self.placement.local)

    @property
    def kv_bytes(self) -> dict[str, int]:
        """KV bytes the run reserved on each tier (summed over its workers)."""
        return self.placement.kv_bytes()

    def attention_of(self) -> list[str]:
        """Where each micro-batch's attention ran on the first slice: ``"dense"`` (its
        KV on the dense worker) or the attention worker's address."""
        plan = self.placement
        return ["dense" if local else addr for local, addr in zip(plan.local, plan.attention[0])]


@dataclasses.dataclass
class RunState:
    """The caller's state of one run (the same object across the restarts of a recovery)."""

    id: str
    plan: Plan
    max_seq_len: int | None  # the KV slot size asked for (None: sized to the requests)
    size: int  # requests the run was sized for (a restarted run keeps the size of the first)
    lease: float  # seconds
    renew_at: float
    prediction: Any = None  # the planner's Prediction, when it chose the plan
    profile_seconds: float = 0.0
    beside: set = dataclasses.field(default_factory=set)  # ids of other runs placed while this one was open
    plan_check: Any = None  # an auto plan's PlanCheck (it learns the lengths its sample stopped at)
    t0: float = dataclasses.field(default_factory=time.time)
    requests: dict[str, Request] = dataclasses.field(default_factory=dict)  # submitted, not yet delivered, by id
    n_requests: int = 0
    generated: int = 0  # tokens of the delivered completions
    stats: dict = dataclasses.field(default_factory=dict)  # the driver's n_steps and n_tokens
    recoveries: list[dict] = dataclasses.field(default_factory=list)
    status: str = "running"  # or "waiting for workers: ..."
    in_flight_tokens: int | None = None  # KV tokens the failed run held (what a restart rebuilds)
    generated_before: int = 0  # tokens sampled by the runs a recovery replaced
    growth: Any = None  # how the run may grow into KV other runs free (a growth.Growth; None: it does not)
    growths: list[dict] = dataclasses.field(default_factory=list)  # each time it grew, and each old micro-batch closed
    feeding: bool = False  # more requests are to come from the caller
    kv_word: Any = None  # a kv_signals.Listener: another run waits for KV, or some was freed

    @property
    def pending(self):
        """The ids of the requests submitted and not yet delivered (a live view)."""
        return self.requests.keys()

    def track(self, requests: list[Request]) -> None:
        """Record requests as pending before they are sent, so a failure cannot lose them."""
        for r in requests:
            self.requests[r.id] = r
        self.n_requests += len(requests)

    def room(self) -> int:
        """How many more requests the driver should hold: two rounds of its slots (of the
        micro-batches that still admit requests)."""
        return max(0, 2 * sum(self.plan.live_sizes()) - len(self.pending))

    def deliver(self, c: Completion) -> bool:
        """Mark ``c`` delivered; False if it already was (a duplicate from a replayed step)."""
        if self.requests.pop(c.id, None) is None:
            return False
        self.generated += len(c.completion_token_ids)
        if self.plan_check is not None:
            self.plan_check.record(c.id, sampled_tokens(len(c.completion_token_ids), c.finish_reason))
        return True

    async def predicted_for_lengths(self) -> float | None:
        """The run's plan predicted again on the lengths its sampled rows stopped at (off
        the loop; None when it was not planned, or cannot be)."""
        if self.plan_check is None:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.plan_check.predicted_for_lengths)
        except Exception as e:  # a check of the planner must not fail the run it checks
            logger.warning("glinthawk run %s: the plan could not be predicted again (%s: %s)", self.id,
                           type(e).__name__, e)
            return None

    def restart_as(self, new: "RunState", generated_before: int) -> None:
        """Go on as ``new``, the run a recovery opened."""
        self.id, self.plan, self.renew_at, self.growth = new.id, new.plan, new.renew_at, new.growth
        self.kv_word = new.kv_word
        self.status, self.generated_before = "running", generated_before


class RequestFeed:
    """Requests read in batches from an iterable: ``first`` (``n_first`` of them, or
    all when ``n_first`` is None), then :meth:`take` as room frees up."""

    def __init__(self, requests: Iterable[Request], n_first: int | None) -> None:
        self._it = iter(requests)
        self.first = list(self._it if n_first is None else itertools.islice(self._it, n_first))
        self.exhausted = n_first is None or len(self.first) < n_first

    def take(self, n: int) -> list[Request]:
        if self.exhausted or n <= 0:
            return []
        out = list(itertools.islice(self._it, n))
        self.exhausted = len(out) < n
        return out
