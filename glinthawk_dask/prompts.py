"""The input contract: what a prompt row may contain and how it becomes a request.

A row is a string (the prompt) or a mapping with ``"prompt"`` (text), ``"messages"``
(chat messages, the chat template is applied) or ``"prompt_token_ids"`` (ids, for
models without a tokenizer); optionally ``"id"`` and any sampling field
(``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``,
``stop_token_ids``, ``ignore_eos``) overriding the defaults for that row.  Other keys
are ignored.  Rows without an id get a stable one from their position and content.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .engine.request import FINISH_ERROR, Completion, Request
from .errors import InvalidRequestError
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["PromptRow", "RequestBuilder", "UndecodableRow", "parse_row", "stable_row_id"]

_CONTENT_KEYS = ("prompt", "messages", "prompt_token_ids")


@dataclass
class PromptRow:
    """A validated, not yet tokenized, prompt row."""

    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = SamplingParams()

    @property
    def source(self) -> Any:
        """What the output records as the prompt."""
        if self.messages is not None:
            return self.messages
        if self.prompt is not None:
            return self.prompt
        return self.prompt_token_ids


@dataclass(frozen=True)
class UndecodableRow:
    """A placeholder for input that could not be decoded (bad JSON, bad bytes): it keeps
    its place in the input and becomes an error record carrying ``message``."""

    id: str
    message: str


def stable_row_id(index: int, row: Any) -> str:
    """An id for a row that has none: its position plus a hash of its content."""
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()
    return f"{index}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError('"messages" must be a non-empty list of {"role", "content"} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
            m.get("content"), str
        ):
            raise InvalidRequestError(
                f'"messages"[{i}] must be an object with string "role" and "content"'
            )
    return [dict(m) for m in messages]


def parse_row(row: Any, index: int, defaults: SamplingParams = SamplingParams()) -> PromptRow:
    """Validate one input row.  Raises :class:`InvalidRequestError` saying what is wrong."""
    if isinstance(row, UndecodableRow):
        raise InvalidRequestError(row.message)
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, Mapping):
        raise InvalidRequestError(
            f'a row must be a string or an object with "prompt" or "messages", got {type(row).__name__}'
        )
    given = [k for k in _CONTENT_KEYS if row.get(k) is not None]
    if len(given) != 1:
        what = "none" if not given else " and ".join(f'"{k}"' for k in given)
        raise InvalidRequestError(
            f'a row needs exactly one of "prompt", "messages" or "prompt_token_ids" (got {what})'
        )
    rid = row.get("id")
    if rid is None:
        rid = stable_row_id(index, dict(row))
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise InvalidRequestError(f'"id" must be a string or an integer, got {type(rid).__name__}')
    overrides = {k: row[k] for k in SamplingParams.field_names() if k in row and row[k] is not None}
    params = defaults.replace(**overrides) if overrides else defaults
    out = PromptRow(id=str(rid), params=params)
    key = given[0]
    if key == "prompt":
        if not isinstance(row["prompt"], str):
            raise InvalidRequestError(f'"prompt" must be a string, got {type(row["prompt"]).__name__}')
        if not row["prompt"]:
            raise InvalidRequestError("empty prompt: give some text to complete")
        out.prompt = row["prompt"]
    elif key == "messages":
        out.messages = _check_messages(row["messages"])
    else:
        ids = row["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise InvalidRequestError('"prompt_token_ids" must be a non-empty list of token ids')
        out.prompt_token_ids = list(ids)
    return out


class RequestBuilder:
    """Turns prompt rows into tokenized requests for one model.

    ``tokenizer`` may be None (models without one take ``prompt_token_ids``);
    ``vocab_size`` bounds token ids; a prompt must leave room in ``max_seq_len``
    positions (the model's context, or a run's smaller KV slot, which ``limit_name``
    names in messages).  ``model`` names the model in messages.
    """

    def __init__(
        self, tokenizer: "Tokenizer | None", *, vocab_size: int, max_seq_len: int, model: str,
        limit_name: str = "the model's context",
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.model = model
        self.limit_name = limit_name

    def tokenize(self, row: PromptRow, chat: bool = False) -> list[int]:
        """Prompt ids of a row: the chat template for messages (or any prompt with
        ``chat``), else the tokenizer's default encoding."""
        if row.prompt_token_ids is not None:
            ids = row.prompt_token_ids
            if max(ids) >= self.vocab_size:
                raise InvalidRequestError(
                    f"prompt token id {max(ids)} is outside the vocabulary ({self.vocab_size})"
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

    def build(
        self,
        rows: Iterable[Any],
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        seen: set[str] | None = None,
    ) -> list[Request | Completion]:
        """Validate and tokenize rows, in input order: a :class:`Request` per good row,
        an error :class:`Completion` per bad one.  ``seen`` collects ids across calls;
        a repeated id is an error (None: ids are not checked, the caller does it)."""
        defaults = params or SamplingParams()
        limit = self.max_seq_len
        out: list[Request | Completion] = []
        for i, raw in enumerate(rows):
            row = None
            try:
                row = parse_row(raw, i, defaults)
                if seen is not None:
                    if row.id in seen:
                        raise InvalidRequestError(f"duplicate id {row.id!r}: ids must be unique")
                    seen.add(row.id)
                ids = self.tokenize(row, chat)
                if len(ids) >= limit:
                    raise InvalidRequestError(
                        f"the prompt has {len(ids)} tokens but {self.limit_name} is {limit}: "
                        f"shorten it to at most {limit - 1}"
                    )
                out.append(Request(row.id, ids, row.params, row.source))
            except InvalidRequestError as e:
                rid = row.id if row is not None else _raw_id(raw, i)
                source = row.source if row is not None else _raw_source(raw)
                out.append(Completion(rid, source, [], "", [], FINISH_ERROR, str(e)))
        return out


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
