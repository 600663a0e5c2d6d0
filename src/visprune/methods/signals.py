"""Signals computed from attention projections, without ever materialising a full attention map.

These are the formulas adapters use to turn a layer's q/k into the rows a method asks for; they are
here, in pure tensor code, so tests can check them against a plain attention computation.
"""

from __future__ import annotations

from torch import Tensor

from visprune.errors import InputError
from visprune.methods.checks import check_choice


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, T, C] -> [B, H, T, C/H]."""
    b, t, c = x.shape
    if c % num_heads:
        raise InputError(f"width {c} is not divisible by num_heads={num_heads}")
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)


def cls_attention(q_cls: Tensor, keys: Tensor, num_heads: int, heads: str = "mean") -> Tensor:
    """Attention probabilities from the CLS query to the patch keys: [B, N].

    q_cls: [B, C] the CLS token's query projection; keys: [B, 1 + N, C] key projections with the CLS
    key first. The softmax runs over all 1 + N keys (as in the model) and the CLS column is dropped.
    heads="single" treats the full width C as one head with scale C^-1/2 (PruMerge's official code);
    "mean"/"sum" split into `num_heads` heads with scale (C/H)^-1/2 and average/sum the per-head rows.
    Computed in float32; returns float32.
    """
    check_choice(heads, "heads", ("single", "mean", "sum"))
    if q_cls.dim() != 2 or keys.dim() != 3 or keys.shape[0] != q_cls.shape[0] or keys.shape[2] != q_cls.shape[1]:
        raise InputError(f"q_cls must be [B, C] and keys [B, 1+N, C]; got {tuple(q_cls.shape)} and {tuple(keys.shape)}")
    q = q_cls.float().unsqueeze(1)
    k = keys.float()
    h = 1 if heads == "single" else num_heads
    qh, kh = _split_heads(q, h), _split_heads(k, h)  # [B, H, 1, d], [B, H, 1+N, d]
    probs = ((qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5).softmax(dim=-1)[:, :, 0, 1:]  # [B, H, N]
    return probs.sum(dim=1) if heads == "sum" else probs.mean(dim=1)


def patch_keys(keys: Tensor, num_heads: int, heads: str = "mean", has_cls: bool = True) -> Tensor:
    """Patch keys without the CLS key: [B, N, C] ("single") or head-averaged [B, N, C/H] ("mean").

    keys: [B, 1 + N, C] with the CLS key first, or [B, N, C] when has_cls is False.
    """
    check_choice(heads, "heads", ("single", "mean"))
    k = keys[:, 1:] if has_cls else keys
    if heads == "single":
        return k
    return _split_heads(k, num_heads).mean(dim=1)
