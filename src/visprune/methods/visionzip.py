"""VisionZip (Yang et al., arXiv 2412.04467): dominant tokens by CLS attention plus contextual
tokens merged from the rest by key similarity. On a tower without a CLS token the dominant tokens are
ranked by the attention each patch receives, summed over heads and averaged over the patch queries."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import (
    Placement,
    Reduction,
    SignalRequest,
    check_signal_option,
    document_signal,
    score_request,
)
from visprune.methods.budget_rules import BudgetRule
from visprune.methods.checks import check_budget, check_count, check_features, check_grid
from visprune.methods.cls_topk import check_signal, top_indices
from visprune.methods.registry import register


def split_budget(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for a total `budget` in VisionZip's 54:10 proportion.

    dominant = round(budget * 54 / 64) (halves round up), contextual = the rest; 64, 128, 192 give the
    published (54, 10), (108, 20), (162, 30). dominant >= 1 for every budget >= 1.
    """
    dominant = (budget * 54 * 2 + 64) // 128
    return dominant, budget - dominant


def check_options(*, dominant: object, contextual: object, budget: object, signal: object) -> None:
    """VisionZip's options: dominant >= 1, contextual >= 0, budget None or >= 1 (the sums against N
    are checked on the features), signal None or a SCORE_SIGNALS choice."""
    check_signal_option(signal)
    check_count(dominant, "dominant", 1)
    check_count(contextual, "contextual", 0)
    if budget is not None:
        check_count(budget, "budget", 1)


def _budget(budget: int, options: dict[str, Any], **_: Any) -> dict[str, Any]:
    """A total of `budget` tokens: the `budget` option (split 54:10), or, when the options fix dominant and
    contextual counts instead, both scaled to the new total in their proportion (per-crop budgets)."""
    if options.get("budget") is None and "dominant" in options and "contextual" in options:
        dominant = max(1, round(budget * options["dominant"] / (options["dominant"] + options["contextual"])))
        return {**options, "dominant": dominant, "contextual": budget - dominant}
    return {**options, "budget": budget}


def _kept(options: dict[str, Any]) -> int | None:
    """Tokens per image: the `budget` option, or dominant + contextual."""
    if options.get("budget") is not None:
        return int(options["budget"])
    if "dominant" in options and "contextual" in options:
        return int(options["dominant"]) + int(options["contextual"])
    return None


