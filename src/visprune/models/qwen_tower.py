"""visprune's runner for the Qwen-VL vision towers: the tower's own weights and block structure, with
batched attention, and an optional cut where a method reduces the tokens for the remaining blocks.

transformers runs these towers' attention once per image, frame or window from Python (without
FlashAttention); here every block runs its attention as one call per distinct segment length
(`segments.segment_attention`), with the layout planned once per forward on the host. The blocks'
arithmetic is the stock one (norm1 -> qkv -> vision RoPE -> attention -> proj, norm2 -> MLP, both
residual), so outputs equal the stock tower's within float rounding; under a FlashAttention
implementation the block's own attention module runs instead (its varlen kernel is already one call).
The work around the attention call (`attention_inputs`, `finish_block`) can run compiled
(`compiled_steps`, apply's `compile_tower`): torch.compile fuses the float32 RMSNorm and RoPE
elementwise passes, which otherwise take about as long as the matrix products on a GPU.

Tokens are held in the TOWER's order (Qwen2.5-VL permutes merged-token units into windows); each
unit (the 4 patches one merged token is made of) remembers its natural index, so results are put back
into row-major grid order at the end. A cut keeps a subset of units (merged where a method merges):
their rows continue through the remaining blocks with their own RoPE angles, and each keeps attending
within its own frame or window, now over the kept units of that frame or window only. A state may be
cut several times (FlowCut prunes after several blocks): each cut keeps a subset of the units still
running.

A state may also MASK units instead (`TowerState.mask`): they keep running, but every later block's
attention gives them no weight as keys (`widen`), so the units still running attend as if the masked ones
were gone. Masking needs no count on the host; FlowCut masks at each pruning point and removes the masked
rows later (`keep_units`), when the host has read which they are without waiting for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache, cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visprune import compat
from visprune.errors import UnsupportedModelError
from visprune.host_reads import host_to_device
from visprune.models.segments import Segments, segment_attention, segment_attention_lse

UNIT = 4  # patches per merged token (spatial_merge_size ** 2 with the released merge size 2)
# Half-precision elements per 16 bytes: GPU matrix-product kernels for Hopper need leading dimensions
# that are multiples of this; a 3420-wide MLP (Qwen2.5-VL) otherwise falls back to ~3x slower kernels.
ALIGN = 8
# The bias `widen` gives a masked key: scaled by any head scale >= 1/16 (head sizes up to 256) its logit is
# below -2000, whose exp is 0 in float32; -2**15 is exact in float16, bfloat16 and float32.
KEY_BIAS = -(2.0**15)


@dataclass(frozen=True)
class TowerLayout:
    """Which tokens attend together, per unit in tower order: its frame (full-attention blocks) and, on
    towers with window attention, its window (every block not in `full_blocks`)."""

    unit_frame: Tensor  # [U] long (CPU): frame id of each unit in tower order, non-decreasing
    unit_window: Tensor | None  # [U] long (CPU): window id, non-decreasing; None when every block is full
    full_blocks: frozenset[int]

    @cached_property
    def _full(self) -> Segments:
        return _runs(self.unit_frame)

    @cached_property
    def _window(self) -> Segments:
        return _runs(self.unit_window)

    def segments(self, block: int) -> Segments:
        """The segments block `block` attends within (in patches)."""
        if self.unit_window is None or block in self.full_blocks:
            return self._full
        return self._window

    def keep(self, units: Tensor) -> TowerLayout:
        """The layout of the units at tower positions `units` (ascending, CPU)."""
        window = None if self.unit_window is None else self.unit_window[units]
        return TowerLayout(self.unit_frame[units], window, self.full_blocks)


def _runs(ids: Tensor) -> Segments:
    """Segments (in patches) of the runs of equal ids in a non-decreasing unit id sequence."""
    counts = torch.unique_consecutive(ids, return_counts=True)[1]
    return Segments(tuple(int(c) * UNIT for c in counts.tolist()))


@dataclass
class BlockInput:
    """A block's input as the methods' signals read it: hidden [T, C] in tower order, its RoPE angles and
    the segments the block attends within."""

    hidden: Tensor
    cos: Tensor
    sin: Tensor
    segments: Segments
    # The block's q and k [T, heads, d] after RoPE (and k before it) and v, kept when the runner computed
    # them (sdpa / eager), so a signal on this block does not compute them again. In a masked block
    # (`TowerState.mask`: FlowCut's) q and k are `widen`ed: each q . k is the logit with the mask applied,
    # and their head size is ALIGN more than v's.
    q: Tensor | None = None
    k: Tensor | None = None
    keys: Tensor | None = None  # the block's keys before RoPE
    v: Tensor | None = None
    # The log-normaliser of each query row and head [T, heads] float32 of the block's attention, where its
    # fused kernel returned it (the CLS-free signal then skips a pass of its own).
    lse: Tensor | None = None


class BlockSteps(NamedTuple):
    """The two halves of a block around its attention call (`attention_inputs`, `finish_block`), plain
    or compiled."""

    attention_inputs: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]  # q, k (widened with a key bias), v, keys
    finish_block: Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class TowerState:
    """A tower forward in progress: the rows still running, in tower order."""

    hidden: Tensor  # [T, C]
    cos: Tensor  # [T, d]
    sin: Tensor  # [T, d]
    layout: TowerLayout
    unit_natural: Tensor  # [U] long (device): the natural (row-major, all images) unit index of each unit
    units_host: Tensor  # [U] long (CPU): unit_natural's host copy, kept without reading the device
    steps: BlockSteps  # how the blocks run (EAGER_STEPS or compiled_steps)
    next_block: int = 0
    key_bias: Tensor | None = None  # [T]: 0 for a row attended to, KEY_BIAS for a masked one (`mask`)

    def natural_order(self) -> Tensor:
        """Index that puts this state's units in natural order (dense states: row-major grid order)."""
        return self.unit_natural.argsort()

    def mask(self, attended: Tensor) -> None:
        """From the next block on, the units that are not `attended` [U] bool (tower order) take no part in any
        block's attention as keys. Their rows still run (their own outputs mean nothing); no host read."""
        bias = torch.where(attended, 0.0, KEY_BIAS).to(self.hidden.dtype)
        self.key_bias = bias.repeat_interleave(UNIT)

    def input_of(self, block: int) -> BlockInput:
        return BlockInput(self.hidden, self.cos, self.sin, self.layout.segments(block))


