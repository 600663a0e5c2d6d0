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
Positions: Qwen3-VL's get_rope_index gives the same 3-row layout for images as Qwen2-VL's (video
timestamps only change videos, which are refused), so kept tokens keep their dense M-RoPE positions
exactly as for Qwen2-VL. The tower has full attention in every block.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from visprune import compat
from visprune.errors import InputError
from visprune.models import qwen_tower
from visprune.models.base import ImageTokens, Reducer
from visprune.models.qwen2_vl import MERGED, Qwen2VLAdapter

DEEPSTACK = "deepstack"


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration",)

    def check_image_inputs(self, image_kwargs: dict[str, Any]) -> None:
        """Videos are refused: their DeepStack features would need the same injection as images'."""
        if image_kwargs.get("pixel_values_videos") is not None or image_kwargs.get("video_grid_thw") is not None:
            raise InputError(
                "video inputs are not supported yet on a visprune-patched Qwen3-VL model; run videos on the "
                "unpatched model (visprune.remove(model)) or pass images"
            )

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
        tower = self.vision_tower
        mergers = [tower.merger, *tower.deepstack_merger_list]
        rows = torch.cat([r.features for r in reductions])
        sizes = [r.count for r in reductions]
        levels = [
            _project(m, part)
            for m, part in zip(mergers, (c.contiguous() for c in rows.chunk(len(mergers), dim=-1)), strict=True)
        ]
        width = rows.shape[-1] // len(mergers)
        return ImageTokens(
            features=list(levels[0].split(sizes)),
            tokens_in=counts,
            reductions=[[replace(r, features=r.features[:, :width])] for r in reductions],
            extras={DEEPSTACK: list(torch.stack(levels[1:], dim=1).split(sizes))} if len(levels) > 1 else {},
        )

    def layer_additions(self, extras: dict[str, list[Tensor]]) -> dict[int, Tensor]:
        """DeepStack level i ([V, D], the images' rows [K_j, L, D] concatenated) after decoder layer i."""
        per_image = extras.get(DEEPSTACK)
        if not per_image:
            return {}
        stacked = torch.cat(per_image)
        return {i: stacked[:, i] for i in range(stacked.shape[1])}


def _project(merger: torch.nn.Module, rows: Tensor) -> Tensor:
    """A Qwen3-VL patch merger's MLP (linear_fc1 -> act -> linear_fc2) on its normed input rows."""
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(rows)))
