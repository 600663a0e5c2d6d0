"""Adapter for LlavaForConditionalGeneration (LLaVA-1.5 and every checkpoint of that class)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from visprune.errors import InputError, UnsupportedModelError
from visprune.methods.base import Reduction, SignalRequest
from visprune.models import vision
from visprune.models.base import Adapter, ImageTokens, Reducer


def dense_reduction(features: Tensor) -> list[Reduction]:
    """The identity: every token kept, in order (the 'none' method)."""
    n = features.shape[1]
    idx = torch.arange(n, device=features.device)
    return [Reduction(features=f, sources=idx, assignment=idx) for f in features.unbind(0)]


class LlavaAdapter(Adapter):
    model_classes = ("LlavaForConditionalGeneration",)
    image_inputs = ("image_sizes",)
    supports_keep_positions = True
    supports_launch_free = True

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def grid(self) -> tuple[int, int]:
        cfg = self.model.config.vision_config
        side = cfg.image_size // cfg.patch_size
        return side, side

    @property
    def signal_kinds(self) -> frozenset[str]:
        return vision.available_signals(self.vision_tower)

    @property
    def vision_layers(self) -> int:
        return vision.num_encoder_layers(self.vision_tower)

    @property
    def max_visual_tokens(self) -> int:
        """The patch grid, plus the CLS token where the tower has one and the strategy is "full", minus
        the first token where the strategy is "default" on a tower without CLS (it drops a patch)."""
        h, w = self.grid
        all_tokens = h * w + vision.has_cls_token(self.vision_tower)
        return all_tokens - (self.model.config.vision_feature_select_strategy == "default")

    def check_pixels(self, pixel_values: Tensor) -> None:
        side = self.model.config.vision_config.image_size
        check_image_tensor(pixel_values, (3, side, side), "[images, 3, H, W]")

    def check_encoder_method(self, requests: dict[str, SignalRequest], tower_layer: int | None = None) -> None:
        depth = vision.num_encoder_layers(self.vision_tower)
        for name, req in requests.items():
            outside = [layer for layer in req.layers if not -depth <= layer < depth]
            if outside:
                raise UnsupportedModelError(
                    f"this method reads {name!r} at vision layer(s) {outside}, but the vision tower has only "
                    f"{depth} layers (valid indices {-depth}..{depth - 1}); adjust the method's layer option"
                )
        strategy = self.model.config.vision_feature_select_strategy
        patches_only = "default" if vision.has_cls_token(self.vision_tower) else "full"
        if strategy != patches_only:
            raise UnsupportedModelError(
                f"encoder-side methods need the features to be exactly the patch grid: on this vision tower "
                f"({type(self.vision_tower).__name__}) that is vision_feature_select_strategy={patches_only!r}, but "
                f"this model uses {strategy!r}. Use an LLM-side method (e.g. 'fastv') instead"
            )
        vision.resolve_requests(self.vision_tower, requests)
        layer = self.model.config.vision_feature_layer
        if any(req.kind == "flowcut" for req in requests.values()) and not isinstance(layer, int):
            raise UnsupportedModelError(
                f"flowcut prunes the tower up to one feature layer, but this model reads several ({layer}); use "
                "another encoder-side method"
            )

    def encode(self, pixel_values: Tensor, requests: dict[str, SignalRequest]) -> vision.VisionOutput:
        cfg = self.model.config
        return vision.encode(
            self.vision_tower, pixel_values, cfg.vision_feature_layer, cfg.vision_feature_select_strategy, requests
        )

    def project(self, features: Tensor) -> Tensor:
        return self.projector(features)

    def image_tokens(self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]) -> ImageTokens:
        requests = getattr(reducer, "requests", {}) if reducer is not None else {}
        out = self.encode(pixel_values, requests)
        n = out.patches or out.features.shape[1]  # the dense patches, also when the tower pruned itself
        if reducer is None:
            reductions = dense_reduction(out.features)
        else:
            grid = self.grid if self.grid[0] * self.grid[1] == n else _square(n)
            reductions = reducer(out.features, grid, out.signals, images=range(out.features.shape[0]))
        counts = [r.count for r in reductions]
        projected = self.projector(torch.cat([r.features for r in reductions]).unsqueeze(0)).squeeze(0)
        return ImageTokens(
            features=list(projected.split(counts)),
            tokens_in=[n] * len(reductions),
            reductions=[[r] for r in reductions],
        )


def check_image_tensor(pixel_values: Tensor, image_shape: tuple[int, ...], layout: str) -> None:
    """pixel_values must be a finite floating tensor whose trailing dims are `image_shape`."""
    ok = isinstance(pixel_values, Tensor) and pixel_values.is_floating_point()
    if (
        not ok
        or tuple(pixel_values.shape[-len(image_shape) :]) != image_shape
        or pixel_values.dim() != len(layout.split(","))
    ):
        got = (
            f"shape {tuple(pixel_values.shape)}, {pixel_values.dtype}"
            if isinstance(pixel_values, Tensor)
            else type(pixel_values).__name__
        )
        raise InputError(
            f"pixel_values must be a floating tensor {layout} with images of {image_shape} as this model's processor "
            f"returns them, got {got}; build the inputs with the model's own processor"
        )
    if not bool(torch.isfinite(pixel_values).all()):
        raise InputError("pixel_values contain NaN or inf values; check the image loading and normalisation")


def _square(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise UnsupportedModelError(f"cannot infer the patch grid of {n} visual tokens; the tower's grid is not square")
    return side, side
