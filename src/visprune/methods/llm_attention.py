"""Shared pieces of the in-LLM stages: attention rows from q/k without the full map, input checks,
and per-row top-k selection by ranking.

Every in-LLM stage receives, for ONE decoder layer, queries q [B, H, S, d] and keys k [B, H_kv, S, d]
(RoPE applied, as the layer's attention sees them), the layer's input hidden states [B, S, C] and a
`TokenLayout` of the current (possibly already pruned) padded sequence. Only the query rows a method
needs are multiplied against the keys: [B, H, R, S] instead of [B, H, S, S].
"""

from __future__ import annotations

from fractions import Fraction
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import TokenLayout
from visprune.methods.checks import check_ratio, check_tensor

__all__ = [
    "assemble_keep",
    "attention_rows",
    "check_hidden",
    "check_int",
    "check_layers",
    "check_layout_arg",
    "check_qk",
    "check_ratios",
    "check_stage",
    "last_token_rows",
    "mean_received_attention",
    "query_or_last",
    "ratio_count",
    "rows_from_mask",
    "top_count_mask",
]


def rows_from_mask(mask: Tensor, bound: int | None = None) -> tuple[Tensor, Tensor]:
    """The positions of the True entries of `mask` [B, S] as padded rows.

    Returns (rows [B, R] long, valid [B, R] bool) with R = max(1, max_b count_b), or max(1, `bound`) when the
    caller passes an upper bound on the counts that it knows on the host (`TokenLayout.text_rows`): row b
    lists its True positions in ascending order, followed by filler indices whose `valid` is False.
    Without a bound, reading R costs one device-to-host synchronisation (the row count must be a Python int).
    """
    counts = mask.sum(dim=1)
    read = bound is None and mask.shape[0] > 0
    r = min(max(1, int(counts.max()) if read else bound or 0), mask.shape[1])
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :r]
    valid = torch.arange(r, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return order, valid


def attention_rows(
    q: Tensor,
    k: Tensor,
    rows: Tensor,
    attention_mask: Tensor,
    *,
    row_valid: Tensor | None = None,
    positions: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention probabilities of the query rows `rows` against every key: [B, H, R, S], float32.

    softmax_j(q_r . k_j * scale) over the keys j a causal decoder lets row r see: real keys
    (`attention_mask` [B, S] True) at a position <= the row's position. Positions are `positions`
    [B, S] (e.g. position ids; kept tokens keep their original ids) or, by default, the index in the
    sequence; both orders agree for left- or right-padded batches and for pruned sequences.
    q: [B, H, S, d]; k: [B, H_kv, S, d] with H % H_kv == 0 (grouped-query attention: query head h
    reads key head h // (H / H_kv), as transformers' repeat_kv); rows: [B, R] long indices into S.
    row_valid: [B, R] bool, rows marked False (and rows that can see no key) come back as all zeros.
    scale: defaults to d ** -0.5.
    Only the R selected query rows are gathered and multiplied: O(B H R S d), never S x S.
    """
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    if h % h_kv:
        raise InputError(f"q has {h} heads, not a multiple of k's {h_kv} key/value heads")
    r = rows.shape[1]
    qr = q.gather(2, rows.view(b, 1, r, 1).expand(b, h, r, d)).float()  # [B, H, R, d]
    qr = qr.view(b, h_kv, h // h_kv, r, d)
    kf = k.float().unsqueeze(2)  # [B, H_kv, 1, S, d]; broadcast over the query heads of a group
    logits = (qr @ kf.transpose(-1, -2)).view(b, h, r, s)
    logits = logits * (d**-0.5 if scale is None else scale)
    pos = positions if positions is not None else torch.arange(s, device=q.device).expand(b, s)
    row_pos = pos.gather(1, rows)  # [B, R]
    allowed = attention_mask.unsqueeze(1) & (pos.unsqueeze(1) <= row_pos.unsqueeze(2))  # [B, R, S]
    if row_valid is not None:
        allowed = allowed & row_valid.unsqueeze(2)
    allowed = allowed.unsqueeze(1)  # [B, 1, R, S]
    logits = logits.masked_fill(~allowed, float("-inf"))
    logits = logits.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # rows seeing nothing: no NaN
    return logits.softmax(dim=-1) * allowed


def mean_received_attention(
    q: Tensor,
    k: Tensor,
    row_mask: Tensor,
    attention_mask: Tensor,
    *,
    rows: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """[B, S]: attention each key receives, averaged over heads and over the query rows `row_mask`.

    row_mask: [B, S] bool, the query rows per sample (ragged). `rows` may pass a precomputed
    `rows_from_mask(row_mask)` (e.g. `(last_index[:, None], ones)` to avoid the host sync).
    A sample without query rows gets all zeros.
    """
    idx, valid = rows if rows is not None else rows_from_mask(row_mask)
    probs = attention_rows(q, k, idx, attention_mask, row_valid=valid).mean(dim=1)  # [B, R, S]
    w = valid.float()
    return (probs * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1.0)


def top_count_mask(scores: Tensor, candidates: Tensor, counts: Tensor) -> Tensor:
    """[B, S] bool: the `counts` [B] highest-scoring candidates of each row (per-row k by ranking).

    Ties break towards the lower index (stable sort), so the result is deterministic. Counts above
    the number of candidates keep all candidates.
    """
    masked = torch.where(candidates, scores.float(), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return candidates & (rank < counts.unsqueeze(1))


def _fraction(value: float) -> Fraction:
    return Fraction(value).limit_denominator(1_000_000)


def ratio_count(n: Tensor, ratio: float | Fraction) -> Tensor:
    """floor(n * ratio) per sample, at least 1 where n >= 1 (0 where n == 0): [B] long.

    Exact integer arithmetic on the ratio as a fraction (0.29 counts as 29/100), so the count does
    not depend on float rounding or on the device.
    """
    f = ratio if isinstance(ratio, Fraction) else _fraction(ratio)
    count = (n.long() * f.numerator) // f.denominator
    return torch.minimum(count.clamp(min=1), n.long())


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """An int (not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_stage(stage: Any, n_stages: int, method: str) -> int:
    """The stage index of a (multi-stage) method: an int in [0, n_stages)."""
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < n_stages:
        raise InputError(f"{method}: stage must be an int in [0, {n_stages}), got {stage!r}")
    return stage


def check_layout_arg(layout: Any) -> tuple[int, int]:
    if not isinstance(layout, TokenLayout):
        raise InputError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    b, s = layout.attention_mask.shape
    return b, s


def check_qk(q: Any, k: Any, layout: Any) -> tuple[int, int]:
    """q [B, H, S, d] and k [B, H_kv, S, d] consistent with layout [B, S]; H % H_kv == 0. -> (B, S)."""
    b, s = check_layout_arg(layout)
    if q is None or k is None:
        raise InputError("this method needs q and k (the decoder layer's queries/keys with RoPE applied)")
    check_tensor(q, "q", (b, None, s, None))
    check_tensor(k, "k", (b, None, s, q.shape[-1]))
    if not q.is_floating_point() or not k.is_floating_point():
        raise InputError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    if min(q.shape[1], k.shape[1], q.shape[-1]) < 1 or q.shape[1] % k.shape[1]:
        raise InputError(
            f"q has {q.shape[1]} heads and k {k.shape[1]}: the query heads must be a positive multiple "
            "of the key/value heads (grouped-query attention)"
        )
    if q.device != layout.attention_mask.device or k.device != q.device:
        raise InputError("q, k and the layout masks must be on the same device")
    return b, s


def check_hidden(hidden: Any, layout: Any) -> tuple[int, int]:
    """hidden [B, S, C] consistent with layout [B, S]. -> (B, S)."""
    b, s = check_layout_arg(layout)
    if hidden is None:
        raise InputError("this method needs hidden (the decoder layer's input hidden states [B, S, C])")
    check_tensor(hidden, "hidden", (b, s, None))
    if not hidden.is_floating_point() or hidden.shape[-1] < 1:
        raise InputError(f"hidden must be a floating tensor [B, S, C] with C >= 1, got {hidden.dtype}")
    if hidden.device != layout.attention_mask.device:
        raise InputError("hidden and the layout masks must be on the same device")
    return b, s


def check_ratios(values: Any, name: str) -> tuple[float, ...]:
    """A non-empty tuple of ratios in (0, 1]."""
    if not isinstance(values, tuple) or not values:
        raise InputError(f"{name} must be a non-empty tuple of numbers in (0, 1], got {values!r}")
    return tuple(check_ratio(v, f"{name}[{i}]") for i, v in enumerate(values))


def check_layers(values: Any, name: str, minimum: int = 0) -> tuple[int, ...]:
    """A non-empty, strictly increasing tuple of decoder layer indices >= minimum."""
    if not isinstance(values, tuple) or not values:
        raise InputError(f"{name} must be a non-empty tuple of ints, got {values!r}")
    for i, v in enumerate(values):
        check_int(v, f"{name}[{i}]", minimum)
    if any(a >= b for a, b in pairwise(values)):
        raise InputError(f"{name} must be strictly increasing, got {values!r}")
    return values


def last_token_rows(layout: TokenLayout) -> tuple[Tensor, Tensor]:
    """Rows for the last real token of each sample ([B, 1] index, [B, 1] valid), no host sync."""
    last = layout.last_index
    return last.clamp(min=0).unsqueeze(1), (last >= 0).unsqueeze(1)


def query_or_last(layout: TokenLayout) -> Tensor:
    """[B, S] the query tokens; a sample without any uses its last real token instead."""
    s = layout.attention_mask.shape[1]
    last = layout.last_index
    one_hot = torch.arange(s, device=last.device).unsqueeze(0) == last.unsqueeze(1)
    has_query = (layout.query & layout.attention_mask).any(dim=1, keepdim=True)
    return torch.where(has_query, layout.query & layout.attention_mask, one_hot & layout.attention_mask)


def assemble_keep(layout: TokenLayout, keep_visual: Tensor) -> Tensor:
    """Final keep mask: real non-visual tokens, plus the kept visual ones; padding is False."""
    real = layout.attention_mask
    return real & (~layout.visual | keep_visual)
