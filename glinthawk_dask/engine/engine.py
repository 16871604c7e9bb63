"""The in-process engine: continuous batching over one process, no Dask.

It runs the same scheduler, tier ops and KV cache as the distributed engine, with the
micro-batches taken in turn.  Completions are yielded as sequences finish.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .. import config
from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.ops import RopeTable
from ..model.weights import SliceWeights
from ..sampling import sample
from .request import Completion, Request
from .runner import forward_step
from .scheduler import BatchScheduler

__all__ = ["EngineConfig", "InProcessEngine", "IN_PROCESS_MICRO_BATCH_SIZE"]

#: slots per micro-batch of the in-process engine when none is asked for; also what
#: ``"auto"`` stands for in an :class:`EngineConfig` (distributed runs plan "auto" themselves)
IN_PROCESS_MICRO_BATCH_SIZE = 64


@dataclass(frozen=True)
class EngineConfig:
    """Batching knobs shared by all engines.

    ``max_seq_len`` is the KV capacity of one sequence (prompt + completion); by
    default it is sized to the requests of a run, capped by the model's context.
    :class:`~glinthawk_dask.LLM` builds one from its options with :meth:`from_options`.
    """

    micro_batch_size: int = IN_PROCESS_MICRO_BATCH_SIZE
    n_micro_batches: int = 1
    max_step_tokens: int = 512
    max_seq_len: int | None = None

    @classmethod
    def from_options(
        cls,
        *,
        mode: str | None = None,
        micro_batch_size: int | str | None = None,
        n_micro_batches: int | str | None = None,
        max_seq_len: int | None = None,
    ) -> EngineConfig:
        """The config of a run in ``mode`` (None: ``glinthawk.engine.mode``) from user options.

        ``micro_batch_size`` (an int, ``"auto"`` or None) defaults to
        :data:`IN_PROCESS_MICRO_BATCH_SIZE` in-process and to
        ``glinthawk.engine.micro-batch-size`` otherwise; ``"auto"`` stands as
        :data:`IN_PROCESS_MICRO_BATCH_SIZE` here, since distributed runs plan it
        themselves.  ``n_micro_batches`` (an int, ``"auto"`` or None) counts only
        in-process; ``max_step_tokens`` is ``glinthawk.engine.max-step-tokens``, raised to
        the micro-batch size.
        """
        in_process = (mode or config.get("engine.mode")) == "in-process"
        size = micro_batch_size or (IN_PROCESS_MICRO_BATCH_SIZE if in_process
                                    else config.get("engine.micro-batch-size"))
        size = IN_PROCESS_MICRO_BATCH_SIZE if size == "auto" else int(size)
        return cls(
            micro_batch_size=size,
            n_micro_batches=n_micro_batches if in_process and isinstance(n_micro_batches, int) else 1,
            max_step_tokens=max(int(config.get("engine.max-step-tokens")), size),
            max_seq_len=max_seq_len,
        )

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "n_micro_batches", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be at least 1")
        if self.max_step_tokens < self.micro_batch_size:
            raise ValueError("EngineConfig.max_step_tokens must be at least micro_batch_size")

    def seq_len_for(self, requests: list[Request], context: int) -> int:
        """KV capacity per slot for ``requests`` on a model with ``context`` positions."""
        if self.max_seq_len is not None:
            return min(self.max_seq_len, context)
        need = max((len(r.prompt_token_ids) + r.params.max_tokens for r in requests), default=1)
        return min(need, context)


class InProcessEngine:
    """Generate completions with the whole model in this process."""

    def __init__(
        self,
        weights: SliceWeights,
        *,
        config: EngineConfig = EngineConfig(),
        eos_token_ids: Iterable[int] = (),
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> None:
        if not (weights.is_first and weights.is_last):
            raise ValueError("the in-process engine needs the weights of the whole model")
        self.weights = weights
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.detokenize = detokenize
        self.rope = RopeTable.build(weights.config, dtype=weights.dtype, device=weights.device)
        self.cache: KVCache | None = None
        self.stats = {"steps": 0, "tokens": 0}
        self.generated_tokens = 0  # tokens sampled so far by the current (or last) generate call

    def _cache_for(self, max_seq_len: int) -> KVCache:
        n_slots = self.config.micro_batch_size * self.config.n_micro_batches
        c = self.cache
        if (c is None or c.max_seq_len < max_seq_len or c.n_slots != n_slots
                or c.compiled != KVCache.compiled_for(c.dtype, c.device)):  # the kernel switched since
            self.cache = None  # drop the old one before allocating the new one
            c = self.cache = KVCache(
                self.weights.config, n_slots, max_seq_len,
                dtype=self.weights.dtype, device=self.weights.device,
            )
        return c

    def generate(self, requests: Iterable[Request], *, max_seq_len: int | None = None,
                 on_tick: Callable[[], None] | None = None) -> Iterator[Completion]:
        """Run ``requests`` to completion, yielding each as it finishes.

        With a KV slot size (``max_seq_len``, else ``config.max_seq_len``), ``requests``
        is consumed lazily, a few micro-batches ahead of the free slots, so an input
        far larger than memory flows through; otherwise it is read whole to size the
        slots.  ``on_tick()`` is called after every step, with :attr:`generated_tokens`
        current.
        """
        self.generated_tokens = 0
        cfg = self.config
        if max_seq_len is not None:
            cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
        context = self.weights.config.max_seq_len
        if cfg.max_seq_len is None:
            requests = list(requests)
        pending = iter(requests)
        first = next(pending, None)
        if first is None:
            return
        pending = itertools.chain([first], pending)
        cache = self._cache_for(cfg.seq_len_for(requests if cfg.max_seq_len is None else [], context))
        sched = BatchScheduler(
            n_micro_batches=cfg.n_micro_batches,
            micro_batch_size=cfg.micro_batch_size,
            max_step_tokens=cfg.max_step_tokens,
            max_seq_len=cache.max_seq_len,
            eos_token_ids=self.eos_token_ids,
            detokenize=self.detokenize,
        )
        exhausted = False
        held: set[str] = set()  # sequences with a KV slot, freed as each one finishes
        try:
            while True:
                while not exhausted and len(sched.waiting) < sched.n_slots:
                    r = next(pending, None)
                    if r is None:
                        exhausted = True
                    else:
                        sched.add(r)
                if not sched.has_work():
                    break
                for mb in range(cfg.n_micro_batches):
                    step = sched.schedule(mb)
                    if step is None:
                        continue
                    for seq in step.admitted:
                        cache.allocate(seq.id, seq.slot)
                        held.add(seq.id)
                    batch = AttentionBatch.build(step.slots, step.starts, step.counts, device=self.weights.device)
                    logits = forward_step(
                        self.weights, cache, self.rope, step.input_ids, batch, step.sample_rows
                    )  # [N, V]
                    tokens: list[int] = []
                    if step.sample_rows:
                        tokens = sample(
                            logits,
                            [s.params for s in step.sample_seqs],
                            [s.generator for s in step.sample_seqs],
                        ).tolist()
                    self.stats["steps"] += 1
                    self.stats["tokens"] += step.n_tokens
                    self.generated_tokens += len(tokens)
                    for done in sched.update(step, tokens):
                        cache.free(done.id)
                        held.discard(done.id)
                        yield done
                    if on_tick is not None:
                        on_tick()
        finally:  # closed early (cancelled, interrupted, the consumer failed): free every slot still held,
            for sid in held:  # also those of sequences that finished in the step being yielded
                if sid in cache:
                    cache.free(sid)
