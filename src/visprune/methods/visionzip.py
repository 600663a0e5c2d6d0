"""VisionZip (Yang et al., arXiv 2412.04467): the CLS token and the dominant patches by CLS attention,
plus contextual tokens merged from the rest by key similarity. On a tower without a CLS token the
dominant tokens are all patches, ranked by the attention each patch receives, summed over heads and
averaged over the patch queries."""

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
from visprune.methods.checks import check_budget, check_count, check_features, check_flag, check_grid
from visprune.methods.cls_topk import check_signal, top_indices
from visprune.methods.registry import register


def split_budget(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for a total `budget` in VisionZip's 54:10 proportion.

    dominant = round(budget * 54 / 64) (halves round up), contextual = the rest; 64, 128, 192 give the
    published (54, 10), (108, 20), (162, 30). dominant >= 1 for every budget >= 1.
    """
    dominant = (budget * 54 * 2 + 64) // 128
    return dominant, budget - dominant


def check_options(*, dominant: object, contextual: object, budget: object, signal: object, cls_token: object) -> None:
    """VisionZip's options: dominant >= 1, contextual >= 0, budget None or >= 1 (the sums against N
    are checked on the features), signal None or a SCORE_SIGNALS choice, cls_token None or a bool."""
    check_signal_option(signal)
    if cls_token is not None:
        check_flag(cls_token, "cls_token")
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
    description="VisionZip: D dominant tokens (the CLS token + the top D-1 patches by CLS attention) + C contextual "
    "tokens merged by key similarity.",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {
        "cls_attn": score_request(o["signal"], (-2,), "sum"),
        "keys": SignalRequest("keys", (-2,), "mean"),
        **(
            {}
            if o["cls_token"] is False
            else {"cls_feature": SignalRequest("cls_feature", optional=o["cls_token"] is None)}
        ),
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
    cls_feature: Tensor | None = None,
    grid: tuple[int, int] | None = None,
    dominant: int = 54,
    contextual: int = 10,
    budget: int | None = None,
    signal: str | None = None,
    cls_token: bool | None = None,
) -> list[Reduction]:
    """VisionZip: keep D dominant tokens, merge the rest into C contextual tokens; D + C outputs.

    features [B, N, C]; cls_attn [B, N] the score chosen by `signal` at layer -2, summed over heads:
    CLS->patch attention ("cls"), or on a tower without CLS ("mean-received") the attention each
    patch receives, averaged over the patch queries; keys [B, N, Dk] head-averaged patch keys of
    layer -2 (CLS dropped); cls_feature [B, C] the CLS token's features (the CLS row of the layer the
    features come from), given when the CLS token is kept (`cls_token`).
    1. Dominant: the CLS token plus the top D-1 patches by cls_attn (ties to the lower index), as in
       the official code, which keeps the CLS token as the first dominant token and passes it to the
       projector; without cls_feature (a tower without CLS, or cls_token=False) the top-D patches.
    2. Contextual: the remaining patches, in spatial order, have their keys L2-normalised (float32).
       Targets are the remaining patches at positions 0, s, 2s, ... (s = max(1, M // C) for the M
       remaining ones), the first C of them. Every other remaining patch is assigned to the target of
       highest cosine similarity (ties to the earlier target). Contextual token = target + mean of the
       features of the patches assigned to it (just the target when none is); float32, cast back.
    Output order: the CLS token (source -1: it stands for no patch), the dominant patches in spatial
    order, then the C contextual tokens in spatial order of their targets (the official order).
    sources: -1 for the CLS token, the dominant patches' indices, then the targets' indices;
    assignment: every patch's output slot (no patch is dropped when C >= 1; with C = 0 the
    non-dominant patches are dropped, -1).

    The official code's selection is reproduced exactly (its `dominant` counts the CLS token); ties
    are broken deterministically and the merge runs in float32.

    Options:
        dominant: number of dominant tokens D (default 54), >= 1.
        contextual: number of contextual tokens C (default 10), >= 0; D + C <= N. The published
            splits are (54, 10), (108, 20), (162, 30) for 64, 128, 192 tokens.
        budget: total D + C (default None: use dominant and contextual). When given it overrides
            both and is split 54:10 (dominant = round(budget * 54 / 64), contextual = the rest).
        signal: {SIGNAL}
        cls_token: whether the CLS token is the first dominant token: None (default) = where the
            tower has one (the official behaviour; D-1 patches then), True = required (refused on a
            tower without CLS), False = D patches and no CLS token.
    """
    check_options(dominant=dominant, contextual=contextual, budget=budget, signal=signal, cls_token=cls_token)
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
    if cls_token is True and cls_feature is None:
        raise InputError("cls_token=True needs cls_feature [B, C], the CLS token's features")
    if cls_token is False and cls_feature is not None:
        raise InputError("cls_feature was given with cls_token=False; drop one of them")
    dev = features.device
    out_feats: list[Tensor] = []
    out_src: list[Tensor] = []
    first = 0  # output slot of the first dominant patch
    if cls_feature is not None:
        out_feats.append(check_signal(cls_feature, "cls_feature", (b, c), features).to(features.dtype).unsqueeze(1))
        out_src.append(torch.full((b, 1), -1, dtype=torch.long, device=dev))
        first = 1
    p = d - first  # dominant patches

    dom = top_indices(scores, p).sort(dim=1).values  # [B, P] ascending
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, dom, True)
    # Stable sort of the mask puts the remaining tokens first, in ascending order.
    rest = is_dom.to(torch.uint8).sort(dim=1, stable=True).indices[:, : n - p]  # [B, N - P]

    assignment = torch.full((b, n), -1, dtype=torch.long, device=dev)
    assignment.scatter_(1, dom, torch.arange(first, d, device=dev).expand(b, p))
    out_feats.append(features.gather(1, dom.unsqueeze(-1).expand(-1, -1, c)))
    out_src.append(dom)
    if k > 0:
        m = n - p
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
