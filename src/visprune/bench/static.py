"""'Ideal' stand-ins: the same pipeline with trivial selection (keep the first K tokens), so a
measured method can be compared with the cost of feeding the LLM the same token counts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visprune.methods.base import MethodSpec, Placement, Reduction, TokenLayout, select_tokens


def static_encoder(counts: list[int]) -> MethodSpec:
    """Keeps the first counts[i] tokens of image i (one gather; no scoring, no signals)."""

    def fn(features: Tensor, *, grid: tuple[int, int] | None = None) -> list[Reduction]:
        if len(set(counts)) == 1:
            idx = torch.arange(counts[0], device=features.device).expand(features.shape[0], -1)
            return select_tokens(features, idx)
        return [
            select_tokens(f[None], torch.arange(k, device=f.device)[None])[0]
            for f, k in zip(features, counts, strict=True)
        ]

    return MethodSpec(
        name="ideal-encoder",
        fn=fn,
        description="first-K selection",
        placement=Placement.ENCODER,
        adaptive=False,
        defaults={},
        signals=lambda o: {},
    )


def static_llm(stages: list[tuple[int, list[int]]]) -> MethodSpec:
    """At each (layer, visual counts per sample) keeps the first visual tokens; no scoring. Its count rule
    (`visual_kept`) lets the host plan its stages, so the launch-free path captures it like the methods it
    stands in for; the counts are filled on the device (no copy from the host inside a graph)."""
    layers = tuple(layer for layer, _ in stages)

    def fn(*, layout: TokenLayout, stage: int = 0, **_: Any) -> Tensor:
        fill = lambda c: layout.visual.new_full((), c, dtype=torch.long)  # noqa: E731
        keep_visual = torch.stack([fill(c) for c in stages[stage][1]]).unsqueeze(1)
        rank = layout.visual.long().cumsum(1)
        return layout.attention_mask & (~layout.visual | (rank <= keep_visual))

    def visual_kept(present: Tensor, options: dict[str, Any], stage: int) -> Tensor:
        return torch.minimum(present, torch.tensor(stages[stage][1], dtype=present.dtype))

    return MethodSpec(
        name="ideal-llm",
        fn=fn,
        description="first-K drop",
        placement=Placement.LLM,
        adaptive=False,
        defaults={},
        signals=lambda o: {},
        layers=lambda o: layers,
        visual_kept=visual_kept,
    )


def stages_from_tokens(tokens_per_layer: list[list[int]], text_tokens: list[int]) -> list[tuple[int, list[int]]]:
    """(layer, visual tokens per sample) wherever the per-layer token counts drop."""
    stages = []
    for layer in range(1, len(tokens_per_layer[0])):
        if any(t[layer] != t[layer - 1] for t in tokens_per_layer):
            stages.append((layer, [t[layer] - n for t, n in zip(tokens_per_layer, text_tokens, strict=True)]))
    return stages


def ideal_methods(visual_out: list[int], tokens_per_layer: list[list[int]]) -> list[MethodSpec]:
    """The first-K stand-ins fed a measured case's counts: its images' tokens (`static_encoder`) and, where
    the tokens per decoder layer drop (an LLM-side method), the same image tokens per stage (`static_llm`).
    One image per prompt: `visual_out[i]` is row i's."""
    methods = [static_encoder(visual_out)]
    text = [t[0] - v for t, v in zip(tokens_per_layer, visual_out, strict=True)]
    stages = stages_from_tokens(tokens_per_layer, text)
    if stages:
        methods.append(static_llm(stages))
    return methods
