"""What the planner reasons about: a run's requests (:class:`Workload`), a plan
(:class:`RunConfig`), what the simulator expects of it (:class:`Prediction`) and the
shape of one micro-batch step (:class:`MicroBatchShape`)."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["MODES", "Workload", "RunConfig", "Prediction", "MicroBatchShape"]

MODES = ("two-tier", "single-tier", "in-process", "hybrid")


@dataclass(frozen=True)
class Workload:
    """The requests of a run: a prompt length and an output length for each."""

    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.prompt_lens) != len(self.output_lens) or not self.prompt_lens:
            raise ValueError("a workload needs one prompt length and one output length per request")
        if min(self.prompt_lens) < 1 or min(self.output_lens) < 1:
            raise ValueError("prompt and output lengths must be at least 1")

    @classmethod
    def uniform(cls, n: int, prompt: int, output: int) -> "Workload":
        return cls((prompt,) * n, (output,) * n)

    @classmethod
    def resample(cls, prompt_lens: Sequence[int], output_lens: Sequence[int] | int, n: int,
                 seed: int = 0) -> "Workload":
        """``n`` requests drawn from samples of lengths (``output_lens`` may be one number)."""
        rng = random.Random(seed)
        outs = [output_lens] if isinstance(output_lens, int) else list(output_lens)
        return cls(tuple(rng.choice(prompt_lens) for _ in range(n)), tuple(rng.choice(outs) for _ in range(n)))

    @property
    def n(self) -> int:
        return len(self.prompt_lens)

    @property
    def max_len(self) -> int:
        return max(p + o for p, o in zip(self.prompt_lens, self.output_lens))


@dataclass(frozen=True)
class RunConfig:
    """A plan to evaluate: the knobs a spec or the CLI sets."""

    mode: str = "two-tier"
    micro_batch_size: int = 32
    micro_batches: int = 1
    dense: int = 1  # dense workers, one layer slice each
    attention: int = 1  # attention workers per slice
    max_seq_len: int | None = None  # KV slot capacity; None: sized to the workload
    max_step_tokens: int = 512
    latency: float = 0.0  # seconds added to every inter-tier message
    dtype_bytes: int = 4
    local_micro_batches: int = 0  # hybrid: how many micro-batches (the first ones) are local
    local_batch_size: int | None = None  # hybrid: slots of each local micro-batch (None: micro_batch_size)
    dense_kv_budget: float | None = None  # KV bytes one dense worker may hold (single-tier, hybrid)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if min(self.micro_batch_size, self.micro_batches, self.dense, self.attention) < 1:
            raise ValueError("micro-batch size, micro-batches, dense and attention workers must be at least 1")
        if self.local_micro_batches < 0 or (self.mode == "hybrid" and self.local_micro_batches > self.micro_batches):
            raise ValueError(f"local micro-batches must be 0..{self.micro_batches} (the micro-batches), "
                             f"not {self.local_micro_batches}")
        if self.local_batch_size is not None and not 1 <= self.local_batch_size <= self.micro_batch_size:
            raise ValueError(f"the local batch size must be 1..{self.micro_batch_size} (the micro-batch size), "
                             f"not {self.local_batch_size}")
        if self.dense_kv_budget is not None and not self.dense_kv_budget >= 0:
            raise ValueError(f"the dense KV budget must be a number of bytes, not {self.dense_kv_budget!r}")

    @property
    def n_local(self) -> int:
        """Micro-batches whose KV and attention stay on the dense worker."""
        if self.mode == "hybrid":
            return self.local_micro_batches
        return 0 if self.mode == "two-tier" else self.micro_batches


@dataclass
class Prediction:
    """What the simulator expects of a run."""

    config: RunConfig
    feasible: bool
    reason: str = ""
    seconds: float = 0.0
    generated_tokens: int = 0
    steps: int = 0
    dense_util: float = 0.0  # busy share of each dense worker's compute stream
    attention_util: float = 0.0  # busy share of each attention worker's stream
    kv_bytes_attention: float = 0.0  # KV reserved on the fullest attention worker
    kv_bytes_dense: float = 0.0  # KV reserved on each dense worker
    bottleneck: str = ""  # "dense", "attention" or "round trip"
    micro_batch_size: int = 0  # as placed (the workload may fill fewer slots than asked, a dense KV
    # budget shrinks single-tier micro-batches); hybrid: the size of the remote micro-batches
    micro_batches: int = 0  # all of them, local ones included
    local_micro_batches: int = 0  # micro-batches with KV on the dense worker, as placed (single-tier: all)
    local_batch_size: int = 0  # slots of each of them (0: none local)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def cost_per_million(self, dense_price: float | None, attention_price: float | None) -> float | None:
        """Dollars per million generated tokens at these $/hour prices (None if unpriced)."""
        if dense_price is None or (self.remote and attention_price is None):
            return None
        c = self.config
        per_hour = c.dense * dense_price + (c.dense * c.attention * attention_price if self.remote else 0)
        return per_hour / 3600.0 / self.tokens_per_s * 1e6 if self.tokens_per_s else None

    @property
    def remote(self) -> bool:
        """Whether the run uses attention workers (two-tier, or hybrid with remote micro-batches)."""
        c = self.config
        return c.mode == "two-tier" or (c.mode == "hybrid" and self.micro_batches > self.local_micro_batches)


@dataclass(frozen=True)
class MicroBatchShape:
    """One micro-batch step: tokens run, KV positions read, attention work, rows sampled."""

    tokens: int
    kv_read: int  # sum over segments of (start + count): positions each attends over
    attn_units: int  # sum over segments of count x (start + count): query-key pairs
    rows: int  # sequences sampled (the head's rows)
    seqs: int

    def bucket(self) -> "MicroBatchShape":
        """A nearby shape that rounds share (costs vary slowly with these sizes)."""
        return MicroBatchShape(_b(self.tokens), _b(self.kv_read, 1.2), _b(self.attn_units, 1.2), _b(self.rows),
                               _b(self.seqs))


@functools.lru_cache(maxsize=1 << 16)
def _b(x: int, step: float = 1.1) -> int:
    if x <= 16:
        return x
    return int(round(step ** round(math.log(x, step))))
