"""User-facing errors.

Every exception that derives from :class:`GlinthawkError` describes a user mistake or an
environment problem (a missing file, a bad option) and carries a message that says what
to do.  The CLI prints such errors as one line and exits non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationInterrupted", "GlinthawkError", "GlinthawkWarning", "ModelLoadError", "InvalidRequestError"]


class GlinthawkError(Exception):
    """Base class of errors whose message is meant for the user."""


class ModelLoadError(GlinthawkError):
    """A model could not be resolved or loaded (missing file, corrupt checkpoint, unknown preset)."""


class InvalidRequestError(GlinthawkError, ValueError):
    """A request or sampling parameter is invalid (empty prompt, prompt too long, bad value)."""


class GenerationInterrupted(KeyboardInterrupt):
    """A generation stopped by a KeyboardInterrupt (Ctrl-C, a notebook's interrupt):
    ``completions`` holds the rows that had finished, in input order, out of ``total``.
    It is a KeyboardInterrupt, so code that catches those sees it as before."""

    def __init__(self, completions: list[Any], total: int) -> None:
        super().__init__(f"interrupted with {len(completions)} of {total} rows finished")
        self.completions, self.total = completions, total


class GlinthawkWarning(UserWarning):
    """Warnings issued by glinthawk-dask (errors in its own test suite)."""
