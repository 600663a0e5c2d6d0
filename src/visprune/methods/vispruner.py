"""VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818 v2): important tokens by visual attention, then
diverse tokens by removing near-duplicates among the rest.

Per image: the top `important_ratio` share of the budget by the CLS attention of encoder layer -2
(FasterVLM's score; the CLS-free signal on towers without CLS); the remaining tokens, in descending
score order, are thinned in rounds: split them alternately into two halves A and B, score each A token by
its largest cosine similarity to a B token, and drop the (at most 8) most similar A tokens; repeat until
the diverse share of the budget is left.
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
from visprune.methods.graphs import fused, replayed
from visprune.methods.registry import register
from visprune.methods.similarity import cosine_similarity, pairwise_cosine

ROUND = 8  # tokens dropped per thinning round at most, as in the official code
SIMILARITY_ELEMENTS = 2**26  # float32 entries (256 MiB) up to which all pairs' similarities are computed once


def check_options(*, budget: Any, important_ratio: Any, signal: Any) -> None:
    """VisPruner's options: a budget >= 1, an important share in [0, 1]."""
    check_count(budget, "budget")
    if isinstance(important_ratio, bool) or not isinstance(important_ratio, (int, float)):
        raise InputError(f"important_ratio must be a number in [0, 1], got {important_ratio!r}")
    if not 0 <= important_ratio <= 1:
        raise InputError(f"important_ratio must be in [0, 1], got {important_ratio}")
    check_signal_option(signal)


def thin_duplicates(features: Tensor, order: Tensor, keep: int) -> Tensor:
    """Indices [B, keep] left of `order` [B, R] (token indices) after dropping near-duplicates in rounds.

    features [B, N, C]. Each round splits the current list into its even (A) and odd (B) positions,
    scores every A token by its largest cosine similarity to a B token (`similarity.cosine_similarity`)
    and drops the min(ROUND, R - keep) highest-scoring A tokens; the list becomes the kept A tokens (most
    similar first, as the official code orders them) followed by the B tokens. Ties go to the lower position.
    The similarities come from one [B, N, N] product when it has at most SIMILARITY_ELEMENTS entries
    (each round then only gathers; ~10x faster at N = 1296 on a GPU), else from the features each round.
    """
    b, n, _ = features.shape
    similarity = pairwise_cosine(features) if b * n * n <= SIMILARITY_ELEMENTS else None
    while order.shape[1] > keep:
        drop = min(ROUND, order.shape[1] - keep)
        if similarity is not None:
            order = _thin_round(similarity, order, drop)
            continue
        evens, odds = order[:, ::2], order[:, 1::2]
        if not odds.shape[1]:
            closest = features.new_zeros(evens.shape, dtype=torch.float32)
        else:
            a, bb = (features.gather(1, x.unsqueeze(-1).expand(-1, -1, features.shape[-1])) for x in (evens, odds))
            closest = cosine_similarity(a, bb).amax(dim=2)
        survivors = closest.sort(dim=1, descending=True, stable=True).indices[:, drop:]
        order = torch.cat([evens.gather(1, survivors), odds], dim=1)
    return order


@fused
def _thin_round(similarity: Tensor, order: Tensor, drop: int) -> Tensor:
    """One thinning round read from the all-pairs `similarity` [B, N, N]: the list `order` [B, R] becomes
    its A tokens (even positions) without the `drop` most similar to a B token (all of them if there are
    fewer), most similar first, then its B tokens (odd positions). The A tokens' order is their
    `descending_rank` and the list is put together by one scatter (a sort and two gathers otherwise): on a
    GPU the round compiles into a few kernels."""
    evens, odds = order[:, ::2], order[:, 1::2]
    b, e = evens.shape
    o = odds.shape[1]
    if o:  # whole rows of the A tokens, the B tokens' columns picked by a mask: coalesced reads, no column gather
        in_b = torch.zeros_like(similarity[:, 0], dtype=torch.bool).scatter(1, odds, True)
        rows = similarity.gather(1, evens.unsqueeze(-1).expand(-1, -1, similarity.shape[2]))
        closest = rows.masked_fill(~in_b.unsqueeze(1), float("-inf")).amax(dim=2)
    else:
        closest = similarity.new_zeros(b, e)
    rank = descending_rank(closest)
    kept = max(e - drop, 0)  # a list of fewer A tokens than `drop` loses them all (it keeps its B tokens)
    drop = e - kept
    slot = torch.where(rank >= drop, rank - drop, kept + o + rank)  # the dropped ones land past the new list
    out = order.new_empty(b, e + o)
    out[:, kept : kept + o] = odds
    out.scatter_(1, slot, evens)
    return out[:, : kept + o]


