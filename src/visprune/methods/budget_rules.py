"""How a visual-token budget maps onto a method's options: each fixed-budget method names its rule when it
registers (`register(..., budget_rule=...)`), so the tools (`visprune eval`, `bench`, `viz`, `demo`) treat
every registered method alike. Adaptive methods take no budget (their rule is None).

What "a budget of B tokens" means:
- encoder-side methods: B tokens per image reach the LLM;
- a one-stage LLM-side method: B image tokens remain after its pruning layer;
- a multi-stage LLM-side method: the AVERAGE number of image tokens over all decoder layers is B, as
  these papers report "equivalent tokens" (the rule lives in the method's own module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _budget_option(options: dict[str, Any]) -> int | None:
    budget = options.get("budget")
    return None if budget is None else int(budget)


@dataclass(frozen=True)
class BudgetRule:
    """apply(budget, options, dense=, num_layers=) -> `options` changed so that the method feeds about
    `budget` visual tokens (images of `dense` tokens, an LLM of `num_layers` layers; encoder-side rules
    need neither, and adapters call them with a per-crop budget). of(options) -> the visual tokens per
    image an encoder-side method keeps with `options` (None: not a fixed count)."""

    apply: Callable[..., dict[str, Any]]
    of: Callable[[dict[str, Any]], int | None] = _budget_option


def _set_budget(budget: int, options: dict[str, Any], **_: Any) -> dict[str, Any]:
    return {**options, "budget": budget}


def _keep_ratio(budget: int, options: dict[str, Any], *, dense: int, **_: Any) -> dict[str, Any]:
    return {**options, "keep_ratio": budget / dense}


# `budget` tokens per image (encoder-side) or image tokens after the pruning layer (one-stage LLM-side).
TOKENS = BudgetRule(_set_budget)
# A one-stage LLM-side method with a `keep_ratio` of the image tokens: keep_ratio = budget / dense.
KEEP_RATIO = BudgetRule(_keep_ratio)


def average_tokens(dense: int, num_layers: int, layers: tuple[int, ...], counts: list[float]) -> float:
    """Mean image tokens per decoder layer when stage s (pruning at layers[s]) leaves counts[s] of `dense`."""
    total, current, start = 0.0, float(dense), 0
    for layer, count in zip(layers, counts, strict=True):
        total += (layer - start) * current
        current, start = count, layer
    total += (num_layers - start) * current
    return total / num_layers
