"""The benchmark's model and inputs: an architecture from a config (random weights time exactly like
trained ones) or a local checkpoint, and a realistic chat prompt with one image per sample.

What differs between model families lives in one `Family` object each (`family_for`): the inputs a
processor would give, the dense visual-token count of an image, the image sizes it takes, and which
benchmark extras apply (CUDA-graph mode, attention-materialising variants) with the reason when not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText

from visprune import bundled, configs
from visprune.errors import InputError, UnsupportedModelError

# A LLaVA-1.5-style chat prompt: ~35 tokens of system prompt before the image, a question after it.
SYSTEM_TOKENS = 35
QUESTION_TOKENS = 16
FIRST_TEXT_ID = 3  # random text ids start here (0-2: pad / bos / eos in the tiny configs)


class Family:
    """How the benchmark builds inputs for one model family and what it can measure on it."""

    name = ""
    model_types: tuple[str, ...] = ()
    graph_skip: str | None = None  # why the batch-1 CUDA-graph mode does not apply (None: it does)
    materialize_skip: str | None = None  # why the attention-materialising variants do not apply
    tower_compare = False  # whether visprune runs its own vision tower, timed against the stock one

    def __init__(self, config: Any):
        self.config = config

    @property
    def special_ids(self) -> list[int]:
        """Token ids random text must not contain (image placeholders and their delimiters)."""
        return [self.config.image_token_id]

    def image_sizes(self, requested: tuple[int, ...]) -> tuple[int, ...]:
        """The square image sizes (pixels) to benchmark, given the requested ones (empty: the default)."""
        raise NotImplementedError

    def dense_tokens(self, image_size: int) -> int:
        """Visual tokens the dense model feeds the LLM for one image of `image_size` x `image_size` px."""
        raise NotImplementedError

    def text_tokens(self) -> int:
        """Non-image tokens per sample of `make_inputs`' prompt."""
        return SYSTEM_TOKENS + QUESTION_TOKENS

    def make_inputs(self, model: nn.Module, batch: int, image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """`batch` samples of system prompt + one image + question, shaped as the family's processor
        returns them (all samples of equal length: no padding)."""
        raise NotImplementedError

    def _text(self, batch: int, n: int, g: torch.Generator) -> torch.Tensor:
        """[batch, n] random text ids below the special tokens (or avoiding them in a tiny vocabulary)."""
        vocab = self.config.text_config.vocab_size
        lowest = min(self.special_ids)
        high = min(vocab, lowest) if lowest > FIRST_TEXT_ID + 100 else vocab
        ids = torch.randint(FIRST_TEXT_ID, high, (batch, n), generator=g)
        return torch.where(torch.isin(ids, torch.tensor(self.special_ids)), FIRST_TEXT_ID, ids)


class LlavaFamily(Family):
    """LLaVA-1.5: a fixed-size CLIP image, one placeholder per patch."""

    name = "llava"
    model_types = ("llava",)

    def image_sizes(self, requested: tuple[int, ...]) -> tuple[int, ...]:
        side = self.config.vision_config.image_size
        if any(size != side for size in requested):
            raise InputError(f"this LLaVA model's tower takes images of exactly {side} px; drop --image-size")
        return (side,)

    def dense_tokens(self, image_size: int) -> int:
        return (image_size // self.config.vision_config.patch_size) ** 2

    def make_inputs(self, model: nn.Module, batch: int, image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        placeholders = torch.full((batch, self.dense_tokens(image_size)), self.config.image_token_id)
        ids = torch.cat([self._text(batch, SYSTEM_TOKENS, g), placeholders, self._text(batch, QUESTION_TOKENS, g)], 1)
        pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, model.dtype),
        }


class QwenVLFamily(Family):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: images of any size (multiples of patch x merge), flattened patches,
    `image_grid_thw`, vision start / end tokens around the merged-token placeholders."""

    name = "qwen-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    default_sizes = (448, 1008)  # rounded to the nearest multiple of patch x merge size (Qwen3-VL: 448, 1024)
    tower_compare = True
    graph_skip = (
        "not measured on Qwen-VL: its vision tower computes window and rotary layouts from image_grid_thw on "
        "the host (.tolist() / .item()), which a CUDA graph cannot capture"
    )
    materialize_skip = (
        "not measured on Qwen-VL: the published attention-materialising code of these methods targets "
        "LLaVA-1.5 (CLIP tower, Llama LLM); the comparison is made on LLaVA"
    )

    @property
    def special_ids(self) -> list[int]:
        c = self.config
        return [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]

    @property
    def _unit(self) -> int:
        """Pixels per merged token along a side (patch size x spatial merge size)."""
        vis = self.config.vision_config
        return vis.patch_size * vis.spatial_merge_size

    def image_sizes(self, requested: tuple[int, ...]) -> tuple[int, ...]:
        sizes = requested or tuple(round(size / self._unit) * self._unit for size in self.default_sizes)
        bad = [s for s in sizes if s % self._unit]
        if bad:
            raise InputError(f"image sizes {bad} are not multiples of {self._unit} px (patch x merge size)")
        return tuple(sizes)

    def dense_tokens(self, image_size: int) -> int:
        return (image_size // self._unit) ** 2

    def text_tokens(self) -> int:
        return SYSTEM_TOKENS + QUESTION_TOKENS + 2  # + vision start / end

    def make_inputs(self, model: nn.Module, batch: int, image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        c, vis = self.config, self.config.vision_config
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        side = image_size // vis.patch_size
        image = [c.vision_start_token_id] + [c.image_token_id] * self.dense_tokens(image_size) + [c.vision_end_token_id]
        ids = torch.cat(
            [
                self._text(batch, SYSTEM_TOKENS, g),
                torch.tensor(image).expand(batch, -1),
                self._text(batch, QUESTION_TOKENS, g),
            ],
            1,
        )
        width = vis.in_channels * vis.temporal_patch_size * vis.patch_size**2
        pixels = torch.randn(batch * side * side, width, generator=g)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": ids.eq(c.image_token_id).long().to(device),
            "pixel_values": pixels.to(device, model.dtype),
            "image_grid_thw": torch.tensor([[1, side, side]] * batch, device=device),
        }


FAMILIES: tuple[type[Family], ...] = (LlavaFamily, QwenVLFamily)


def family_for(config: Any) -> Family:
    """The benchmark family of a transformers config; unsupported ones raise UnsupportedModelError."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family(config)
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"the benchmark builds LLaVA-1.5, Qwen2-VL and Qwen2.5-VL models (model_type {known}); "
        f"{type(config).__name__} is not one"
    )


def load_config(name_or_path: str) -> Any:
    """A bundled architecture name (e.g. 'llava-1.5-7b', 'qwen2.5-vl-7b') or a folder / config.json path."""
    if name_or_path in configs.available():
        return configs.load(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        raise InputError(f"unknown config {name_or_path!r}: use one of {configs.available()} or a local path")
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise InputError(f"no config.json in {folder}; pass a transformers config.json or the folder holding it")
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the config in {folder}: {bundled.first_line(err)}") from err


def build_model(
    config: str,
    dtype: torch.dtype,
    device: torch.device,
    attn: str = "sdpa",
    pretrained: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """Random-weight model from `config` (built directly on the device, its weights drawn from `seed`
    whatever the global RNG state), or `pretrained` from a folder; any family of `FAMILIES`."""
    if pretrained is not None:
        source = bundled.check_source(pretrained)
        try:
            family_for(AutoConfig.from_pretrained(source))
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, attn_implementation=attn)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load the checkpoint {pretrained}: {bundled.first_line(err)}") from err
        model = model.to(device)
    else:
        cfg = load_config(config)
        family_for(cfg)
        gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=gpus), torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model
