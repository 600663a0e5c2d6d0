"""The text-relevance stage of `knee+text` (Seed 2, stage 2; Yu, Chen, Xu, arXiv 2409.01162).

Inside the LLM, at decoder layer K, every earlier token j gets a relevance to the question: the
attention the query (question) tokens give it, averaged over heads and over the query rows. The
visual tokens (and, with prune_text, the system-prompt tokens) whose relevance falls below the knee
of their sorted relevance curve are dropped. Stage 1 is the encoder method `knee`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visprune.methods.base import Placement, SignalRequest, TokenLayout
from visprune.methods.checks import check_choice, check_flag, check_ratio
from visprune.methods.depth import RelativeDepth, published
from visprune.methods.knee_point import DETECTORS, knee_count
from visprune.methods.llm_attention import (
    check_int,
    check_qk,
    check_stage,
    mean_received_attention,
    query_or_last,
    ratio_count,
    rows_from_mask,
    top_count_mask,
)
from visprune.methods.registry import register

# The text stage prunes at layer K = 2 of a 32-layer LLM; a shallower LLM gets the same relative depth.
TEXT_LAYER = RelativeDepth(2, reference=32, stack="llm", lowest=1, highest=-1, only_if_needed=True)


def check_options(
    *, text_layer: Any, text_keep_ratio: Any, text_detector: Any, text_smooth: Any, prune_text: Any
) -> None:
    """The text stage's own options (the encoder stage `knee` checks its own)."""
    if not isinstance(text_layer, RelativeDepth):
        check_int(text_layer, "text_layer", 1)
    if text_keep_ratio is not None:
        check_ratio(text_keep_ratio, "text_keep_ratio")
    check_choice(text_detector, "text_detector", DETECTORS)
    check_int(text_smooth, "text_smooth", 1)
    check_flag(prune_text, "prune_text")


def _signals(o: dict) -> dict[str, SignalRequest]:
    score = (published(o["text_layer"]),)
    return {"q": SignalRequest("q", layers=score, rows="query"), "k": SignalRequest("k", layers=score)}


def text_relevance(q: Tensor, k: Tensor, layout: TokenLayout) -> Tensor:
    """[B, S] float32: head- and query-row-averaged attention from the query tokens to every token.

    Query rows are the layout's query tokens (a sample without any uses its last real token).
    """
    return mean_received_attention(q, k, query_or_last(layout), layout.attention_mask)


def kept_images(present: Tensor, options: dict[str, Any], stage: int = 0) -> Tensor | None:
    """[B] long: the image tokens the text stage keeps of the `present` ones per sample with a
    `text_keep_ratio`, floor(n * ratio) and at least 1 (the rule its function applies; the decoder pruner
    plans the shorter sequence with it). None where the counts come from the data: the knee
    (text_keep_ratio=None) or prune_text (the system tokens' cut)."""
    if options["text_keep_ratio"] is None or options["prune_text"]:
        return None
    return ratio_count(present, options["text_keep_ratio"])


def _group_keep(
    relevance: Tensor,
    group: Tensor,
    protected: Tensor,
    keep_ratio: float | None,
    detector: str,
    smooth: int,
) -> Tensor:
    """Keep the top of `group` [B, S]: a fixed ratio of it, or the part above the knee of its sorted relevance.

    `protected` members (the fallback query row) are always kept: under a ratio they take the first of its
    places, so the count is the ratio's whatever the rows are (the count rule `kept_images`); the knee is
    found on the curve of the other members.
    """
    if keep_ratio is not None:
        counts = ratio_count(group.sum(dim=1), keep_ratio)
        return top_count_mask(torch.where(protected, float("inf"), relevance), group, counts)
    group = group & ~protected
    n = group.sum(dim=1)
    ordered = torch.where(group, relevance, float("-inf")).sort(dim=1, descending=True).values
    # Fill past each row's valid length with its smallest valid value (flat tail: no effect on the
    # knee, safe under smoothing); rows without members are all zeros and keep nothing below.
    last = ordered.gather(1, (n - 1).clamp(min=0).unsqueeze(1))
    inside = torch.arange(ordered.shape[1], device=n.device).unsqueeze(0) < n.unsqueeze(1)
    ordered = torch.where(inside, ordered, torch.where(n.unsqueeze(1) > 0, last, 0.0))
    counts = torch.minimum(knee_count(ordered, detector, smooth, valid=n.clamp(min=1)), n)
    # A curve of 1 or 2 points has no interior knee: keep its top point, as every detector does on
    # an unpadded curve (knee_count's max-curvature would keep 2 of a padded 2-point row).
    counts = torch.where(n <= 2, n.clamp(max=1), counts)
    return top_count_mask(relevance, group, counts) | protected