def descending_rank(values: Tensor) -> Tensor:
    """[B, E] long: each entry's position in its row sorted in descending order, equal values in the order
    of their positions (+0.0 and -0.0 are equal). On a GPU from pairwise comparisons (`_compared_rank`: one
    fused reduction for the short rows of the thinning rounds, where a sort launches several kernels), on
    the CPU from a stable sort (there ~25% faster over a whole selection at 8 x 1296 tokens)."""
    if values.is_cuda:
        return _compared_rank(values)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )


def _compared_rank(values: Tensor) -> Tensor:
    """`descending_rank` by counting, for each entry, the entries that go before it."""
    position = torch.arange(values.shape[1], device=values.device)
    other, this = values.unsqueeze(1), values.unsqueeze(2)
    ahead = (other > this) | ((other == this) & (position < position.unsqueeze(1)))
    return ahead.sum(dim=2)


@register(
    "vispruner",
    description="VisPruner: important tokens by CLS attention, then diverse tokens by removing near-duplicates "
    "among the rest (fixed K)",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {"cls_attn": score_request(o["signal"], (-2,), "mean")},
    check=check_options,
    budget_rule=TOKENS,
    published_attention="vision",
)
@document_signal
def vispruner(
    features: Tensor,
    *,
    cls_attn: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
    important_ratio: float = 0.5,
    signal: str | None = None,
) -> list[Reduction]:
    """Keep `budget` tokens per image: int(budget * important_ratio) important ones by `cls_attn` [B, N]
    (the score chosen by `signal` at encoder layer -2: head-averaged CLS attention, or on a tower without
    CLS the attention each patch receives, averaged over the patch queries), then the rest chosen by
    `thin_duplicates` on the features [B, N, C] of the other tokens in descending score
    order. Output: the kept tokens, unchanged, in spatial order; `assignment` marks the dropped ones -1.
    grid is accepted for uniformity and only validated.

    Deviations from the official code: ties in the scores go to the lower index (it uses an unstable
    sort); a round with an odd number of remaining tokens works (there it fails to index).
    The thinning rounds order tokens by near-equal similarities and each round's split follows that
    order, so the diverse tokens change with the last bits of the similarities: at 8 x 1296 tokens the
    float32 and the float64 selections shared about 60% of them (`scripts/check_similarity.py`). The
    important tokens and the size of each share do not change.

    Options:
        budget: tokens kept per image (default 64), 1 <= budget <= N.
        important_ratio: share of the budget taken as important tokens, in [0, 1] (default 0.5; the
            official scripts use 0.5, and 0.75 at 64 tokens on some benchmarks).
        signal: {SIGNAL}
    """
    check_options(budget=budget, important_ratio=important_ratio, signal=signal)
    b, n, k = check_budgeted_features(features, grid, budget)
    scores = check_signal(cls_attn, "cls_attn", (b, n), features)
    return select_tokens(
        features, replayed(important_and_diverse, features, scores, k=k, important=int(k * important_ratio))
    )


def important_and_diverse(features: Tensor, scores: Tensor, k: int, important: int) -> Tensor:
    """[B, k] indices: the `important` top tokens by `scores` [B, N], then `thin_duplicates` of the rest of
    the features [B, N, C] in descending score order; no host synchronisation (`graphs.replayed`
    captures it)."""
    ranked = scores.float().sort(dim=1, descending=True, stable=True).indices
    diverse = thin_duplicates(features, ranked[:, important:], k - important)
    return torch.cat([ranked[:, :important], diverse], dim=1)
