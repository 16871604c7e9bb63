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

__all__ = ["forward_step"]


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
    cfg = weights.config
    ids = torch.tensor(input_ids, dtype=torch.long, device=weights.device)  # [T]
    positions = batch.positions.to(weights.device)
    cos, sin = rope.at(positions)  # [T, D] each
    x = embed(weights, ids)  # [T, dim]
    q, k, v = pre_attention(cfg, weights.layers[0], x, cos, sin)
    n = len(weights.layers)
    for i, layer in enumerate(weights.layers):
        o = cache.attend(i, q, k, v, batch).to(x.dtype)  # [T, H, D]
        if i + 1 < n:
            x, q, k, v = post_pre_attention(cfg, layer, weights.layers[i + 1], x, o, cos, sin)
        else:
            x = post_attention(cfg, layer, x, o)
    rows = torch.tensor(sample_rows, dtype=torch.long, device=x.device)
    return head(weights, x[rows])  # [N, V]
