"""FlowCut (Tong et al., NeurIPS 2025, arXiv 2505.19536): progressive pruning inside the vision tower
by the information flow, accumulated over the tower's layers.

The tower runners (`visprune.models.vision` for LLaVA's CLIP tower, the Qwen-VL adapters with
`visprune.models.qwen_tower`) call the pure functions here layer by layer; the registered method only
hands on what the tower kept.

CLIP tower (CLS token; LLaVA-1.5). Per layer l, from that layer's normalised input:
- a: the CLS query's attention over the patches (softmax over CLS + patches, heads averaged);
- s: the CLS token's value similarity over the patches (per head softmax of v_cls . v_j over CLS +
  patches, unscaled, heads averaged);
- |v|: the L1 norm of each patch's head-averaged value vector;
- the layer score S = (a / sum a + s / sum s) * |v|, and the flow F = S at the first layer, then
  F = (F + S) / 2 at every later one (`accumulate`).
After layer l, when the layers left before the feature layer (r = f - l - 2 for LLaVA's feature
layer hidden_states[f]) are an even number, the patches with the highest flow are kept: N - p of them,
p = round((N - T) / sqrt(r) * (1 - rho^2)), rho = the entropy of a / sum a divided by ln N, and
exactly T at r = 0 (never fewer than T). So every later layer attends over the kept patches only, and
the feature layer runs on the T kept ones; nothing is merged, the CLS token is always kept, and the kept
patches stay in spatial order. (visprune's CLIP runner, `visprune.models.vision`, masks the dropped
patches out of the attention until the last cut instead of removing their rows, so that the tower pass
needs no count on the host and replays from one CUDA graph: the same result, at about the dense tower's
GPU cost until that cut.)

Qwen-VL towers (no CLS token; the official FlowCut_Qwen code). Per block, from that block's q and k
(after the vision RoPE) and v of the image's tokens still running (`relation_terms`):
- a global query per image and head, the mean of the image's patch queries;
- a: its attention over the image's patches, softmax(q_mean . k_j / sqrt(d)), heads averaged;
- the block score S = a * |v| (no value-similarity term, as the official Qwen code);
and the same flow, counts and selection as above, on MERGE UNITS instead of patches: the 2x2 patch
groups that the merger turns into one LLM token (`unit_sums`: a unit's attention and score are the SUMS
over its 4 patches, so the unit attention is a distribution over the image's units; the mean would
rank and count identically, every unit having 4 patches). N and T count units (T = the LLM tokens
per image). The pruning points are after the blocks with an even number r of blocks left, the last
block included (r = 0: exactly T units; `prune_schedule(depth - 1)`), as the official code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import Placement, Reduction, SignalRequest
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_count, check_features, check_on_device, check_tensor
from visprune.methods.flowcut_keys import key_terms
from visprune.methods.registry import register


def check_options(*, budget: Any) -> None:
    """FlowCut's option: a budget >= 1 (the bound against N needs the data)."""
    check_count(budget, "budget", 1)


def prune_schedule(last: int) -> dict[int, int]:
    """{layer: r} of the layers after which the tower prunes when its last pruning layer is `last`: r =
    last - layer (the layers left to that point), every layer where r is even and >= 0 (r = 0 prunes to
    the target). Qwen-VL towers of D blocks: last = D - 1 (the merger reads the last block's output)."""
    return {layer: last - layer for layer in range(last, -1, -2)}


def prune_layers(feature_layer: int) -> dict[int, int]:
    """`prune_schedule` for LLaVA's feature layer `feature_layer` (an index into hidden_states, so layers
    0..feature_layer - 1 produce it): r = feature_layer - layer - 2, as the official LLaVA code (for CLIP
    ViT-L's 24 layers and hidden_states[-2]: layers 1, 3, ..., 21)."""
    return prune_schedule(feature_layer - 2)


def accumulate(flow: Tensor | None, score: Tensor) -> Tensor:
    """The flow after a layer with score `score`: the score itself at the first layer (`flow` None), then
    the mean of the flow so far and the score."""
    return score if flow is None else (flow + score) / 2


