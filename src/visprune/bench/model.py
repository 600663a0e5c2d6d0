"""The benchmark's model and inputs: an architecture from a config (random weights time exactly like
trained ones) or a local checkpoint, and a realistic LLaVA-1.5 prompt with one image per sample."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from visprune import bundled, configs
from visprune.errors import InputError, UnsupportedModelError

# LLaVA-1.5's chat prompt: ~35 tokens of system prompt before the image, a question after it.
SYSTEM_TOKENS = 35
QUESTION_TOKENS = 16


def load_config(name_or_path: str) -> LlavaConfig:
    """A bundled architecture name (e.g. 'llava-1.5-7b') or a folder / config.json path."""
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
    whatever the global RNG state), or `pretrained` from a folder."""
    if pretrained is not None:
        source = bundled.check_source(pretrained)
        try:
            model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation=attn)
        except OSError as err:
            raise InputError(f"cannot load the checkpoint {pretrained}: {bundled.first_line(err)}") from err
        model = model.to(device)
    else:
        cfg = load_config(config)
        if not isinstance(cfg, LlavaConfig):
            raise UnsupportedModelError(f"the benchmark builds LLaVA-1.5-style models; {type(cfg).__name__} is not one")
        gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=gpus), torch.device(device):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


def make_inputs(model: nn.Module, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` samples of system prompt + one image's placeholders + question (no padding needed)."""
    cfg = model.config
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    vis = cfg.vision_config
    n_image = (vis.image_size // vis.patch_size) ** 2
    image_token = cfg.image_token_id
    vocab = cfg.text_config.vocab_size
    low = 3
    high = min(vocab, image_token) if image_token > low + 100 else vocab

    def text(n: int) -> torch.Tensor:
        ids = torch.randint(low, high, (batch, n), generator=g)
        return torch.where(ids == image_token, low, ids)

    ids = torch.cat([text(SYSTEM_TOKENS), torch.full((batch, n_image), image_token), text(QUESTION_TOKENS)], 1)
    pixels = torch.randn(batch, 3, vis.image_size, vis.image_size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, model.dtype),
    }
