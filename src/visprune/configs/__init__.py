"""Bundled architecture configs (no weights) for models visprune knows by name.

Each JSON file here is a `LlavaConfig` dict matching the llava-hf checkpoint of the same name, so the
FLOPs calculator and tests can reason about real model shapes without downloading anything.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from visprune.errors import InputError, closest


def available() -> list[str]:
    """Names of the bundled configs, e.g. ``["llava-1.5-13b", "llava-1.5-7b"]``."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_dict(name: str) -> dict[str, Any]:
    """The raw JSON dict of the bundled config `name`."""
    names = available()
    if name not in names:
        raise InputError(f"unknown bundled config {name!r}; available: {', '.join(names)}.{closest(name, names)}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8"))


def load(name: str) -> Any:
    """The bundled config `name` ("llava-1.5-7b" or "llava-1.5-13b") as a `transformers.LlavaConfig`."""
    from transformers import LlavaConfig

    data = load_dict(name)
    data.pop("model_type", None)
    return LlavaConfig(**data)
