"""FlowCut (Tong et al., NeurIPS 2025, arXiv 2505.19536): progressive pruning inside the vision tower
by the information flow from the CLS token, accumulated over the tower's layers.

The tower runner (`visprune.models.vision`) calls the pure functions here layer by layer; the
registered method only hands on what the tower kept. Per layer l, from that layer's normalised input:
- a: the CLS query's attention over the patches (softmax over CLS + patches, heads averaged);
- s: the CLS token's value similarity over the patches (per head softmax of v_cls . v_j over CLS +
  patches, unscaled, heads averaged);
- |v|: the L1 norm of each patch's head-averaged value vector;
- the layer score S = (a / sum a + s / sum s) * |v|, and the flow F = S at the first layer, then
  F = (F + S) / 2 at every later one.
After layer l, when the layers left before the feature layer (r = f - l - 2 for LLaVA's feature
layer hidden_states[f]) are an even number, the patches with the highest flow are kept: N - p of them,
p = round((N - T) / sqrt(r) * (1 - rho^2)), rho = the entropy of a / sum a divided by ln N, and
exactly T at r = 0 (never fewer than T). So the tower's later layers, the feature layer included,
run on fewer tokens; nothing is merged, the CLS token is always kept, and the kept patches stay in
spatial order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import Placement, Reduction, SignalRequest
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_count, check_features, check_tensor
from visprune.methods.registry import register


def check_options(*, budget: Any) -> None:
    """FlowCut's option: a budget >= 1 (the bound against N needs the data)."""
    check_count(budget, "budget", 1)


def prune_layers(feature_layer: int) -> dict[int, int]:
    """{layer: layers left r} of the layers after which the tower prunes, for LLaVA's feature layer
    `feature_layer` (an index into hidden_states, so layers 0..feature_layer - 1 produce it): r =
    feature_layer - layer - 2, pruning where r is even and >= 0 (for CLIP ViT-L's 24 layers and
    hidden_states[-2]: layers 1, 3, ..., 21)."""
    last = feature_layer - 2
    return {layer: last - layer for layer in range(last, -1, -2)}


def layer_scores(attention: Tensor, semantic: Tensor, value_norm: Tensor, valid: Tensor) -> Tensor:
    """[B, N] float32 S = (a / sum a + s / sum s) * |v| over the valid patches (0 elsewhere)."""
    a = attention.float() * valid
    s = semantic.float() * valid
    total = lambda x: x.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # noqa: E731
    return (a / total(a) + s / total(s)) * value_norm.float() * valid


