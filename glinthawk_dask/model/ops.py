"""Tier-1 (dense) operations of a Llama layer, over a flat batch of tokens.

A micro-batch is processed as ``T`` tokens laid end to end (prefill chunks of several
sequences and single decode tokens alike); which sequence each token belongs to only
matters to attention (tier 2, :mod:`.attention`).  The functions here are everything
else: embedding, the pre-attention half of a layer (RMSNorm, q/k/v, RoPE), the
post-attention half (output projection, residual, FFN, residual), and the head.

The numerics follow Hugging Face ``LlamaForCausalLM`` (norm in float32, RoPE with
``rotate_half``, residual adds in the same order), so tokens match it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .weights import LayerWeights, SliceWeights

__all__ = [
    "RopeTable",
    "rms_norm",
    "embed",
    "pre_attention",
    "post_attention",
    "post_pre_attention",
    "head",
]


@dataclass
class RopeTable:
    """Precomputed rotary cos/sin for positions ``[0, max_positions)``."""

    cos: torch.Tensor  # [P, D]
    sin: torch.Tensor  # [P, D]

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        max_positions: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "RopeTable":
        d = config.head_dim
        p = config.max_seq_len if max_positions is None else max_positions
        # Same expression as transformers' default rope init, evaluated in float32.
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # [D/2]
        pos = torch.arange(p, dtype=torch.float)  # [P]
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        return cls(emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype))

    def at(self, positions: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for ``positions`` [T] → ([T, D], [T, D]).

        ``max_position`` (the largest of ``positions``, known on the host) spares a
        device-to-host sync for the range check when ``positions`` lives on a GPU.
        """
        if max_position is None and positions.numel():
            max_position = int(positions.max())
        if max_position is not None and max_position >= self.cos.shape[0]:
            raise ValueError(f"position {max_position} is beyond the rotary table ({self.cos.shape[0]})")
        return self.cos[positions], self.sin[positions]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, result cast back to ``x.dtype``.  x: [..., dim]."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, D]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D]
    return x * cos + _rotate_half(x) * sin


def embed(weights: SliceWeights, token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids [T] → hidden states [T, dim]."""
    if weights.embed is None:
        raise ValueError("this slice has no embedding (only the first slice embeds tokens)")
    return F.embedding(token_ids, weights.embed)  # [T, dim]


def pre_attention(
    config: ModelConfig,
    layer: LayerWeights,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm, q/k/v projections and RoPE.

    x: [T, dim]; cos, sin: [T, D] → q [T, H, D], k [T, KVH, D], v [T, KVH, D]
    (q and k rotated).
    """
    t = x.shape[0]
    h = rms_norm(x, layer.attn_norm, config.norm_eps)  # [T, dim]
    qkv = F.linear(h, layer.wqkv)  # [T, (H + 2*KVH) * D]
    q, k, v = qkv.split([config.q_size, config.kv_size, config.kv_size], dim=-1)
    q = _apply_rope(q.view(t, config.n_heads, config.head_dim), cos, sin)  # [T, H, D]
    k = _apply_rope(k.view(t, config.n_kv_heads, config.head_dim), cos, sin)  # [T, KVH, D]
    v = v.reshape(t, config.n_kv_heads, config.head_dim)  # [T, KVH, D]
    return q, k, v


def post_attention(
    config: ModelConfig, layer: LayerWeights, x: torch.Tensor, o: torch.Tensor
) -> torch.Tensor:
    """Output projection + residual, then SwiGLU FFN + residual.

    x: [T, dim] (residual stream), o: [T, H, D] (attention output) → x [T, dim].
    """
    t = x.shape[0]
    x = x + F.linear(o.reshape(t, config.q_size), layer.wo)  # [T, dim]
    h = rms_norm(x, layer.ffn_norm, config.norm_eps)  # [T, dim]
    gate, up = F.linear(h, layer.w_gate_up).chunk(2, dim=-1)  # [T, F] each
    return x + F.linear(F.silu(gate) * up, layer.w_down)  # [T, dim]


def post_pre_attention(
    config: ModelConfig,
    layer: LayerWeights,
    next_layer: LayerWeights,
    x: torch.Tensor,
    o: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dense step: finish ``layer`` and start ``next_layer``.

    x: [T, dim], o: [T, H, D] → (x [T, dim], q [T, H, D], k [T, KVH, D], v [T, KVH, D]).
    """
    x = post_attention(config, layer, x, o)
    return (x, *pre_attention(config, next_layer, x, cos, sin))


def head(weights: SliceWeights, x: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and LM head: x [N, dim] → logits [N, V] (float32)."""
    if weights.lm_head is None or weights.final_norm is None:
        raise ValueError("this slice has no head (only the last slice computes logits)")
    h = rms_norm(x, weights.final_norm, weights.config.norm_eps)  # [N, dim]
    return F.linear(h, weights.lm_head).float()  # [N, V]