def embed_patches(patch_embed: nn.Module, pixel_values: Tensor) -> Tensor:
    """The tower's patch embedding as one matrix product: its Conv3d has kernel = stride = the patch, so on
    the processor's flattened patches (channel, time, row, column order) it is a linear map. cuDNN's 3-D
    convolution takes ~25x longer for the same arithmetic on an H200 (5 ms against 0.2 ms at 1008 px x 8)."""
    proj = patch_embed.proj
    weight = proj.weight.reshape(proj.weight.shape[0], -1)
    return F.linear(pixel_values.to(weight.dtype), weight, proj.bias)


@dataclass(frozen=True)
class TowerPlan:
    """The part of a tower forward that only the images' grids decide: which tokens attend together, the
    tower order of the units and every patch's RoPE angles. Planned on the host once per grid list
    (`plan`); adapters keep recent plans, so repeated image sizes skip the host work (~30 ms at 8 x
    1008 px, time in which the GPU would wait)."""

    layout: TowerLayout
    unit_order: Tensor | None  # [U] long (device): the natural unit at each tower position; None: identity
    unit_order_host: Tensor | None  # the same on the host
    cos: Tensor  # [T, d] float32 (device), tower order
    sin: Tensor


def plan(
    tower: nn.Module, grid_thw: Tensor, layout: TowerLayout, unit_order: Tensor | None, device: torch.device
) -> TowerPlan:
    """The TowerPlan of images with grids `grid_thw` [images, 3] (host), laid out as `layout` with the
    units in `unit_order` (host, None for the identity). The position ids are laid out on the host and
    copied over once; the RoPE angles are computed in float32, as the tower does."""
    position_ids = compat.vision_position_ids(grid_thw, tower.spatial_merge_size).to(device)
    cos, sin = (x.float() for x in tower.rotary_pos_emb(position_ids, position_ids))  # (x gives the device)
    on_device = None
    if unit_order is not None:
        on_device = unit_order.to(device)
        rows = _patch_rows(on_device)
        cos, sin = cos[rows], sin[rows]
    return TowerPlan(layout, on_device, unit_order, cos, sin)


