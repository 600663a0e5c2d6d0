"""Adapter for Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL): Qwen2-VL's contract, plus window attention.

The tower permutes merged tokens into attention windows; visprune's runner keeps that order (and the
window of every token, also after a `tower_layer` cut) and the methods see the tokens in row-major
grid order. Only the blocks in `fullatt_block_indexes` attend across the whole image, so
attention-based scores (mean-received) are read from the last full-attention block at or before the
requested one (the first full-attention block if none is earlier); keys are read where requested.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visprune import compat
from visprune.errors import UnsupportedModelError
from visprune.methods.base import SignalRequest
from visprune.models import qwen_tower
from visprune.models.qwen2_vl import MERGED, Qwen2VLAdapter, _unit_frames


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def _layout(
        self, grid_thw: Tensor, grids: list[tuple[int, int, int]]
    ) -> tuple[qwen_tower.TowerLayout, Tensor | None]:
        """Units in window order; each unit's window (windowed blocks) and frame (full-attention blocks)."""
        tower = self.vision_tower
        window_index, lengths = compat.vision_windows(tower, grid_thw)
        windows = torch.tensor([n // MERGED for n in lengths])
        unit_window = torch.repeat_interleave(torch.arange(len(windows)), windows)
        unit_frame = _unit_frames(grids)[window_index]
        return qwen_tower.TowerLayout(unit_frame, unit_window, frozenset(tower.fullatt_block_indexes)), window_index

    def _blocks(self, req: SignalRequest, depth: int) -> list[int]:
        blocks = super()._blocks(req, depth)
        if not blocks or self._kind(req) == "keys":
            return blocks
        full = sorted(self.vision_tower.fullatt_block_indexes)
        chosen = [max((f for f in full if f <= b), default=full[0]) for b in blocks]
        if max(chosen) >= depth:
            raise UnsupportedModelError(
                f"this tower's first full-attention block is {full[0]}, so an attention score cannot be read "
                f"before block {depth}; pass tower_layer > {full[0]}"
            )
        return chosen
