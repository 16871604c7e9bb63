"""How many torch threads an attention worker computes a run's attention on, chosen by
measuring the run itself.

Attention on more threads is faster alone, but on a machine whose cores the tiers share
it only pays when the other tier is idle meanwhile, when the work is large enough to
outweigh waking a team of OpenMP threads, and when the helper thread it leaves behind
does not hold a core the dense math wants.  On the embedded cluster (two cores) HumanEval's
long prompts ran 5-12% faster with attention on both cores, 16 x 48 random prompts
no faster, and pipelines two micro-batches deep had attention x9-x11 slower.  No
microbenchmark told these apart (a lone attention call on two threads took 0.3 ms or
3 ms on the same shape, by how long its helper had slept), so the run measures: a
:class:`ThreadTuner` times the run's steps (the interval from one step of the attention
worker's micro-batches to the next, all its layers and the dense worker's math and the
round trips included) on each thread count in turn, computes on the faster, and measures
again every so many steps, as contexts grow.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["ThreadTuner"]


@dataclass
class ThreadTuner:
    """Chooses among ``choices`` (torch thread counts) from measured step intervals.

    Call :meth:`layout` whenever a micro-batch of the run starts a step here (the first
    layer's request carries the step's layout); it returns the thread count to compute
    with until the next call.  A *round* ends when a micro-batch starts its next step,
    so one round is one step of every micro-batch this worker holds, and its interval
    covers everything the run did meanwhile.  Rounds that admitted a prompt (prefill
    work, a different size) are not counted.  While exploring, the counts take turns
    round by round until each has ``samples`` decode rounds; then the one with the lower
    median interval holds for ``hold`` rounds, and the exploring starts over.
    """

    choices: tuple[int, ...]
    samples: int = 4
    hold: int = 96
    current: int = field(init=False)
    chosen: int | None = field(init=False, default=None)  # the last exploration's pick
    history: list[dict[int, float]] = field(init=False, default_factory=list)  # per pick: median s by threads
    _seen: set[int] = field(init=False, default_factory=set)
    _start: float | None = field(init=False, default=None)
    _decode: bool = field(init=False, default=True)
    _times: dict[int, list[float]] = field(init=False, default_factory=dict)
    _held: int = field(init=False, default=0)
    _turn: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError("a thread tuner needs two or more thread counts to choose from")
        self.current = self.choices[0]
        self._times = {c: [] for c in self.choices}

    @property
    def exploring(self) -> bool:
        return self.chosen is None or self._held >= self.hold

    def layout(self, micro_batch: int, now: float, decode: bool) -> int:
        """A step of ``micro_batch`` starts at ``now`` (``decode``: every sequence in it
        decodes one token); the thread count to compute with from here."""
        if micro_batch in self._seen:  # a round ended
            if self._start is not None:
                self._round(now - self._start, self._decode)
            self._start, self._seen, self._decode = now, set(), True
        elif self._start is None:
            self._start = now
        self._seen.add(micro_batch)
        self._decode = self._decode and decode
        return self.current

    def _round(self, seconds: float, decode: bool) -> None:
        if not self.exploring:
            self._held += 1
            if self.exploring:  # the hold is over: measure again, from fresh samples
                self._times = {c: [] for c in self.choices}
                self._turn = 0
                self.current = self.choices[0]
            return
        if decode:
            self._times[self.current].append(seconds)
        if all(len(t) >= self.samples for t in self._times.values()):
            medians = {c: statistics.median(t) for c, t in self._times.items()}
            self.chosen = min(self.choices, key=lambda c: medians[c])
            self.history.append(medians)
            self.current, self._held = self.chosen, 0
            return
        self._turn += 1
        self.current = self.choices[self._turn % len(self.choices)]
