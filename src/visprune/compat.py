"""Every place visprune depends on transformers internals, in one module.

Each helper detects the feature it needs (a parameter name, an attribute) instead of comparing
version strings, so a release that changes one of them breaks here, with a message naming the
supported range, and nowhere else. The supported range is declared in pyproject.toml and tested
at both ends by CI (`scripts/test.sh`).

Facts this module covers:
- transformers 5.24 renamed the KV-cache keyword of decoder layers and models from
  `past_key_values` to `cache` (the old name is a deprecated alias until 5.40), and model outputs
  carry `.cache` instead of `.past_key_values`.
- `generate` infers a missing attention mask from the pad token (left-padded batches passed without
  a mask); the patched generate must infer it from the caller's ids, before it splices.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from torch import Tensor, nn

from visprune.errors import UnsupportedModelError

SUPPORTED_TRANSFORMERS = ">=5.17,<5.25"
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes the KV cache ('cache' or 'past_key_values')."""
    params = inspect.signature(module.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{type(module).__name__}.forward takes none of {CACHE_KEYWORDS}; this transformers version is outside "
        f"visprune's supported range (transformers{SUPPORTED_TRANSFORMERS}): install a supported version"
    )


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache in a forward/generate call's keyword arguments, under either name (or None)."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a model or generate output carries (`.cache` or `.past_key_values`), or None."""
    for name in CACHE_KEYWORDS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def replace_output_cache(output: Any, cache: Any) -> None:
    """Put `cache` where `output_cache` found the output's KV cache (the field's name depends on the version)."""
    for name in CACHE_KEYWORDS:
        if getattr(output, name, None) is not None:
            setattr(output, name, cache)  # a ModelOutput keeps its mapping in step with the attribute
            return


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    """Tokens held in `cache` for decoder layer `layer_idx` (0 for an empty or missing cache)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def filled_length(cache: Any, layer_idx: int) -> int | Tensor:
    """Tokens held for decoder layer `layer_idx`: a static layer's count as the 0-dim device tensor it keeps
    (read without waiting for the device, and advanced by replayed CUDA graphs), any other layer's as an int."""
    layer = cache.layers[layer_idx]
    if getattr(layer, "max_cache_len", None) is not None and getattr(layer, "is_initialized", False):
        count = getattr(layer, "cumulative_length", None)
        if isinstance(count, Tensor):
            return count
    return cache_length(cache, layer_idx)


def attended_keys(cache: Any, layer_idx: int, q_len: int) -> int:
    """How many key slots decoder layer `layer_idx` attends over in a step that feeds `q_len` tokens: the
    filled length plus the new tokens for a growing cache, the whole preallocated length for a static one
    (its unfilled slots must be masked)."""
    layer = cache.layers[layer_idx]
    if getattr(layer, "is_sliding", False):
        raise UnsupportedModelError(
            "LLM-side methods do not support sliding-window caches; use the default dynamic or a static cache"
        )
    preallocated = getattr(layer, "max_cache_len", None)
    return int(preallocated) if preallocated is not None else cache_length(cache, layer_idx) + q_len


def generation_attention_mask(input_ids: Tensor, pad: int | None, eos: int | list[int] | None) -> Tensor:
    """The attention mask `generate` infers when none is passed: real tokens are those that are not the
    pad token, when the pad token occurs in the ids and is not an end-of-sequence token; all ones otherwise.
    """
    ones = torch.ones_like(input_ids, dtype=torch.long)
    if pad is None:
        return ones
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if int(pad) in eos_ids or not bool((input_ids == pad).any()):
        return ones
    return (input_ids != pad).long()


def vision_rope(attention: nn.Module) -> Any:
    """The `apply_rotary_pos_emb_vision(q, k, cos, sin)` of the modeling module a Qwen-VL vision attention
    comes from (q, k [T, H, d]; cos, sin [T, d]; computed in float32 and cast back, as the tower does)."""
    import sys

    fn = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb_vision", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(attention).__module__} has no apply_rotary_pos_emb_vision; this transformers version is outside "
            f"visprune's supported range (transformers{SUPPORTED_TRANSFORMERS}): install a supported version"
        )
    return fn


def vision_position_ids(grid_thw: Tensor, spatial_merge_size: int) -> Tensor:
    """[T, 2] (h, w) rotary position ids of a Qwen-VL tower's patches, in its merge-block order."""
    from transformers.vision_utils import get_vision_position_ids

    return get_vision_position_ids(grid_thw, spatial_merge_size)


def vision_windows(tower: nn.Module, grid_thw: Tensor) -> tuple[Tensor, list[int]]:
    """Qwen2.5-VL: (window_index [units], window lengths in patches): the permutation (in merged-token
    units) that groups tokens into the tower's attention windows, and the windows' sizes in that order."""
    from transformers.vision_utils import get_vision_window_index

    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw,
        spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    bounds = cu_window_seqlens.tolist()
    return window_index, [b - a for a, b in itertools.pairwise(bounds) if b > a]


def vision_position_embedding(tower: nn.Module, grid_thw: Tensor) -> Tensor:
    """Qwen3-VL: the learned position embeddings [T, C] the tower adds to its patch embeddings
    (interpolated to each image's grid)."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=tower.num_grid_per_side,
        mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners,
        spatial_merge_size=tower.config.spatial_merge_size,
    )
    return (tower.pos_embed(indices) * weights[:, :, None]).sum(1)
