"""What visprune needs to know about a Llama-family decoder layer: its q/k with RoPE for scoring.

Shared by every adapter whose language model is Llama-like (Llama, Mistral, Qwen2, Vicuna...):
input_layernorm -> self_attn.{q_proj,k_proj} -> rotary embedding with (cos, sin) from the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_qk(layer: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Queries [B, H, S, d] and keys [B, H_kv, S, d] of a decoder layer for its input `hidden` [B, S, C],
    with rotary position embedding applied exactly as the layer's attention does."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, s, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, s, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, d).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
