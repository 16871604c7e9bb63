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
from typing import Any, Mapping

from .errors import InvalidRequestError
from .sampling import SamplingParams

__all__ = ["PromptRow", "UndecodableRow", "parse_row", "stable_row_id"]

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
