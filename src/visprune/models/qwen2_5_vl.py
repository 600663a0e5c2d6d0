"""Adapter for Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL): Qwen2-VL's contract, plus window attention.

The tower permutes merged tokens into attention windows and back after its merger; the methods see
them in row-major grid order (the hooks read the windowed order, which is undone here). Only the
blocks in `fullatt_block_indexes` attend across the whole image, so attention-based scores
(mean-received) are read from the last full-attention block at or before the requested one (the
first full-attention block if none is earlier); keys are read where requested.
"""

from __future__ import annotations

from torch import Tensor

from visprune import compat
from visprune.methods.base import SignalRequest
from visprune.models.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def _natural_order(self, grid_thw: Tensor) -> Tensor:
        return compat.vision_window_index(self.vision_tower, grid_thw).argsort()

    def _blocks(self, req: SignalRequest) -> list[int]:
        blocks = super()._blocks(req)
        if self._kind(req) == "keys":
            return blocks
        full = sorted(self.vision_tower.fullatt_block_indexes)
        return [max((f for f in full if f <= b), default=full[0]) for b in blocks]