def start(patches: Tensor, plan: TowerPlan, steps: BlockSteps | None = None) -> TowerState:
    """Put the embedded patches [T, C] (natural order) in the tower order of `plan`. `steps`: how blocks
    run (plain by default)."""
    if plan.unit_order is None:
        natural = torch.arange(patches.shape[0] // UNIT, device=patches.device)
        host = torch.arange(natural.shape[0])
    else:
        natural, host = plan.unit_order, plan.unit_order_host
        patches = patches[_patch_rows(natural)]
    return TowerState(patches, plan.cos, plan.sin, plan.layout, natural, host, steps or EAGER_STEPS)


def run_blocks(
    tower: nn.Module,
    state: TowerState,
    until: int,
    *,
    inputs: Collection[int] = (),
    outputs: Collection[int] = (),
    normalisers: bool = True,
) -> tuple[dict[int, BlockInput], dict[int, Tensor]]:
    """Run blocks state.next_block .. until-1; return the inputs of the blocks in `inputs` and the outputs
    (hidden [T, C], tower order) of the blocks in `outputs`. normalisers=False records the inputs without
    their attention's log-normalisers (for readers of q, k and v only: the plain attention call runs)."""
    seen_in: dict[int, BlockInput] = {}
    seen_out: dict[int, Tensor] = {}
    rope = None
    for i in range(state.next_block, until):
        block = tower.blocks[i]
        if i in inputs:
            seen_in[i] = state.input_of(i)
        rope = rope or compat.vision_rope(block.attn)
        segments = state.layout.segments(i)
        record = seen_in.get(i)
        state.hidden = run_block(
            block, state.hidden, state.cos, state.sin, segments, rope, state.steps, record, normalisers, state.key_bias
        )
        if i in outputs:
            seen_out[i] = state.hidden
    state.next_block = max(state.next_block, until)
    return seen_in, seen_out


def run_block(
    block: nn.Module,
    hidden: Tensor,
    cos: Tensor,
    sin: Tensor,
    segments: Segments,
    rope: Callable,
    steps: BlockSteps,
    record: BlockInput | None = None,
    normalisers: bool = True,
    key_bias: Tensor | None = None,
) -> Tensor:
    """One Qwen-VL vision block with its attention batched over `segments`; its q, k, v and (with
    `normalisers`) attention log-normalisers go into `record` where given. `key_bias` [T] (`TowerState.mask`)
    is added to every logit of each key (see `widen`); a masked block runs on torch's attention under any
    attention implementation (FlashAttention's varlen path takes no bias)."""
    attn = block.attn
    impl = attn.config._attn_implementation or "eager"
    if impl not in ("sdpa", "eager") and key_bias is None:
        # FlashAttention and others: the block's own varlen path is already a single call.
        cu = segments.cu_seqlens(hidden.device)
        return block(hidden, cu_seqlens=cu, max_seqlen=max(segments.lengths), position_embeddings=(cos, sin))
    q, k, v, keys = steps.attention_inputs(block, hidden, cos, sin, rope, key_bias)
    if record is not None and normalisers:
        out, record.lse = segment_attention_lse(q, k, v, segments, scale=attn.scaling, eager=impl == "eager")
    else:
        out = segment_attention(q, k, v, segments, scale=attn.scaling, eager=impl == "eager")
    if record is not None:
        record.q, record.k, record.keys, record.v = q, k, keys, v
    return steps.finish_block(block, hidden, out)


def attention_inputs(
    block: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, rope: Callable, key_bias: Tensor | None = None
) -> tuple[Tensor, ...]:
    """norm1 -> qkv -> the vision RoPE of q and k: the block's q, k, v [T, heads, d], and its keys before
    RoPE (what the "keys" signal reads); with `key_bias`, q and k `widen`ed by it."""
    attn = block.attn
    q, keys, v = attn.qkv(block.norm1(hidden)).reshape(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
    q, k = rope(q, keys, cos, sin)
    if key_bias is not None:
        q, k = widen(q, k, key_bias)
    return q, k, v, keys


def widen(q: Tensor, k: Tensor, key_bias: Tensor) -> tuple[Tensor, Tensor]:
    """q and k [T, H, d] with ALIGN more columns, so that every q_i . k_j gains key_bias[j] ([T]): q's first
    new column is 1, k's the bias, the others 0 (the width stays a multiple of ALIGN, which the fused
    attention kernels need). A key of bias 0 scores exactly as before; one of KEY_BIAS gets weight 0 in
    every softmax. This key mask costs cuDNN's attention 0-5% at Qwen2.5-VL's shapes, an explicit boolean
    mask 50% (`scripts/time_key_mask.py`), and a row whose whole segment is masked still gets finite weights
    (a boolean mask gives NaN there in some kernels): such rows are dropped units, whose outputs nobody
    reads."""
    t, heads, _ = q.shape
    zeros = q.new_zeros(t, heads, ALIGN - 1)
    q = torch.cat([q, q.new_ones(t, heads, 1), zeros], dim=-1)
    k = torch.cat([k, key_bias.to(k.dtype).view(t, 1, 1).expand(t, heads, 1), zeros], dim=-1)
    return q, k


def finish_block(block: nn.Module, hidden: Tensor, attended: Tensor) -> Tensor:
    """The block after its attention (`attended` [T, heads, d]): output projection and residual, then
    norm2 -> MLP and residual."""
    hidden = hidden + block.attn.proj(attended.reshape(hidden.shape[0], -1))
    return hidden + mlp_forward(block.mlp, block.norm2(hidden))


EAGER_STEPS = BlockSteps(attention_inputs, finish_block)
COMPILE_BACKEND = "inductor"


@cache
def compiled_steps(backend: str = COMPILE_BACKEND) -> BlockSteps:
    """`attention_inputs` and `finish_block` through torch.compile: one graph each, shared by every block
    of every Qwen-VL tower (modules are inputs, token counts dynamic), so a process compiles once per
    dtype and device (seconds to tens of seconds on first use). fullgraph: a graph break would be an error here, not
    a silent slowdown. A machine where the backend cannot compile (no C compiler for inductor on a CPU,
    say) gets an UnsupportedModelError that says so."""
    from torch._dynamo.exc import BackendCompilerFailed

    def explained(fn: Callable) -> Callable:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)

        def call(*args: object) -> object:
            try:
                return compiled(*args)
            except BackendCompilerFailed as err:
                raise UnsupportedModelError(
                    f"compile_tower: torch.compile ({backend}) could not compile the vision blocks here "
                    f"({type(err.inner_exception).__name__}: {err.inner_exception}); apply without compile_tower"
                ) from err

        return call

    return BlockSteps(explained(attention_inputs), explained(finish_block))


def mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """The block's MLP on `x`. A gated MLP (gate_proj, up_proj, down_proj) on a CUDA half-precision input
    whose hidden width is not a multiple of ALIGN runs as `aligned_gated_mlp`; any other runs as is."""
    width = getattr(getattr(mlp, "gate_proj", None), "out_features", None)
    misaligned = width is not None and width % ALIGN != 0
    if misaligned and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return aligned_gated_mlp(mlp, x)
    return mlp(x)


def aligned_gated_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """down(act(gate(x)) * up(x)) with every matrix product on aligned leading dimensions: gate and up
    zero-padded to a width that is a multiple of ALIGN and stacked into one product, the down weight
    zero-padded to match: the padding columns hold act(0) * 0 = 0, so the sums are the same plus zeros.
    The padded weights are built for this call (a copy of the MLP's weights, well under a millisecond on a
    GPU) and not kept, so the model's weights stay the only ones held."""
    width = mlp.gate_proj.out_features
    extra = -(-width // ALIGN) * ALIGN - width
    stacked = torch.cat([F.pad(mlp.gate_proj.weight, (0, 0, 0, extra)), F.pad(mlp.up_proj.weight, (0, 0, 0, extra))])
    bias = None
    if mlp.gate_proj.bias is not None:
        bias = torch.cat([F.pad(mlp.gate_proj.bias, (0, extra)), F.pad(mlp.up_proj.bias, (0, extra))])
    gate, up = F.linear(x, stacked, bias).chunk(2, dim=-1)
    return F.linear(mlp.act_fn(gate) * up, F.pad(mlp.down_proj.weight, (0, extra)), mlp.down_proj.bias)


def unit_positions(unit_natural: Tensor, natural: Tensor) -> Tensor:
    """The positions in `unit_natural` (the natural unit index of each unit of a state, tower order) of the
    natural units `natural` (each one of them)."""
    ordered, perm = unit_natural.sort()
    return perm[torch.searchsorted(ordered, natural)]


def keep_units(state: TowerState, kept_host: Tensor) -> Tensor:
    """Continue with the units at tower positions `kept_host` (ascending, on the host), rows and all; no
    host read. Returns the positions on the device (for the caller's own per-unit tensors)."""
    kept = host_to_device(kept_host, state.hidden.device)
    state.hidden = state.hidden[_patch_rows(kept)]
    state.unit_natural = state.unit_natural[kept]
    _keep_rows(state, kept, kept_host)
    return kept


def _keep_rows(state: TowerState, kept: Tensor, kept_host: Tensor) -> None:
    """The per-row state other than hidden and unit_natural, at the kept tower positions (device and host)."""
    rows = _patch_rows(kept)
    state.cos, state.sin = state.cos[rows], state.sin[rows]
    if state.key_bias is not None:
        state.key_bias = state.key_bias[rows]
    state.layout = state.layout.keep(kept_host)
    state.units_host = state.units_host[kept_host]


def cut(state: TowerState, rows: Tensor | None, natural: Tensor) -> Tensor:
    """Continue with a subset of the units still running: `rows` [K, UNIT * C] (units' patches
    concatenated; None: the units' own rows) standing at the natural units `natural` [K] (device), each one
    of the state's units. Returns the index that puts the tower-order rows back into the order given
    (apply it to results of the remaining blocks). One host synchronisation (the new layout). A cut state
    may be cut again."""
    tower_pos = unit_positions(state.unit_natural, natural)  # natural unit -> its tower position
    if rows is None:
        rows = state.hidden.reshape(-1, UNIT * state.hidden.shape[-1])[tower_pos]
    order = tower_pos.argsort(stable=True)
    kept = tower_pos[order]
    # Gathered (not reshaped views): a compiled block sees the same kind of tensor in every block.
    state.hidden = rows.reshape(-1, rows.shape[1] // UNIT)[_patch_rows(order)]
    state.unit_natural = natural[order]
    _keep_rows(state, kept, kept.cpu())
    return order.argsort()


def _patch_rows(units: Tensor) -> Tensor:
    """The patch rows [len(units) * UNIT] of merged-token units `units` (each unit's UNIT rows in order)."""
    return (units.unsqueeze(1) * UNIT + torch.arange(UNIT, device=units.device)).flatten()
