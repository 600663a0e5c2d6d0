"""Adapter for LlavaNextForConditionalGeneration (LLaVA-NeXT / LLaVA-1.6, anyres).

Each image arrives as a base crop plus tiles. Reduction runs per crop BEFORE packing, on the tokens
that survive LLaVA-NeXT's unpadding (a rectangle of each tile's grid), with that crop's own CLS
signals. Budget rule: a fixed per-image budget is split across the image's crops in proportion to
their surviving token counts (largest remainder, at least one token per crop; a budget above the
image's tokens keeps them all, with a warning); adaptive methods
decide per crop. Packing keeps the dense layout: base-crop tokens first, then the tiles' kept tokens
in the unpadded grid's row-major order with every row's newline token (newlines are always kept and
counted as visual tokens reaching the LLM), then any extra summary tokens (PruMerge) in crop order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from visprune.errors import InputError, UnsupportedModelError
from visprune.methods.base import Reduction, SignalRequest
from visprune.models.base import ImageTokens, Reducer
from visprune.models.llava import LlavaAdapter, check_image_tensor, dense_reduction


@dataclass
class _Crop:
    """One crop's surviving tokens: local indices in the crop's grid, their sub-grid shape, and for
    tiles the row-major key of each surviving token in the unpadded global grid (with newlines)."""

    image: int
    crop: int  # index into the flat batch of crops
    local: Tensor  # [n] local token indices that survive unpadding
    grid: tuple[int, int]
    key: Tensor | None  # [n] order keys of those tokens among the image's tile tokens + newlines


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    supports_launch_free = True
    launch_free_image_graph = False  # the crops' layout and packing are computed from image_sizes on the host
    supports_keep_positions = False

    @property
    def max_visual_tokens(self) -> int:
        """Base crop + the most tiles any grid pinpoint gives, every token surviving unpadding."""
        cfg = self.model.config
        side = cfg.vision_config.image_size
        h, w = self.grid
        tiles = max((ph // side) * (pw // side) for ph, pw in cfg.image_grid_pinpoints)
        return (1 + tiles) * h * w

    @property
    def signal_kinds(self) -> frozenset[str]:
        return super().signal_kinds - {"flowcut"}

    def check_encoder_method(self, requests: dict[str, SignalRequest], tower_layer: int | None = None) -> None:
        if any(req.kind == "flowcut" for req in requests.values()):
            raise UnsupportedModelError(
                "flowcut is for LLaVA-1.5-class models: on LLaVA-NeXT the official method prunes every crop to half "
                "the budget and adds a stage inside the LLM, which visprune does not implement; use vispruner, "
                "divprune or scope"
            )
        super().check_encoder_method(requests, tower_layer)

    def check_pixels(self, pixel_values: Tensor) -> None:
        side = self.model.config.vision_config.image_size
        layout = (
            "[images, crops, 3, H, W]"
            if isinstance(pixel_values, Tensor) and pixel_values.dim() == 5
            else "[crops, 3, H, W]"
        )
        check_image_tensor(pixel_values, (3, side, side), layout)

    def _layout(
        self, image_sizes: Tensor, patches: list[int]
    ) -> tuple[list[list[_Crop]], list[tuple[int, int]], list[int]]:
        """Per image: its crops, (newline rows, row stride of the order keys), and the dense token count."""
        cfg = self.model.config
        h, w = self.grid
        n = h * w
        crops, newlines, dense = [], [], []
        offset = 0
        for i, (size, n_patches) in enumerate(zip(image_sizes.tolist(), patches, strict=True)):
            base = _Crop(i, offset, torch.arange(n), (h, w), None)
            if n_patches == 1:
                crops.append([base])
                newlines.append((1, 0))
                dense.append(n + 1)
                offset += 1
                continue
            gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            full = torch.arange(gh * h * gw * w).view(1, gh * h, gw * w)
            kept = unpad_image(full, size)[0]  # [H', W'] flat indices into the padded global grid
            rows, cols = kept // (gw * w), kept % (gw * w)
            width = kept.shape[1]
            order_key = torch.arange(kept.shape[0]).unsqueeze(1) * (width + 1) + torch.arange(width)
            tile = (rows // h) * gw + cols // w
            local = (rows % h) * w + cols % w
            image_crops = [base]
            for t in range(gh * gw):
                sel = tile == t
                if not bool(sel.any()):
                    continue
                rr, cc = rows[sel], cols[sel]
                sub = (int(rr.unique().numel()), int(cc.unique().numel()))
                flat_order = local[sel].argsort()
                image_crops.append(_Crop(i, offset + 1 + t, local[sel][flat_order], sub, order_key[sel][flat_order]))
            crops.append(image_crops)
            newlines.append((kept.shape[0], width + 1))
            dense.append(n + kept.numel() + kept.shape[0])
            offset += n_patches
        return crops, newlines, dense

    def image_tokens(self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]) -> ImageTokens:
        cfg = self.model.config
        image_sizes = image_kwargs.get("image_sizes")
        if image_sizes is None:
            raise InputError("LLaVA-NeXT needs image_sizes from its processor; pass the processor's full output")
        patches = [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for s in image_sizes.tolist()
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:p] for pv, p in zip(pixel_values, patches, strict=True)])
        requests = getattr(reducer, "requests", {}) if reducer is not None else {}
        out = self.encode(pixel_values, requests)
        crops, newlines, dense = self._layout(image_sizes, patches)
        reductions = self._reduce(out.features, out.signals, crops, reducer)
        newline = self.model.model.image_newline
        features = []
        for image_crops, image_red, rows in zip(crops, reductions, newlines, strict=True):
            features.append(self._pack(image_crops, image_red, rows, newline))
        return ImageTokens(features=features, tokens_in=dense, reductions=reductions)

    def _reduce(
        self, features: Tensor, signals: dict[str, Tensor], crops: list[list[_Crop]], reducer: Reducer | None
    ) -> list[list[Reduction]]:
        """Reduce every crop on its surviving tokens; crops of one sub-grid shape and budget go together."""
        budgets: dict[tuple[int, int], int | None] = {}
        for image_crops in crops:
            shares = _split_budget(
                reducer.budget if reducer is not None else None, [c.local.numel() for c in image_crops]
            )
            for c, b in zip(image_crops, shares, strict=True):
                budgets[(c.image, c.crop)] = b
        groups: dict[tuple, list[_Crop]] = {}
        for c in (c for image_crops in crops for c in image_crops):
            key = (c.grid, budgets[(c.image, c.crop)], c.local.numel() == features.shape[1])
            groups.setdefault(key, []).append(c)
        result: dict[tuple[int, int], Reduction] = {}
        device = features.device
        for (grid, budget, full), members in groups.items():
            idx = torch.tensor([c.crop for c in members], device=device)
            if full:
                feats, sig = features[idx], {k: v[idx] for k, v in signals.items()}
            else:
                local = torch.stack([c.local for c in members]).to(device)
                feats = features[idx].gather(1, local.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
                kinds = {name: req.kind for name, req in reducer.requests.items()} if reducer is not None else {}
                sig = {k: _take_tokens(v[idx], local, kinds[k]) for k, v in signals.items()}
            if reducer is None:
                reds = dense_reduction(feats)
            else:
                reds = reducer(feats, grid, sig, budget=budget, images=[c.image for c in members])
            for c, r in zip(members, reds, strict=True):
                result[(c.image, c.crop)] = r
        return [[result[(c.image, c.crop)] for c in image_crops] for image_crops in crops]

    def _pack(self, crops: list[_Crop], reds: list[Reduction], lines: tuple[int, int], newline: Tensor) -> Tensor:
        """Project and pack one image's reduced crops in the dense model's order."""
        counts = [r.count for r in reds]
        projected = self.projector(torch.cat([r.features for r in reds]).unsqueeze(0)).squeeze(0)
        per_crop = list(projected.split(counts))
        base_red, base = reds[0], per_crop[0]
        extras = [base[base_red.sources < 0]]
        parts = [base[base_red.sources >= 0]]
        if len(crops) == 1:
            return torch.cat([*parts, newline[None].to(base), *extras])
        rows, width = lines
        tile_rows, tile_keys = [], []
        for c, red, feats in zip(crops[1:], reds[1:], per_crop[1:], strict=True):
            own = red.sources >= 0
            tile_rows.append(feats[own])
            tile_keys.append(c.key.to(feats.device)[red.sources[own]])
            extras.append(feats[~own])
        nl_keys = torch.arange(rows, device=projected.device) * width + (width - 1)
        keys = torch.cat([*tile_keys, nl_keys])
        rows_all = torch.cat([*tile_rows, newline[None].to(projected).expand(rows, -1)])
        parts.append(rows_all[keys.argsort()])
        return torch.cat([*parts, *extras])


def _take_tokens(signal: Tensor, local: Tensor, kind: str) -> Tensor:
    """Select tokens `local` [n, N'] from a signal of the requested `kind` (its fallback has the same
    shape): cls_attn / mean_received / cls_cosine [n, N], keys [n, N, D], cls_attn_layers / mean_received_layers
    [n, L, N]; cls_feature [n, C] is per crop, not per token, and passes unchanged."""
    if kind == "cls_feature":
        return signal
    if kind in ("cls_attn", "mean_received", "cls_cosine"):
        return signal.gather(1, local)
    if kind == "keys":
        return signal.gather(1, local.unsqueeze(-1).expand(-1, -1, signal.shape[-1]))
    if kind in ("cls_attn_layers", "mean_received_layers"):
        return signal.gather(2, local.unsqueeze(1).expand(-1, signal.shape[1], -1))
    raise UnsupportedModelError(f"signal {kind!r} is not an encoder signal")


def _split_budget(budget: int | None, sizes: list[int]) -> list[int | None]:
    """Split a per-image budget across crops in proportion to their token counts (largest remainder),
    at least one per crop and at most the crop's tokens. None stays None (adaptive methods)."""
    if budget is None:
        return [None] * len(sizes)
    total = sum(sizes)
    if budget < len(sizes):
        raise InputError(
            f"budget={budget} is smaller than this image's {len(sizes)} crops; LLaVA-NeXT keeps at least one token "
            "per crop, so use a budget of at least the number of crops"
        )
    if budget > total:
        warnings.warn(
            f"budget={budget} exceeds this image's {total} tokens (LLaVA-NeXT crops that survive unpadding): "
            f"all {total} are kept; handle.stats.visual_tokens_out shows it",
            stacklevel=2,
        )
        budget = total
    exact = [budget * s / total for s in sizes]
    shares = [max(1, int(e)) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(shares) < budget:
        j = order[i % len(order)]
        if shares[j] < sizes[j]:
            shares[j] += 1
        i += 1
    while sum(shares) > budget:
        j = max(range(len(sizes)), key=lambda k: shares[k])
        shares[j] -= 1
    return shares
