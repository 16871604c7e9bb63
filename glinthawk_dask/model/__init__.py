"""Llama-family model math, pure torch: configs, weights, tier-1 and tier-2 operations.

Nothing in this package knows about Dask.  Importing it, its configs or its checkpoint
readers' configs does not import torch (``glinthawk plan`` starts in a fraction of a
second); the weights and the math do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .checkpoint import CheckpointSource
from .config import PRESETS, ModelConfig, from_name

if TYPE_CHECKING:
    from .weights import LayerWeights, SliceWeights, load_slice

__all__ = [
    "PRESETS",
    "ModelConfig",
    "from_name",
    "CheckpointSource",
    "LayerWeights",
    "SliceWeights",
    "load_slice",
]

_FROM_WEIGHTS = ("LayerWeights", "SliceWeights", "load_slice")


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported on first use."""
    if name in _FROM_WEIGHTS:
        return getattr(importlib.import_module(".weights", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
