"""Adapter for Qwen2VLForConditionalGeneration (Qwen2-VL): no CLS token, a 2x2 patch merger, M-RoPE.

What the methods see: the MERGED tokens the LLM receives. An image of t x h x w patches gives
t * h/2 * w/2 merged tokens on the grid (t * h/2, w/2); the processor lays each merge group's four
patches out consecutively, so per-patch signals pool onto a merged token as the mean over its four
rows. Features are the merger's MLP input (its `ln_q` of the four patches, concatenated: [N, 4C]),
and the merger's MLP is the projector, as LLaVA's methods act before its projector.
Signals: no CLS, so methods score with "mean-received" attention (the attention a token receives,
averaged over the queries and heads of one tower block, from that block's q/k with the tower's 2-D
RoPE); merging methods use the block's keys (before RoPE: content similarity).
The tower runs through visprune's runner (`qwen_tower`: the tower's weights, its attention batched
over images, frames and windows instead of one call each), which also hands over the signal blocks'
inputs; the blocks past the last one a method needs still run (the merger reads the last). With
`tower_layer=b` (apply) the method reduces at the input of block b, as if the tower ended there, and
blocks b.. run on the kept tokens only: the reduction then saves tower time too. FlowCut ("flowcut"
signal) prunes inside the tower progressively, after several blocks of its own schedule: each pruning
point masks the units it drops out of the later blocks' attention, and their rows are removed from the
runner's state two blocks later (`_flowcut`). Images of one grid
shape are reduced together (budgets are per image); a fixed budget above an image's merged tokens
keeps all of them, with a warning.
Positions: every token keeps its dense M-RoPE position (text its place, a kept visual token the
position of its grid cell, a summary token the image's last cell); row 0 of the 4-row position ids
numbers the shorter sequence (the causal mask's positions), and `rope_deltas` is set so that decoding
from a cache continues at the dense positions. Videos pass through unreduced: their dense features
go to their placeholders before splicing, and they keep their dense positions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from visprune import compat
from visprune.errors import InputError, UnsupportedModelError
from visprune.host_reads import StagedRead, host_to_device
from visprune.methods import flowcut, graphs
from visprune.methods.base import Reduction, SignalRequest
from visprune.methods.signals import mean_received_attention, patch_keys
from visprune.models import qwen_tower
from visprune.models.base import Adapter, Embedded, ImageTokens, Reducer
from visprune.models.llava import dense_reduction
from visprune.models.splice import Spliced
from visprune.models.vision import missing_cls

MERGED = qwen_tower.UNIT  # patches per merged token (spatial_merge_size ** 2 with the released merge size 2)
PLANS = 4  # tower plans an adapter keeps (per grid list; ~30 MB each at 8 x 1008 px)
_unit_terms = graphs.fused(flowcut.unit_terms)  # FlowCut's per-block terms, compiled on a GPU


@graphs.fused
def _pruning_point(
    attention: Tensor, flow: Tensor, slot: Tensor, running: Tensor, valid: Tensor, target: Tensor, root: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One FlowCut pruning point on a Qwen-VL tower, compiled on a GPU (as eager operations its host time was
    ~1.1 ms a point, while the tower's host work barely keeps ahead of the device): (the units still attended
    to [U] bool, tower order; their [images, W] layout `valid`; their count per image). attention, flow [U]:
    this block's relation attention and the flow per unit; slot, running, valid: the `_UnitView`'s; target
    [images] the final counts; root: sqrt of the blocks left after this one (`flowcut.prune_counts`)."""
    counts = flowcut.prune_counts(_padded(attention, slot, running), valid, target, root)
    attending = flowcut.top_mask(_padded(flow, slot, running), valid, counts).flatten()[slot]
    kept = running & _padded(attending, slot, running)
    return attending, kept, kept.sum(dim=1)


def _padded(per_unit: Tensor, slot: Tensor, running: Tensor) -> Tensor:
    """[images, W]: per-unit values [U] (tower order) at their `slot`s of the layout `running` (padding: 0)."""
    return per_unit.new_zeros(running.numel()).index_put_((slot,), per_unit).view(running.shape)


