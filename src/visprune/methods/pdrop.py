"""PyramidDrop (Xing et al., arXiv 2410.17247): drop image tokens in stages as the LLM gets deeper.

At each layer of `layers` the image tokens still present are ranked by the head-averaged attention
they receive from the last instruction token, computed with THAT layer's q/k on its input, and the
top ones stay, so that after stage s a fraction keep_ratios[s] of the original image tokens is left.
"""

from __future__ import annotations

from fractions import Fraction
from itertools import pairwise
from typing import Any

from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import Placement, SignalRequest, TokenLayout
from visprune.methods.budget_rules import BudgetRule, average_tokens
from visprune.methods.depth import RelativeDepth, published, scale_layers
from visprune.methods.llm_attention import (
    assemble_keep,
    check_layers,
    check_qk,
    check_ratios,
    check_stage,
    last_token_rows,
    mean_received_attention,
    ratio_count,
    top_count_mask,
)
from visprune.methods.registry import register

# PyramidDrop's stages at layers 8/16/24 of LLaVA-1.5-7B's 32, moved to the same relative depth elsewhere.
LAYERS = RelativeDepth((8, 16, 24), reference=32, stack="llm", lowest=1, highest=-1)


def check_options(*, layers: Any, keep_ratios: Any) -> tuple[float, ...]:
    """PyramidDrop's options: strictly increasing layers >= 1 (or the default) and one non-increasing
    keep ratio in (0, 1] per layer. Returns the ratios as floats."""
    stages = published(layers)
    if not isinstance(layers, RelativeDepth):
        check_layers(layers, "layers", 1)
    ratios = check_ratios(keep_ratios, "keep_ratios")
    if len(ratios) != len(stages):
        raise InputError(f"keep_ratios has {len(ratios)} entries but layers has {len(stages)}; give one per layer")
    if any(a < b for a, b in pairwise(ratios)):
        raise InputError(f"keep_ratios must be non-increasing (cumulative fractions), got {keep_ratios!r}")
    return ratios


def _signals(o: dict) -> dict[str, SignalRequest]:
    layers = tuple(published(o["layers"]))
    return {"q": SignalRequest("q", layers=layers, rows="last"), "k": SignalRequest("k", layers=layers)}


def kept_images(present: Tensor, options: dict[str, Any], stage: int) -> Tensor:
    """[B] long: the image tokens stage `stage` keeps of the `present` ones per sample (the rule pdrop's
    function applies; the decoder pruner plans the shorter sequence with it)."""
    return ratio_count(present, stage_fraction(options["keep_ratios"], stage))


def stage_fraction(keep_ratios: tuple[float, ...], stage: int) -> Fraction:
    """The fraction of the image tokens PRESENT at `stage` that it keeps: r_s / r_{s-1} (r_{-1} = 1)."""
    frac = [Fraction(r).limit_denominator(1_000_000) for r in keep_ratios]
    return frac[stage] / (frac[stage - 1] if stage else 1)


# The default stages (8, 16, 24) average at least 8/32 of the dense tokens; lower budgets move the stages
# earlier, to these layers (of a 32-layer LLM; moved to the same relative depth of another).
EARLY_LAYERS = (2, 6, 16)


def _ratios(budget: int, dense: int, num_layers: int, layers: tuple[int, ...]) -> tuple[float, ...] | None:
    """Ratios (l, l^2, l^3, ...) of the dense count kept after each stage so that the layer average is
    `budget`; None when even dropping everything at the first stage averages more than the budget."""
    if max(layers) >= num_layers:
        return None
    if average_tokens(dense, num_layers, layers, [0.0] * len(layers)) >= budget:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        lam = (lo + hi) / 2
        avg = average_tokens(dense, num_layers, layers, [dense * lam ** (s + 1) for s in range(len(layers))])
        lo, hi = (lam, hi) if avg < budget else (lo, lam)
    return tuple(round(lo ** (s + 1), 6) for s in range(len(layers)))


def _budget(budget: int, options: dict[str, Any], *, dense: int, num_layers: int) -> dict[str, Any]:
    """Geometric keep ratios (lambda^s after stage s) with the image tokens averaged over the LLM's layers
    equal to `budget`; at budgets the default stages cannot reach, the stages move to EARLY_LAYERS."""
    layers = options.get("layers", published(LAYERS))
    for stage_layers in (layers, scale_layers(EARLY_LAYERS, LAYERS.reference, num_layers)):
        ratios = _ratios(budget, dense, num_layers, stage_layers)
        if ratios is not None:
            return {**options, "layers": stage_layers, "keep_ratios": ratios}
    raise InputError(f"pdrop cannot average {budget} tokens in a {num_layers}-layer LLM")


@register(
    "pdrop",
    description="PyramidDrop: multi-stage drop of image tokens by last-instruction-token attention "
    "(layers 8/16/24 keeping 50%/25%/12.5%)",
    placement=Placement.LLM,
    adaptive=False,
    signals=_signals,
    layers=lambda o: tuple(published(o["layers"])),
    check=check_options,
    budget_rule=BudgetRule(_budget),
    published_attention="llm",
    visual_kept=kept_images,
)
def pdrop(
    *,
    q: Tensor | None = None,
    k: Tensor | None = None,
    hidden: Tensor | None = None,
    layout: TokenLayout,
    stage: int = 0,
    layers: tuple | RelativeDepth = LAYERS,
    keep_ratios: tuple = (0.5, 0.25, 0.125),
) -> Tensor:
    """Keep mask [B, S] (True = keep) over the sequence entering decoder layer `layers[stage]`.

    Called at the forward pre-hook of each decoder layer in `layers`, with stage = its index there,
    on the sequence as pruned by the earlier stages. Expects q [B, H, S, d] and k [B, H_kv, S, d] of
    the SAME layer layers[stage], RoPE applied, computed from the hook's input hidden states
    (input_layernorm -> q_proj/k_proj -> RoPE, as PyramidDrop's official code; only the last real
    token's query row is needed). hidden is not used.
    Score of image token j = head mean of softmax(q_last k^T / sqrt(d))[j], q_last = last real token
    (the last instruction token). Stage s keeps floor(n_s * keep_ratios[s] / keep_ratios[s-1])
    (keep_ratios[-1] := 1) of the n_s image tokens present, at least 1: the cumulative fractions of
    the ORIGINAL count are reached stage by stage (exactly for counts divisible by the ratios'
    denominators, e.g. 576 -> 288 -> 144 -> 72; otherwise within rounding, as the official code,
    which also floors per stage). Real non-visual tokens are kept; padding positions come back False.

    Options:
        layers: decoder layers whose input is pruned, strictly increasing (>= 1). Default: (8, 16, 24)
            as published for a 32-layer LLM, moved to the same relative depth of the model's LLM
            when applied (e.g. (2, 4, 6) in an 8-layer one). An explicit tuple is used as given.
        keep_ratios: cumulative fractions of the original image tokens left after each stage,
            non-increasing, in (0, 1], one per layer.
    """
    ratios = check_options(layers=layers, keep_ratios=keep_ratios)
    check_stage(stage, len(ratios), "pdrop")
    check_qk(q, k, layout)
    visual = layout.visual & layout.attention_mask
    scores = mean_received_attention(q, k, visual, layout.attention_mask, rows=last_token_rows(layout))
    counts = kept_images(visual.sum(dim=1), {"keep_ratios": ratios}, stage)
    return assemble_keep(layout, top_count_mask(scores, visual, counts))