def flow_terms(q_cls: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(the layer score S [B, N], the CLS attention a [B, N]) in float32 from one layer's CLS query
    [B, H, 1, d], keys and values [B, H, 1 + N, d] (CLS first); the patches that are not `valid` [B, N]
    take no part in either softmax (wherever they are) and score 0.

    The two softmaxes run as one over the stacked logits. Half-precision CUDA inputs are multiplied as
    they are, on the tensor cores with float32 results (a product of two half values is exact in float32);
    the value norm is the head mean taken in float32 straight from them. No float32 copy of k or v is made:
    those copies were most of FlowCut's extra GPU time in the tower (docs/bench)."""
    b = keys.shape[0]
    logits = torch.stack([_dots(keys, q_cls), _dots(values, values[:, :, :1])], dim=1)  # [B, 2, H, 1 + N]
    logits[:, 0] *= scale
    padded = ~torch.cat([valid.new_ones(b, 1), valid], dim=1)
    shares = logits.masked_fill_(padded[:, None, None], float("-inf")).softmax(-1)[..., 1:].mean(dim=2)  # [B, 2, N]
    both = shares / shares.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    value_norm = values[:, :, 1:].mean(dim=1, dtype=torch.float32).abs().sum(dim=-1)
    return both.sum(dim=1) * value_norm, shares[:, 0]


def _dots(x: Tensor, row: Tensor) -> Tensor:
    """[B, H, T] float32: each row of x [B, H, T, d] dotted with its head's `row` [B, H, 1, d].

    Half-precision CUDA inputs go to the tensor cores with float32 results. Where x is the head split of
    one [B, T, H * d] projection (as a layer's q, k, v are), that projection is multiplied as it lies with
    the block-diagonal matrix of the rows [B, H * d, H]: one product per image, without a copy of x."""
    b, heads, t, width = x.shape
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return (x.float() @ row.float().transpose(-1, -2)).squeeze(-1)
    if x.transpose(1, 2).is_contiguous():
        eye = torch.eye(heads, dtype=x.dtype, device=x.device)
        blocks = (row.reshape(b, heads, width, 1) * eye.unsqueeze(1)).view(b, heads * width, heads)
        projection = x.transpose(1, 2).reshape(b, t, heads * width)
        return torch.bmm(projection, blocks, out_dtype=torch.float32).transpose(1, 2)
    columns = row.reshape(b * heads, 1, width).transpose(1, 2)
    return torch.bmm(x.reshape(b * heads, t, width), columns, out_dtype=torch.float32).view(b, heads, t)


def prune_counts(attention: Tensor, valid: Tensor, target: int | Tensor, remaining: int | Tensor) -> Tensor:
    """[B] long: the tokens (patches, or Qwen-VL merge units) each image keeps after a pruning layer with
    `remaining` layers left (r); `target` T is one int or one per image ([B] long).

    N = the image's valid tokens; r = 0 keeps T; otherwise N - p with
    p = round((N - T) / sqrt(r) * (1 - rho^2)) (round half to even, as torch.round), rho = H / ln N and
    H the entropy of the attention normalised over the valid tokens (0 ln 0 = 0); never fewer than T.
    `remaining` may also be a 0-d float32 tensor holding sqrt(r) for an r > 0: compiled code then takes one
    version for every pruning layer instead of one per value of r.
    """
    n = valid.sum(dim=1)
    # an int target is filled in on the device (no copy from the host, so a CUDA graph can capture it)
    target = torch.full_like(n, target) if isinstance(target, int) else target.to(n.dtype).expand_as(n)
    if isinstance(remaining, int) and remaining == 0:
        return target.clone()
    root = remaining if isinstance(remaining, Tensor) else math.sqrt(remaining)
    p = attention.float() * valid
    p = p / p.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(dim=1)
    rho = entropy / n.float().log().clamp(min=torch.finfo(torch.float32).tiny)
    pruned = ((n - target).float() / root * (1 - rho.square())).round().long()
    return torch.maximum(n - pruned, target)


def relation_terms(
    q: Tensor, k: Tensor, v: Tensor, image: Tensor, counts: Tensor, scale: float, taking_part: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(the block score S [T], the relation attention a [T]) in float32 per token of a packed sequence,
    FlowCut's terms on a tower without CLS: q, k (RoPE applied) and v [T, H, d] of the tokens of
    `counts.shape[0]` images, `image` [T] long the image of each token and `counts` [images] long the tokens
    of each image taking part (which the caller knows per pruning point: counting them here was a reduction
    of 41k rows into 8 sums, a slow kernel, in every block). Per image and head the global query is the mean
    of the image's queries; a_j = softmax over the image's tokens of q_mean . k_j * scale, averaged over the
    heads; S_j = a_j * |mean over heads of v_j|_1. One query row per image and head: no attention map.
    `taking_part` [T] bool: the tokens counted (default all); the others (pruned, still in the sequence)
    are in no mean or softmax and score 0 (their values must be finite: they are multiplied by 0). q and k
    may be `qwen_tower.widen`ed (wider than v) by a key bias that is 0 for every token taking part: the
    terms are then the same, read without a copy of the unwidened columns.

    The per-image sums are products with the [images, T] membership matrix (half-precision CUDA inputs on
    the tensor cores with float32 results, exact products): no scatter onto a few [images, H] rows, whose
    atomic adds contend, and no host synchronisation. Each key meets its own image's mean query, and the
    value norms are taken, in one read of k and v (`flowcut_keys.key_terms`, a Triton kernel on a GPU)."""
    t, heads, width = q.shape
    images = counts.shape[0]
    member = image.unsqueeze(0) == torch.arange(images, device=image.device).unsqueeze(1)  # [images, T]
    if taking_part is not None:
        member &= taking_part.unsqueeze(0)
    rows = counts.clamp(min=1).float()
    sums = _member_sums(member, q.reshape(t, heads * width)).view(images, heads, width)[..., : v.shape[2]]
    dots, value_norms = key_terms(k, v, sums / rows[:, None, None], image)
    logits = dots * scale
    peaks = logits.unsqueeze(2).masked_fill(~member.t().unsqueeze(1), float("-inf")).amax(dim=0)  # [H, images]
    weights = (logits - peaks.t()[image]).exp_()  # [T, H]
    if taking_part is not None:
        weights.masked_fill_(~taking_part.unsqueeze(1), 0)  # (a pruned key's logit may exceed the peak)
    total = _member_sums(member, weights)  # [images, H]
    attention = (weights / total[image]).mean(dim=1)
    return attention * value_norms, attention


def unit_terms(
    q: Tensor, k: Tensor, v: Tensor, unit_image: Tensor, counts: Tensor, scale: float, taking_part: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`relation_terms` summed per merge unit (`unit_sums`): FlowCut's (score, attention) [U] per unit of a
    Qwen-VL block, q, k, v [4U, H, d] in units of 4 consecutive rows, `unit_image` and `taking_part` [U]
    per unit, `counts` [images] the units of each image taking part. The Qwen-VL adapters run it compiled
    (`graphs.fused`): as written it is some thirty small kernels per block, whose launches, not the GPU,
    set the pace of FlowCut's tower."""
    unit = q.shape[0] // unit_image.shape[0]  # patches per unit (4: Qwen-VL's 2x2 merge)
    image = unit_image.repeat_interleave(unit)
    rows = None if taking_part is None else taking_part.repeat_interleave(unit)
    score, attention = relation_terms(q, k, v, image, counts * unit, scale, rows)
    return unit_sums(score, unit), unit_sums(attention, unit)


def _member_sums(member: Tensor, x: Tensor) -> Tensor:
    """[images, C] float32: the sums of the rows of x [T, C] per image (`member` [images, T] bool)."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(member.to(x.dtype).unsqueeze(0), x.unsqueeze(0), out_dtype=torch.float32).squeeze(0)
    return member.float() @ x.float()


def unit_sums(x: Tensor, unit: int = 4) -> Tensor:
    """[T / unit]: the sums of `x` [T] over consecutive groups of `unit` tokens (a Qwen-VL merge unit's 4
    patches, which the tower keeps consecutive)."""
    return x.view(-1, unit).sum(dim=1)


def keep_top(flow: Tensor, valid: Tensor, counts: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """(positions [B, K] of the `counts` [B] valid patches of highest flow, in ascending position order,
    padded with the image's last kept position; their validity [B, K]), K = `width`, which must be
    max(counts) (read from the device when not given). Ties go to the lower position."""
    k = int(counts.max()) if width is None else width
    top = _ranked(flow, valid)[:, :k]
    valid_out = torch.arange(k, device=flow.device) < counts.unsqueeze(1)
    ordered = top.masked_fill(~valid_out, flow.shape[1]).sort(dim=1).values  # padding sorts last
    last = ordered.gather(1, (counts - 1).unsqueeze(1))
    return torch.where(valid_out, ordered, last), valid_out


def _ranked(flow: Tensor, valid: Tensor) -> Tensor:
    """[B, N]: each image's token positions by descending flow, the valid ones first (ties to the lower
    position)."""
    return flow.float().masked_fill(~valid, float("-inf")).sort(dim=1, descending=True, stable=True).indices


def top_mask(flow: Tensor, valid: Tensor, counts: Tensor) -> Tensor:
    """[B, N] bool: the `counts` [B] valid tokens of highest flow per image, the tokens `keep_top` keeps (ties
    to the lower position), marked where they are instead of gathered: the layout keeps its width, which
    the host knows without reading the counts."""
    order = _ranked(flow, valid)
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)
    return rank < counts.unsqueeze(1)


@register(
    "flowcut",
    description="FlowCut: progressive pruning inside the vision tower by the information flow (CLIP: from the CLS "
    "token's attention, value similarity and value norm; Qwen-VL: from the mean query's attention and the value "
    "norm, on whole 2x2 merge units), accumulated over layers; fixed K",
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
    tokens that survived the tower's progressive pruning (the adapters run it with this module's
    functions), kept [B, K] their original indices, ascending; grid the dense grid (the N of
    `assignment`; without it N = K, every token kept). On LLaVA-1.5 a token is a CLIP patch; on the
    Qwen-VL family it is a merged token (a 2x2 merge unit), on the merged grid (t * h/2, w/2).

    Deviations from the official code (TungChintao/FlowCut, LLaVA-1.5): each image's pruning counts are
    its own (the official code prunes every image of a batch by the largest count, so an image's result
    depends on the rest of the batch); the scores are computed in float32 from q, k and v (no attention
    map is materialised, so the tower keeps SDPA); the entropy treats 0 ln 0 as 0 (the official code
    gives NaN there); the dropped patches are masked out of the later layers' attention rather than
    removed until the last cut (the same result; module docstring). LLaVA-NeXT (FlowCut's per-crop
    variant with its own LLM stage) and CLIP-less LLaVA towers (SigLIP) are refused.

    On a tower without CLS (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) it computes, at every vision block, the relation
    attention a of the image's mean query over its tokens and the score a * |v|_1 (q, k after the vision RoPE, heads
    averaged; module docstring), accumulates the flow over blocks, and after the blocks with an even number r of
    blocks left (the last one included, r = 0) keeps the merge units of highest flow, N - p of them (exactly
    `budget` at r = 0); the blocks after a pruning point attend over the kept units only (the dropped ones are
    masked out of their attention, and their rows are removed two blocks later, when the host has the kept set
    without waiting for the device), each kept unit within its own image (or Qwen2.5-VL window), with its own RoPE
    angle and dense M-RoPE position; Qwen3-VL's DeepStack levels are those of the final kept units. Deviations from
    the official Qwen code (FlowCut_Qwen, modeling_qwen2_vl_flowcut.py, Qwen2-VL only): it prunes single PATCHES
    down to 4 x the target and lets the 2x2 merger merge whatever four survivors end up adjacent; here whole merge
    units are pruned (a unit's attention and score: the sums over its 4 patches; the counts' N, T and entropy are
    over units), so every LLM token is still merged from its own 2x2 patches, and each image ends with exactly
    `budget` tokens in the tower (the official code prunes again inside the LLM at layer 1, to the target, by its
    own LLM-side score: not done here; compose an LLM-side method for that); the global query, softmax and entropy
    are per image (the official code runs batch 1 and takes them over the whole packed sequence, and keeps stale
    cu_seqlens after pruning); the flow keeps updating on every block while any image of the batch is above its
    target (the official code stops once its one sequence reaches it; an image at its target keeps all its tokens
    either way, so results are the same); Qwen2.5-VL (no official code) scores every block over the whole image,
    windowed blocks included, and each kept unit keeps attending within its window; Qwen3-VL (no official code
    either) forms each DeepStack level from its block's output on the units running there, taken at the final kept
    units; the scores are computed in float32 (the official code: softmax in float32, then the model's dtype) with
    ties to the lower unit index (torch.topk's order is unspecified); the entropy's 1e-7 inside the log is dropped
    (0 ln 0 = 0). As every method on Qwen-VL, a budget above an image's merged tokens keeps all of them (with a
    UserWarning); `tower_layer` is refused (flowcut chooses its own pruning blocks).

    Options:
        budget: tokens kept per image (default 64), 1 <= budget <= N (LLaVA: an error above N; Qwen-VL:
            an image with fewer merged tokens keeps all of them, with a warning).
    """
    check_options(budget=budget)
    b, k, _ = check_features(features)
    check_tensor(kept, "kept", (b, k))
    if k != budget:
        raise InputError(f"kept holds {k} tokens per image, but budget={budget}")
    if grid is not None and (len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid)):
        raise InputError(f"grid must be a pair of positive ints (height, width), got {grid!r}")
    n = k if grid is None else grid[0] * grid[1]
    wrong = (
        f"kept must hold ascending patch indices in [0, {n}) per image (N = the grid's patches; pass grid when the "
        "tower pruned)"
    )
    if kept.dtype != torch.long:
        raise InputError(f"{wrong}, as torch.long; got {kept.dtype}")
    check_on_device(~(((kept < 0) | (kept >= n)).any() | (kept.diff(dim=1) <= 0).any()), wrong)
    slots = torch.arange(k, device=features.device).expand(b, k)
    # clamped: a check deferred to the caller's verify must not fail as an index error on the way there
    places = kept.clamp(0, n - 1)
    assignment = torch.full((b, n), -1, dtype=torch.long, device=features.device).scatter_(1, places, slots)
    return [
        Reduction(features=f, sources=s, assignment=a)
        for f, s, a in zip(features.unbind(0), kept.unbind(0), assignment.unbind(0), strict=True)
    ]
