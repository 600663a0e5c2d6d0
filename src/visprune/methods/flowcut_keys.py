"""FlowCut's per-row terms of one Qwen-VL block in one read of its keys and values: each key's dot with its own
image's mean query, and each row's value norm.

On a GPU this is one Triton kernel. A program takes 16 rows and walks their heads, so it reads whole rows of k
and v (every load 16-byte aligned: the head strides are compile-time constants) and each row's mean query from
the cache, and writes only the [T, H] dots and the [T] norms. With torch operations the same terms took a
[T, H, 3 x images] float32 product against every image's mean query, two kernels re-reading it and a product
for the norms: ~147 of FlowCut's ~210 us a block at Qwen2.5-VL's batch 8 x 1008 px. This kernel takes 75 of the
terms' 158 us there (`scripts/time_flow_terms.py`; `scripts/probe_flow_key_kernels.py`, variant C). The
softmax's per-image peaks are left to the caller: taken in the kernel (atomic max per image and head) they cost
more than the whole read. Off the GPU, or without Triton (CPU builds of torch), it is the plain float32
expression.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

ROWS_PER_PROGRAM = 16
WARPS = 2


def key_terms(k: Tensor, v: Tensor, mean_q: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
    """(dots [T, H], value norms [T]), float32, for k [T, H, >= d] and v [T, H, d] (any float dtype, last
    dimension contiguous; k may be wider than v, its extra columns are not read), mean_q [images, H, d] float32
    and `image` [T] long: dots[t, h] = k[t, h, :d] . mean_q[image[t], h], each product rounded once to
    float32, and norms[t] = |mean over heads of v[t]|_1."""
    if k.is_cuda and triton is not None and k.stride(2) == 1 and v.stride(2) == 1:
        return torch.ops.visprune.flowcut_key_terms(k, v, mean_q.float().contiguous(), image)
    dots = (k[..., : v.shape[2]].float() * mean_q.float()[image]).sum(dim=-1)
    return dots, v.float().mean(dim=1).abs().sum(dim=-1)


if triton is not None:

    @triton.jit
    def _key_terms_kernel(
        k_ptr,
        v_ptr,
        mean_q_ptr,
        image_ptr,
        dots_ptr,
        norms_ptr,
        rows,
        k_row_stride,
        v_row_stride,
        HEADS: tl.constexpr,
        WIDTH: tl.constexpr,
        K_HEAD_STRIDE: tl.constexpr,
        V_HEAD_STRIDE: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
        BLOCK_WIDTH: tl.constexpr,
    ):
        """One program per BLOCK_ROWS rows, all heads; each row's mean query is gathered per head (a few KiB
        of table, read from the cache), so rows of any images may share a program."""
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.arange(0, BLOCK_WIDTH)
        head_ids = tl.arange(0, BLOCK_HEADS)  # a power of two >= HEADS
        row_ok = row < rows
        tile_ok = row_ok[:, None] & (col < WIDTH)[None, :]
        group = tl.load(image_ptr + row, mask=row_ok, other=0)
        wide_row = row.to(tl.int64)[:, None]
        k_at = k_ptr + wide_row * k_row_stride + col[None, :]
        v_at = v_ptr + wide_row * v_row_stride + col[None, :]
        q_at = mean_q_ptr + group[:, None] * (HEADS * WIDTH) + col[None, :]
        value_sum = tl.zeros([BLOCK_ROWS, BLOCK_WIDTH], dtype=tl.float32)
        dots = tl.zeros([BLOCK_ROWS, BLOCK_HEADS], dtype=tl.float32)
        for head in tl.static_range(HEADS):
            keys = tl.load(k_at + head * K_HEAD_STRIDE, mask=tile_ok, other=0.0).to(tl.float32)
            query = tl.load(q_at + head * WIDTH, mask=tile_ok, other=0.0)
            value_sum += tl.load(v_at + head * V_HEAD_STRIDE, mask=tile_ok, other=0.0).to(tl.float32)
            dots = tl.where(head_ids[None, :] == head, tl.sum(keys * query, axis=1)[:, None], dots)
        tl.store(
            dots_ptr + wide_row * HEADS + head_ids[None, :], dots, mask=row_ok[:, None] & (head_ids < HEADS)[None, :]
        )
        tl.store(norms_ptr + row, tl.sum(tl.abs(value_sum), axis=1) / HEADS, mask=row_ok)

    @torch.library.triton_op("visprune::flowcut_key_terms", mutates_args=())
    def _key_terms_cuda(k: Tensor, v: Tensor, mean_q: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        rows, heads, width = v.shape
        dots = torch.empty(rows, heads, dtype=torch.float32, device=k.device)
        norms = torch.empty(rows, dtype=torch.float32, device=k.device)
        torch.library.wrap_triton(_key_terms_kernel)[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
            k,
            v,
            mean_q,
            image,
            dots,
            norms,
            rows,
            k.stride(0),
            v.stride(0),
            HEADS=heads,
            WIDTH=width,
            K_HEAD_STRIDE=k.stride(1),
            V_HEAD_STRIDE=v.stride(1),
            BLOCK_ROWS=ROWS_PER_PROGRAM,
            BLOCK_HEADS=triton.next_power_of_2(heads),
            BLOCK_WIDTH=triton.next_power_of_2(width),
            num_warps=WARPS,
        )
        return dots, norms
