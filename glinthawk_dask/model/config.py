"""Model shape configuration and named presets.

A :class:`ModelConfig` describes a Llama-family decoder: sizes only, no weights, no
device.  Presets cover the embedded default (SmolLM2-135M-Instruct), the Llama-2/3
shapes used for benchmarks with synthetic weights, and tiny shapes for tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ModelConfig", "PRESETS", "UnknownPresetError", "from_name"]


class UnknownPresetError(KeyError):
    """Raised when a preset name is not in :data:`PRESETS`."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-family decoder.

    ``head_dim`` defaults to ``dim // n_heads``; ``n_kv_heads`` defaults to ``n_heads``
    (multi-head attention).  ``n_heads`` must be a multiple of ``n_kv_heads`` (GQA groups).
    """

    name: str
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int
    n_kv_heads: int = 0
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for field in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # -- derived sizes -------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, element_size: int, n_layers: int | None = None) -> int:
        """Bytes of K and V one token occupies over ``n_layers`` layers (all by default)."""
        layers = self.n_layers if n_layers is None else n_layers
        return 2 * layers * self.n_kv_heads * self.head_dim * element_size

    def n_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        per_layer = (
            2 * self.dim  # norms
            + self.dim * (self.q_size + 2 * self.kv_size)  # wq, wk, wv
            + self.q_size * self.dim  # wo
            + 3 * self.dim * self.ffn_dim  # gate, up, down
        )
        embed = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + embed + head + self.dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        return from_name(name)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(
            name="smollm2-135m-instruct", dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
            ffn_dim=1536, vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0,
            max_seq_len=8192, tie_embeddings=True,
        ),
        ModelConfig(
            name="llama-2-7b", dim=4096, n_layers=32, n_heads=32, ffn_dim=11008,
            vocab_size=32000, max_seq_len=4096,
        ),
        ModelConfig(
            name="llama-2-13b", dim=5120, n_layers=40, n_heads=40, ffn_dim=13824,
            vocab_size=32000, max_seq_len=4096,
        ),
        ModelConfig(
            name="llama-2-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
            ffn_dim=28672, vocab_size=32000, max_seq_len=4096,
        ),
        ModelConfig(
            name="llama-3-8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
            ffn_dim=14336, vocab_size=128256, rope_theta=500000.0, max_seq_len=8192,
        ),
        ModelConfig(
            name="llama-3-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
            ffn_dim=28672, vocab_size=128256, rope_theta=500000.0, max_seq_len=8192,
        ),
        # Tiny shapes for tests: odd sizes on purpose.
        ModelConfig(
            name="tiny-mha", dim=64, n_layers=2, n_heads=4, ffn_dim=172, vocab_size=259,
            max_seq_len=256,
        ),
        ModelConfig(
            name="tiny-gqa", dim=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=200,
            vocab_size=301, rope_theta=500000.0, max_seq_len=256,
        ),
    ]
}


def from_name(name: str) -> ModelConfig:
    """Look up a preset by name (case-insensitive)."""
    key = name.lower()
    if key not in PRESETS:
        raise UnknownPresetError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[key]
