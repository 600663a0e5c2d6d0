"""PruMerge and PruMerge+ (Shang, Cai et al., arXiv 2403.15388), batched.

Both act on the vision tower's output, before the projector:

1. score every patch by the CLS attention `a` [B, N] of the last encoder layer (on a tower without a
   CLS token: the attention each patch receives, averaged over the patch queries of that layer);
2. keep the IQR outliers of `a` (m = #{a > Q3 + 1.5 IQR}, at least 1), i.e. the top-m tokens;
3. PruMerge+ only: add spatially uniform samples, stride max(1, floor(floor(1/r) / 3)) with r = m / N;
4. merge: every kept token p becomes y_p + sum_j a_j y_j over its `neighbors` most key-similar OTHER
   tokens (cosine similarity of the patch keys), and one extra token sum_{j pruned} a_j y_j is appended.

Everything is computed for the whole batch at once; the only host synchronisation is the one that
reads the per-image token counts for the ragged output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import (
    SIGNAL_DOC,
    Placement,
    Reduction,
    SignalRequest,
    check_signal_option,
    score_request,
)
from visprune.methods.checks import check_choice, check_features, check_flag, check_grid, check_tensor
from visprune.methods.padded import padding
from visprune.methods.registry import register

FENCES = ("per-image", "batch")
WEIGHTS = ("unnormalized", "normalized")
ORDERS = ("spatial", "score")
ATTENTIONS = ("single", "mean")

_OPTIONS_DOC = """
    Options:
        fence: "per-image" (default) computes Q1/Q3 of each image's scores, so m is per image (the
            paper's intent); "batch" computes them over the whole batch flattened and gives every image
            m = floor(#outliers in the batch / B), as the official code does (then m depends on the
            batch-mates; use it only to reproduce the official numbers).
        weights: "unnormalized" (default, the official code) adds sum_j a_j y_j to each kept token and
            makes the extra token sum_j a_j y_j; "normalized" divides both sums by their total weight
            sum_j |a_j| (the paper's "weighted average"; the official code has that division commented
            out); all-zero weights average plainly, so the result is finite for any finite input.
        order: "spatial" (default) emits the kept tokens in ascending original index, which suits the
            LLM's positional encoding; "score" emits them as the official code does: the top-m by
            descending score, then (PruMerge+) the uniform samples in ascending index.
        neighbors: how many most key-similar other tokens (kept or pruned) each kept token absorbs;
            default 32 as published; 0 disables the merge. Capped at N - 1.
        extra_token: True (default, official) appends, last, one token summing the pruned tokens
            weighted by their attention (source -1). It is omitted for an image where nothing was
            pruned.
        attention: which attention the adapter computes for the score and which keys it hands over:
            "single" (default, the official code) treats the full-width q/k projections as one head
            (keys of width C); "mean" averages the per-head attention rows and the per-head keys.
        signal: {SIGNAL}
