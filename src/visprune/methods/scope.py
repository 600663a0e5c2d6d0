"""SCOPE (Deng et al., NeurIPS 2025, arXiv 2510.24214): saliency-coverage oriented token selection.

The coverage of a token j by a selected set is its largest cosine similarity to a selected token (0 for
the empty set). Each step adds the token whose coverage gain, the summed increase of every token's
coverage, times its saliency (CLS attention, raised to `alpha`) is largest: salient tokens that cover
what is not yet covered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import (
    Placement,
    Reduction,
    check_signal_option,
    document_signal,
    score_request,
    select_tokens,
)
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_budgeted_features, check_count
from visprune.methods.cls_topk import check_signal
from visprune.methods.graphs import fused, replayed, row_at
from visprune.methods.registry import register
from visprune.methods.similarity import pairwise_cosine


def check_options(*, budget: Any, alpha: Any, signal: Any) -> None:
    """SCOPE's options: a budget >= 1, a saliency exponent alpha >= 0."""
    check_count(budget, "budget", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise InputError(f"alpha must be a number >= 0 (the saliency exponent), got {alpha!r}")
    check_signal_option(signal)


def saliency_coverage_selection(features: Tensor, saliency: Tensor, k: int) -> Tensor:
    """[B, k] indices in selection order. features [B, N, C] (cosine similarity S), saliency [B, N] >= 0.

    coverage [B, N] starts at 0; a step scores every unselected token i by
    saliency_i * sum_j max(0, S_ji - coverage_j), takes the best (ties to the lowest index) and raises
    coverage to max(coverage, S_i). Batched over images; one `_coverage_step` per selected token, O(N^2) each; no host
    synchronisation (`graphs.replayed` captures it).

    For half-precision features S is held in their dtype, as the official code holds it (in the model's),
    so each step reads half the bytes (at Qwen2.5-VL's 1296 tokens per image, 27 instead of 54 MB per step
    at batch 8); the gains and the coverage are summed and kept in float32.
    """
    similarity = pairwise_cosine(features)  # [B, N, N] float32
    if features.dtype in (torch.float16, torch.bfloat16):
        similarity = similarity.to(features.dtype)
    # a step sums over j for every token i: reading S transposed (S_ji at [i, j]) makes that a contiguous row sum
    similarity_t = similarity.transpose(1, 2).contiguous()
    coverage = torch.zeros_like(saliency, dtype=torch.float32)
    taken = torch.zeros_like(saliency, dtype=torch.bool)
    chosen = []
    for _ in range(k):
        best, coverage, taken = _coverage_step(similarity, similarity_t, saliency, coverage, taken)
        chosen.append(best)
    return torch.stack(chosen, dim=1)


@fused
def _coverage_step(
    similarity: Tensor, similarity_t: Tensor, saliency: Tensor, coverage: Tensor, taken: Tensor
) -> tuple[Tensor, ...]:
    """One greedy step: the best unselected token, the coverage it leaves and the updated taken mask.
    similarity_t [B, N, N] holds S_ji at [i, j]. The taken mask is updated elementwise, not by a scatter, so
    that it fuses with the coverage's update (6.65 -> 6.23 ms for 324 steps of 8 x 1296 tokens on an H200)."""
    gain = (similarity_t - coverage.unsqueeze(1)).clamp(min=0).sum(dim=2)  # [B, N]: token i's gain
    best = (gain * saliency).masked_fill(taken, float("-inf")).argmax(dim=1)
    picked = torch.arange(taken.shape[1], device=taken.device) == best.unsqueeze(1)
    return best, torch.maximum(coverage, row_at(similarity, best)), taken | picked


@register(
    "scope",
    description="SCOPE: greedy tokens of largest saliency x coverage gain (CLS attention, cosine coverage of "
    "the not-yet-covered tokens; fixed K)",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {"cls_attn": score_request(o["signal"], (-2,), "sum")},
    check=check_options,
    budget_rule=TOKENS,
    published_attention="vision",
)
@document_signal
def scope(
    features: Tensor,
    *,
    cls_attn: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
    alpha: float = 1.0,
    signal: str | None = None,
) -> list[Reduction]:
    """Keep `budget` tokens per image chosen by `saliency_coverage_selection` on the features [B, N, C]
    (the tower's feature layer, as the official code measures coverage) with saliency cls_attn ** alpha:
    cls_attn [B, N] the score chosen by `signal` at encoder layer -2, summed over heads (CLS attention,
    or on a tower without CLS the attention each patch receives, averaged over the patch queries).

    Output: the kept tokens, unchanged, in spatial order; `assignment` marks the dropped ones -1.
    Deviations from the official code: the budget is per image (it divides a total by the batch size);
    the gains are summed in float32 (the official code sums them in the model's dtype, in which both
    hold the similarity);
    its environment switches (ALPHA, and COMBINED='add' instead of the product) are the `alpha` option
    here and the product only; a saliency below zero (none of the supported signals gives one) would be
    used as is.

    Options:
        budget: tokens kept per image (default 64), 1 <= budget <= N.
        alpha: exponent of the saliency in the product (default 1.0, the official default; 0 ignores
            the saliency: coverage alone).
        signal: {SIGNAL}
    """
    check_options(budget=budget, alpha=alpha, signal=signal)
    b, n, k = check_budgeted_features(features, grid, budget)
    scores = check_signal(cls_attn, "cls_attn", (b, n), features)
    return select_tokens(features, replayed(saliency_coverage_selection, features, scores.float() ** alpha, k=k))
