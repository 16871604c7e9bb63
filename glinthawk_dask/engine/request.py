"""Requests in, completions out: the records the engines exchange with their callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplingParams

__all__ = ["Request", "Completion", "FINISH_STOP", "FINISH_LENGTH", "FINISH_ERROR"]

FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_tokens reached, or the context is full
FINISH_ERROR = "error"  # the request could not be processed; see Completion.error


@dataclass
class Request:
    """A tokenized generation request.

    ``prompt_token_ids`` is what the model sees; ``prompt`` is kept for the output.
    """

    id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: Any = None  # the text or chat messages the ids came from


@dataclass
class Completion:
    """The result of one request."""

    id: str
    prompt: Any
    prompt_token_ids: list[int]
    completion: str
    completion_token_ids: list[int]
    finish_reason: str
    error: str | None = None
    time_to_first_token: float | None = None  # seconds from submission to the first token
    time_per_token: float | None = None  # seconds per generated token after the first

    def to_dict(self) -> dict[str, Any]:
        d = {
            "id": self.id,
            "prompt": self.prompt,
            "completion": self.completion,
            "completion_token_ids": self.completion_token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            "completion_tokens": len(self.completion_token_ids),
        }
        if self.error is not None:
            d["error"] = self.error
        if self.time_to_first_token is not None:
            d["time_to_first_token"] = round(self.time_to_first_token, 6)
        if self.time_per_token is not None:
            d["time_per_token"] = round(self.time_per_token, 6)
        return d
