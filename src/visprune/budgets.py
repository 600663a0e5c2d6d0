"""Map a visual-token budget onto each method's own options, so methods can be compared at equal
budgets (64 / 128 / 192 tokens of LLaVA-1.5's 576).

Rules (documented in the README):
- encoder-side fixed methods: `budget` tokens per image reach the LLM.
- fastv, dart (one LLM stage): `budget` image tokens remain after the pruning layer
  (fastv keep_ratio = budget / dense).
- pdrop, sparsevlm (several LLM stages): the AVERAGE number of image tokens over all decoder
  layers equals the budget, as these papers report "equivalent tokens". pdrop keeps the ratio
  lambda^s after stage s (lambda solved numerically; budgets its default stages (8, 16, 24)
  cannot reach move the stages to EARLY_PDROP_LAYERS); sparsevlm scales its published
  (300, 200, 110) counts by one factor.
- adaptive methods (prumerge, prumerge+, knee, knee+text) take no budget: use their defaults.
- a budget given as a SHARE of each image's visual tokens (models whose images differ in size, e.g.
  Qwen-VL: 25% / 12.5% / 6.25%) is the token budget round(share * dense) under the rules above
  (`options_for_share`), so fastv's keep_ratio is the share whenever share * dense is whole.
Layer defaults of the multi-stage methods are published for 32-layer LLMs (7B); for another depth
they are moved to the same relative depth (e.g. pdrop's 8/16/24 become 2/4/6 in an 8-layer LLM), and
a single pruning layer (fastv, dart, knee+text) moves only when the LLM is too shallow for it. That
rule lives with the methods (`visprune.methods.depth`, `MethodSpec.bind`); this module only reads it.
This module is the one budget mapping used by `visprune bench`, `visprune eval` and `visprune viz`.
"""

from __future__ import annotations

from typing import Any

from visprune.errors import InputError
from visprune.methods import depth, get_method

ENCODER_BUDGET = ("fastervlm", "vtc-cls", "visionzip", "tome", "random", "pool")
ADAPTIVE = ("prumerge", "prumerge+", "knee", "knee+text")
# PyramidDrop's default stages (8, 16, 24) average at least 8/32 of the dense tokens; lower budgets
# move the stages earlier, to these layers.
EARLY_PDROP_LAYERS = (2, 6, 16)


REFERENCE_LAYERS = 32  # the depth the published layer choices are for (LLaVA-1.5-7B)


def scale_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Published layer indices moved to the same relative depth of a `num_layers`-layer LLM (>= 1);
    the rule of visprune.methods.depth, which also resolves the methods' layer defaults."""
    return depth.scale_layers(tuple(layers), REFERENCE_LAYERS, num_layers)


def _pdrop_ratios(budget: int, dense: int, num_layers: int, layers: tuple[int, ...]) -> tuple[float, ...] | None:
    """Ratios (l, l^2, l^3, ...) of the dense count kept after each stage so the layer average is `budget`;
    None when even dropping everything at the first stage averages more than the budget."""
    if max(layers) >= num_layers:
        return None
    if _average_tokens(dense, num_layers, layers, [0.0] * len(layers)) >= budget:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        lam = (lo + hi) / 2
        avg = _average_tokens(dense, num_layers, layers, [dense * lam ** (s + 1) for s in range(len(layers))])
        lo, hi = (lam, hi) if avg < budget else (lo, lam)
    return tuple(round(lo ** (s + 1), 6) for s in range(len(layers)))


def _average_tokens(dense: int, num_layers: int, layers: tuple[int, ...], counts: list[float]) -> float:
    """Mean image tokens per decoder layer when stage s (pruning at layers[s]) leaves counts[s]."""
    total, current, start = 0.0, float(dense), 0
    for layer, count in zip(layers, counts, strict=True):
        total += (layer - start) * current
        current, start = count, layer
    total += (num_layers - start) * current
    return total / num_layers


def fit_layers(method: str, num_layers: int) -> dict[str, Any]:
    """The method's LLM layer defaults as `MethodSpec.bind` resolves them for a `num_layers`-layer LLM,
    where they differ from the published ones ({} if none do): pdrop's and sparsevlm's stages move to
    the same relative depth, a single `layer` / `text_layer` (fastv, dart, knee+text) only when it
    does not fit."""
    spec = get_method(method)
    bound = spec.bind({}, llm_layers=num_layers, vision_layers=None)
    return {
        name: bound[name]
        for name, default in spec.defaults.items()
        if isinstance(default, depth.RelativeDepth) and default.stack == "llm" and bound[name] != default.published
    }


def options_for_budget(method: str, budget: int | None, dense: int = 576, num_layers: int = 32) -> dict[str, Any]:
    """Options that make `method` feed about `budget` visual tokens (None: its defaults) to an LLM of
    `num_layers` layers whose dense image has `dense` tokens."""
    spec = get_method(method)
    options = fit_layers(method, num_layers)
    if budget is None:
        return options
    if method in ADAPTIVE:
        raise InputError(f"{method} is adaptive and takes no budget; pass budget=None")
    if not 1 <= budget <= dense:
        raise InputError(f"budget={budget} must be between 1 and the dense count {dense}")
    if method in ENCODER_BUDGET or method == "dart":
        return {**options, "budget": budget}
    if method == "fastv":
        return {**options, "keep_ratio": budget / dense}
    layers = options.get("layers", depth.published(spec.defaults["layers"]))
    if method == "sparsevlm":
        published = spec.defaults["keep_counts"]
        prune_at = tuple(layer + 1 for layer in layers)  # sparsevlm scores at `layers`, prunes after them
        if prune_at[-1] >= num_layers:
            raise InputError(f"sparsevlm's layers {layers} leave no layer to prune in a {num_layers}-layer LLM")
        fixed = _average_tokens(dense, num_layers, prune_at, [0.0] * len(layers))
        per_unit = _average_tokens(dense, num_layers, prune_at, list(published)) - fixed
        scale = (budget - fixed) / per_unit
        counts = tuple(max(1, round(c * scale)) for c in published)
        if scale <= 0 or any(c > dense for c in counts):
            raise InputError(
                f"sparsevlm cannot average {budget} tokens with layers {layers} in a {num_layers}-layer LLM "
                f"(the layers before its first stage alone average {fixed:.0f})"
            )
        return {**options, "keep_counts": counts}
    if method == "pdrop":
        for stage_layers in (layers, scale_layers(EARLY_PDROP_LAYERS, num_layers)):
            ratios = _pdrop_ratios(budget, dense, num_layers, stage_layers)
            if ratios is not None:
                return {**options, "layers": stage_layers, "keep_ratios": ratios}
        raise InputError(f"pdrop cannot average {budget} tokens in a {num_layers}-layer LLM")
    raise InputError(f"no budget rule for method {method!r}")


def budget_for_share(share: float, dense: int) -> int:
    """Tokens per image that keep `share` (0 < share <= 1) of an image's `dense` visual tokens (at least 1)."""
    if not 0 < share <= 1:
        raise InputError(f"a budget share must be in (0, 1], got {share}")
    return max(1, round(share * dense))


def options_for_share(method: str, share: float | None, dense: int, num_layers: int = 32) -> dict[str, Any]:
    """Options that make `method` feed about `share` of the `dense` visual tokens of each image (None: its
    defaults): `options_for_budget` at `budget_for_share(share, dense)`."""
    budget = None if share is None else budget_for_share(share, dense)
    return options_for_budget(method, budget, dense, num_layers)