@register(
    "visionzip",
    description="VisionZip: D dominant tokens by CLS attention + C contextual tokens merged by key similarity.",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {
        "cls_attn": score_request(o["signal"], (-2,), "sum"),
        "keys": SignalRequest("keys", (-2,), "mean"),
    },
    check=check_options,
    budget_rule=BudgetRule(_budget, _kept),
    published_attention="vision",
)
@document_signal
def visionzip(
    features: Tensor,
    *,
    cls_attn: Tensor,
    keys: Tensor,
    grid: tuple[int, int] | None = None,
    dominant: int = 54,
    contextual: int = 10,
    budget: int | None = None,
    signal: str | None = None,
) -> list[Reduction]:
    """VisionZip: keep D dominant tokens, merge the rest into C contextual tokens; D + C outputs.

    features [B, N, C]; cls_attn [B, N] the score chosen by `signal` at layer -2, summed over heads:
    CLS->patch attention ("cls"), or on a tower without CLS ("mean-received") the attention each
    patch receives, averaged over the patch queries; keys [B, N, Dk] head-averaged patch keys of
    layer -2 (CLS dropped).
    1. Dominant: the top-D tokens by cls_attn (ties to the lower index).
    2. Contextual: the N - D remaining tokens, in spatial order, have their keys L2-normalised
       (float32). Targets are the remaining tokens at positions 0, s, 2s, ... (s = max(1, (N-D) // C)),
       the first C of them. Every other remaining token is assigned to the target of highest cosine
       similarity (ties to the earlier target). Contextual token = target + mean of the features of
       the tokens assigned to it (just the target when none is); float32, cast back.
    Output order: the D dominant tokens in spatial order, then the C contextual tokens in spatial
    order of their targets. sources: the dominant tokens' indices, then the targets' indices;
    assignment: every token's output slot (no token is dropped when C >= 1; with C = 0 the
    non-dominant tokens are dropped, -1).

    Deviation from the official code: there the CLS token is the first dominant token (top D-1
    patches + CLS). LLaVA drops the CLS before the projector, so here the CLS is not among the
    features and the D dominant tokens are all patches (top-D): the LLM receives exactly D + C
    tokens either way. Ties are broken deterministically and the merge runs in float32.

    Options:
        dominant: number of dominant tokens D (default 54), >= 1.
        contextual: number of contextual tokens C (default 10), >= 0; D + C <= N. The published
            splits are (54, 10), (108, 20), (162, 30) for 64, 128, 192 tokens.
        budget: total D + C (default None: use dominant and contextual). When given it overrides
            both and is split 54:10 (dominant = round(budget * 54 / 64), contextual = the rest).
        signal: {SIGNAL}
    """
    check_options(dominant=dominant, contextual=contextual, budget=budget, signal=signal)
    b, n, c = check_features(features)
    if grid is not None:
        check_grid(grid, n)
    if budget is not None:
        d, k = split_budget(check_budget(budget, n))
    else:
        d, k = dominant, contextual
        if d + k > n:
            raise InputError(f"dominant + contextual = {d} + {k} = {d + k} exceeds the N={n} tokens")
    scores = check_signal(cls_attn, "cls_attn", (b, n), features)
    key = check_signal(keys, "keys", (b, n, None), features)
    dev = features.device

    dom = top_indices(scores, d).sort(dim=1).values  # [B, D] ascending
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, dom, True)
    # Stable sort of the mask puts the remaining tokens first, in ascending order.
    rest = is_dom.to(torch.uint8).sort(dim=1, stable=True).indices[:, : n - d]  # [B, N - D]

    assignment = torch.full((b, n), -1, dtype=torch.long, device=dev)
    assignment.scatter_(1, dom, torch.arange(d, device=dev).expand(b, d))
    out_feats = [features.gather(1, dom.unsqueeze(-1).expand(-1, -1, c))]
    out_src = [dom]
    if k > 0:
        m = n - d
        step = max(1, m // k)
        tpos = torch.arange(0, m, step, device=dev)[:k]  # positions of the targets within `rest`
        is_target = torch.zeros(m, dtype=torch.uint8, device=dev).index_fill_(0, tpos, 1)
        opos = is_target.sort(stable=True).indices[: m - k]  # the other positions, ascending; no host sync
        targets = rest[:, tpos]  # [B, K] original indices, ascending
        others = rest[:, opos]  # [B, M - K]

        def take(t: Tensor, idx: Tensor) -> Tensor:
            return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        kf = F.normalize(key.float(), dim=-1)
        sim = take(kf, others) @ take(kf, targets).transpose(1, 2)  # [B, M - K, K]
        choice = sim.argmax(dim=2)  # first maximum: ties to the earlier target
        # [B, M - K, K] one-hot; the matmul keeps the sums deterministic on every device
        onehot = (choice.unsqueeze(-1) == torch.arange(k, device=dev)).float()
        sums = onehot.transpose(1, 2) @ take(features, others).float()  # [B, K, C]
        counts = onehot.sum(dim=1).clamp(min=1).unsqueeze(-1)
        ctx = take(features, targets).float() + sums / counts
        out_feats.append(ctx.to(features.dtype))
        out_src.append(targets)
        slots = d + torch.arange(k, device=dev)
        assignment.scatter_(1, targets, slots.expand(b, k))
        assignment.scatter_(1, others, d + choice)
    feats = torch.cat(out_feats, dim=1)
    srcs = torch.cat(out_src, dim=1)
    return [
        Reduction(features=f, sources=s, assignment=a)
        for f, s, a in zip(feats.unbind(0), srcs.unbind(0), assignment.unbind(0), strict=True)
    ]
