"""Map a visual-token budget onto each method's own options, so methods can be compared at equal
budgets (64 / 128 / 192 tokens of LLaVA-1.5's 576).

Each fixed-budget method registers its rule (`visprune.methods.budget_rules`, README "Budgets"):
encoder-side methods feed `budget` tokens per image; one-stage LLM-side methods keep `budget` image
tokens after their pruning layer; multi-stage ones (pdrop, sparsevlm) average `budget` image tokens
over all decoder layers, as those papers report "equivalent tokens". Adaptive methods (prumerge,
prumerge+, knee, knee+text) take no budget. A budget given as a SHARE of each image's visual tokens
(models whose images differ in size, e.g. Qwen-VL: 25% / 12.5% / 6.25%) is the token budget
round(share * dense) under the same rules (`options_for_share`).
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

REFERENCE_LAYERS = 32  # the depth the published layer choices are for (LLaVA-1.5-7B)


def scale_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Published layer indices moved to the same relative depth of a `num_layers`-layer LLM (>= 1);
    the rule of visprune.methods.depth, which also resolves the methods' layer defaults."""
    return depth.scale_layers(tuple(layers), REFERENCE_LAYERS, num_layers)


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
    `num_layers` layers whose dense image has `dense` tokens: its registered budget rule applied to its
    layer defaults for that LLM."""
    spec = get_method(method)
    options = fit_layers(method, num_layers)
    if budget is None:
        return options
    if spec.budget_rule is None:
        raise InputError(f"{method} is adaptive and takes no budget; pass budget=None")
    if not 1 <= budget <= dense:
        raise InputError(f"budget={budget} must be between 1 and the dense count {dense}")
    return spec.budget_rule.apply(budget, options, dense=dense, num_layers=num_layers)


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
