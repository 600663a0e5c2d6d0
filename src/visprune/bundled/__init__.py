"""The tiny LLaVA trained on the synthetic suite, shipped inside the package (no download needed).

`load()` returns (model, processor) from the bundled folder, or from any LLaVA checkpoint folder or
hub id given as `path`. The bundled model is a `LlavaForConditionalGeneration` (CLIP tower at 336 px /
patch 14, 8-layer Llama LM, 2-layer GELU projector) stored as fp16 safetensors shards; see
README.md ("The bundled tiny model") for its accuracy and how it was trained
(`python -m visprune.train.tiny`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visprune.errors import InputError

BUNDLED_DIR = Path(__file__).resolve().parent / "tiny-llava"
BUNDLED_NAME = "tiny-llava"


def path() -> Path:
    """The folder of the bundled model."""
    return BUNDLED_DIR


def available() -> bool:
    """Whether the bundled weights are present (they are package data of visprune)."""
    return (BUNDLED_DIR / "config.json").is_file() and any(BUNDLED_DIR.glob("*.safetensors"))


def resolve(model: str | Path | None) -> str:
    """The folder (or hub id) to load: the bundled model for None or 'tiny-llava', else `model` itself."""
    if model is None or str(model) == BUNDLED_NAME:
        if not available():
            raise InputError(f"the bundled model is missing from {BUNDLED_DIR}; reinstall visprune")
        return str(BUNDLED_DIR)
    return str(model)


def load(model: str | Path | None = None, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """(model, processor) for `model` (default: the bundled tiny LLaVA), in eval mode on `device`.

    dtype: torch dtype of the weights once loaded; default float32 on CPU and float16 elsewhere.
    Loading a local folder needs no network. Any checkpoint of a class visprune supports works
    (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration).
    """
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    from transformers.utils import logging as hf_logging

    source = resolve(model)
    if dtype is None:
        dtype = torch.float32 if str(device) == "cpu" else torch.float16
    config = AutoConfig.from_pretrained(source)
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if config.model_type not in classes:
        raise InputError(
            f"{source} is a {config.model_type!r} checkpoint; visprune's tools load 'llava' and 'llava_next' models"
        )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        net = classes[config.model_type].from_pretrained(source, dtype=dtype).to(device).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    processor = AutoProcessor.from_pretrained(source)
    return net, processor