def flow_terms(q_cls: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(the layer score S [B, N], the CLS attention a [B, N]) in float32 from one layer's CLS query
    [B, H, 1, d], keys and values [B, H, 1 + N, d] (CLS first); padded patches (not `valid` [B, N]) take no
    part and score 0. Left unfused on purpose: a compiled call costs ~0.6-1 ms of host time per layer with
    dynamic shapes, more than the ~0.2 ms of GPU time fusing saves (profiled on an H200, docs/bench)."""
    q, k, v = q_cls.float(), keys.float(), values.float()
    padded = ~torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)[:, None, None, :]
    attention = ((q @ k.transpose(-1, -2)) * scale).masked_fill(padded, float("-inf")).softmax(-1)
    semantic = (v[:, :, :1] @ v.transpose(-1, -2)).masked_fill(padded, float("-inf")).softmax(-1)
    a = attention[:, :, 0, 1:].mean(dim=1)
    s = semantic[:, :, 0, 1:].mean(dim=1)
    value_norm = v.mean(dim=1)[:, 1:].abs().sum(dim=-1)
    return layer_scores(a, s, value_norm, valid), a


def prune_counts(attention: Tensor, valid: Tensor, target: int, remaining: int) -> Tensor:
    """[B] long: the patches each image keeps after a pruning layer with `remaining` layers left (r).

    N = the image's valid patches; r = 0 keeps `target`; otherwise N - p with
    p = round((N - T) / sqrt(r) * (1 - rho^2)) (round half to even, as torch.round), rho = H / ln N and
    H the entropy of the attention normalised over the valid patches (0 ln 0 = 0); never fewer than T.
    """
    n = valid.sum(dim=1)
    if remaining == 0:
        return torch.full_like(n, target)
    p = attention.float() * valid
    p = p / p.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(dim=1)
    rho = entropy / n.float().log().clamp(min=torch.finfo(torch.float32).tiny)
    pruned = ((n - target).float() / math.sqrt(remaining) * (1 - rho.square())).round().long()
    return torch.maximum(n - pruned, torch.full_like(n, target))


def keep_top(flow: Tensor, valid: Tensor, counts: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """(positions [B, K] of the `counts` [B] valid patches of highest flow, in ascending position order,
    padded with the image's last kept position; their validity [B, K]), K = `width`, which must be
    max(counts) (read from the device when not given). Ties go to the lower position."""
    k = int(counts.max()) if width is None else width
    ranked = flow.float().masked_fill(~valid, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    top = ranked[:, :k]
    valid_out = torch.arange(k, device=flow.device) < counts.unsqueeze(1)
    ordered = top.masked_fill(~valid_out, flow.shape[1]).sort(dim=1).values  # padding sorts last
    last = ordered.gather(1, (counts - 1).unsqueeze(1))
    return torch.where(valid_out, ordered, last), valid_out


@register(
    "flowcut",
    description="FlowCut: progressive pruning inside the CLIP tower by the information flow from the CLS token "
    "(attention, value similarity and value norm, accumulated over layers; fixed K)",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {"kept": SignalRequest("flowcut", keep=o["budget"])},
    check=check_options,
    budget_rule=TOKENS,
    published_attention="vision",
)
def flowcut(
    features: Tensor,
    *,
    kept: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
) -> list[Reduction]:
    """The tokens the tower kept: features [B, K, C] are the feature layer's rows of the K = `budget`
    patches that survived the tower's progressive pruning (`visprune.models.vision` runs it with this
    module's functions), kept [B, K] their original patch indices, ascending; grid the dense patch grid
    (the N of `assignment`; without it N = K, every patch kept).

    Deviations from the official code (TungChintao/FlowCut, LLaVA-1.5): each image's pruning counts are
    its own (the official code prunes every image of a batch by the largest count, so an image's result
    depends on the rest of the batch); the scores are computed in float32 from q, k and v (no attention
    map is materialised, so the tower keeps SDPA); the entropy treats 0 ln 0 as 0 (the official code
    gives NaN there). LLaVA-1.5-class models only: LLaVA-NeXT (FlowCut's per-crop variant with its own
    LLM stage) and towers without a CLS token are refused.

    Options:
        budget: tokens kept per image (default 64), 1 <= budget <= N.
    """
    check_options(budget=budget)
    b, k, _ = check_features(features)
    check_tensor(kept, "kept", (b, k))
    if k != budget:
        raise InputError(f"kept holds {k} tokens per image, but budget={budget}")
    if grid is not None and (len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid)):
        raise InputError(f"grid must be a pair of positive ints (height, width), got {grid!r}")
    n = k if grid is None else grid[0] * grid[1]
    if kept.dtype != torch.long or bool(((kept < 0) | (kept >= n)).any()) or bool((kept.diff(dim=1) <= 0).any()):
        raise InputError(
            f"kept must hold ascending patch indices in [0, {n}) per image (N = the grid's patches; pass grid "
            "when the tower pruned)"
        )
    slots = torch.arange(k, device=features.device).expand(b, k)
    assignment = torch.full((b, n), -1, dtype=torch.long, device=features.device).scatter_(1, kept, slots)
    return [
        Reduction(features=f, sources=s, assignment=a)
        for f, s, a in zip(features.unbind(0), kept.unbind(0), assignment.unbind(0), strict=True)
    ]
