"""What a checkpoint reader is: canonical tensor names and the :class:`CheckpointSource` protocol.

Checkpoint readers (GGUF, Hugging Face safetensors, synthetic) implement
:class:`CheckpointSource`: they hand out single tensors by canonical name, in the
Hugging Face layout (``[out_features, in_features]``, q/k rows in HF rotary order),
reading only what is asked for.  A reader's ``config`` comes from metadata alone, so
describing a model (planning a run, checking a spec) does not import torch; the readers
import it where they make a tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..errors import ModelLoadError
from .config import ModelConfig

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointSource", "MissingTensorError", "GLOBAL_NAMES", "LAYER_SUFFIXES", "layer_tensor_names"]


class MissingTensorError(KeyError, ModelLoadError):
    """A checkpoint lacks a tensor the model needs (raised by every checkpoint reader)."""

    def __str__(self) -> str:
        return str(self.args[0])


# Canonical tensor names.  Per layer: f"layers.{i}.{suffix}".
LAYER_SUFFIXES = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
GLOBAL_NAMES = ("embed", "final_norm", "lm_head")


def layer_tensor_names(i: int) -> list[str]:
    return [f"layers.{i}.{s}" for s in LAYER_SUFFIXES]


@runtime_checkable
class CheckpointSource(Protocol):
    """A readable checkpoint.

    ``config`` describes its shapes.  ``get(name)`` returns one tensor by canonical name
    as a float32 (or native float) CPU tensor with HF layout, raising
    :class:`MissingTensorError` if absent; ``has(name)`` tells without reading.
    """

    config: ModelConfig

    def get(self, name: str) -> torch.Tensor: ...

    def has(self, name: str) -> bool: ...
