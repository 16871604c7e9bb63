"""Requests in, completions out: the records the engines exchange with their callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplingParams

__all__ = ["Request", "Completion", "ROW_FIELDS", "OPTIONAL_FIELDS", "FINISH_STOP", "FINISH_LENGTH", "FINISH_ERROR",
           "sampled_tokens"]

FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_tokens reached, or the context is full
FINISH_ERROR = "error"  # the request could not be processed; see Completion.error


def sampled_tokens(completion_tokens: int, finish_reason: str) -> int:
    """Tokens a request sampled, as engines count them (``generated_tokens``): its
    completion's, and the stop token it ended at, which the completion leaves out."""
    return completion_tokens + (finish_reason == FINISH_STOP)

#: the fields of a completion as a row (:meth:`Completion.to_row`), in order: what a
#: pipeline's output stores per row, what job and output DataFrames hold, what
#: ``glinthawk generate`` writes per line
ROW_FIELDS = (
    "id", "prompt", "completion", "completion_token_ids", "finish_reason", "error",
    "prompt_tokens", "completion_tokens", "time_to_first_token", "time_per_token",
)
#: the fields of a row that may be None (no error, unknown timing)
OPTIONAL_FIELDS = ("error", "time_to_first_token", "time_per_token")


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

    def to_row(self) -> dict[str, Any]:
        """The completion as a row of :data:`ROW_FIELDS`: the token counts added, the
        error and unknown timings None."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "completion": self.completion,
            "completion_token_ids": list(self.completion_token_ids),
            "finish_reason": self.finish_reason,
            "error": self.error,
            "prompt_tokens": len(self.prompt_token_ids),
            "completion_tokens": len(self.completion_token_ids),
            "time_to_first_token": self.time_to_first_token,
            "time_per_token": self.time_per_token,
        }

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON (a line of ``glinthawk generate``): fields that are None left
        out, timings rounded to microseconds."""
        d = {}
        for name, value in self.to_row().items():
            if value is None and name in OPTIONAL_FIELDS:
                continue
            d[name] = round(value, 6) if name in ("time_to_first_token", "time_per_token") else value
        return d