class Qwen2VLAdapter(Adapter):
    model_classes = ("Qwen2VLForConditionalGeneration",)
    image_inputs = (
        "image_grid_thw",
        "mm_token_type_ids",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )
    host_inputs = ("image_grid_thw", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts")
    signal_kinds = ("keys", "mean_received", "mean_received_layers", "flowcut")
    supports_tower_layer = True
    supports_compile_tower = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._plans: dict[tuple, qwen_tower.TowerPlan] = {}  # recent tower plans, oldest first

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

    def check_encoder_method(self, requests: dict[str, SignalRequest], tower_layer: int | None = None) -> None:
        if self.model.config.vision_config.spatial_merge_size**2 != MERGED:
            raise UnsupportedModelError("visprune supports Qwen2-VL towers with spatial_merge_size=2")
        depth = self.vision_layers
        if tower_layer is not None:
            if isinstance(tower_layer, bool) or not isinstance(tower_layer, int) or not 1 <= tower_layer < depth:
                raise InputError(
                    f"tower_layer must be an int in [1, {depth - 1}] (the vision block at whose input the method "
                    f"reduces) for this {depth}-block tower, got {tower_layer!r}"
                )
            depth = tower_layer
        for name, req in requests.items():
            if self._kind(req) == "flowcut" and tower_layer is not None:
                raise UnsupportedModelError(
                    "flowcut prunes inside the vision tower after blocks of its own schedule (every other block "
                    "up to the last); apply it without tower_layer"
                )
            outside = [layer for layer in req.layers if not -depth <= layer < depth]
            if outside:
                where = (
                    f"the tower has {depth} blocks"
                    if tower_layer is None
                    else f"tower_layer={depth} leaves {depth} block(s) before the cut"
                )
                raise UnsupportedModelError(f"this method reads {name!r} at vision block(s) {outside}, but {where}")
            self._blocks(req, depth)

    def _kind(self, req: SignalRequest) -> str:
        """The signal computed for a request: its kind, or its CLS-free fallback (this tower has no CLS)."""
        try:
            return req.resolve(self.signal_kinds).kind
        except UnsupportedModelError:
            raise missing_cls(req.kind, type(self.vision_tower).__name__) from None

    def image_tokens(self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]) -> ImageTokens:
        reductions, counts = self._reductions(pixel_values, reducer, image_kwargs)
        rows, _ = self._llm_rows(reductions)
        projected = rows.split([r.count for r in reductions])
        return ImageTokens(features=list(projected), tokens_in=counts, reductions=[[r] for r in reductions])

    def _reductions(
        self, pixel_values: Tensor, reducer: Reducer | None, image_kwargs: dict[str, Any]
    ) -> tuple[list[Reduction], list[int]]:
        """Encode the images with visprune's tower runner and reduce their features (`_parts`, concatenated)
        with `reducer` (None = dense), images of one grid together; return one Reduction per image and each
        image's merged-token count. With the reducer's `tower_layer` b, the reduction happens at the input
        of block b (the method sees a tower of b blocks) and blocks b.. run on the kept tokens only."""
        tower = self.vision_tower
        grids = _grids(image_kwargs.get("image_grid_thw"), pixel_values.shape[0])
        counts = [t * h * w // MERGED for t, h, w in grids]
        requests = getattr(reducer, "requests", {}) if reducer is not None else {}
        cut_at = getattr(reducer, "tower_layer", None) if reducer is not None else None
        depth = len(tower.blocks) if cut_at is None else cut_at
        state = self._start(pixel_values, grids)
        flow = [name for name, req in requests.items() if self._kind(req) == "flowcut"]
        if flow:
            return self._flowcut(state, reducer, flow[0], requests[flow[0]].keep, grids, counts), counts
        parts = self._parts()
        early = {name: block for name, block in parts.items() if block is not None and block < depth}
        wanted = {block for req in requests.values() for block in self._blocks(req, depth)}
        inputs, outputs = qwen_tower.run_blocks(tower, state, depth, inputs=wanted, outputs=set(early.values()))
        order = state.natural_order()
        signals = {name: self._signals(inputs, req, depth, order, counts) for name, req in requests.items()}
        if cut_at is None:
            outputs[None] = state.hidden
            feats = torch.cat([self._part(name, outputs[block]) for name, block in parts.items()], dim=-1)[order]
            return self._reduce(feats, signals, grids, counts, reducer), counts
        at_cut = [state.hidden.reshape(-1, MERGED * state.hidden.shape[-1])]
        at_cut += [self._part(name, outputs[block]) for name, block in early.items()]
        reductions = self._reduce(torch.cat(at_cut, dim=-1)[order], signals, grids, counts, reducer)
        return self._continue_after_cut(state, reductions, counts, early), counts

    def _continue_after_cut(
        self, state: qwen_tower.TowerState, reductions: list[Reduction], counts: list[int], early: dict[str, int]
    ) -> list[Reduction]:
        """Run the tower's remaining blocks on the rows `reductions` kept at the cut; return the reductions
        with their features replaced by the features (`_parts`) those rows end the tower with."""
        tower = self.vision_tower
        sources = [r.sources for r in reductions]
        if bool((torch.cat(sources) < 0).any()):
            raise UnsupportedModelError(
                "this method adds summary tokens that stand at no grid cell, so they cannot continue through the "
                "vision tower; leave them out (prumerge / prumerge+: extra_token=False) or apply without tower_layer"
            )
        offsets = torch.tensor([0, *counts[:-1]], device=state.hidden.device).cumsum(0)
        natural = torch.cat([s + offsets[i] for i, s in enumerate(sources)])
        rows = torch.cat([r.features for r in reductions])
        width = MERGED * state.hidden.shape[-1]
        late = {name: block for name, block in self._parts().items() if name not in early}
        back = qwen_tower.cut(state, rows[:, :width], natural)
        _, outputs = qwen_tower.run_blocks(
            tower, state, len(tower.blocks), outputs={b for b in late.values() if b is not None}
        )
        outputs[None] = state.hidden
        done = dict(zip(early, rows[:, width:].split(width, dim=-1) if early else [], strict=True))
        for name, block in late.items():
            done[name] = self._part(name, outputs[block])[back]
        feats = torch.cat([done[name] for name in self._parts()], dim=-1)
        per_image = feats.split([r.count for r in reductions])
        return [replace(r, features=f) for r, f in zip(reductions, per_image, strict=True)]

    def _flowcut(
        self,
        state: qwen_tower.TowerState,
        reducer: Reducer,
        name: str,
        budget: int,
        grids: list[tuple[int, int, int]],
        counts: list[int],
    ) -> list[Reduction]:
        """FlowCut inside the tower (`visprune.methods.flowcut`): at every block the relation attention and
        score of each image's units from the block's q, k and v, accumulated into the flow; after the
        blocks of `prune_schedule(depth - 1)` each image keeps its units of highest flow (the counts its
        own: per image, `budget` after the last block, all of an image's units where it has no more).
        Returns the reducer's Reductions of the kept units' features (`_parts`: DeepStack levels from the
        blocks that formed them, at the final kept units), their original indices under `name`.

        The host never reads a result of the block it has just launched: a pruning point only MASKS the
        units it drops (`TowerState.mask`: the later blocks give them no attention, so the kept ones attend
        as if they were gone) and starts a copy of which they are to the host. At the next pruning point, two
        blocks later, the host reads that copy (waiting, if at all, for work two blocks back, while the
        device has the blocks queued since) and removes the dropped rows (`qwen_tower.keep_units`), so the
        blocks after it run on fewer rows. Where every image has its target from the start (budgets of
        all their units), the flow is not computed at all."""
        tower = self.vision_tower
        depth = len(tower.blocks)
        device = state.hidden.device
        schedule = flowcut.prune_schedule(depth - 1)
        targets = [min(budget, n) for n in counts]
        target = host_to_device(torch.tensor(targets), device)
        starts_host = torch.tensor([0, *counts]).cumsum(0)  # each image's first natural unit
        starts = host_to_device(starts_host, device)
        left = sorted(set(schedule.values()))  # sqrt of each pruning point's blocks left, as prune_counts takes it
        roots = dict(zip(left, host_to_device(torch.tensor([math.sqrt(r) for r in left]), device), strict=True))
        parts = self._parts()
        saved: dict[str, tuple[Tensor, Tensor]] = {}  # part -> (its rows [U_b, 4C], their natural units)
        running = list(counts)  # the units each image still runs with (host)
        scoring = running != targets  # an image above its target reaches it at r <= 2 only: scored to the end
        view = _UnitView.of(state.unit_natural, starts, running)
        flow: Tensor | None = None  # per running unit, tower order
        pending: StagedRead | None = None  # the units the last pruning point kept, on their way to the host
        for i in range(depth):
            inputs, outputs = qwen_tower.run_blocks(
                tower, state, i + 1, inputs={i} if scoring else (), outputs={i}, normalisers=False
            )
            for part, block in parts.items():
                if block == i:
                    saved[part] = (self._part(part, outputs[i]), state.unit_natural)
            if not scoring:
                continue
            score, attention = self._flow_terms(tower.blocks[i], inputs[i], view)
            flow = flowcut.accumulate(flow, score)
            if schedule.get(i, 0) == 0:  # not a pruning point, or the last one (after the loop)
                continue
            if pending is not None:  # (no pruning point since that one: the units it kept are those attended)
                reducer.before_host_read()  # (the call's pending host work runs first, once)
                kept = pending.value().nonzero().squeeze(1)
                if kept.shape[0] < len(state.units_host):
                    images = torch.bucketize(state.units_host[kept], starts_host[1:], right=True)
                    running = torch.bincount(images, minlength=len(counts)).tolist()
                    on_device = qwen_tower.keep_units(state, kept)
                    flow, attention = flow[on_device], attention[on_device]
                    view = _UnitView.of(state.unit_natural, starts, running)
                else:
                    view = view.attending_to_all()
            attending, valid, attended = _pruning_point(
                attention, flow, view.slot, view.running, view.valid, target, roots[schedule[i]]
            )
            state.mask(attending)
            view = view.attending_to(attending, valid, attended)
            pending = StagedRead(attending)
        if flow is None:  # every image had its target from the start: all kept
            flow = torch.zeros(len(state.units_host), device=device)
        positions, _ = flowcut.keep_top(view.pad(flow), view.valid, target, width=max(targets))
        rows = view.natural.gather(1, positions)
        final = torch.cat([row[:n] for row, n in zip(rows, targets, strict=True)])  # natural order
        feats = []
        for part, block in parts.items():
            found, units = saved[part] if block is not None else (self._part(part, state.hidden), state.unit_natural)
            feats.append(found[qwen_tower.unit_positions(units, final)])
        image = torch.bucketize(final, starts[1:], right=True)
        local = list((final - starts[image]).split(targets))
        return self._reduce(torch.cat(feats, dim=-1), {name: local}, grids, counts, reducer, rows=targets)

    def _flow_terms(self, block: nn.Module, seen: qwen_tower.BlockInput, view: _UnitView) -> tuple[Tensor, Tensor]:
        """FlowCut's (score, relation attention) per unit (tower order) of one block, from its q, k, v (the
        runner's own where it kept them), over the units `view` still attends to."""
        attn = block.attn
        q, k, v = seen.q, seen.k, seen.v
        if q is None or k is None or v is None:
            rope = compat.vision_rope(attn)
            q, k, v, _ = qwen_tower.attention_inputs(block, seen.hidden, seen.cos, seen.sin, rope)
        return _unit_terms(q, k, v, view.unit_image, view.counts, attn.scaling, view.attending)

    def _reduce(
        self,
        feats: Tensor,
        signals: dict[str, list[Tensor]],
        grids: list[tuple[int, int, int]],
        counts: list[int],
        reducer: Reducer | None,
        rows: list[int] | None = None,
    ) -> list[Reduction]:
        """One Reduction per image from its features (rows of `feats`, natural order: `rows` per image, by
        default all its `counts` merged tokens), images of one grid shape reduced together."""
        per_image = list(feats.split(counts if rows is None else rows))
        reductions: list[Reduction | None] = [None] * len(grids)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, grid in enumerate(grids):
            groups.setdefault(grid, []).append(i)
        for (t, h, w), members in groups.items():
            stacked = torch.stack([per_image[i] for i in members])
            if reducer is None:
                reds = dense_reduction(stacked)
            else:
                sig = {name: torch.stack([parts[i] for i in members]) for name, parts in signals.items()}
                budget = _image_budget(reducer, t * h * w // MERGED)
                reds = reducer(stacked, (t * h // 2, w // 2), sig, budget=budget, images=members)
            for i, r in zip(members, reds, strict=True):
                reductions[i] = r
        return reductions

    def _start(self, pixel_values: Tensor, grids: list[tuple[int, int, int]]) -> qwen_tower.TowerState:
        """Embed the patches and lay them out in the tower's order."""
        tower = self.vision_tower
        patches = self._embed_patches(pixel_values.to(tower.dtype), torch.tensor(grids, device=pixel_values.device))
        steps = qwen_tower.compiled_steps(qwen_tower.COMPILE_BACKEND) if self.compile_tower else None
        return qwen_tower.start(patches, self._plan(grids, patches.device), steps)

    def _plan(self, grids: list[tuple[int, int, int]], device: torch.device) -> qwen_tower.TowerPlan:
        """The tower plan of these grids, from the last PLANS ones planned for this model (by grids, device
        and tower dtype) or planned now."""
        key = (tuple(grids), device, self.vision_tower.dtype)
        found = self._plans.get(key)
        if found is None:
            grid_thw = torch.tensor(grids)  # on the host: the layout is planned there
            layout, unit_order = self._layout(grid_thw, grids)
            found = qwen_tower.plan(self.vision_tower, grid_thw, layout, unit_order, device)
            if len(self._plans) >= PLANS:
                del self._plans[next(iter(self._plans))]
            self._plans[key] = found
        return found

    def _embed_patches(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """The tower's input rows [T, C] (natural order): the patch embedding."""
        return qwen_tower.embed_patches(self.vision_tower.patch_embed, pixel_values)

    def _layout(
        self, grid_thw: Tensor, grids: list[tuple[int, int, int]]
    ) -> tuple[qwen_tower.TowerLayout, Tensor | None]:
        """(which tokens attend together, the natural unit at each tower position or None for the identity),
        from the grids (grid_thw on the host): Qwen2-VL attends within each frame in every block, in
        natural order."""
        return qwen_tower.TowerLayout(_unit_frames(grids), None, frozenset()), None

    def _parts(self) -> dict[str, int | None]:
        """The feature parts the methods reduce, concatenated in this order: name -> the block whose OUTPUT
        they are formed from (None: the last block). Qwen2-VL: the merger's input."""
        return {"merger": None}

    def _part(self, name: str, hidden: Tensor) -> Tensor:
        """A feature part [U, 4C] from the hidden states [4U, C] it is formed from (tower order): the
        merger's MLP input (its ln_q of each merged token's four patches, concatenated)."""
        merger = self.vision_tower.merger
        return merger.ln_q(hidden).reshape(-1, MERGED * hidden.shape[-1])

    def _blocks(self, req: SignalRequest, depth: int) -> list[int]:
        """The tower blocks whose input a request reads (its layers, counted from the end if negative, in a
        tower of `depth` blocks)."""
        return [layer % depth for layer in req.layers]

    def _signals(
        self,
        inputs: dict[int, qwen_tower.BlockInput],
        req: SignalRequest,
        depth: int,
        order: Tensor,
        counts: list[int],
    ) -> list[Tensor]:
        """A request's signal per image (natural order): [N_i], [L, N_i] or [N_i, D]."""
        blocks = self.vision_tower.blocks
        read = self._blocks(req, depth)  # several layers may read one block (Qwen2.5-VL): scored once
        per_block = {i: self._signal(blocks[i], inputs[i], req)[order] for i in dict.fromkeys(read)}
        rows = [per_block[i] for i in read]
        if self._kind(req) == "mean_received_layers":
            return list(torch.stack(rows).split(counts, dim=1))
        return list(rows[0].split(counts))

    def _signal(self, block: nn.Module, seen: qwen_tower.BlockInput, req: SignalRequest) -> Tensor:
        """One block's signal per merged token (tower order), from the block's input."""
        attn = block.attn
        t = seen.hidden.shape[0]
        if self._kind(req) == "keys":
            k = seen.keys
            if k is None:
                k = attn.qkv(block.norm1(seen.hidden)).reshape(t, 3, attn.num_heads, -1)[:, 1]
            pooled = k.flatten(1).reshape(t // MERGED, MERGED, -1).mean(1)
            return patch_keys(pooled.unsqueeze(0), attn.num_heads, req.heads, has_cls=False)[0]
        lse = None
        if seen.q is None or seen.k is None:
            rope = compat.vision_rope(attn)
            q, k, _, _ = qwen_tower.attention_inputs(block, seen.hidden, seen.cos, seen.sin, rope)
        else:
            q, k = seen.q, seen.k  # the runner's own, kept when the block ran
            if req.heads != "single" and attn.scaling == q.shape[-1] ** -0.5:
                lse = seen.lse  # the block's own attention normalisers: the signal's first pass
        received = mean_received_attention(
            q.flatten(1), k.flatten(1), attn.num_heads, req.heads, cu_seqlens=seen.segments.cu_seqlens(), lse=lse
        )
        return received.reshape(t // MERGED, MERGED).mean(1)

    def embed(self, input_ids: Tensor, image_kwargs: dict[str, Any]) -> Embedded:
        """Text embeddings with any videos' dense features at their placeholders: videos pass through
        unreduced (methods act on images only)."""
        embedded = super().embed(input_ids, image_kwargs)
        videos = image_kwargs.get("pixel_values_videos")
        if videos is None:
            return embedded
        grid = image_kwargs.get("video_grid_thw")
        if not isinstance(grid, Tensor):
            raise InputError("videos need video_grid_thw from the processor; pass the processor's full output")
        reductions, _ = self._reductions(videos, None, {"image_grid_thw": grid})
        rows, extras = self._llm_rows(reductions)
        slots = input_ids == self.model.config.video_token_id
        if int(slots.sum()) != rows.shape[0]:
            raise InputError(
                f"the prompts hold {int(slots.sum())} video placeholders but the videos give {rows.shape[0]} "
                "tokens; build the inputs with the model's own processor"
            )
        embeds = embedded.embeds.masked_scatter(slots.unsqueeze(-1), rows.to(embedded.embeds))
        return Embedded(embeds, extras)

    def project(self, features: Tensor) -> Tensor:
        """The merger's MLP on the merger-input features."""
        return self.vision_tower.merger.mlp(features)

    def _llm_rows(self, reductions: list[Reduction]) -> tuple[Tensor, dict[str, Tensor]]:
        """The LLM-width rows [sum K_i, D] of the reductions' features (`project`), and per extra name the
        rows that go with them (none on Qwen2-VL)."""
        return self.project(torch.cat([r.features for r in reductions])), {}

    def dense_positions(
        self, input_ids: Tensor, attention_mask: Tensor, image_kwargs: dict[str, Any], keep_positions: bool
    ) -> Tensor:
        """[3, B, S] M-RoPE position ids of the dense prompt: transformers' `get_rope_index` on the host
        copies of the inputs (it reads them in Python: 2.3 ms at batch 8 x 1008 px on the H200 machine's
        host; on device tensors it would wait for the vision tower). Always needed here: M-RoPE keeps the
        dense positions."""
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
        return dense

    def position_ids(self, dense: Tensor | None, batch: Spliced) -> Tensor:
        """[4, B, S'] position ids of the spliced sequence (see the module docstring): the text positions of
        its own real tokens, then the dense M-RoPE positions gathered at the tokens' dense indices; sets the
        model's `rope_deltas` so that decoding continues after the dense positions."""
        rows = batch.attention_mask.long()
        text = (rows.cumsum(1) - 1).clamp(min=0)
        index = batch.source_index.unsqueeze(0).expand(dense.shape[0], -1, -1)
        mrope = host_to_device(dense, text.device).gather(2, index)
        # Decoding from a cache numbers new tokens text + rope_deltas: continue after the dense positions.
        self.model.model.rope_deltas = (mrope[:, :, -1].amax(0) - text[:, -1]).unsqueeze(1)
        return torch.cat([text.unsqueeze(0), mrope], dim=0)


@dataclass(frozen=True)
class _UnitView:
    """The units a tower state still runs, laid out per image for FlowCut's per-image math (`methods.flowcut`):
    [images, W] padded, each image's units in natural order (W: the most units an image runs with)."""

    slot: Tensor  # [U] long: the padded slot (image * W + rank in its image) of each unit, tower order
    natural: Tensor  # [images, W] long: the natural unit at each slot (padding: 0)
    running: Tensor  # [images, W] bool: the slots that hold a unit
    unit_image: Tensor  # [U] long: the image of each unit, tower order
    running_counts: Tensor  # [images] long: the running units per image
    valid: Tensor  # [images, W] bool: the running units still attended to
    counts: Tensor  # [images] long: the running units still attended to per image
    attending: Tensor | None = None  # [U] bool, tower order: the units still attended to (None: all)

    @classmethod
    def of(cls, unit_natural: Tensor, starts: Tensor, kept: list[int]) -> _UnitView:
        """The view of units `unit_natural` (tower order) of images whose natural units start at `starts`
        [images + 1], `kept` [images] of them per image (host)."""
        device = unit_natural.device
        width = max(kept)
        order = unit_natural.argsort()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=device)
        image = torch.bucketize(unit_natural, starts[1:], right=True)
        counts = host_to_device(torch.tensor(kept), device)  # (a blocking copy would wait for the device's queue)
        first = counts.cumsum(0) - counts  # rank of each image's first unit
        slot = image * width + rank - first[image]
        natural = unit_natural.new_zeros(len(kept) * width).index_put_((slot,), unit_natural).view(len(kept), width)
        running = torch.arange(width, device=device) < counts.unsqueeze(1)
        return cls(slot, natural, running, image, counts, running, counts)

    def attending_to(self, attending: Tensor, valid: Tensor, counts: Tensor) -> _UnitView:
        """The same units, of which only `attending` [U] bool (tower order) are still attended to: `valid`
        [images, W] in this layout, `counts` [images] per image (`_pruning_point` gives all three)."""
        return replace(self, attending=attending, valid=valid, counts=counts)

    def attending_to_all(self) -> _UnitView:
        """The same units, every one attended to."""
        return replace(self, attending=None, valid=self.running, counts=self.running_counts)

    def pad(self, per_unit: Tensor) -> Tensor:
        """[images, W]: per-unit values [U] (tower order) in this layout (padding: 0)."""
        return _padded(per_unit, self.slot, self.running)


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


def _unit_frames(grids: list[tuple[int, int, int]]) -> Tensor:
    """[U] long (CPU): the frame (attention segment of a full-attention block) of each merged-token unit, in
    natural order: every frame of every image is a segment of its own, as the tower's cu_seqlens say."""
    sizes = torch.tensor([h * w // MERGED for t, h, w in grids for _ in range(t)])
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


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
