"""Stage 1 of the two-stage image-text pruning of Yu, Chen & Xu (arXiv 2409.01162), batched.

Per image: sort the patches' similarity to the CLS token (cosine; CLS attention as an option)
descending, cut the curve at its knee (see `visprune.methods.knee_point.knee_count`), clamp the count
to [k_min, k_max] and keep the top-k* tokens in spatial order. No merging. k* varies per image. On a
tower without a CLS token the score is the attention each patch receives, averaged over the patch
queries of the same layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import (
    SCORE_SIGNALS,
    Placement,
    Reduction,
    SignalRequest,
    document_signal,
    score_request,
)
from visprune.methods.checks import check_choice, check_count, check_features, check_grid, check_tensor
from visprune.methods.knee_point import DETECTORS, knee_count
from visprune.methods.padded import padding
from visprune.methods.registry import register

ATTENTIONS = ("single", "mean")
# The score options: the shared ones, plus "cosine": the cosine similarity between the CLS token and each
# patch (the paper's "similarity between visual and CLS tokens", read literally).
SIGNALS = (*SCORE_SIGNALS, "cosine")


def check_options(*, detector: Any, smooth: Any, k_min: Any, k_max: Any, attention: Any, signal: Any) -> None:
    """The knee method's options (also the encoder-stage options of knee+text)."""
    check_choice(detector, "detector", DETECTORS)
    check_choice(attention, "attention", ATTENTIONS)
    if signal is not None:
        check_choice(signal, "signal", SIGNALS)
    check_count(smooth, "smooth")
    check_count(k_min, "k_min")
    if k_max is not None:
        check_count(k_max, "k_max")
        if k_max < k_min:
            raise InputError(f"k_max={k_max} must be >= k_min={k_min} (or None for no upper clamp)")


def knee_request(signal: str | None, attention: str) -> SignalRequest:
    """The score `knee` ranks by, at the last encoder layer: with signal="cosine" the CLS-patch cosine
    similarity of that layer's input hidden states (the layer whose output LLaVA feeds the projector),
    with "cls" the CLS attention, with "mean-received" the CLS-free score; None (default) is the
    cosine where the tower has a CLS token and the CLS-free score otherwise."""
    if signal in (None, "cosine"):
        return SignalRequest("cls_cosine", (-1,), attention, fallback=None if signal else "mean_received")
    return score_request(signal, (-1,), attention)


@register(
    "knee",
    description="Stage 1 of Yu, Chen & Xu: keep the tokens above the knee of the sorted CLS-similarity "
    "curve, per image (adaptive, no merging)",
    placement=Placement.ENCODER,
    adaptive=True,
    signals=lambda o: {"cls_attn": knee_request(o["signal"], o["attention"])},
    check=check_options,
)
@document_signal
def knee(
    features: Tensor,
    *,
    cls_attn: Tensor,
    grid: tuple[int, int] | None = None,
    detector: str = "kneedle",
    smooth: int = 1,
    k_min: int = 16,
    k_max: int | None = None,
    attention: str = "single",
    signal: str | None = None,
) -> list[Reduction]:
    """Keep the tokens above the knee of the sorted CLS-similarity curve (Yu, Chen & Xu, stage 1).

    features [B, N, C] are the patch features (CLS dropped); cls_attn [B, N] the score chosen by
    `signal` at the last encoder layer: the CLS-patch cosine similarity ("cosine", the default where
    the tower has a CLS token), the CLS-query attention probabilities over the patches ("cls", as
    PruMerge's score), or on a tower without CLS ("mean-received") the attention each patch receives,
    averaged over the patch queries (one full-width head or head-averaged, per `attention`); grid is accepted
    for uniformity and only validated. Per image the scores are sorted descending, k* = the knee
    count of that curve, clamped to [k_min, k_max], and the top-k* tokens are kept unchanged in
    ascending (spatial) order. Assignment: kept tokens map to their slot, the others to -1.

    The paper is public (arXiv 2409.01162; its v2 is titled "Sparsity Meets Similarity: Leveraging
    Long-Tail Distribution for Dynamic Optimized Token Representation in Multimodal Large Language
    Models"). Its first-stage score is "the similarity between visual and CLS tokens": the default
    reads it literally as cosine similarity, which on validation items of the synthetic suite kept more
    accuracy than CLS attention with the kneedle and max-gap detectors under every text-stage rule
    (docs/results/knee-operating-point).
    Ties in the scores are broken towards the lower index.

    Options:
        detector: how the knee is found (see knee_point.knee_count): "kneedle" (default, the point of
            the min-max normalised curve farthest below its chord), "max-gap" (largest drop between
            consecutive sorted scores) or "max-curvature" (largest discrete second difference).
        smooth: moving-average window applied to the sorted curve before the detector; 1 (default)
            means no smoothing.
        k_min: the fewest tokens kept per image, default 16 (an image with fewer than k_min tokens
            keeps all of them).
        k_max: the most tokens kept per image, default None (= N, no upper clamp). Must be >= k_min.
        attention: how the attention scores combine heads ("cls" and "mean-received"): "single"
            (default, PruMerge's official full-width one-head attention) or "mean" (head-averaged).
        signal: which score ranks the patches: None (default) = "cosine" where the tower has a CLS
            token, "mean-received" otherwise; "cosine" = the cosine similarity between the CLS token
            and each patch in the hidden states entering the last encoder layer (LLaVA's feature
            layer), towers with a CLS token only; "cls" = the CLS query's attention (towers with CLS);
            "mean-received" = the attention each patch receives, averaged over all patch queries.
    """
    b, n, c = check_features(features)
    if grid is not None:
        check_grid(grid, n)
    check_tensor(cls_attn, "cls_attn", (b, n))
    if not cls_attn.is_floating_point():
        raise InputError(f"cls_attn must be a floating point tensor, got {cls_attn.dtype}")
    if cls_attn.device != features.device:
        raise InputError(f"features ({features.device}) and cls_attn ({cls_attn.device}) must be on the same device")
    check_options(detector=detector, smooth=smooth, k_min=k_min, k_max=k_max, attention=attention, signal=signal)

    dev = features.device
    a = cls_attn.float()
    rows = torch.arange(n, device=dev).expand(b, n)
    ordered, by_score = a.sort(dim=1, descending=True, stable=True)
    lo = min(k_min, n)
    hi = n if k_max is None else min(k_max, n)
    kstar = knee_count(ordered, detector=detector, smooth=smooth).clamp(min=lo, max=hi)
    rank = torch.empty_like(by_score).scatter_(1, by_score, rows)
    keep = rank < kstar.unsqueeze(1)
    perm = torch.where(keep, rows, rows + n).argsort(dim=1)  # kept first, ascending
    slot_of = torch.empty_like(perm).scatter_(1, perm, rows)
    assign = torch.where(keep, slot_of, -1)
    if padding():  # every row, the counts on the device (methods.padded)
        gathered = features.gather(1, perm.unsqueeze(-1).expand(-1, -1, c))
        return [Reduction(gathered[i], perm[i], assign[i], size=kstar[i]) for i in range(b)]
    sizes = kstar.tolist()  # the one host sync
    sel = perm[:, : max(sizes)]
    gathered = features.gather(1, sel.unsqueeze(-1).expand(-1, -1, c))
    return [Reduction(features=gathered[i, :s], sources=sel[i, :s], assignment=assign[i]) for i, s in enumerate(sizes)]
