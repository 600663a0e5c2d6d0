"""Model adapters: one per supported model family. `adapter_for(model)` picks the right one."""

from __future__ import annotations

from torch import nn

from visprune.errors import UnsupportedModelError
from visprune.models.base import Adapter, ImageTokens, Reducer
from visprune.models.llava import LlavaAdapter
from visprune.models.llava_next import LlavaNextAdapter
from visprune.models.qwen2_5_vl import Qwen2_5_VLAdapter
from visprune.models.qwen2_vl import Qwen2VLAdapter
from visprune.models.qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
)


def supported_model_classes() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`'s class; an unsupported class raises with the list of supported ones."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise UnsupportedModelError(
        f"visprune does not support {name}. Supported model classes: {', '.join(supported_model_classes())}"
    )


__all__ = ["ADAPTERS", "Adapter", "ImageTokens", "Reducer", "adapter_for", "supported_model_classes"]
