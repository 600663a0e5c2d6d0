"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the most diverse visual tokens.

Token selection as a max-min diversity problem, solved greedily in cosine distance (1 - cos): first
the token whose nearest other token is farthest, then, step by step, the token whose distance to the
nearest already-selected token is largest. It needs no attention map and no text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visprune.methods.base import Placement, Reduction, SignalRequest, select_tokens
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_budgeted_features, check_count
from visprune.methods.cls_topk import check_signal
from visprune.methods.graphs import fused, replayed, row_at
from visprune.methods.registry import register
from visprune.methods.similarity import pairwise_cosine


def check_options(*, budget: Any) -> None:
    """DivPrune's option: a budget >= 1 (the bound against N needs the data)."""
    check_count(budget, "budget", 1)


def max_min_selection(x: Tensor, k: int) -> Tensor:
    """[B, k] indices chosen greedily to maximise the smallest cosine distance among them, per image.

    x [B, N, D]. Step 0 takes the token farthest from its nearest other token; each later step takes
    the token farthest from its nearest selected token. A selected token is never taken again (its
    distance to itself counts as -inf, so once selected its distance to the selection is -inf); ties go
    to the lowest index. Batched over images; one `_farthest_step` per selected token, no host
    synchronisation (so `graphs.replayed` can capture it).
    """
    n = x.shape[1]
    distance = 1 - pairwise_cosine(x)  # [B, N, N], symmetric
    rows = torch.arange(n, device=x.device)
    itself = rows == rows.unsqueeze(1)
    nearest_other = distance.masked_fill(itself, float("inf")).amin(dim=2)
    distance.masked_fill_(itself, float("-inf"))
    chosen = [nearest_other.argmax(dim=1)]
    to_selected = row_at(distance, chosen[0])  # [B, N]
    for _ in range(k - 1):
        nxt, to_selected = _farthest_step(distance, to_selected)
        chosen.append(nxt)
    return torch.stack(chosen, dim=1)


@fused
def _farthest_step(distance: Tensor, to_selected: Tensor) -> tuple[Tensor, Tensor]:
    """One greedy step: the token farthest from the selection, and every token's distance to the new one."""
    nxt = to_selected.argmax(dim=1)
    return nxt, torch.minimum(to_selected, row_at(distance, nxt))


@register(
    "divprune",
    description="DivPrune: the most diverse tokens by greedy max-min cosine distance among the projected tokens "
    "(fixed K, no attention map)",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {"projected": SignalRequest("projected")},
    check=check_options,
    budget_rule=TOKENS,
)
def divprune(
    features: Tensor,
    *,
    projected: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
) -> list[Reduction]:
    """Keep `budget` tokens per image chosen by `max_min_selection` on `projected` [B, N, D]: the tokens as
    the LLM receives them (the projector applied to every feature row), as the official code selects on
    the LLM's input embeddings. features [B, N, C] are what is kept (the adapter projects them after);
    grid is accepted for uniformity and only validated.

    Output: the kept tokens in spatial order, unchanged; `assignment` marks the dropped ones with -1.
    Deviations from the official code: it keeps round(ratio * N) tokens of a batch of one, here exactly
    `budget` per image of any batch; it could take a token twice when every remaining one sits at
    distance 0 from the selection (identical tokens), here a selected token is never taken again.

    Options:
        budget: tokens kept per image (default 64), 1 <= budget <= N.
    """
    check_options(budget=budget)
    b, n, k = check_budgeted_features(features, grid, budget)
    check_signal(projected, "projected", (b, n, None), features)
    return select_tokens(features, replayed(max_min_selection, projected, k=k))
