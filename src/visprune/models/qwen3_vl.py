"""Adapter for Qwen3VLForConditionalGeneration (Qwen3-VL): Qwen2-VL's contract, plus DeepStack.

Features and projector: the merger is norm -> linear_fc1 -> GELU -> linear_fc2 with the norm applied
per patch (`use_postshuffle_norm=False`); the methods act on the merger's MLP input (each merged
token's four normed patches, concatenated: [N, 4C]) and linear_fc2(act(linear_fc1(.))) is the projector,
so with no reduction the projected rows are the tower's own merged output.
DeepStack: after the blocks in `deepstack_visual_indexes` the tower merges the hidden states with its
`deepstack_merger_list` (norm over the four concatenated patches, then the same MLP shape), and the LLM
adds level i to the hidden states of the visual tokens after decoder layer i. Here each level's MLP
input is concatenated to the features along channels, so ONE reducer call reduces them all: every
level gets exactly the kept set, summary tokens and merge weights of the main tokens (the methods
choose from their signals and mix tokens with weights shared by every channel; a method that looked at
the features would see all levels, and the levels would still agree). Each level is then projected by
its own merger's MLP and added by visprune's forward hooks after decoder layers 0..L-1 at prefill
(`layer_additions`), following the tokens an LLM-side stage keeps.
Positions: Qwen3-VL's get_rope_index gives the same 3-row layout for images as Qwen2-VL's, so kept
tokens keep their dense M-RoPE positions exactly as for Qwen2-VL. The tower has full attention in
every block. Videos pass through unreduced, as on Qwen2-VL: their dense features at their placeholders,
their dense DeepStack rows added to their tokens (with the images' reduced rows, in sequence order).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from visprune import compat
from visprune.methods.base import Reduction
from visprune.models import qwen_tower
from visprune.models.base import ImageTokens, Reducer
from visprune.models.qwen2_vl import MERGED, Qwen2VLAdapter
from visprune.models.splice import Spliced

DEEPSTACK = "deepstack"


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration",)

    @property
    def addition_layers(self) -> tuple[int, ...]:
        return tuple(range(len(self.vision_tower.deepstack_merger_list)))

    def _embed_patches(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """The patch embedding plus the learned position embedding interpolated to each image's grid."""
        patches = qwen_tower.embed_patches(self.vision_tower.patch_embed, pixel_values)
        return patches + compat.vision_position_embedding(self.vision_tower, grid_thw).to(patches.dtype)

    def _parts(self) -> dict[str, int | None]:
        """The merger's MLP input, then each DeepStack merger's (from the output of its tower block)."""
        indexes = self.vision_tower.deepstack_visual_indexes
        return {"merger": None, **{f"{DEEPSTACK}{i}": int(block) for i, block in enumerate(indexes)}}

    def _part(self, name: str, hidden: Tensor) -> Tensor:
        """[U, 4C]: the merger normalises each patch before concatenating; DeepStack mergers after."""
        tower = self.vision_tower
        if name == "merger":
            return tower.merger.norm(hidden).reshape(-1, MERGED * hidden.shape[-1])
        merger = tower.deepstack_merger_list[int(name.removeprefix(DEEPSTACK))]
        return merger.norm(hidden.reshape(-1, MERGED * hidden.shape[-1]))

    def image_tokens(self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]) -> ImageTokens:
        reductions, counts = self._reductions(pixel_values, reducer, image_kwargs)
        rows, extras = self._llm_rows(reductions)
        sizes = [r.count for r in reductions]
        width = reductions[0].features.shape[-1] // (1 + len(self.vision_tower.deepstack_merger_list))
        return ImageTokens(
            features=list(rows.split(sizes)),
            tokens_in=counts,
            reductions=[[replace(r, features=r.features[:, :width])] for r in reductions],
            extras={name: list(t.split(sizes)) for name, t in extras.items()},
        )

    def project(self, features: Tensor) -> Tensor:
        """The merger's MLP on the main part of the features (the DeepStack parts follow it)."""
        tower = self.vision_tower
        width = features.shape[-1] // (1 + len(tower.deepstack_merger_list))
        return _project(tower.merger, features[..., :width])

    def _llm_rows(self, reductions: list[Reduction]) -> tuple[Tensor, dict[str, Tensor]]:
        """The main rows [sum K_i, D] (the merger's MLP on the first part of the features) and the DeepStack
        levels [sum K_i, L, D] (each level's merger MLP on its part)."""
        tower = self.vision_tower
        mergers = [tower.merger, *tower.deepstack_merger_list]
        rows = torch.cat([r.features for r in reductions])
        parts = (c.contiguous() for c in rows.chunk(len(mergers), dim=-1))
        levels = [_project(m, part) for m, part in zip(mergers, parts, strict=True)]
        return levels[0], ({DEEPSTACK: torch.stack(levels[1:], dim=1)} if len(levels) > 1 else {})

    def layer_additions(
        self, extras: dict[str, list[Tensor]], passthrough: dict[str, Tensor], batch: Spliced
    ) -> tuple[dict[int, Tensor], Tensor]:
        """DeepStack level i after decoder layer i, on every visual token as the model adds it: the images'
        reduced rows at the spliced image tokens and any videos' dense rows at their tokens, in sequence
        order."""
        visual = batch.layout.visual
        images = extras.get(DEEPSTACK)
        videos = passthrough.get(DEEPSTACK)
        if videos is None:
            stacked = torch.cat(images) if images else None
        else:
            is_video = (batch.input_ids == self.model.config.video_token_id) & batch.attention_mask.bool()
            joint = visual | is_video
            stacked = videos.new_empty(int(joint.sum()), *videos.shape[1:])
            stacked[is_video[joint]] = videos
            if images:
                stacked[visual[joint]] = torch.cat(images).to(videos)
            visual = joint
        if stacked is None:
            return {}, visual
        return {i: stacked[:, i] for i in range(stacked.shape[1])}, visual


def _project(merger: torch.nn.Module, rows: Tensor) -> Tensor:
    """A Qwen3-VL patch merger's MLP (linear_fc1 -> act -> linear_fc2) on its normed input rows."""
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(rows)))
