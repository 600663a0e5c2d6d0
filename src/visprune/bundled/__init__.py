"""The tiny LLaVA trained on the synthetic suite, shipped inside the package (no download needed).

`load()` returns (model, processor) from the bundled folder, or from any LLaVA checkpoint folder or
hub id given as `path`. The bundled model is a `LlavaForConditionalGeneration` (CLIP tower at 336 px /
patch 14, 8-layer Llama LM, 2-layer GELU projector) stored as fp16 safetensors shards; see
README.md ("The bundled tiny model") for its accuracy and how it was trained
(`python -m visprune.train.tiny`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from visprune.errors import InputError

BUNDLED_DIR = Path(__file__).resolve().parent / "tiny-llava"
BUNDLED_NAME = "tiny-llava"
# A hub id: `name` or `owner/name` of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_WHAT_TO_PASS = "pass a checkpoint folder written by save_pretrained (config.json and weights) or a hub id"


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
    return check_source(model)


def check_source(model: str | Path) -> str:
    """`model` as a string if it is a checkpoint folder with a config.json or could be a hub id; a path
    that does not exist, a file, or a folder without config.json raises InputError saying so."""
    text = str(model)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise InputError(f"model folder {text} has no config.json; {_WHAT_TO_PASS}")
        return str(folder)
    if folder.exists():
        raise InputError(f"model {text} is a file, not a checkpoint folder; {_WHAT_TO_PASS}")
    if not _HUB_ID.fullmatch(text):
        raise InputError(f"model folder {text} does not exist; {_WHAT_TO_PASS}")
    return text


def resolve_device(name: str | None) -> str:
    """The torch device to run on: 'auto' (or None) is CUDA when available, else the CPU; a device that
    torch does not know or that this machine lacks raises InputError."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} needs a CUDA GPU and torch sees none here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InputError(
                f"device {name!r} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type != "cpu":
        raise InputError(f"device {name!r} is not supported by visprune's tools; use cpu, cuda, cuda:N or auto")
    return str(device)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")


def load_config(source: str) -> Any:
    """The config of the checkpoint at `source`; one that cannot be read raises InputError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a model config from {source}: {first_line(err)}; {_WHAT_TO_PASS}") from err


def load_pretrained(source: str, model_class: Any, device: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(model, processor) of the checkpoint at `source`: `model_class.from_pretrained(source, **kwargs)` on
    `device` in eval mode, without download bars; missing weights or files raise InputError."""
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        net = model_class.from_pretrained(source, **kwargs).to(device).eval()
        processor = AutoProcessor.from_pretrained(source)
    except OSError as err:
        raise InputError(f"cannot load the checkpoint in {source}: {first_line(err)}; {_WHAT_TO_PASS}") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return net, processor


def load(model: str | Path | None = None, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """(model, processor) for `model` (default: the bundled tiny LLaVA), in eval mode on `device`.

    dtype: torch dtype of the weights once loaded; default float32 on CPU and float16 elsewhere.
    Loading a local folder needs no network. Any checkpoint of a class visprune's tools prompt for works
    (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration).
    """
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    source = resolve(model)
    if dtype is None:
        dtype = torch.float32 if str(device) == "cpu" else torch.float16
    config = load_config(source)
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if config.model_type not in classes:
        raise InputError(
            f"{source} is a {config.model_type!r} checkpoint; visprune's tools load 'llava' and 'llava_next' models"
        )
    return load_pretrained(source, classes[config.model_type], device, dtype=dtype)
