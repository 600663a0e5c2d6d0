"""FastV (Chen et al., arXiv 2403.06764): drop the image tokens the last prompt token attends to least.

At decoder layer K the image tokens are ranked by the head-averaged attention they receive from the
last prompt token in layer K-1 and the top `keep_ratio` of them stay; layers >= K run on the
shorter sequence and kept tokens keep their original positions.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from visprune.methods.base import Placement, SignalRequest, TokenLayout
from visprune.methods.budget_rules import KEEP_RATIO
from visprune.methods.checks import check_ratio
from visprune.methods.depth import RelativeDepth, published
from visprune.methods.llm_attention import (
    assemble_keep,
    check_int,
    check_qk,
    check_stage,
    last_token_rows,
    mean_received_attention,
    ratio_count,
    top_count_mask,
)
from visprune.methods.registry import register

# FastV prunes after layer K = 2 of LLaVA-1.5-7B's 32; a shallower LLM gets the same relative depth.
LAYER = RelativeDepth(2, reference=32, stack="llm", lowest=1, highest=-1, only_if_needed=True)


def check_options(*, layer: Any, keep_ratio: Any) -> None:
    """FastV's options: layer >= 1 (or the default) and keep_ratio in (0, 1]."""
    if not isinstance(layer, RelativeDepth):
        check_int(layer, "layer", 1)
    check_ratio(keep_ratio, "keep_ratio")


def _signals(o: dict) -> dict[str, SignalRequest]:
    score = (published(o["layer"]) - 1,)
    return {"q": SignalRequest("q", layers=score, rows="last"), "k": SignalRequest("k", layers=score)}


def kept_images(present: Tensor, options: dict[str, Any], stage: int = 0) -> Tensor:
    """[B] long: the image tokens FastV keeps of the `present` ones per sample, floor(n * keep_ratio), at
    least 1 (the rule its function applies; the decoder pruner plans the shorter sequence with it)."""
    return ratio_count(present, options["keep_ratio"])


@register(
    "fastv",
    description="FastV: at LLM layer K keep the image tokens the last prompt token attends to most "
    "(layer K-1 attention, head mean); fixed keep ratio",
    placement=Placement.LLM,
    adaptive=False,
    signals=_signals,
    layers=lambda o: (published(o["layer"]),),
    check=check_options,
    budget_rule=KEEP_RATIO,
    published_attention="llm",
    visual_kept=kept_images,
)
def fastv(
    *,
    q: Tensor | None = None,
    k: Tensor | None = None,
    hidden: Tensor | None = None,
    layout: TokenLayout,
    stage: int = 0,
    layer: int | RelativeDepth = LAYER,
    keep_ratio: float = 0.5,
) -> Tensor:
    """Keep mask [B, S] (True = keep) over the sequence entering decoder layer `layer`.

    Called once, at the forward pre-hook of decoder layer `layer` (K). Expects q [B, H, S, d] and
    k [B, H_kv, S, d] of the PREVIOUS layer (K-1): that layer's self-attention queries/keys, RoPE
    applied, computed from its input hidden states (the keys are what layer K-1 wrote to the KV
    cache; only the last real token's query row is needed). The registered signals say so:
    SignalRequest("q", layers=(K-1,)). hidden is not used.
    Score of image token j = mean over heads of softmax(q_last k^T / sqrt(d))[j], where q_last is
    the last real token of each sample (the last prompt token; the last real token also when the
    sample has no query tokens). Keeps floor(n_b * keep_ratio) image tokens (at least 1) of the n_b
    present in sample b; every real non-visual token is kept; padding positions come back False.
    The official code keeps round(n * (1 - R)) (Python's round: halves to even), so the two differ by
    one token where n * keep_ratio has a fractional part above 1/2 (or exactly 1/2 with an odd floor);
    floor is kept here because it never exceeds a budget given as keep_ratio = budget / n, and the
    count is computed on the exact fraction (64/576 keeps 64 of 576, not 63).

    Options:
        layer: decoder layer K whose input is pruned (>= 1; scores come from layer K - 1). Default: 2,
            as published for a 32-layer LLM; kept on every LLM it fits and moved to the same
            relative depth (at least 1) only on a shallower one. An explicit value is used as given.
        keep_ratio: fraction of the image tokens kept, in (0, 1] (0.5 keeps half, FastV's R = 50%).
    """
    check_options(layer=layer, keep_ratio=keep_ratio)
    check_stage(stage, 1, "fastv")
    check_qk(q, k, layout)
    visual = layout.visual & layout.attention_mask
    scores = mean_received_attention(q, k, visual, layout.attention_mask, rows=last_token_rows(layout))
    counts = kept_images(visual.sum(dim=1), {"keep_ratio": keep_ratio})
    return assemble_keep(layout, top_count_mask(scores, visual, counts))