"""


def _with_options_doc(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _OPTIONS_DOC.replace("{SIGNAL}", SIGNAL_DOC)
    return fn


def _signals(o: dict[str, Any]) -> dict[str, SignalRequest]:
    return {
        "cls_attn": score_request(o["signal"], (-1,), o["attention"]),
        "keys": SignalRequest("keys", (-1,), heads="single" if o["attention"] == "single" else "mean"),
    }


def _quantile_of_descending(desc: Tensor, p: float) -> Tensor:
    """[R, 1]: the p-quantile of each row of `desc` [R, L] (sorted descending), linear interpolation.

    Same definition as numpy.percentile's default and torch.quantile(interpolation="linear"):
    position p (L - 1) in ascending order, interpolated between its two neighbours. The positions are
    Python numbers, so no host synchronisation happens.
    """
    last = desc.shape[1] - 1
    pos = p * last
    lo = int(pos)
    hi = min(lo + 1, last)
    below = desc[:, last - lo : last - lo + 1]  # ascending index lo
    above = desc[:, last - hi : last - hi + 1]  # ascending index hi
    return torch.lerp(below, above, pos - lo)


def _outlier_counts_sorted(desc: Tensor, fence: str) -> Tensor:
    if fence == "batch":
        flat = desc.flatten().sort(descending=True).values.unsqueeze(0)
        q1, q3 = _quantile_of_descending(flat, 0.25), _quantile_of_descending(flat, 0.75)
        return (flat > q3 + 1.5 * (q3 - q1)).sum().expand(desc.shape[0])
    q1, q3 = _quantile_of_descending(desc, 0.25), _quantile_of_descending(desc, 0.75)
    return (desc > q3 + 1.5 * (q3 - q1)).sum(dim=1)


def outlier_counts(scores: Tensor, fence: str = "per-image") -> Tensor:
    """[B] long: how many scores lie strictly above Q3 + 1.5 * (Q3 - Q1).

    scores: [B, N]. Quartiles use linear interpolation (numpy.percentile's default, the same as
    torch.quantile's "linear"), in float32. fence="per-image" counts per row against that row's
    quartiles; fence="batch" computes the quartiles over the flattened batch and returns the
    batch-wide count, repeated for every row. (The quartiles are read off a sort that the methods
    need anyway, rather than calling torch.quantile, which sorts again and costs more launches.)
    """
    check_choice(fence, "fence", FENCES)
    return _outlier_counts_sorted(scores.float().sort(dim=1, descending=True).values, fence)


def uniform_stride(count: Tensor, n: int, images: int = 1) -> Tensor:
    """[B] long: PruMerge+'s sampling stride max(1, floor(floor(1 / r) / 3)).

    r = count / (images * n) is the outlier fraction (count outliers among `images` images of n tokens
    each; images=1 for a per-image fence), floored at 1 / n so that r = 0 (no outliers) acts as one
    kept token instead of dividing by zero. Computed in exact integers: floor(1 / r) =
    (images * n) // max(count, images). The stride is 1 (every token sampled, so the whole image is
    kept) as soon as floor(1 / r) < 6, i.e. r > 1/6, in the official formula as here; it would reach 0
    (the official code's crash) only for r > 1/3, which IQR outliers (at most about a quarter of the
    tokens) never reach. Never 0 here.
    """
    step = (images * n) // count.clamp(min=images)
    return (step // 3).clamp(min=1)


def check_options(
    *, fence: Any, weights: Any, order: Any, neighbors: Any, extra_token: Any, attention: Any, signal: Any
) -> None:
    """The options of prumerge and prumerge+."""
    check_signal_option(signal)
    check_choice(fence, "fence", FENCES)
    check_choice(weights, "weights", WEIGHTS)
    check_choice(order, "order", ORDERS)
    check_choice(attention, "attention", ATTENTIONS)
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or neighbors < 0:
        raise InputError(f"neighbors must be an int >= 0 (0 disables merging), got {neighbors!r}")
    check_flag(extra_token, "extra_token")


def normalize_weights(w: Tensor, members: Tensor) -> Tensor:
    """Weights for a weighted average over the True entries of `members` (same shape as w), along dim -1.

    Each weight is divided by the row's total ABSOLUTE weight, which is >= every |w_j|, so every
    normalised weight lies in [-1, 1] and the average stays finite for any finite input. For
    attention probabilities (non-negative) that is exactly w_j / sum_j w_j. A row whose member
    weights are all zero gets the plain mean (the limit of equal weights); a row without members
    gets zeros. Entries outside `members` come back 0.
    """
    w = torch.where(members, w, 0.0)
    total = w.abs().sum(dim=-1, keepdim=True)
    count = members.sum(dim=-1, keepdim=True)
    uniform = members / count.clamp(min=1)
    return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), uniform)


def _prumerge(
    features: Tensor,
    cls_attn: Tensor,
    keys: Tensor,
    grid: tuple[int, int] | None,
    *,
    plus: bool,
    fence: str,
    weights: str,
    order: str,
    neighbors: int,
    extra_token: bool,
    attention: str,
    signal: str | None,
) -> list[Reduction]:
    b, n, c = check_features(features)
    if grid is not None:
        check_grid(grid, n)
    check_tensor(cls_attn, "cls_attn", (b, n))
    check_tensor(keys, "keys", (b, n, None))
    if not cls_attn.is_floating_point() or not keys.is_floating_point():
        raise InputError("cls_attn and keys must be floating point tensors")
    if keys.shape[2] < 1:
        raise InputError(f"keys has an empty channel dimension: shape {tuple(keys.shape)}")
    if cls_attn.device != features.device or keys.device != features.device:
        raise InputError(
            f"features ({features.device}), cls_attn ({cls_attn.device}) and keys ({keys.device}) "
            "must be on the same device"
        )
    check_options(
        fence=fence,
        weights=weights,
        order=order,
        neighbors=neighbors,
        extra_token=extra_token,
        attention=attention,
        signal=signal,
    )

    dev = features.device
    a = cls_attn.float()
    idx = torch.arange(n, device=dev)
    rows = idx.expand(b, n)

    # Step 2: adaptive count m = floor(N r) >= 1, with r the outlier fraction (per image or over the batch).
    desc, by_score = a.sort(dim=1, descending=True, stable=True)
    count = _outlier_counts_sorted(desc, fence)
    images = 1 if fence == "per-image" else b  # how many images the count was taken over
    m = (count // images).clamp(min=1)
    rank = torch.empty_like(by_score).scatter_(1, by_score, rows)  # 0 = highest score
    top = rank < m.unsqueeze(1)
    kept = top
    if plus:
        kept = top | (idx.unsqueeze(0) % uniform_stride(count, n, images).unsqueeze(1) == 0)

    # Output order: kept tokens first (spatial or score order), then the rest. Sort keys are unique.
    if order == "spatial":
        key = torch.where(kept, rows, rows + n)
    else:
        key = torch.where(top, rank, torch.where(kept, rows + n, rows + 2 * n))
    perm = key.argsort(dim=1)
    slot_of = torch.empty_like(perm).scatter_(1, perm, rows)  # position of each token in `perm`
    sizes = kept.sum(dim=1)
    pruned = ~kept
    has_extra = pruned.any(dim=1) & extra_token
    if padding():  # as wide as every token could be kept, the counts on the device (methods.padded)
        sizes_l = extra_l = None
        kmax = n
    else:
        sizes_l, extra_l = torch.stack([sizes, has_extra.long()]).tolist()  # the one host sync
        kmax = max(sizes_l)

    # Step 3: merge each kept token with its most key-similar other tokens.
    sel = perm[:, :kmax]  # [B, K]; columns past sizes[b] are padding
    valid = torch.arange(kmax, device=dev).unsqueeze(0) < sizes.unsqueeze(1)
    x = features.float()
    base = x.gather(1, sel.unsqueeze(-1).expand(-1, -1, c))
    assign = torch.where(kept, slot_of, -1)
    k = min(neighbors, n - 1)
    if k > 0:
        kn = F.normalize(keys.float(), dim=-1)
        # Similarities of every token pair, then the kept rows: an [N, N] product per image has the
        # same shape whatever the batch-mates, so equal keys give bitwise-equal similarities in a batch
        # and one by one ([K_max, N] rows would round differently as K_max changes with the batch).
        full = kn @ kn.transpose(1, 2)  # [B, N, N]
        sim = full.gather(1, sel.unsqueeze(-1).expand(-1, -1, n))  # [B, K, N]
        sim.scatter_(2, sel.unsqueeze(-1), float("-inf"))  # never pick itself
        # A stable sort rather than topk: ties go to the lower index, identically on every device.
        nb = sim.argsort(dim=2, descending=True, stable=True)[:, :, :k]  # [B, K, k]
        w = a.gather(1, nb.flatten(1)).view_as(nb)
        if weights == "normalized":
            w = normalize_weights(w, torch.ones_like(nb, dtype=torch.bool))
        mix = torch.zeros(b, kmax, n, device=dev).scatter_(2, nb, w)
        merged = base + mix @ x
        # A pruned token merged into kept tokens is assigned to the most similar one among them.
        member = torch.zeros(b, kmax, n, dtype=torch.bool, device=dev).scatter_(2, nb, True) & valid.unsqueeze(-1)
        best = torch.where(member, sim, float("-inf")).argmax(dim=1)  # [B, N]
        assign = torch.where(pruned & member.any(dim=1), best, assign)
        linked = member.any(dim=1)
    else:
        merged = base
        linked = torch.zeros_like(kept)
    extra_slot = torch.where(has_extra, sizes, -1)
    assign = torch.where(pruned & ~linked, extra_slot.unsqueeze(1), assign)

    # The extra token: attention-weighted sum (or average) of the pruned tokens, placed at slot sizes[b].
    pw = normalize_weights(a, pruned) if weights == "normalized" else torch.where(pruned, a, 0.0)
    extra = (pw.unsqueeze(1) @ x).squeeze(1)  # [B, C]
    out = torch.cat([merged, merged.new_zeros(b, 1, c)], dim=1)
    out.scatter_(1, sizes.view(b, 1, 1).expand(-1, -1, c), extra.unsqueeze(1))
    out = out.to(features.dtype)
    src = torch.cat([sel, sel.new_full((b, 1), -1)], dim=1)
    src.scatter_(1, sizes.unsqueeze(1), -1)

    if sizes_l is None:
        count = sizes + has_extra.long()
        return [Reduction(out[i], src[i], assign[i], size=count[i]) for i in range(b)]
    result = []
    for i in range(b):
        kk = sizes_l[i] + extra_l[i]
        result.append(Reduction(features=out[i, :kk], sources=src[i, :kk], assignment=assign[i]))
    return result


@register(
    "prumerge",
    description="PruMerge: keep the IQR outliers of CLS attention, merge key-similar tokens into them, "
    "plus one summary token of the pruned ones (adaptive, ~5.5% of tokens)",
    placement=Placement.ENCODER,
    adaptive=True,
    signals=_signals,
    check=check_options,
)
@_with_options_doc
def prumerge(
    features: Tensor,
    *,
    cls_attn: Tensor,
    keys: Tensor,
    grid: tuple[int, int] | None = None,
    fence: str = "per-image",
    weights: str = "unnormalized",
    order: str = "spatial",
    neighbors: int = 32,
    extra_token: bool = True,
    attention: str = "single",
    signal: str | None = None,
) -> list[Reduction]:
    """PruMerge (Shang, Cai et al., arXiv 2403.15388): adaptive outlier selection and merging.

    features [B, N, C] are the patch features LLaVA hands the projector (CLS dropped); cls_attn [B, N]
    the score chosen by `signal` at the last encoder layer: the CLS-query attention probabilities
    over the patches (CLS column dropped), or on a tower without CLS ("mean-received") the attention
    each patch receives, averaged over the patch queries, which also weights the merge; keys
    [B, N, D] that layer's patch keys (CLS dropped); grid is accepted for uniformity
    and only validated. Returns one Reduction per image: the m >= 1 kept tokens, each updated to
    y_p + sum_j a_j y_j over its `neighbors` most key-similar other tokens (original, unmerged y_j),
    then the extra summary token of the pruned tokens (source -1). Assignment: kept tokens map to
    their slot; a pruned token merged into kept tokens maps to the most key-similar of them; any
    other pruned token maps to the extra token, or -1 without one.

    Deviations from the official code (all but the count arithmetic are options): the IQR fence is
    per image (official: over the flattened batch), output order is spatial (official: by score),
    m >= 1 is guaranteed, the batch fence uses exact integer arithmetic m = floor(count / B) instead of
    int(N * (count / (B N))) in floating point, and the neighbour count is capped at N - 1.
    """
    return _prumerge(
        features,
        cls_attn,
        keys,
        grid,
        plus=False,
        fence=fence,
        weights=weights,
        order=order,
        neighbors=neighbors,
        extra_token=extra_token,
        attention=attention,
        signal=signal,
    )


@register(
    "prumerge+",
    description="PruMerge+: PruMerge's outliers plus spatially uniform samples, then the same merge "
    "(adaptive, ~25% of tokens)",
    placement=Placement.ENCODER,
    adaptive=True,
    signals=_signals,
    check=check_options,
)
@_with_options_doc
def prumerge_plus(
    features: Tensor,
    *,
    cls_attn: Tensor,
    keys: Tensor,
    grid: tuple[int, int] | None = None,
    fence: str = "per-image",
    weights: str = "unnormalized",
    order: str = "spatial",
    neighbors: int = 32,
    extra_token: bool = True,
    attention: str = "single",
    signal: str | None = None,
) -> list[Reduction]:
    """PruMerge+ (Shang, Cai et al., arXiv 2403.15388): PruMerge with added uniform samples.

    Arguments and output as `prumerge`. After the m IQR outliers are chosen (r = m / N per image, or
    r = #outliers in the batch / (B N) with fence="batch", floored at 1 / N), the tokens at indices
    range(0, N, max(1, floor(floor(1 / r) / 3))) that are not already kept are added, and the merge
    runs over the enlarged kept set; the extra token sums the tokens still pruned. On a tower without
    CLS the score (and merge weight) is the mean-received attention, as in `prumerge`.

    How many tokens: about 4m (m outliers plus ~3m samples), ~25% of the image at LLaVA-1.5's typical
    r ~ 5.5%. An image with more than N/6 outliers gets stride 1 and keeps ALL its tokens, exactly as
    the official formula does (floor(floor(1/r) / 3) = 1 for r in (1/6, 1/4]): kept faithfully, so
    `handle.stats.visual_tokens_out` shows N for such images; use prumerge or a fixed-budget method
    where a reduction must happen on every image.

    Deviations from the official code: works for batch > 1 (the official code crashes, its issue
    #11): the uniform samples are computed per image; r = 0 (flat attention, no outliers) counts as
    m = 1 instead of dividing by zero; r > 1/3 (unreachable with IQR outliers) would give stride 1
    instead of a zero-stride crash; the candidate range runs to N (official: a hard-coded 575);
    step is computed in exact integers (floor(N / m)). The fence, weights and order options as in
    `prumerge`.
    """
    return _prumerge(
        features,
        cls_attn,
        keys,
        grid,
        plus=True,
        fence=fence,
        weights=weights,
        order=order,
        neighbors=neighbors,
        extra_token=extra_token,
        attention=attention,
        signal=signal,
    )
