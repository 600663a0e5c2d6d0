"""What visprune needs to know about a Llama-family decoder layer: its q/k with RoPE for scoring.

Shared by every adapter whose language model is Llama-like (Llama, Mistral, Qwen2, Vicuna...):
input_layernorm -> self_attn.{q_proj,k_proj} -> rotary embedding with (cos, sin) from the model; layers
that normalise queries and keys before RoPE (Qwen3: self_attn.q_norm / k_norm) get the same norms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    """The rotation partner of RoPE: (-x2, x1) for the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_qk(
    layer: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], q_rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Queries [B, H, S, d] and keys [B, H_kv, S, d] of a decoder layer for its input `hidden` [B, S, C],
    with rotary position embedding applied exactly as the layer's attention does.

    q_rows: optional [B, R] positions; only those query rows are computed (the rest of q is zeros),
    which saves the full query projection when a method reads a few rows.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, s, _ = x.shape
    d = attn.head_dim
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    k = _heads(attn.k_proj(x), getattr(attn, "k_norm", None), d).transpose(1, 2)
    k = k * cos + rotate_half(k) * sin
    if q_rows is None:
        q = _heads(attn.q_proj(x), getattr(attn, "q_norm", None), d).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k
    take = q_rows.unsqueeze(-1)
    xr = x.gather(1, take.expand(-1, -1, x.shape[-1]))
    qr = _heads(attn.q_proj(xr), getattr(attn, "q_norm", None), d).transpose(1, 2)  # [B, H, R, d]
    index = take.unsqueeze(1).expand(-1, 1, -1, d)
    qr = qr * cos.gather(2, index) + rotate_half(qr) * sin.gather(2, index)
    q = qr.new_zeros(b, qr.shape[1], s, d)
    q.scatter_(2, take.unsqueeze(1).expand(-1, qr.shape[1], -1, d), qr)
    return q, k


def _heads(projected: Tensor, norm: nn.Module | None, head_dim: int) -> Tensor:
    """[B, S, H * d] projections -> [B, S, H, d], through the attention's q/k norm where it has one: per head
    (Qwen3, a norm of width d) or over the whole projection (a norm of width H * d)."""
    b, s, width = projected.shape
    if norm is not None and norm.weight.shape[-1] == width:
        projected = norm(projected)
    heads = projected.view(b, s, -1, head_dim)
    if norm is not None and norm.weight.shape[-1] != width:
        heads = norm(heads)
    return heads
