"""Dense (tier-1) weights of a contiguous slice of layers, and how they are assembled.

:func:`load_slice` turns a :class:`~.checkpoint.CheckpointSource` into fused, typed
:class:`SliceWeights` for layers ``[start, stop)``, so a worker hosting a slice never
reads the other layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkpoint import CheckpointSource
from .config import ModelConfig

__all__ = ["LayerWeights", "SliceWeights", "load_slice"]


@dataclass
class LayerWeights:
    """Dense weights of one transformer layer, fused for few large matmuls."""

    attn_norm: torch.Tensor  # [dim]
    wqkv: torch.Tensor  # [(H + 2*KVH) * D, dim]
    wo: torch.Tensor  # [dim, H * D]
    ffn_norm: torch.Tensor  # [dim]
    w_gate_up: torch.Tensor  # [2 * F, dim]
    w_down: torch.Tensor  # [dim, F]

    def tensors(self) -> list[torch.Tensor]:
        return [self.attn_norm, self.wqkv, self.wo, self.ffn_norm, self.w_gate_up, self.w_down]


@dataclass
class SliceWeights:
    """Weights for layers ``[start, stop)`` of a model.

    The first slice (``start == 0``) carries the embedding; the last slice
    (``stop == n_layers``) carries the final norm and the LM head.  With tied
    embeddings ``lm_head`` is the embedding tensor itself (no copy).
    """

    config: ModelConfig
    start: int
    stop: int
    layers: list[LayerWeights]
    embed: torch.Tensor | None = None  # [V, dim]
    final_norm: torch.Tensor | None = None  # [dim]
    lm_head: torch.Tensor | None = None  # [V, dim]
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.config.n_layers

    def layer(self, i: int) -> LayerWeights:
        """Weights of absolute layer index ``i``."""
        if not self.start <= i < self.stop:
            raise IndexError(f"layer {i} is not in this slice [{self.start}, {self.stop})")
        return self.layers[i - self.start]

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in [self.embed, self.final_norm, self.lm_head] + [
            t for lw in self.layers for t in lw.tensors()
        ]:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _expect(t: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(t.shape)}, the model config expects {shape}"
        )
    return t


def load_slice(
    source: CheckpointSource,
    start: int = 0,
    stop: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SliceWeights:
    """Read and fuse the weights of layers ``[start, stop)`` from ``source``.

    Only tensors of this slice are read: the embedding for the first slice, the
    final norm and LM head for the last one.
    """
    cfg = source.config
    stop = cfg.n_layers if stop is None else stop
    if not 0 <= start < stop <= cfg.n_layers:
        raise ValueError(f"bad layer slice [{start}, {stop}) for a {cfg.n_layers}-layer model")
    device = torch.device(device)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _expect(source.get(name), shape, name).to(device=device, dtype=dtype)

    d, qs, kvs, f = cfg.dim, cfg.q_size, cfg.kv_size, cfg.ffn_dim
    layers = []
    for i in range(start, stop):
        p = f"layers.{i}."
        wqkv = torch.cat([get(p + "wq", (qs, d)), get(p + "wk", (kvs, d)), get(p + "wv", (kvs, d))])
        w_gate_up = torch.cat([get(p + "w_gate", (f, d)), get(p + "w_up", (f, d))])
        layers.append(
            LayerWeights(
                attn_norm=get(p + "attn_norm", (d,)),
                wqkv=wqkv.contiguous(),
                wo=get(p + "wo", (d, qs)).contiguous(),
                ffn_norm=get(p + "ffn_norm", (d,)),
                w_gate_up=w_gate_up.contiguous(),
                w_down=get(p + "w_down", (d, f)).contiguous(),
            )
        )

    is_last = stop == cfg.n_layers
    embed = None
    if start == 0 or (is_last and cfg.tie_embeddings):
        embed = get("embed", (cfg.vocab_size, d)).contiguous()
    final_norm = lm_head = None
    if is_last:
        final_norm = get("final_norm", (d,))
        if cfg.tie_embeddings:
            lm_head = embed
        else:
            lm_head = get("lm_head", (cfg.vocab_size, d)).contiguous()
        if start != 0 and cfg.tie_embeddings:
            embed = None  # the last slice of a tied model only needs it as the head
    return SliceWeights(
        config=cfg, start=start, stop=stop, layers=layers, embed=embed,
        final_norm=final_norm, lm_head=lm_head, dtype=dtype, device=device,
    )
