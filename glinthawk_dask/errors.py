"""User-facing errors.

Every exception that derives from :class:`GlinthawkError` describes a user mistake or an
environment problem (a missing file, a bad option) and carries a message that says what
to do.  The CLI prints such errors as one line and exits non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["GlinthawkError", "GlinthawkWarning", "ModelLoadError", "InvalidRequestError"]


class GlinthawkError(Exception):
    """Base class of errors whose message is meant for the user."""


class ModelLoadError(GlinthawkError):
    """A model could not be resolved or loaded (missing file, corrupt checkpoint, unknown preset)."""


class InvalidRequestError(GlinthawkError, ValueError):
    """A request or sampling parameter is invalid (empty prompt, prompt too long, bad value)."""


class GlinthawkWarning(UserWarning):
    """Warnings issued by glinthawk-dask (errors in its own test suite)."""
