"""Stats: what the last patched call did (tokens per image and per layer, reductions, timings), as
`handle.stats` reports it."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from visprune.methods import Reduction


@dataclass
class Stats:
    """What the last patched call did.

    visual_tokens_in: per image, the tokens the dense model would feed the LLM.
    visual_tokens_out: per image, the visual tokens that reached the LLM (after the encoder stage).
    tokens_per_layer: per sample, the real tokens each decoder layer processed at prefill.
    position_map: [B, S] for each of the caller's input positions, its index in the returned
        `forward` logits (-1 for image placeholders, dropped tokens and padding).
    reductions: per image, the Reduction(s) behind its tokens (one per crop).
    timings: seconds of host wall-clock for 'vision' (tower + signals) and 'reduce'; with
        apply(..., sync_timings=True) CUDA is synchronised around them so they are device times.
    llm_visual: with an LLM-side method, [B, S] bool over the prefill sequence the LLM received: its
        visual tokens (sample b's k-th True is the k-th visual token of its images, in order).
    llm_visual_kept: with an LLM-side method, per stage (decoder layer, [B, S] bool over the same
        sequence): the visual tokens still present from that layer on.
    """

    visual_tokens_in: list[int] = field(default_factory=list)
    visual_tokens_out: list[int] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    position_map: Tensor | None = None
    reductions: list[list[Reduction]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    llm_visual: Tensor | None = None
    llm_visual_kept: list[tuple[int, Tensor]] = field(default_factory=list)

    def visual_tokens_per_layer(self, images_per_sample: list[int] | None = None) -> list[float]:
        """Per sample: its visual tokens averaged over the LLM's layers (text tokens are never dropped, so
        each layer's visual count is its token count minus the sample's text). `images_per_sample`: how
        many consecutive entries of `visual_tokens_out` each sample owns (default: one image each)."""
        counts = [1] * len(self.tokens_per_layer) if images_per_sample is None else images_per_sample
        if sum(counts) != len(self.visual_tokens_out) or len(counts) != len(self.tokens_per_layer):
            raise ValueError(
                f"images_per_sample {counts} does not match {len(self.visual_tokens_out)} images in "
                f"{len(self.tokens_per_layer)} samples"
            )
        out, start = [], 0
        for tokens, n in zip(self.tokens_per_layer, counts, strict=True):
            visual = sum(self.visual_tokens_out[start : start + n])
            start += n
            text = tokens[0] - visual
            out.append(sum(t - text for t in tokens) / len(tokens))
        return out
