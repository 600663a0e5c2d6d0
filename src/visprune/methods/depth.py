"""Layer options whose default is a relative depth.

Papers publish layer choices for one model: an LLM of 32 decoder layers (LLaVA-1.5-7B) or a CLIP
ViT-L/14 tower of 24 encoder layers. A method declares such a default as a `RelativeDepth`; when
the method is bound to a model (`MethodSpec.bind`) the default is moved to the same relative depth of
that model's stack, while a value the user passes explicitly is used exactly as given and only
checked against the model's depth. This module is the one place for that scaling rule; the tools'
budget mapping (`visprune.budgets`) uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visprune.errors import InputError

STACKS = ("llm", "vision")


@dataclass(frozen=True)
class RelativeDepth:
    """Default of a layer option: `published` layer(s) for a `reference`-layer stack, to be moved to
    the same relative depth of the model's `stack` ("llm" decoder layers or "vision" encoder layers).

    Indices follow Python: negative ones count from the end of the stack (-1 = the last layer).
    lowest / highest: the range a value of this option may take in a stack of depth L, each given
    as an index (negative ones relative to L, e.g. highest=-1 is layer L - 1); they bound explicit
    values and the scaled default alike.
    only_if_needed: keep the published value on every stack it fits (an early single pruning layer
    is an absolute choice in its paper: "after layer 2"), and scale it only where it does not fit.
    """

    published: int | tuple[int, ...]
    reference: int
    stack: str
    lowest: int
    highest: int
    only_if_needed: bool = False

    def __post_init__(self) -> None:
        if self.stack not in STACKS:
            raise ValueError(f"stack must be one of {STACKS}, got {self.stack!r}")

    def __str__(self) -> str:
        rule = "moved only where it does not fit" if self.only_if_needed else "same relative depth elsewhere"
        return f"{self.published} [for {self.reference} layers; {rule}]"

    def bounds(self, depth: int) -> tuple[int, int]:
        """The allowed (low, high) range as non-negative layer indices of a `depth`-layer stack."""
        return _position(self.lowest, depth), _position(self.highest, depth)

    def resolve(self, depth: int | None) -> int | tuple[int, ...]:
        """The default for a stack of `depth` layers (None: unknown depth, the published value)."""
        if depth is None or (depth == self.reference and not self.only_if_needed):
            return self.published
        if self.only_if_needed and fits(self, self.published, depth):
            return self.published
        layers = self.published if isinstance(self.published, tuple) else (self.published,)
        scaled = scale_layers(layers, self.reference, depth, self.bounds(depth))
        return scaled if isinstance(self.published, tuple) else scaled[0]


def _position(index: int, depth: int) -> int:
    return index + depth if index < 0 else index


def published(value: Any) -> Any:
    """`value`, or the published layers when it is a RelativeDepth default (depth unknown)."""
    return value.published if isinstance(value, RelativeDepth) else value


def scale_layers(
    layers: tuple[int, ...], reference: int, depth: int, bounds: tuple[int, int] | None = None
) -> tuple[int, ...]:
    """Layer indices chosen for a `reference`-layer stack, moved to the same relative depth of a
    `depth`-layer one: index i becomes sign(i) * max(1, round(|i| * depth / reference)) (negative
    indices keep counting from the end; a positive index never moves to layer 0), clamped into
    `bounds` (non-negative (low, high); default [1, depth - 1]), then made strictly increasing by
    moving later ones up (and, where that passes `high`, packed just below it). Raises InputError
    when they cannot all fit.
    """
    if depth < 1:
        raise InputError(f"a stack must have at least 1 layer, got {depth}")
    low, high = bounds if bounds is not None else (1, depth - 1)
    out: list[int] = []
    for layer in layers:
        magnitude = max(1, round(abs(layer) * depth / reference))
        pos = min(high, max(low, depth - magnitude if layer < 0 else magnitude))
        if out and pos <= out[-1]:
            pos = out[-1] + 1
        out.append(pos)
    # Where the upward moves overflow the top, pack the last ones just below it instead.
    out = [min(p, high - (len(out) - 1 - i)) for i, p in enumerate(out)]
    if out[0] < low:
        raise InputError(
            f"cannot place the layers {tuple(layers)} (chosen for {reference} layers) in a {depth}-layer model: "
            f"they must be distinct layers in [{low}, {high}]"
        )
    return tuple(p - depth if layer < 0 else p for p, layer in zip(out, layers, strict=True))


def fits(rule: RelativeDepth, value: int | tuple[int, ...], depth: int) -> bool:
    """Whether every layer of `value` lies in the rule's range for a `depth`-layer stack."""
    low, high = rule.bounds(depth)
    values = value if isinstance(value, tuple) else (value,)
    return all(low <= _position(v, depth) <= high for v in values)


def check_fits(name: str, rule: RelativeDepth, value: int | tuple[int, ...], depth: int) -> None:
    """An explicit layer option must fit the model's stack; raises InputError saying what to pass."""
    if not fits(rule, value, depth):
        low, high = rule.bounds(depth)
        what = "LLM decoder" if rule.stack == "llm" else "vision tower encoder"
        negative = min(value if isinstance(value, tuple) else (value,)) < 0
        span = f"{low - depth}..{high - depth}" if negative else f"{low}..{high}"
        raise InputError(
            f"{name}={value!r} does not fit this model's {depth}-layer {what} stack: use layers in {span}, "
            f"or leave {name} unset for the default ({rule})"
        )
