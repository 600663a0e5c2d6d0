"""Bundled architecture configs (no weights) for models visprune knows by name.

Each JSON file here is a transformers config dict (its `model_type` says which class: `llava` for the
llava-hf checkpoints, `qwen2_5_vl` for Qwen2.5-VL-7B-Instruct, `qwen3_vl` for Qwen3-VL-8B-Instruct)
matching the released checkpoint of the same name, so the FLOPs calculator, the benchmark and tests
can reason about real model shapes without downloading anything.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from visprune.errors import InputError, closest


def available() -> list[str]:
    """Names of the bundled configs, e.g. ``["llava-1.5-13b", "llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"]``."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_dict(name: str) -> dict[str, Any]:
    """The raw JSON dict of the bundled config `name`."""
    names = available()
    if name not in names:
        raise InputError(f"unknown bundled config {name!r}; available: {', '.join(names)}.{closest(name, names)}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8"))


def load(name: str) -> Any:
    """The bundled config `name` as the transformers config class its `model_type` names (e.g. a
    `LlavaConfig` for "llava-1.5-7b", a `Qwen2_5_VLConfig` for "qwen2.5-vl-7b")."""
    from transformers import AutoConfig

    data = load_dict(name)
    return AutoConfig.for_model(data.pop("model_type"), **data)
