"""The adapter interface: what visprune needs to know about one multimodal model family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from visprune.methods.base import Reduction, SignalRequest

# A reducer: (features [n, N, C], grid, signals, budget=None) -> one Reduction per image or crop; it has
# `requests` (the signals it needs) and `budget` (tokens per image, None when adaptive).
Reducer = Callable[..., list[Reduction]]


@dataclass
class ImageTokens:
    """Per image, in prompt order: the rows handed to the LLM and the reductions behind them."""

    features: list[Tensor]  # [K_i, D] LLM-width rows per image (projected; newline rows included)
    tokens_in: list[int]  # visual tokens the dense model would feed for this image
    reductions: list[list[Reduction]]  # per image, one Reduction per crop (one crop for LLaVA-1.5)


class Adapter(ABC):
    """Knows where a model family keeps its parts and how its image features are formed."""

    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    @abstractmethod
    def vision_tower(self) -> nn.Module: ...

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder stack (embed_tokens, layers, norm): where LLM-side hooks go."""

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    @abstractmethod
    def vision_layers(self) -> int:
        """Encoder layers of the vision tower (the depth relative layer defaults scale to)."""

    @property
    @abstractmethod
    def max_visual_tokens(self) -> int:
        """The most tokens one image can give the reducer (a budget above it can never be met)."""

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    @property
    def attn_implementation(self) -> str:
        return self.model.config.text_config._attn_implementation or "eager"

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    @abstractmethod
    def check_pixels(self, pixel_values: Tensor) -> None:
        """Raise InputError unless `pixel_values` has the shape and values this model's processor gives."""

    @abstractmethod
    def check_encoder_method(self, requests: dict[str, SignalRequest]) -> None:
        """Raise a clear error if the vision tower cannot provide what an encoder method needs."""

    @abstractmethod
    def image_tokens(self, pixel_values: Tensor, reducer: Reducer | None, image_sizes: Tensor | None) -> ImageTokens:
        """Encode the images, reduce them with `reducer` (None = dense) and project them."""
