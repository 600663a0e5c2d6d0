"""SparseVLM (Zhang et al., arXiv 2410.04417): text-guided, multi-stage visual token sparsification.

Raters are the question tokens most related to the image: with R = softmax over text tokens of
V T^T (V = visual hidden states, T = question hidden states), a question token is a rater when its
mean relation over the visual tokens exceeds the mean over all question tokens. Visual tokens are
scored by the head-averaged attention the raters give them and the top keep_counts[s] stay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import Placement, SignalRequest, TokenLayout
from visprune.methods.budget_rules import BudgetRule, average_tokens
from visprune.methods.depth import RelativeDepth, published
from visprune.methods.llm_attention import (
    assemble_keep,
    check_hidden,
    check_int,
    check_layers,
    check_qk,
    check_stage,
    mean_received_attention,
    query_or_last,
    rows_from_mask,
    top_count_mask,
)
from visprune.methods.registry import register

# SparseVLM scores at layers 2/6/15 of LLaVA-1.5-7B's 32 (pruning from the next layer on), moved to
# the same relative depth elsewhere; the last scoring layer must leave a layer to prune.
LAYERS = RelativeDepth((2, 6, 15), reference=32, stack="llm", lowest=0, highest=-2)


def check_options(*, layers: Any, keep_counts: Any) -> None:
    """SparseVLM's options: strictly increasing layers >= 0 (or the default) and one keep count
    (int >= 1) per layer."""
    stages = published(layers)
    if not isinstance(layers, RelativeDepth):
        check_layers(layers, "layers", 0)
    if not isinstance(keep_counts, tuple) or len(keep_counts) != len(stages):
        raise InputError(f"keep_counts must be a tuple with one count per layer ({len(stages)}), got {keep_counts!r}")
    for i, c in enumerate(keep_counts):
        check_int(c, f"keep_counts[{i}]", 1)


def _signals(o: dict) -> dict[str, SignalRequest]:
    layers = tuple(published(o["layers"]))
    return {
        "q": SignalRequest("q", layers=layers, rows="text"),
        "k": SignalRequest("k", layers=layers),
        "hidden": SignalRequest("hidden", layers=layers),
    }


def raters(hidden: Tensor, layout: TokenLayout) -> Tensor:
    """[B, S] bool: the rater text tokens of each sample (see the module docstring).

    Text tokens are the query tokens (the last real token when a sample has none). When no token
    exceeds the mean (all relations equal) every text token rates; without visual tokens likewise.
    """
    text = query_or_last(layout)
    visual = layout.visual & layout.attention_mask
    idx, valid = rows_from_mask(text, layout.text_rows)  # [B, R]
    h = hidden.float()
    t = h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, R, C]
    logits = (h @ t.transpose(1, 2)).masked_fill(~valid.unsqueeze(1), float("-inf"))  # [B, S, R]
    logits = logits.masked_fill(~valid.any(dim=1).view(-1, 1, 1), 0.0)
    rel = logits.softmax(dim=-1)
    n_vis = visual.sum(dim=1, keepdim=True).clamp(min=1)
    score = (rel * visual.unsqueeze(-1)).sum(dim=1) / n_vis  # [B, R] mean relation over visual tokens
    n_text = valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, score, 0.0).sum(dim=1, keepdim=True) / n_text
    chosen = valid & (score > mean)
    chosen = torch.where(chosen.any(dim=1, keepdim=True), chosen, valid)
    return torch.zeros_like(text).scatter_(1, idx, chosen)  # idx is a permutation prefix: no clashes


PUBLISHED_KEEP_COUNTS = (300, 200, 110)


def _budget(budget: int, options: dict[str, Any], *, dense: int, num_layers: int) -> dict[str, Any]:
    """The published keep counts scaled by one factor so that the image tokens averaged over the LLM's
    layers equal `budget`; InputError when the layers before the first stage alone average more."""
    layers = options.get("layers", published(LAYERS))
    prune_at = tuple(layer + 1 for layer in layers)  # sparsevlm scores at `layers`, prunes after them
    if prune_at[-1] >= num_layers:
        raise InputError(f"sparsevlm's layers {layers} leave no layer to prune in a {num_layers}-layer LLM")
    fixed = average_tokens(dense, num_layers, prune_at, [0.0] * len(layers))
    per_unit = average_tokens(dense, num_layers, prune_at, list(PUBLISHED_KEEP_COUNTS)) - fixed
    scale = (budget - fixed) / per_unit
    counts = tuple(max(1, round(c * scale)) for c in PUBLISHED_KEEP_COUNTS)
    if scale <= 0 or any(c > dense for c in counts):
        raise InputError(
            f"sparsevlm cannot average {budget} tokens with layers {layers} in a {num_layers}-layer LLM "
            f"(the layers before its first stage alone average {fixed:.0f})"
        )
    return {**options, "keep_counts": counts}


def kept_images(present: Tensor, options: dict[str, Any], stage: int) -> Tensor:
    """[B] long: the image tokens stage `stage` keeps of the `present` ones per sample, min(n, keep_counts[s])
    (the rule sparsevlm's function applies; the decoder pruner plans the shorter sequence with it)."""
    return present.clamp(max=options["keep_counts"][stage])


@register(
    "sparsevlm",
    description="SparseVLM: text raters' attention prunes image tokens at LLM layers 2/6/15 (keep 300/200/110)",
    placement=Placement.LLM,
    adaptive=False,
    signals=_signals,
    layers=lambda o: tuple(layer + 1 for layer in published(o["layers"])),
    check=check_options,
    budget_rule=BudgetRule(_budget),
    published_attention="llm",
    visual_kept=kept_images,
)
def sparsevlm(
    *,
    q: Tensor | None = None,
    k: Tensor | None = None,
    hidden: Tensor | None = None,
    layout: TokenLayout,
    stage: int = 0,
    layers: tuple | RelativeDepth = LAYERS,
    keep_counts: tuple = PUBLISHED_KEEP_COUNTS,
) -> Tensor:
    """Keep mask [B, S] (True = keep) over the sequence entering decoder layer `layers[stage] + 1`.

    As in the paper and its official code, `layers` are the layers whose attention scores the
    tokens; the pruning takes effect from the NEXT layer on. So the function is called at the forward
    pre-hook of decoder layer layers[stage] + 1 (the registered `layers` are (3, 7, 16) by default),
    with stage = the index in `layers`, on the sequence as pruned by the earlier stages, and expects
    q [B, H, S, d], k [B, H_kv, S, d] (RoPE applied) and hidden [B, S, C] of layer layers[stage]
    (the PREVIOUS layer relative to the hook): its self-attention queries/keys and its INPUT hidden
    states (the same tensor its q/k are projected from, before input_layernorm). Only the text rows
    of q are used.
    Stage s keeps min(keep_counts[s], n_b) of the n_b image tokens present in sample b (the counts
    are clamped to what is there; a sample with fewer keeps all). Real non-visual tokens are kept;
    padding positions come back False.

    Options:
        layers: decoder layers whose attention scores the image tokens, strictly increasing; pruning
            applies from layer + 1 on. Default: (2, 6, 15) as published for a 32-layer LLM, moved to
            the same relative depth of the model's LLM when applied (e.g. (1, 2, 4) in an 8-layer
            one). An explicit tuple is used as given.
        keep_counts: image tokens kept after each stage, one per layer (ints >= 1), clamped per
            sample to the image tokens present.
    """
    check_options(layers=layers, keep_counts=keep_counts)
    check_stage(stage, len(keep_counts), "sparsevlm")
    check_qk(q, k, layout)
    check_hidden(hidden, layout)
    visual = layout.visual & layout.attention_mask
    rating = raters(hidden, layout)
    rows = rows_from_mask(rating, layout.text_rows)  # raters are text tokens (or the last token)
    scores = mean_received_attention(q, k, rating, layout.attention_mask, rows=rows)
    counts = kept_images(visual.sum(dim=1), {"keep_counts": keep_counts}, stage)
    return assemble_keep(layout, top_count_mask(scores, visual, counts))
