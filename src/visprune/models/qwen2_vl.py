"""Adapter for Qwen2VLForConditionalGeneration (Qwen2-VL): no CLS token, a 2x2 patch merger, M-RoPE.

What the methods see: the MERGED tokens the LLM receives. An image of t x h x w patches gives
t * h/2 * w/2 merged tokens on the grid (t * h/2, w/2); the processor lays each merge group's four
patches out consecutively, so per-patch signals pool onto a merged token as the mean over its four
rows. Features are the merger's MLP input (its `ln_q` of the four patches, concatenated: [N, 4C]),
and the merger's MLP is the projector, as LLaVA's methods act before its projector.
Signals: no CLS, so methods score with "mean-received" attention (the attention a token receives,
averaged over the queries and heads of one tower block, from that block's q/k with the tower's 2-D
RoPE); merging methods use the block's keys (before RoPE: content similarity).
The tower runs as transformers runs it; forward pre-hooks read the input of the signal blocks and of
the merger. Images of one grid shape are reduced together (budgets are per image); a fixed budget
above an image's merged tokens keeps all of them, with a warning.
Positions: every token keeps its dense M-RoPE position (text its place, a kept visual token the
position of its grid cell, a summary token the image's last cell); row 0 of the 4-row position ids
numbers the shorter sequence (the causal mask's positions), and `rope_deltas` is set so that decoding
from a cache continues at the dense positions. Videos pass through unreduced: their dense features
go to their placeholders before splicing, and they keep their dense positions.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from visprune.errors import InputError, UnsupportedModelError
from visprune.methods.base import Reduction, SignalRequest
from visprune.methods.signals import mean_received_attention, patch_keys
from visprune.models.base import Adapter, ImageTokens, Reducer
from visprune.models.decoder import rotate_half
from visprune.models.llava import dense_reduction
from visprune.models.splice import Spliced

MERGED = 4  # patches per merged token (spatial_merge_size ** 2 with the released merge size 2)


class Qwen2VLAdapter(Adapter):
    model_classes = ("Qwen2VLForConditionalGeneration",)
    image_inputs = (
        "image_grid_thw",
        "mm_token_type_ids",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )
    signal_kinds = ("keys", "mean_received", "mean_received_layers")

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_layers(self) -> int:
        return len(self.vision_tower.blocks)

    @property
    def max_visual_tokens(self) -> int | None:
        return None  # images of any size: budgets are checked per image at call time

    def check_pixels(self, pixel_values: Tensor) -> None:
        cfg = self.model.config.vision_config
        width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        ok = isinstance(pixel_values, Tensor) and pixel_values.is_floating_point() and pixel_values.dim() == 2
        if not ok or pixel_values.shape[1] != width:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise InputError(
                f"pixel_values must be the processor's flattened patches [patches, {width}], got {got}; "
                "build the inputs with the model's own processor"
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise InputError("pixel_values contain NaN or inf values; check the image loading and normalisation")

    def check_encoder_method(self, requests: dict[str, SignalRequest]) -> None:
        if self.model.config.vision_config.spatial_merge_size**2 != MERGED:
            raise UnsupportedModelError("visprune supports Qwen2-VL towers with spatial_merge_size=2")
        depth = self.vision_layers
        for name, req in requests.items():
            self._kind(req)
            outside = [layer for layer in req.layers if not -depth <= layer < depth]
            if outside:
                raise UnsupportedModelError(
                    f"this method reads {name!r} at vision block(s) {outside}, but the tower has {depth} blocks"
                )

    def _kind(self, req: SignalRequest) -> str:
        """The signal computed for a request: its kind, or its CLS-free fallback (this tower has no CLS)."""
        try:
            return req.resolve(self.signal_kinds).kind
        except UnsupportedModelError:
            raise UnsupportedModelError(
                f"the Qwen-VL vision tower has no CLS token, so the {req.kind!r} signal does not exist; leave the "
                "method's `signal` option unset or pass signal='mean-received'"
            ) from None

    def image_tokens(self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]) -> ImageTokens:
        reductions, counts = self._reductions(pixel_values, reducer, image_kwargs)
        outs = [r.features for r in reductions]
        projected = self.vision_tower.merger.mlp(torch.cat(outs)).split([o.shape[0] for o in outs])
        return ImageTokens(features=list(projected), tokens_in=counts, reductions=[[r] for r in reductions])

    def _reductions(
        self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]
    ) -> tuple[list[Reduction], list[int]]:
        """Encode the images and reduce their features (`_features`) with `reducer` (None = dense), images of
        one grid together; return one Reduction per image and each image's merged-token count."""
        grids = _grids(image_kwargs.get("image_grid_thw"), pixel_values.shape[0])
        requests = getattr(reducer, "requests", {}) if reducer is not None else {}
        merged, signals = self._encode(pixel_values, grids, requests)
        counts = [t * h * w // MERGED for t, h, w in grids]
        per_image = list(merged.split(counts))
        per_signal = {
            name: list(sig.split(counts, dim=1 if self._kind(requests[name]) == "mean_received_layers" else 0))
            for name, sig in signals.items()
        }
        reductions: list[Reduction | None] = [None] * len(grids)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, grid in enumerate(grids):
            groups.setdefault(grid, []).append(i)
        for (t, h, w), members in groups.items():
            feats = torch.stack([per_image[i] for i in members])
            if reducer is None:
                reds = dense_reduction(feats)
            else:
                sig = {name: torch.stack([parts[i] for i in members]) for name, parts in per_signal.items()}
                reds = reducer(feats, (t * h // 2, w // 2), sig, budget=_image_budget(reducer, feats.shape[1]))
            for i, r in zip(members, reds, strict=True):
                reductions[i] = r
        return reductions, counts

    def _encode(
        self, pixel_values: Tensor, grids: list[tuple[int, int, int]], requests: dict[str, SignalRequest]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the tower; return the features (`_features`) [sum N_i, F] and each request's signal per patch
        pooled onto merged tokens ([sum N_i] or [L, sum N_i] or [sum N_i, D])."""
        tower = self.vision_tower
        wanted = sorted({block for req in requests.values() for block in self._blocks(req)})
        captured: dict[Any, tuple[Tensor, dict]] = {}

        def capture(key: Any) -> Any:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[key] = (args[0] if args else kwargs["hidden_states"], kwargs)

            return hook

        handles = [tower.blocks[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in wanted]
        mergers = self._mergers()
        handles += [m.register_forward_pre_hook(capture(key), with_kwargs=True) for key, m in mergers.items()]
        grid_thw = torch.tensor(grids, device=pixel_values.device)
        try:
            tower(pixel_values.to(tower.dtype), grid_thw=grid_thw)
        finally:
            for h in handles:
                h.remove()
        order = self._natural_order(grid_thw)
        merged = self._features({key: captured[key][0] for key in mergers})[order]
        signals = {}
        for name, req in requests.items():
            rows = [self._signal(tower.blocks[i], *captured[i], req)[order] for i in self._blocks(req)]
            signals[name] = rows[0] if self._kind(req) != "mean_received_layers" else torch.stack(rows)
        return merged, signals

    def _mergers(self) -> dict[str, nn.Module]:
        """The tower's modules whose inputs (per patch, in the tower's order) the features are formed from."""
        return {"merger": self.vision_tower.merger}

    def _features(self, inputs: dict[str, Tensor]) -> Tensor:
        """The features [sum N_i, F] the methods reduce, from the captured `_mergers` inputs: the merger's MLP
        input (its ln_q of each merged token's four patches, concatenated)."""
        hidden = inputs["merger"]
        return self.vision_tower.merger.ln_q(hidden).reshape(-1, MERGED * hidden.shape[-1])

    def _natural_order(self, grid_thw: Tensor) -> Tensor | slice:
        """Index that puts the tower's merged tokens in row-major grid order (Qwen2-VL: already so)."""
        return slice(None)

    def _blocks(self, req: SignalRequest) -> list[int]:
        """The tower blocks whose input a request reads (its layers, counted from the end if negative)."""
        return [layer % len(self.vision_tower.blocks) for layer in req.layers]

    def _signal(self, block: nn.Module, hidden: Tensor, kwargs: dict, req: SignalRequest) -> Tensor:
        """One block's signal per merged token, from the block's input `hidden` [T, C]."""
        attn = block.attn
        t = hidden.shape[0]
        qkv = attn.qkv(block.norm1(hidden)).reshape(t, 3, attn.num_heads, -1)
        q, k = qkv[:, 0], qkv[:, 1]  # [T, H, d]
        if self._kind(req) == "keys":
            pooled = k.flatten(1).reshape(t // MERGED, MERGED, -1).mean(1)
            return patch_keys(pooled.unsqueeze(0), attn.num_heads, req.heads, has_cls=False)[0]
        cos, sin = (x.unsqueeze(-2).to(q.dtype) for x in kwargs["position_embeddings"])
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        received = mean_received_attention(
            q.flatten(1), k.flatten(1), attn.num_heads, req.heads, cu_seqlens=kwargs["cu_seqlens"]
        )
        return received.reshape(t // MERGED, MERGED).mean(1)

    def embed(self, input_ids: Tensor, image_kwargs: dict[str, Any]) -> Tensor:
        """Text embeddings with any videos' dense features at their placeholders: videos pass through
        unreduced (methods act on images only)."""
        embeds = super().embed(input_ids, image_kwargs)
        videos = image_kwargs.get("pixel_values_videos")
        if videos is None:
            return embeds
        grid = image_kwargs.get("video_grid_thw")
        if not isinstance(grid, Tensor):
            raise InputError("videos need video_grid_thw from the processor; pass the processor's full output")
        out = self.model.model.get_video_features(videos, video_grid_thw=grid)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = torch.cat(list(pooled)).to(embeds)
        slots = input_ids == self.model.config.video_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise InputError(
                f"the prompts hold {int(slots.sum())} video placeholders but the videos give {feats.shape[0]} "
                "tokens; build the inputs with the model's own processor"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), feats)

    def position_ids(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_kwargs: dict[str, Any],
        batch: Spliced,
        keep_positions: bool,
    ) -> Tensor:
        """[4, B, S'] M-RoPE position ids of the spliced sequence (see the module docstring)."""
        grid = image_kwargs.get("image_grid_thw")
        types = image_kwargs.get("mm_token_type_ids")
        if types is None:
            types = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.model.config.video_token_id)
        videos = {
            k: image_kwargs[k] for k in ("video_grid_thw", "second_per_grid_ts") if image_kwargs.get(k) is not None
        }
        dense, _ = self.model.model.get_rope_index(
            input_ids, image_grid_thw=grid, attention_mask=attention_mask, mm_token_type_ids=types, **videos
        )
        rows = batch.attention_mask.long()
        text = (rows.cumsum(1) - 1).clamp(min=0)
        index = batch.source_index.unsqueeze(0).expand(dense.shape[0], -1, -1)
        mrope = dense.to(text.device).gather(2, index)
        # Decoding from a cache numbers new tokens text + rope_deltas: continue after the dense positions.
        self.model.model.rope_deltas = (mrope[:, :, -1].amax(0) - text[:, -1]).unsqueeze(1)
        return torch.cat([text.unsqueeze(0), mrope], dim=0)


def _grids(grid_thw: Any, patches: int) -> list[tuple[int, int, int]]:
    """The images' (t, h, w) patch grids; they must account for every row of pixel_values."""
    if not isinstance(grid_thw, Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise InputError("Qwen-VL needs image_grid_thw [images, 3] from its processor; pass the processor's output")
    grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    if sum(t * h * w for t, h, w in grids) != patches or any(h % 2 or w % 2 for _, h, w in grids):
        raise InputError(
            f"image_grid_thw {grids} does not describe the {patches} patch rows of pixel_values; pass the "
            "processor's pixel_values and image_grid_thw together"
        )
    return grids


def _image_budget(reducer: Reducer, n: int) -> int | None:
    """The reducer's budget for images of `n` merged tokens: kept as asked, or all n (with a warning)."""
    budget = reducer.budget
    if budget is None or budget <= n:
        return budget
    warnings.warn(
        f"budget={budget} exceeds an image's {n} visual tokens: all {n} are kept; handle.stats.visual_tokens_out "
        "shows it",
        stacklevel=3,
    )
    return n
