"""DART (Wen et al., arXiv 2502.11494): prune by duplication, not importance.

At decoder layer K a few pivot tokens are chosen (the image and question tokens with the largest key
L1 norm); for each pivot the image tokens LEAST similar to it (cosine of hidden states) are kept,
each image token at most once. Needs no attention map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import Placement, SignalRequest, TokenLayout
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_tensor
from visprune.methods.depth import RelativeDepth, published
from visprune.methods.llm_attention import (
    assemble_keep,
    check_hidden,
    check_int,
    check_layout_arg,
    check_stage,
    top_count_mask,
)
from visprune.methods.registry import register

# DART prunes at layer 2 of LLaVA-1.5-7B's 32; a shallower LLM gets the same relative depth.
LAYER = RelativeDepth(2, reference=32, stack="llm", lowest=1, highest=-1, only_if_needed=True)


def _signals(o: dict) -> dict[str, SignalRequest]:
    layer = published(o["layer"])
    return {
        "hidden": SignalRequest("hidden", layers=(layer,)),
        "k": SignalRequest("k", layers=(layer - 1,)),
    }


def check_options(*, layer: Any, budget: Any, pivots: Any) -> None:
    """DART's options: layer >= 1 (or the default), budget >= 1, pivots >= 1."""
    if not isinstance(layer, RelativeDepth):
        check_int(layer, "layer", 1)
    check_int(budget, "budget", 1)
    check_int(pivots, "pivots", 1)


def _ordered_top(scores: Tensor, candidates: Tensor, p: int) -> Tensor:
    """[B, p] indices of the p highest-scoring candidates, best first (ties: lower index)."""
    masked = torch.where(candidates, scores, float("-inf"))
    return torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :p]


def kept_images(present: Tensor, options: dict[str, Any], stage: int = 0) -> Tensor:
    """[B] long: the image tokens DART keeps of the `present` ones per sample, min(n, budget) (the rule its
    function applies; the decoder pruner plans the shorter sequence with it)."""
    return present.clamp(max=options["budget"])


@register(
    "dart",
    description="DART: at LLM layer K keep, for 4 image + 4 text pivots (largest key L1 norm), the image "
    "tokens least similar to each pivot; fixed budget, no attention map",
    placement=Placement.LLM,
    adaptive=False,
    signals=_signals,
    layers=lambda o: (published(o["layer"]),),
    check=check_options,
    budget_rule=TOKENS,
    visual_kept=kept_images,
)
def dart(
    *,
    q: Tensor | None = None,
    k: Tensor | None = None,
    hidden: Tensor | None = None,
    layout: TokenLayout,
    stage: int = 0,
    layer: int | RelativeDepth = LAYER,
    budget: int = 64,
    pivots: int = 4,
) -> Tensor:
    """Keep mask [B, S] (True = keep) over the sequence entering decoder layer `layer`.

    Called once, at the forward pre-hook of decoder layer `layer` (K). Expects
    k [B, H_kv, S, d]: the keys of the PREVIOUS layer K-1 as stored in its KV cache (RoPE applied;
    the official code reads exactly that cache), and hidden [B, S, C]: the INPUT hidden states of
    layer K (the hook's argument). The official code applies the model's final norm to hidden first;
    cosine similarity ignores scale, so that only matters through the norm's per-channel weight: an
    adapter that wants the exact official behaviour passes norm(hidden). q is not used.
    Pivots: the `pivots` image tokens and the `pivots` query tokens with the largest key L1 norm
    (sum of |k| over all key heads and dims), per sample and clamped to the tokens present. The
    image pivots are kept; then, pivot by pivot (image pivots by descending norm, then text pivots),
    the remaining budget is split evenly (the first pivots take one more when it does not divide)
    and each pivot keeps its share of the not-yet-kept image tokens with the LOWEST cosine
    similarity to it. Exactly min(budget, n_b) image tokens are kept in sample b (the official code
    keeps pivots + 8 * (budget // 8), i.e. 68 for budget 64). Real non-visual tokens are kept;
    padding positions come back False.

    Pivot order: the result depends on it (each pivot takes its share from the tokens earlier pivots
    left). The implementation we could read (llmc's DART, batch 1) visits the pivots in the iteration
    order of a Python set of their sequence positions: deterministic, but neither norm nor position
    order (it depends on the positions modulo the set's hash-table size). visprune fixes a documented
    order instead: image pivots by descending key norm, then text pivots by descending key norm.

    Options:
        layer: decoder layer K whose input is pruned (>= 1; keys come from layer K - 1). Default: 2,
            as published for a 32-layer LLM; kept on every LLM it fits and moved to the same
            relative depth (at least 1) only on a shallower one. An explicit value is used as given.
        budget: image tokens kept per sample (int >= 1; all of them when fewer are present).
        pivots: pivot tokens per modality (image and text), int >= 1.
    """
    check_options(layer=layer, budget=budget, pivots=pivots)
    check_stage(stage, 1, "dart")
    b, s = check_hidden(hidden, layout)
    check_layout_arg(layout)
    if k is None:
        raise InputError("dart needs k (the keys of decoder layer `layer` - 1, RoPE applied) [B, H_kv, S, d]")
    check_tensor(k, "k", (b, None, s, None))
    mask = layout.attention_mask
    visual = layout.visual & mask
    text = layout.query & mask & ~layout.visual
    norms = k.float().abs().sum(dim=(1, 3))  # [B, S] L1 norm of the concatenated per-head keys
    n_vis = visual.sum(dim=1)
    target = kept_images(n_vis, {"budget": budget})
    p_img = n_vis.clamp(max=pivots).clamp(max=target)
    p_txt = text.sum(dim=1).clamp(max=pivots)
    p = min(pivots, s)
    slots = torch.arange(p, device=mask.device).unsqueeze(0)
    piv_idx = torch.cat([_ordered_top(norms, visual, p), _ordered_top(norms, text, p)], dim=1)  # [B, 2p]
    piv_valid = torch.cat([slots < p_img.unsqueeze(1), slots < p_txt.unsqueeze(1)], dim=1)
    n_piv = (p_img + p_txt).clamp(min=1).unsqueeze(1)
    remaining = (target - p_img).unsqueeze(1)
    order = piv_valid.long().cumsum(dim=1) - 1  # index among the valid pivots
    quota = torch.where(piv_valid, remaining // n_piv + (order < remaining % n_piv).long(), 0)

    hn = F.normalize(hidden.float(), dim=-1)
    selected = top_count_mask(norms, visual, p_img)
    for j in range(piv_idx.shape[1]):  # at most 2 * pivots iterations, each batched over samples
        pivot = hn.gather(1, piv_idx[:, j].view(b, 1, 1).expand(b, 1, hn.shape[-1]))  # [B, 1, C]
        sim = (hn @ pivot.transpose(1, 2)).squeeze(-1)  # [B, S]
        selected = selected | top_count_mask(-sim, visual & ~selected, quota[:, j])
    return assemble_keep(layout, selected)
