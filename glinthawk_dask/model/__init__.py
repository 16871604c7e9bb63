"""Llama-family model math, pure torch: configs, weights, tier-1 and tier-2 operations.

Nothing in this package knows about Dask.
"""

from .config import PRESETS, ModelConfig, from_name
from .weights import CheckpointSource, LayerWeights, SliceWeights, load_slice

__all__ = [
    "PRESETS",
    "ModelConfig",
    "from_name",
    "CheckpointSource",
    "LayerWeights",
    "SliceWeights",
    "load_slice",
]
