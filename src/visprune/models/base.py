"""The adapter interface: what visprune needs to know about one multimodal model family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from visprune.errors import UnsupportedModelError, VisPruneError
from visprune.host_reads import host_to_device
from visprune.methods.base import Reduction, SignalRequest
from visprune.methods.padded import trim, trim_counts
from visprune.models.splice import Spliced

# A reducer: (features [n, N, C], grid, signals, budget=None) -> one Reduction per image or crop; it has
# `requests` (the signals it needs) and `budget` (tokens per image, None when adaptive).
Reducer = Callable[..., list[Reduction]]


@dataclass
class ImageTokens:
    """Per image, in prompt order: the rows handed to the LLM and the reductions behind them."""

    features: list[Tensor]  # [K_i, D] LLM-width rows per image (projected; newline rows included)
    tokens_in: list[int]  # visual tokens the dense model would feed for this image
    reductions: list[list[Reduction]]  # per image, one Reduction per crop (one crop for LLaVA-1.5)
    # Per name, per image: more per-row tensors [K_i, ...] reduced with the same Reductions as `features`
    # (Qwen3-VL's DeepStack features); `Adapter.layer_additions` turns them into language-model inputs.
    extras: dict[str, list[Tensor]] = field(default_factory=dict)

    def trimmed(self) -> ImageTokens:
        """These tokens with padded reductions (`methods.padded.padded_outputs`) cut to their counts, read in
        one host read; as they are when none is padded. Padded reductions need one crop per image whose rows
        are the image's rows (an adapter whose image path does more, `launch_free_image_graph=False`, runs
        its methods unpadded)."""
        counts = trim_counts([r for crops in self.reductions for r in crops])
        if counts is None:
            return self
        if any(len(crops) != 1 for crops in self.reductions) or self.extras:
            raise VisPruneError("padded reductions need one crop per image and no extra rows; please report this bug")
        return ImageTokens(
            features=[f[:k] for f, k in zip(self.features, counts, strict=True)],
            tokens_in=self.tokens_in,
            reductions=[[trim(crops[0], k)] for crops, k in zip(self.reductions, counts, strict=True)],
        )


@dataclass
class Embedded:
    """The caller's tokens embedded before images are spliced in: `embeds` [B, S, D], and for tokens that
    pass through unreduced (videos) the per-row tensors `Adapter.layer_additions` needs (per name [V, ...],
    those tokens in batch order)."""

    embeds: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


class Adapter(ABC):
    """Knows where a model family keeps its parts and how its image features are formed.

    The contract a model family fills in (one file per family; nothing else branches on it):
    where the vision tower and decoder layers are (`vision_tower`, `language_model`,
    `decoder_layers`), the per-image inputs it consumes besides pixel_values (`image_inputs`), how to
    check pixels and encode + reduce + project images (`check_pixels`, `image_tokens`), which tokens
    can be reduced at most (`max_visual_tokens`, `vision_layers`), where each kept row stands in its
    image's placeholder run (`placeholder_offsets`), and the position ids of a spliced sequence
    (`dense_positions` worked out on host copies of the prompt and of the inputs named in `host_inputs`,
    `position_ids` gathering them: None for the model's own 1-D numbering), and,
    where the model feeds visual features into the LLM beyond its input rows (DeepStack), the rows added
    to the visual tokens' hidden states after some decoder layers (`addition_layers`, `layer_additions`).
    """

    model_classes: tuple[str, ...] = ()
    image_inputs: tuple[str, ...] = ()  # per-image keyword inputs the adapter consumes (e.g. image_sizes)
    # of those, the ones `dense_positions` reads: handed to it as host copies, with input_ids and the mask
    host_inputs: tuple[str, ...] = ()
    supports_keep_positions: bool = False
    supports_tower_layer: bool = False  # the reducer may cut the vision tower (apply's tower_layer)
    supports_compile_tower: bool = False  # visprune runs the vision tower's blocks (apply's compile_tower)
    compile_tower: bool = False  # set by apply: run those blocks through torch.compile
    supports_launch_free: bool = False  # apply's launch_free (static shapes and CUDA graphs; launch_free.py)
    # On that path, whether a fixed-budget method's whole image path (tower, reduction, packing) is one graph;
    # False where it does host work between them (only the tower is captured then).
    launch_free_image_graph: bool = True

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
    def max_visual_tokens(self) -> int | None:
        """The most tokens one image can give the reducer (a budget above it can never be met); None
        when images of any size are accepted (budgets are then checked per image)."""

    def check_image_inputs(self, image_kwargs: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Raise InputError for per-image inputs this adapter cannot handle (default: none)."""

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    @property
    def attn_implementation(self) -> str:
        return self.model.config.text_config._attn_implementation or "eager"

    def embed(self, input_ids: Tensor, image_kwargs: dict[str, Any]) -> Embedded:
        """Embeddings of the caller's tokens before images are spliced in (adapters may fill in inputs
        that pass through unreduced here, e.g. video features at their placeholders)."""
        return Embedded(self.model.get_input_embeddings()(input_ids))

    @abstractmethod
    def check_pixels(self, pixel_values: Tensor) -> None:
        """Raise InputError unless `pixel_values` has the shape and values this model's processor gives."""

    @property
    def signal_kinds(self) -> Collection[str]:
        """The encoder signal kinds this adapter computes (`SignalRequest.resolve`'s `available`)."""
        return ()

    @abstractmethod
    def check_encoder_method(self, requests: dict[str, SignalRequest], tower_layer: int | None = None) -> None:
        """Raise a clear error if the vision tower cannot provide what an encoder method needs (reducing at
        the input of block `tower_layer` where given: adapters with `supports_tower_layer` only)."""

    @abstractmethod
    def image_tokens(self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]) -> ImageTokens:
        """Encode the images, reduce them with `reducer` (None = dense) and project them."""

    def project(self, features: Tensor) -> Tensor:
        """The rows [n, N, D] the LLM would receive for features [n, N, C] (the projector alone, nothing
        reduced): the "projected" signal of methods that select on LLM-space tokens."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot project features for a method")

    def placeholder_offsets(self, reductions: list[list[Reduction]], tokens_in: list[int]) -> list[Tensor] | None:
        """Per image, each output row's offset in the image's placeholder run, for images of one crop; None
        when images have crops whose packing has no such mapping. A token with no source stands at the
        run's first slot when it leads the output (VisionZip's CLS token), else at its last slot (PruMerge's
        trailing summary token)."""
        if any(len(crops) != 1 for crops in reductions):
            return None
        out = []
        for crops, n in zip(reductions, tokens_in, strict=True):
            sources = crops[0].sources
            leading = (sources >= 0).cumsum(0) == 0
            out.append(torch.where(sources >= 0, sources, torch.where(leading, 0, n - 1)))
        return out

    def dense_positions(
        self, input_ids: Tensor, attention_mask: Tensor, image_kwargs: dict[str, Any], keep_positions: bool
    ) -> Tensor | None:
        """The position ids of the dense prompt, on the host, for `position_ids` to gather from; None where
        the model numbers the spliced sequence itself. It reads only host copies (input_ids, attention_mask
        and the `host_inputs` among image_kwargs, copied before the image path was launched) and nothing the
        reduction decides, so the patch runs it while the device encodes the images (before the image path's
        first host read). Default: with keep_positions, each token's index among its sample's real tokens;
        otherwise None."""
        if not keep_positions:
            return None
        return (attention_mask.long().cumsum(1) - 1).clamp(min=0)

    def position_ids(self, dense: Tensor | None, batch: Spliced) -> Tensor | None:
        """Position ids for the spliced sequence (on the batch's device): each token's dense position
        (`dense_positions`' result) gathered through `batch.source_index`; None where `dense` is None."""
        if dense is None or batch.source_index is None:
            return None
        return host_to_device(dense, batch.source_index.device).gather(1, batch.source_index)

    @property
    def addition_layers(self) -> tuple[int, ...]:
        """Decoder layers after which `layer_additions` may add rows (default: none)."""
        return ()

    def layer_additions(
        self, extras: dict[str, list[Tensor]], passthrough: dict[str, Tensor], batch: Spliced
    ) -> tuple[dict[int, Tensor], Tensor]:
        """At prefill, ({decoder layer: rows [V, D]}, mask [B, S']): rows added after that layer to the hidden
        states of the V tokens the mask marks in the spliced batch (in batch order: sample by sample, in
        sequence order), built from `ImageTokens.extras` (the spliced image tokens) and `Embedded.extras`
        (tokens that passed through, e.g. videos). Default: none."""
        return {}, batch.layout.visual
