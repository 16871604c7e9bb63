"""The Python API: load a model, turn prompt rows into requests, generate.

>>> from glinthawk_dask import LLM, SamplingParams
>>> llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
>>> [c.completion for c in llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import torch

from . import config
from .engine.engine import EngineConfig, InProcessEngine
from .engine.progress import GenerationProgress, ProgressTracker
from .engine.request import Completion, Request, sampled_tokens
from .errors import GenerationInterrupted, GlinthawkError
from .heap import steady_heap
from .handles import GenerationJob, submit_prompts
from .model.resolve import DEFAULT_MODEL, resolve_checkpoint
from .model.weights import load_slice
from .prompts import PromptRow, RequestBuilder
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["LLM", "default_device", "default_dtype"]

MODES = ("two-tier", "single-tier", "hybrid", "in-process")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU, bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise GlinthawkError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class LLM:
    """A model with its tokenizer and an engine: in this process, or on a Dask cluster.

    ``model`` is a preset name, a GGUF file, a Hugging Face directory or
    ``random:<preset>``.  ``mode`` is ``"two-tier"`` (dense workers + attention
    workers), ``"single-tier"`` (KV on the dense workers), ``"hybrid"`` (KV on the dense
    workers as far as ``dense_kv_budget`` bytes per dense worker and the planner find it
    pays, the rest on attention workers) or ``"in-process"`` (no Dask); by default
    ``glinthawk.engine.mode`` (two-tier); ``dense_kv_budget`` also caps single-tier runs;
    ``local_micro_batches`` fixes hybrid's split instead of the planner.
    ``engine_config`` sets the batching knobs (by default
    :meth:`~glinthawk_dask.engine.engine.EngineConfig.from_options` of the mode and the
    two below); ``micro_batch_size`` and ``n_micro_batches`` (ints, or ``"auto"``)
    replace its fields: in distributed modes "auto" (the default depth) plans from the
    cluster's measured profile, in-process it keeps the config's.  Distributed modes use ``client``,
    or connect to ``scheduler``, or start the embedded local cluster
    (``local_workers``: dense and attention worker processes, by default 1 and
    ``glinthawk.local-cluster.attention-workers``), which :meth:`close` stops.

    Prompt rows are strings or mappings (see :mod:`glinthawk_dask.prompts`); a row that
    cannot be processed becomes a completion with ``finish_reason == "error"`` and the
    others go on.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        mode: str | None = None,
        scheduler: str | None = None,
        client: Any = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        engine_config: EngineConfig | None = None,
        n_micro_batches: int | str | None = None,
        micro_batch_size: int | str | None = None,
        n_slices: int | None = None,
        latency: float | None = None,
        local_workers: tuple[int, int | None] = (1, None),
        dense_kv_budget: int | None = None,
        local_micro_batches: int | None = None,
    ) -> None:
        self.model = model
        self.mode = mode or config.get("engine.mode")
        if self.mode not in MODES:
            raise GlinthawkError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype, self.device)
        source = resolve_checkpoint(model)
        self.config = source.config
        self.tokenizer = Tokenizer.from_checkpoint(source)
        self.requests = RequestBuilder(
            self.tokenizer, vocab_size=self.config.vocab_size, max_seq_len=self.config.max_seq_len, model=model
        )
        eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.client = self.cluster = None
        self._own_client = False
        ec = engine_config or EngineConfig.from_options(mode=self.mode, micro_batch_size=micro_batch_size,
                                                         n_micro_batches=n_micro_batches)
        if self.mode == "in-process":  # ints given beside a config replace its fields
            size = micro_batch_size if isinstance(micro_batch_size, int) else ec.micro_batch_size
            ec = dataclasses.replace(
                ec, micro_batch_size=size, max_step_tokens=max(ec.max_step_tokens, size),
                n_micro_batches=n_micro_batches if isinstance(n_micro_batches, int) else ec.n_micro_batches,
            )
        self.engine_config = ec  # the batching knobs it runs with (distributed: before any auto plan)
        if self.mode == "in-process":
            steady_heap()
            self.weights = load_slice(source, dtype=self.dtype, device=self.device)
            self.engine: Any = InProcessEngine(
                self.weights, config=ec, eos_token_ids=eos,
                detokenize=self.tokenizer.decode if self.tokenizer else None,
            )
            return
        from .runtime.client import DaskEngine
        from .runtime.cluster import connect, ensure_plugins

        if client is None:
            self.client, self.cluster = connect(scheduler, n_dense=local_workers[0], n_attention=local_workers[1])
            self._own_client = True
        else:
            self.client = client
            ensure_plugins(client)
        self.engine = DaskEngine(
            self.client, model, mode=self.mode, n_slices=n_slices,
            micro_batch_size=micro_batch_size or ec.micro_batch_size,
            n_micro_batches=n_micro_batches,
            max_step_tokens=ec.max_step_tokens,
            max_seq_len=ec.max_seq_len,
            dtype=self.dtype_name, latency=latency, model_config=self.config,
            dense_kv_budget=dense_kv_budget, local_micro_batches=local_micro_batches,
        )

    @property
    def label(self) -> str:
        """What this LLM's runs on a cluster are for (a pipeline sets its name): ``glinthawk
        status`` and the KV changes between runs show it beside their ids.  Empty by
        default; an in-process LLM has none."""
        return getattr(self.engine, "label", "")

    @label.setter
    def label(self, text: str) -> None:
        if hasattr(self.engine, "label"):
            self.engine.label = str(text)

    def cluster_status(self) -> dict:
        """The cluster's workers, KV and open runs (see :func:`glinthawk_dask.runtime.cluster_status`)."""
        if self.client is None:
            raise GlinthawkError("an in-process LLM has no cluster")
        from .runtime.cluster import cluster_status

        return cluster_status(self.client)

    def tier_workers(self) -> dict[str, list[str]]:
        """The addresses of the cluster's dense and attention workers (see
        :func:`glinthawk_dask.runtime.cluster.tier_workers`)."""
        if self.client is None:
            raise GlinthawkError("an in-process LLM has no cluster")
        from .runtime.cluster import tier_workers

        return tier_workers(self.client)

    def close(self) -> None:
        """Stop the local cluster this LLM started (if any)."""
        if self._own_client and self.client is not None:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
            self.client = self.cluster = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard of the cluster (None in-process)."""
        return self.client.dashboard_link if self.client is not None else None

    @property
    def dashboard_page(self) -> str | None:
        """The Glinthawk page of the dashboard: pipeline stream, tokens/s, KV memory, rows."""
        if self.client is None:
            return None
        from .runtime.dashboard import page_link

        return page_link(self.client)

    def submit(self, rows: Iterable[Any], params: SamplingParams | None = None, *,
               chat: bool = False) -> GenerationJob:
        """Generate in the background: returns a :class:`~glinthawk_dask.jobs.GenerationJob`
        at once (progress, ``result()``, ``to_pandas()``, ``cancel()``)."""
        return submit_prompts(self, rows, params, chat=chat)

    def __repr__(self) -> str:
        c = self.config
        where = f"{self.dtype} on {self.device}" if self.mode == "in-process" else f"{self.mode} on {self.client}"
        return (
            f"<LLM {self.model!r}: {c.n_layers} layers, dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads}, {where}>"
        )

    # -- requests ------------------------------------------------------------------
    def tokenize(self, row: PromptRow, chat: bool = False) -> list[int]:
        """Prompt ids of a row (see :meth:`RequestBuilder.tokenize`)."""
        return self.requests.tokenize(row, chat)

    def make_requests(
        self, rows: Iterable[Any], params: SamplingParams | None = None, *, chat: bool = False
    ) -> list[Request | Completion]:
        """Validate and tokenize rows, in input order: a :class:`Request` per good row,
        an error :class:`Completion` per bad one."""
        return self.requests.build(rows, params, chat=chat, seen=set())

    # -- generation ----------------------------------------------------------------
    def stream_requests(
        self, requests: Iterable[Request], *, max_seq_len: int | None = None,
        on_tick: Callable[[], None] | None = None, output_lengths: Sequence[int] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Generator[Completion, None, None]:
        """Generate built requests (see :meth:`make_requests`), yielding each completion as it finishes.

        ``max_seq_len`` is the KV capacity of a sequence (prompt + completion): with it (or
        the engine config's), ``requests`` is consumed lazily, a little ahead of the free
        slots, so an input far larger than memory flows through; without, it is read
        whole to size the slots.  ``on_tick()`` is called after every engine step or poll,
        with :attr:`generated_tokens` current.  The result is a generator: closing it
        (``close()``, or ``contextlib.closing`` around a loop that may stop early) ends the
        run at once and frees its KV cache.  One generation at a time per LLM.
        ``output_lengths``, completion lengths seen before (a resumed run's committed
        rows), lets an auto plan expect rows to stop as those did rather than run to
        ``max_tokens``.  On a cluster, ``stop()`` turning true while the run waits to be
        placed (for KV other runs hold) ends it with nothing generated.
        """
        if self.client is None:  # (in process: no plan to make, no placement to wait for)
            return self.engine.generate(requests, max_seq_len=max_seq_len, on_tick=on_tick)
        return self.engine.generate(requests, max_seq_len=max_seq_len, on_tick=on_tick,
                                    output_lengths=list(output_lengths) if output_lengths else None, stop=stop)

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled so far by the current (or last) generation."""
        return self.engine.generated_tokens

    @property
    def recoveries(self) -> list[dict]:
        """Workers the current (or last) generation lost and how it went on: one record
        per recovery (``kind``: ``"moved micro-batch"`` or ``"restarted run"``, ``cause``,
        ``requests``, ``rebuilt_tokens``, ``seconds``, ``time``), appended while it runs;
        :func:`~glinthawk_dask.engine.progress.recovery_text` words one.  Empty in-process."""
        return list(getattr(self.engine, "recoveries", ()))

    @property
    def placement_wait_seconds(self) -> float:
        """How long the current (or last) distributed generation waited to be placed, for
        KV that other runs held (0 in-process)."""
        return float(getattr(self.engine, "placement_wait_s", 0.0))

    @property
    def last_summary(self) -> Any:
        """What the last distributed generation ran (a :class:`~glinthawk_dask.runtime.client.RunSummary`:
        plan, micro-batches, KV per tier, timings); None in-process or before the first."""
        return getattr(self.engine, "last_summary", None)

    @property
    def dtype_name(self) -> str:
        """The name of :attr:`dtype`: ``float32``, ``bfloat16`` or ``float16``."""
        return _DTYPE_NAMES[self.dtype]

    @property
    def max_step_tokens(self) -> int:
        """Tokens one micro-batch step may take (decode tokens and prefill chunks)."""
        if self.mode == "in-process":
            return self.engine.config.max_step_tokens
        return self.engine.max_step_tokens

    def stream(
        self, rows: Iterable[Any], params: SamplingParams | None = None, *, chat: bool = False,
        progress: Callable[[GenerationProgress], None] | None = None,
    ) -> Iterator[Completion]:
        """Yield completions as they finish (error rows first).

        ``progress`` gets a :class:`~glinthawk_dask.engine.progress.GenerationProgress`
        after every engine step or poll (often: rate-limit what you do with it) and once
        more at the end."""
        yield from self.stream_built(self.make_requests(rows, params, chat=chat), progress)

    def generate(
        self, rows: Iterable[Any] | str, params: SamplingParams | None = None, *, chat: bool = False,
        progress: Callable[[GenerationProgress], None] | None = None,
    ) -> list[Completion]:
        """Complete every row; results in input order (``progress`` as for :meth:`stream`).

        Interrupted (Ctrl-C), it raises :class:`~glinthawk_dask.errors.GenerationInterrupted`
        with the rows finished so far: the run is closed and its KV freed first."""
        if isinstance(rows, str):
            rows = [rows]
        entries = self.make_requests(rows, params, chat=chat)
        index = {e.id: i for i, e in enumerate(entries)}
        results: list[Any] = list(entries)
        try:
            for c in self.stream_built(entries, progress):
                results[index[c.id]] = c
        except KeyboardInterrupt as e:
            if isinstance(e, GenerationInterrupted):
                raise
            raise GenerationInterrupted([r for r in results if isinstance(r, Completion)], len(results)) from e
        return results

    def stream_built(self, entries: list[Request | Completion],
                     progress: Callable[[GenerationProgress], None] | None = None) -> Iterator[Completion]:
        """Generate what :meth:`make_requests` built, yielding each completion as it
        finishes (the bad rows' error completions first); ``progress`` as for :meth:`stream`.
        The rows' ids tell where each completion belongs."""
        requests = [e for e in entries if isinstance(e, Request)]
        tracker = ProgressTracker(len(entries), sum(r.params.max_tokens for r in requests))

        def tick() -> None:
            tracker.tokens(self.generated_tokens)
            tracker.recoveries = self.recoveries
            progress(tracker.snapshot())

        for e in entries:
            if isinstance(e, Completion):
                tracker.row(error=True)
                yield e

        def taken() -> Iterator[Request]:  # (the engine takes them a little ahead of its slots)
            for r in requests:
                tracker.take(r.params.max_tokens)
                yield r

        budget = {r.id: r.params.max_tokens for r in requests}
        if requests:
            for c in self.stream_requests(taken(), on_tick=tick if progress is not None else None):
                tracker.row(c.error is not None, budget.get(c.id, 0),
                            sampled_tokens(len(c.completion_token_ids), c.finish_reason))
                yield c
        if progress is not None:
            tick()

