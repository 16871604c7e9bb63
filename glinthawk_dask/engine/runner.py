"""Run one micro-batch step through the model on local weights and a local KV cache.

This composes the tier-1 ops and the tier-2 cache exactly as the distributed pipeline
does, in one process: it is the single-process baseline and the correctness oracle.
"""

from __future__ import annotations

import torch

from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.ops import RopeTable, embed, head, post_attention, post_pre_attention, pre_attention
from ..model.weights import SliceWeights

__all__ = ["forward_step", "run_layers"]


def run_layers(
    weights: SliceWeights,
    cache: KVCache,
    batch: AttentionBatch,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """The layers of a slice, attention on a local cache: x [T, dim] → x [T, dim].

    cos, sin: [T, D] rotary rows of the tokens' positions.
    """
    cfg, layers = weights.config, weights.layers
    q, k, v = pre_attention(cfg, layers[0], x, cos, sin)
    for i, layer in enumerate(layers):
        o = cache.attend(weights.start + i, q, k, v, batch).to(x.dtype)  # [T, H, D]
        if i + 1 < len(layers):
            x, q, k, v = post_pre_attention(cfg, layer, layers[i + 1], x, o, cos, sin)
        else:
            x = post_attention(cfg, layer, x, o)
    return x


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
    x = run_layers(weights, cache, batch, embed(weights, ids), cos, sin)  # [T, dim]
    rows = torch.tensor(sample_rows, dtype=torch.long, device=x.device)
    return head(weights, x[rows])  # [N, V]
