"""Run one micro-batch step through the model on local weights and a local KV cache.

This composes the tier-1 ops and the tier-2 cache exactly as the distributed pipeline
does, in one process: it is the single-process baseline and the correctness oracle.
The per-layer loop (:class:`SliceLayers`) is the one a dense worker runs too, with
attention on its own cache or on an attention worker.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.ops import RopeTable, embed, head, post_attention, post_pre_attention, pre_attention
from ..model.weights import SliceWeights

__all__ = ["SliceLayers", "attend_locally", "forward_step", "run_layers"]


QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q [T, H, D], k and v [T, KVH, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SliceLayers:
    """The dense half of a slice's layers, around attention steps the caller runs.

    :meth:`begin` gives the first layer's q/k/v; the caller computes that layer's
    attention (on a local cache, or on an attention worker) and hands the output to
    :meth:`resume`, which finishes the layer and gives the next layer's q/k/v (post- and
    pre-attention fused), or None after the last layer, when :attr:`x` is the slice's
    output.  The caller may run each call on another thread or at another time: this is
    the one place of the per-layer math, whatever carries attention.
    """

    def __init__(self, weights: SliceWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cfg, self.layers, self.start = weights.config, weights.layers, weights.start
        self.x = x  # the residual stream [T, dim]
        self.cos, self.sin = cos, sin  # [T, D] rotary rows of the tokens' positions

    def begin(self) -> QKV:
        """Pre-attention of the first layer (RMSNorm, q/k/v projections, RoPE)."""
        return pre_attention(self.cfg, self.layers[0], self.x, self.cos, self.sin)

    def resume(self, layer: int, o: torch.Tensor) -> QKV | None:
        """Finish ``layer`` (model numbering) with its attention output o [T, H, D] (any
        device, any dtype): o-projection, residual and MLP; then the next layer's pre-attention."""
        i = layer - self.start
        o = o.to(self.x.device, non_blocking=True).to(self.x.dtype)  # [T, H, D]
        if i + 1 < len(self.layers):
            self.x, q, k, v = post_pre_attention(self.cfg, self.layers[i], self.layers[i + 1], self.x, o,
                                                 self.cos, self.sin)
            return q, k, v
        self.x = post_attention(self.cfg, self.layers[i], self.x, o)  # [T, dim]
        return None


def run_layers(weights: SliceWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               attend: Attend) -> torch.Tensor:
    """The layers of a slice, attention by ``attend(layer, q, k, v) -> o`` [T, H, D]
    in turn: x [T, dim] → x [T, dim].

    cos, sin: [T, D] rotary rows of the tokens' positions.
    """
    steps = SliceLayers(weights, x, cos, sin)
    layer, qkv = weights.start, steps.begin()
    while qkv is not None:
        qkv = steps.resume(layer, attend(layer, *qkv))
        layer += 1
    return steps.x


def attend_locally(cache: KVCache, batch: AttentionBatch) -> Attend:
    """``attend`` for :func:`run_layers` on a local cache."""
    return lambda layer, q, k, v: cache.attend(layer, q, k, v, batch)


@torch.inference_mode()
def forward_step(
    weights: SliceWeights,
    cache: KVCache,
    rope: RopeTable,
    input_ids: list[int],
    batch: AttentionBatch,
    sample_rows: list[int],
) -> torch.Tensor:
    """All layers of a full model for one micro-batch step.

    input_ids: T tokens laid out as ``batch`` describes → logits [len(sample_rows), V].
    """
    if not (weights.is_first and weights.is_last):
        raise ValueError("forward_step needs the weights of the whole model")
    ids = torch.tensor(input_ids, dtype=torch.long, device=weights.device)  # [T]
    cos, sin = rope.at(batch.positions.to(weights.device), batch.max_position)  # [T, D] each
    x = run_layers(weights, embed(weights, ids), cos, sin, attend_locally(cache, batch))  # [T, dim]
    rows = torch.tensor(sample_rows, dtype=torch.long, device=x.device)
    return head(weights, x[rows])  # [N, V]
