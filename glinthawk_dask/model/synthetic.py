"""Deterministic random weights for any :class:`ModelConfig` (benchmarks, tests).

Each tensor is generated on demand from a seed derived from ``(seed, name)`` alone, so
any worker reading any subset of layers gets the same values for the same name.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .checkpoint import MissingTensorError
from .config import ModelConfig

if TYPE_CHECKING:
    import torch

__all__ = ["SyntheticCheckpoint"]

WEIGHT_STD = 0.02  # matrices and embedding: N(0, 0.02^2), the usual Llama init
NORM_STD = 0.1  # RMSNorm gains: N(1, 0.1^2)
CHUNK = 1 << 20  # elements per independently seeded chunk (fixed: values never depend on threads)
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(\w+)")


class SyntheticCheckpoint:
    """A :class:`CheckpointSource` of seeded random fp32 weights shaped like ``config``.

    Nothing is allocated up front; :meth:`get` builds one tensor in its target shape
    with a :class:`torch.Generator` seeded from ``(seed, name)``.
    """

    def __init__(self, config: ModelConfig, seed: int = 0):
        self.config = config
        self.seed = int(seed)
        self.name = f"random:{config.name}"

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of canonical tensor ``name``, or None if this model has no such tensor."""
        c = self.config
        globals_ = {"embed": (c.vocab_size, c.dim), "final_norm": (c.dim,)}
        if not c.tie_embeddings:
            globals_["lm_head"] = (c.vocab_size, c.dim)
        if name in globals_:
            return globals_[name]
        m = _LAYER_NAME.fullmatch(name)
        if m is None or int(m.group(1)) >= c.n_layers:
            return None
        return {
            "attn_norm": (c.dim,),
            "wq": (c.q_size, c.dim),
            "wk": (c.kv_size, c.dim),
            "wv": (c.kv_size, c.dim),
            "wo": (c.dim, c.q_size),
            "ffn_norm": (c.dim,),
            "w_gate": (c.ffn_dim, c.dim),
            "w_up": (c.ffn_dim, c.dim),
            "w_down": (c.dim, c.ffn_dim),
        }.get(m.group(2))

    def has(self, name: str) -> bool:
        """Whether ``name`` is a tensor of this model (the LM head only when untied)."""
        return self.shape(name) is not None

    def get(self, name: str) -> torch.Tensor:
        """Generate canonical tensor ``name`` (float32, deterministic in ``(seed, name)``)."""
        shape = self.shape(name)
        if shape is None:
            raise MissingTensorError(f"synthetic {self.config.name} has no tensor {name!r}")
        digest = hashlib.blake2b(f"{self.seed}:{name}".encode(), digest_size=8).digest()
        w = _seeded_normal(shape, int.from_bytes(digest, "little") & (2**62 - 1))
        if name.endswith("norm"):
            return w.mul_(NORM_STD).add_(1.0)
        return w.mul_(WEIGHT_STD)

    def __repr__(self) -> str:
        return f"SyntheticCheckpoint({self.config.name!r}, seed={self.seed})"


def _seeded_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard-normal float32 tensor of ``shape``, a pure function of ``seed``.

    Filled in fixed-size chunks, chunk ``i`` from generator seed ``seed + i``, in parallel
    threads (``normal_`` releases the GIL) so llama-2-7b sized matrices take a fraction
    of a second on a many-core host.
    """
    import torch  # here: a synthetic model's config (planning) does not need it

    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(-1)  # [numel]
    n_chunks = max(1, -(-flat.numel() // CHUNK))

    def fill(i: int) -> None:
        gen = torch.Generator().manual_seed(seed + i)
        flat[i * CHUNK : (i + 1) * CHUNK].normal_(generator=gen)

    workers = min(n_chunks, torch.get_num_threads())
    if workers <= 1:
        for i in range(n_chunks):
            fill(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(n_chunks)))
    return out
