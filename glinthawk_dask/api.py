"""The Python API: load a model, turn prompt rows into requests, generate.

>>> from glinthawk_dask import LLM, SamplingParams
>>> llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
>>> [c.completion for c in llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))]
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from . import config
from .engine.engine import EngineConfig, InProcessEngine
from .engine.request import FINISH_ERROR, Completion, Request
from .errors import GlinthawkError, InvalidRequestError
from .model.resolve import DEFAULT_MODEL, resolve_checkpoint
from .model.weights import load_slice
from .prompts import PromptRow, UndecodableRow, parse_row, stable_row_id
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["LLM", "default_device", "default_dtype"]

MODES = ("two-tier", "single-tier", "in-process")
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
    workers), ``"single-tier"`` (KV on the dense workers) or ``"in-process"`` (no Dask);
    by default ``glinthawk.engine.mode`` (two-tier).  ``engine_config`` sets the batching
    knobs; in distributed modes ``n_micro_batches`` (an int or ``"auto"``, the default)
    replaces its ``n_micro_batches``.  Distributed modes use ``client``,
    or connect to ``scheduler``, or start the embedded local cluster (1 dense and 2
    attention worker processes), which :meth:`close` stops.

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
        n_slices: int | None = None,
        latency: float | None = None,
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
        eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.client = self.cluster = None
        self._own_client = False
        if self.mode == "in-process":
            self.weights = load_slice(source, dtype=self.dtype, device=self.device)
            self.engine: Any = InProcessEngine(
                self.weights, config=engine_config or EngineConfig(), eos_token_ids=eos,
                detokenize=self.tokenizer.decode if self.tokenizer else None,
            )
            return
        from .runtime.client import DaskEngine
        from .runtime.cluster import connect, ensure_plugins

        if client is None:
            self.client, self.cluster = connect(scheduler)
            self._own_client = True
        else:
            self.client = client
            ensure_plugins(client)
        ec = engine_config
        self.engine = DaskEngine(
            self.client, model, mode=self.mode, n_slices=n_slices,
            micro_batch_size=ec.micro_batch_size if ec else None,
            n_micro_batches=n_micro_batches,
            max_step_tokens=ec.max_step_tokens if ec else None,
            max_seq_len=ec.max_seq_len if ec else None,
            dtype=_DTYPE_NAMES[self.dtype], latency=latency, model_config=self.config,
        )

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
        return self.client.dashboard_link if self.client is not None else None

    def __repr__(self) -> str:
        c = self.config
        where = f"{self.dtype} on {self.device}" if self.mode == "in-process" else f"{self.mode} on {self.client}"
        return (
            f"<LLM {self.model!r}: {c.n_layers} layers, dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads}, {where}>"
        )

    # -- requests ------------------------------------------------------------------
    def tokenize(self, row: PromptRow, chat: bool = False) -> list[int]:
        """Prompt ids of a row: the chat template for messages (or any prompt with
        ``chat``), else the tokenizer's default encoding."""
        if row.prompt_token_ids is not None:
            ids = row.prompt_token_ids
            if max(ids) >= self.config.vocab_size:
                raise InvalidRequestError(
                    f"prompt token id {max(ids)} is outside the vocabulary ({self.config.vocab_size})"
                )
            return ids
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"model {self.model!r} has no tokenizer: give \"prompt_token_ids\" instead of text"
            )
        messages = row.messages
        if messages is None and chat:
            messages = [{"role": "user", "content": row.prompt}]
        if messages is not None:
            if not self.tokenizer.has_chat_template:
                raise InvalidRequestError(f"model {self.model!r} has no chat template")
            return self.tokenizer.encode_chat(messages)
        ids = self.tokenizer.encode(row.prompt)
        if not ids:
            raise InvalidRequestError("the prompt encodes to no tokens")
        return ids

    def make_requests(
        self, rows: Iterable[Any], params: SamplingParams | None = None, *, chat: bool = False
    ) -> list[Request | Completion]:
        """Validate and tokenize rows, in input order: a :class:`Request` per good row,
        an error :class:`Completion` per bad one."""
        defaults = params or SamplingParams()
        context = self.config.max_seq_len
        out: list[Request | Completion] = []
        seen: set[str] = set()
        for i, raw in enumerate(rows):
            row = None
            try:
                row = parse_row(raw, i, defaults)
                if row.id in seen:
                    raise InvalidRequestError(f"duplicate id {row.id!r}: ids must be unique")
                seen.add(row.id)
                ids = self.tokenize(row, chat)
                if len(ids) >= context:
                    raise InvalidRequestError(
                        f"the prompt has {len(ids)} tokens but the model's context is {context}: "
                        f"shorten it to at most {context - 1}"
                    )
                out.append(Request(row.id, ids, row.params, row.source))
            except InvalidRequestError as e:
                rid = row.id if row is not None else _raw_id(raw, i)
                source = row.source if row is not None else _raw_source(raw)
                out.append(Completion(rid, source, [], "", [], FINISH_ERROR, str(e)))
        return out

    # -- generation ----------------------------------------------------------------
    def stream(
        self, rows: Iterable[Any], params: SamplingParams | None = None, *, chat: bool = False
    ) -> Iterator[Completion]:
        """Yield completions as they finish (error rows first)."""
        entries = self.make_requests(rows, params, chat=chat)
        yield from (e for e in entries if isinstance(e, Completion))
        yield from self.engine.generate(e for e in entries if isinstance(e, Request))

    def generate(
        self, rows: Iterable[Any] | str, params: SamplingParams | None = None, *, chat: bool = False
    ) -> list[Completion]:
        """Complete every row; results in input order."""
        if isinstance(rows, str):
            rows = [rows]
        entries = self.make_requests(rows, params, chat=chat)
        index = {e.id: i for i, e in enumerate(entries) if isinstance(e, Request)}
        results: list[Any] = list(entries)
        for c in self.engine.generate(e for e in entries if isinstance(e, Request)):
            results[index[c.id]] = c
        return results


def _raw_source(raw: Any) -> Any:
    """What an error record shows as the prompt of a row that failed validation."""
    if isinstance(raw, UndecodableRow):
        return None
    if isinstance(raw, dict):
        return raw.get("prompt", raw.get("messages"))
    return raw


def _raw_id(raw: Any, index: int) -> str:
    if isinstance(raw, UndecodableRow):
        return raw.id
    if isinstance(raw, dict) and isinstance(raw.get("id"), (str, int)):
        return str(raw["id"])
    return stable_row_id(index, raw)
