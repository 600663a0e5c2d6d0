"""Tiny random-weight Qwen-VL models built from configs (no downloads), and inputs shaped like the
processor's: flattened patches, image_grid_thw, vision start / placeholder / end tokens, left padding."""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from tests.models.tiny import PAD, build, left_pad

IMAGE, VIDEO, START, END = 100, 101, 102, 103
VISION = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "num_heads": 4}
FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def tiny_qwen(family: str, attn: str = "sdpa", seed: int = 0, **vision):
    """A tiny model of `family` (see FAMILIES); `vision`: vision config entries to override (depth, ...)."""
    if family == "qwen2-vl":
        return tiny_qwen2_vl(attn, seed, **vision)
    if family == "qwen2.5-vl":
        return tiny_qwen2_5_vl(attn, seed, **vision)
    if family == "qwen3-vl":
        return tiny_qwen3_vl(attn, seed, **vision)
    raise ValueError(f"unknown family {family!r}")


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0, **overrides) -> Qwen2VLForConditionalGeneration:
    """A 3-block tower (width 32, 14-px patches, 2x2 merger) and a 4-layer M-RoPE LLM of width 64."""
    vision = {**VISION, "depth": 3, "embed_dim": 32, "hidden_size": 64, **overrides}
    return _build(Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, attn, seed)


def tiny_qwen2_5_vl(attn: str = "sdpa", seed: int = 0, **overrides) -> Qwen2_5_VLForConditionalGeneration:
    """A 4-block tower with 56-px attention windows (2 x 2 merged tokens) and full attention in blocks 1
    and 3, the same LLM as tiny_qwen2_vl."""
    vision = {
        **VISION,
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "window_size": 56,
        "fullatt_block_indexes": [1, 3],
        **overrides,
    }
    return _build(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision, attn, seed)


def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0, **overrides) -> Qwen3VLForConditionalGeneration:
    """A 3-block tower (width 32, 14-px patches, a 4 x 4 learned position grid) with DeepStack mergers after
    blocks 0 and 1 (added after LLM layers 0 and 1), and a 4-layer Qwen3 LLM (q/k norms) of width 64."""
    vision = {
        **VISION,
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1],
        **overrides,
    }
    return _build(Qwen3VLConfig, Qwen3VLForConditionalGeneration, vision, attn, seed, head_dim=16)


def _build(config_class, model_class, vision: dict, attn: str, seed: int, **text):
    cfg = config_class(
        vision_config=vision,
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            "pad_token_id": PAD,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **text,
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    return build(model_class, cfg, attn, seed)


def make_inputs(model, grids: list[tuple[int, int, int]], lengths: list[int], seed: int = 0) -> dict:
    """One image of patch grid (t, h, w) per prompt (None: a text-only prompt), questions of `lengths`."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    rows, pixels, used = [], [], []
    for grid, n in zip(grids, lengths, strict=True):
        row = torch.randint(3, 90, (3,), generator=g).tolist()
        if grid is not None:
            t, h, w = grid
            row += [START] + [IMAGE] * (t * h * w // vc.spatial_merge_size**2) + [END]
            # A smooth image (a ramp plus a bright square) so that attention-based scores are not flat.
            patch = torch.randn(t * h * w, width, generator=g) * 0.5 + torch.linspace(-1, 1, t * h * w)[:, None]
            pixels.append(patch)
            used.append(grid)
        rows.append(row + torch.randint(3, 90, (n,), generator=g).tolist())
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE).long()}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(used)
    return out


def select(inputs: dict, i: int, grids: list) -> dict:
    """Prompt i alone, without padding, with its own image rows."""
    keep = inputs["attention_mask"][i].bool()
    out = {k: inputs[k][i : i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if grids[i] is not None:
        sizes = [t * h * w for t, h, w in (g for g in grids if g is not None)]
        k = sum(1 for g in grids[:i] if g is not None)
        start = sum(sizes[:k])
        out["pixel_values"] = inputs["pixel_values"][start : start + sizes[k]]
        out["image_grid_thw"] = inputs["image_grid_thw"][k : k + 1]
    return out