@register(
    "knee+text",
    description="Two-stage image-text pruning: CLS-similarity knee before the LLM (`knee`), then keep the "
    "image tokens most relevant to the question at LLM layer K (half of them by default, or its knee)",
    placement=Placement.BOTH,
    adaptive=True,
    signals=_signals,
    layers=lambda o: (published(o["text_layer"]),),
    encoder_stage="knee",
    check=check_options,
    visual_kept=kept_images,
)
def text_stage(
    *,
    q: Tensor | None = None,
    k: Tensor | None = None,
    hidden: Tensor | None = None,
    layout: TokenLayout,
    stage: int = 0,
    text_layer: int | RelativeDepth = TEXT_LAYER,
    text_keep_ratio: float | None = 0.5,
    text_detector: str = "kneedle",
    text_smooth: int = 1,
    prune_text: bool = False,
    **encoder_options: Any,
) -> Tensor:
    """Keep mask [B, S] (True = keep) over the sequence entering decoder layer `text_layer`.

    The LLM stage of `knee+text`. Called once, at the forward pre-hook of decoder layer
    `text_layer` (K), on the sequence the encoder stage `knee` already shortened. Expects
    q [B, H, S, d] and k [B, H_kv, S, d] of the SAME layer K, RoPE applied, computed from the hook's
    input hidden states (input_layernorm -> q_proj/k_proj -> RoPE); only the query-token rows of q
    are used. hidden is not used. The spec's `signals` list only these LLM signals; the encoder
    stage's come from get_method(spec.encoder_stage).signals(options).
    Relevance of token j = mean over heads and over the query tokens (the question; a sample with
    none uses its last real token instead, which is then kept like a query token; when it is an image
    token it takes the first of the ratio's places, so the count follows `kept_images`) of
    softmax(q_i k^T / sqrt(d))[j] under the causal mask. Among
    the image tokens of each sample, the most relevant `text_keep_ratio` share (default half of those
    that reach layer K, which already vary per image) are kept, or with text_keep_ratio=None those
    ranked at or above the knee of the descending relevance curve (`knee_point.knee_count` with the
    sample's own count); at least 1 per sample with image tokens. With prune_text, the system tokens
    (text before the first image) are cut the same way on their OWN curve (their scale differs from
    the image tokens'), except the first real token (BOS, the attention sink), which is always kept.
    Query tokens and other text are never dropped; padding positions come back False. Options of the
    encoder stage may be passed along (the merged option dict) and are
    ignored here; its `signal` option picks stage 1's score (on a tower without CLS the attention
    each patch receives, averaged over the patch queries; this stage is the same on every tower).

    Options:
        text_layer: decoder layer K (>= 1) whose input is pruned, scored with layer K's own q/k.
            Default: 2 for a 32-layer LLM; kept on every LLM it fits and moved to the same relative
            depth (at least 1) only on a shallower one. An explicit value is used as given.
        text_keep_ratio: a fraction in (0, 1] keeps that share of the image (and, with prune_text,
            system) tokens that reach layer K, the most relevant ones; default 0.5. None cuts at the
            knee of the relevance curve instead. On validation items of the synthetic suite 0.5 kept
            more accuracy than the knee and than 0.25 with every first stage
            (docs/results/knee-operating-point).
        text_detector: knee detector on the sorted relevance curve: 'kneedle', 'max-gap' or
            'max-curvature' (see visprune.methods.knee_point).
        text_smooth: moving-average window applied to the sorted relevance curve first (1 = none).
        prune_text: also drop system-prompt tokens below their own knee (the first real token stays).
    """
    check_options(
        text_layer=text_layer,
        text_keep_ratio=text_keep_ratio,
        text_detector=text_detector,
        text_smooth=text_smooth,
        prune_text=prune_text,
    )
    check_stage(stage, 1, "knee+text")
    check_qk(q, k, layout)
    mask = layout.attention_mask
    rows = query_or_last(layout)  # the query rows; never dropped (also when it is the fallback)
    relevance = mean_received_attention(q, k, rows, mask, rows=rows_from_mask(rows, layout.text_rows))
    visual = layout.visual & mask
    kept_visual = _group_keep(relevance, visual, rows & visual, text_keep_ratio, text_detector, text_smooth)
    keep = mask & ~(visual & ~kept_visual)
    if prune_text:
        s = mask.shape[1]
        first = torch.arange(s, device=mask.device).unsqueeze(0) == mask.long().argmax(dim=1, keepdim=True)
        system = layout.system & mask & ~layout.visual & ~first
        kept_system = _group_keep(relevance, system, rows & system, text_keep_ratio, text_detector, text_smooth)
        keep = keep & (~system | kept_system)
    return keep
