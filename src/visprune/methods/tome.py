"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", arXiv 2210.09461): bipartite soft
matching, applied to the vision tower's output tokens until the budget is reached."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.methods.base import Placement, Reduction, SignalRequest
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_budgeted_features, check_count
from visprune.methods.cls_topk import check_signal
from visprune.methods.registry import register


def tome_round(x: Tensor, k: Tensor, size: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One round of bipartite soft matching on T tokens in their current order, merging r of them.

    x [B, T, C] and k [B, T, D] float32 features and keys, size [B, T] float32 token sizes (how many
    original tokens each stands for). Set A = even positions, B = odd positions; each A token's
    match is its most cosine-similar B token (first on ties); the r A tokens with the most similar
    matches (stable: earlier A token first on ties) are merged into their matches, the rest stay.
    Features and keys of a merged group are the size-weighted mean, sizes add up.
    Returns (x', k', size', newpos, kept): the T - r surviving tokens in their previous relative
    order, newpos [B, T] the new position of every current token, kept [B, T] True for survivors.
    Requires 0 < r <= ceil(T / 2).
    """
    b, t, _ = x.shape
    dev = x.device
    kn = F.normalize(k, dim=-1)
    a_pos = torch.arange(0, t, 2, device=dev)
    b_pos = torch.arange(1, t, 2, device=dev)
    scores = kn[:, a_pos] @ kn[:, b_pos].transpose(1, 2)  # [B, |A|, |B|]
    best = scores.argmax(dim=2)  # [B, |A|]
    best_val = scores.gather(2, best.unsqueeze(-1)).squeeze(-1)
    order = best_val.sort(dim=1, descending=True, stable=True).indices
    merged_a = torch.zeros_like(best_val, dtype=torch.bool).scatter_(1, order[:, :r], True)  # [B, |A|]

    kept = torch.ones(b, t, dtype=torch.bool, device=dev)
    kept[:, a_pos] = ~merged_a
    newpos = kept.long().cumsum(dim=1) - 1  # position among survivors (valid for kept tokens)
    dst_pos = newpos.gather(1, 2 * best + 1)  # the new position of each A token's match
    newpos[:, a_pos] = torch.where(merged_a, dst_pos, newpos[:, a_pos])

    # Group sums by new position through a one-hot matmul: deterministic on every device.
    onehot = (newpos.unsqueeze(1) == torch.arange(t - r, device=dev).view(1, -1, 1)).float()  # [B, T-r, T]
    new_size = onehot @ size.unsqueeze(-1)  # [B, T-r, 1]
    w = size.unsqueeze(-1)
    new_x = (onehot @ (x * w)) / new_size
    new_k = (onehot @ (k * w)) / new_size
    return new_x, new_k, new_size.squeeze(-1), newpos, kept


def check_options(*, budget: object) -> None:
    """ToMe's option: budget >= 1 (<= N is checked on the features)."""
    check_count(budget, "budget")


@register(
    "tome",
    description="ToMe: bipartite soft matching on the tower's output keys, size-weighted merges until K tokens remain.",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {"keys": SignalRequest("keys", (-1,), "mean")},
    check=check_options,
    budget_rule=TOKENS,
)
def tome(
    features: Tensor,
    *,
    keys: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
) -> list[Reduction]:
    """Merge tokens by repeated bipartite soft matching until exactly `budget` remain.

    features [B, N, C]; keys [B, N, D] head-averaged patch keys of the last encoder layer (whose
    input is the features LLaVA uses), CLS dropped. Each round splits the current tokens
    (kept in spatial order of the original token they stand at) alternately into sets A (even
    positions) and B (odd positions), matches every A token to its most cosine-similar B token by
    keys, and merges the r = min(|A|, T - budget) best-matched A tokens into their B matches with
    size-weighted means of features and keys (sizes tracked, so every output token is the plain mean
    of the original tokens merged into it). Rounds repeat until `budget` tokens remain (576 -> 64
    takes 4). Computed in float32, cast back to the features' dtype. Output in ascending source
    order; sources are the surviving B token (destination) of each group, or the token itself;
    assignment maps every original token to its output slot (nothing is dropped).

    Deviations from the official ToMe, which merges r tokens inside every transformer block with
    that block's keys (and proportional attention): here the merging is post hoc on the tower's
    output with one layer's keys, merged keys stand in for recomputed ones in later rounds, there is
    no CLS token to protect, and after each round the survivors are put back in spatial order
    (official: unmerged A tokens, then B) so that the A/B alternation stays spatial.

    Options:
        budget: number of tokens left per image (default 64), 1 <= budget <= N.
    """
    check_options(budget=budget)
    b, n, target = check_budgeted_features(features, grid, budget)
    key = check_signal(keys, "keys", (b, n, None), features)
    dev = features.device
    x = features.float()
    k = key.float()
    size = torch.ones(b, n, device=dev)
    slot = torch.arange(n, device=dev).expand(b, n)  # current position of every original token
    src = slot  # original index of the token at each current position
    t = n
    while t > target:
        r = min((t + 1) // 2, t - target)
        x, k, size, newpos, kept = tome_round(x, k, size, r)
        # Positions of the surviving tokens in the current order, ascending (stable sort puts them first).
        kept_pos = (~kept).to(torch.uint8).sort(dim=1, stable=True).indices[:, : t - r]
        src = src.gather(1, kept_pos)
        slot = newpos.gather(1, slot)
        t -= r
    out = x.to(features.dtype)
    return [
        Reduction(features=f, sources=s, assignment=a)
        for f, s, a in zip(out.unbind(0), src.unbind(0), slot.unbind(0), strict=True)
    ]
