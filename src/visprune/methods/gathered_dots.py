"""Row dot products against a gathered row of a small table: out[t, h] = x[t, h] . table[index[t], h], in
float32. FlowCut's Qwen-VL terms need it for every key of a block against its own image's mean query.

On a GPU it is one Triton kernel that reads x once and the table (a few KiB, images x heads x d) from the
cache, writing only the [T, H] result. torch has no single operation for it: a product with every image's
row ([T, H, images]) and a pick of each token's own reads and writes eight times the result at batch 8,
and the same expression compiled by inductor came out at 200 us a block where one read of the keys takes
35 (`scripts/time_flow_terms.py`). Off the GPU, or without Triton (CPU builds of torch), it is the plain
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

ROWS_PER_PROGRAM = 128


def gathered_dots(x: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """[T, H] float32: each x[t, h] (x [T, H, d], any float dtype, its last dimension contiguous) dotted with
    table[index[t], h] (table [G, H, d] float32, index [T] long). A CUDA x is multiplied in float32 from its
    own dtype, each product rounded once and summed in float32, as the plain expression."""
    if x.is_cuda and triton is not None:
        return torch.ops.visprune.gathered_dots(x, table.float().contiguous(), index)
    return (x.float() * table.float()[index]).sum(dim=-1)


if triton is not None:

    @triton.jit
    def _dots_kernel(
        x_ptr,
        table_ptr,
        index_ptr,
        out_ptr,
        rows,
        x_row_stride,
        x_head_stride,
        heads,
        width,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_WIDTH: tl.constexpr,
    ):
        """One program per ROWS_PER_PROGRAM rows and one head. It reads its rows of x once and, for each
        group between the smallest and the largest of its rows' (one or two where the groups are runs of
        rows, as a packed sequence's images are), that group's table row once, for the rows of that group:
        a gather of the table row per x row read more bytes than x itself."""
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        head = tl.program_id(1)
        col = tl.arange(0, BLOCK_WIDTH)
        row_ok = row < rows
        col_ok = col < width
        group = tl.load(index_ptr + row, mask=row_ok, other=0)
        x_at = x_ptr + row[:, None].to(tl.int64) * x_row_stride + head * x_head_stride + col[None, :]
        x = tl.load(x_at, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        first = tl.min(tl.where(row_ok, group, 2**62), axis=0)
        last = tl.max(tl.where(row_ok, group, -1), axis=0)
        out = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for g in range(first, last + 1):
            t = tl.load(table_ptr + (g * heads + head) * width + col, mask=col_ok, other=0.0)
            out = tl.where(group == g, tl.sum(x * t[None, :], axis=1), out)
        tl.store(out_ptr + row.to(tl.int64) * heads + head, out, mask=row_ok)

    @torch.library.triton_op("visprune::gathered_dots", mutates_args=())
    def _gathered_dots_cuda(x: Tensor, table: Tensor, index: Tensor) -> Tensor:
        rows, heads, width = x.shape
        if x.stride(2) != 1:
            x = x.contiguous()
        out = torch.empty(rows, heads, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), heads)
        torch.library.wrap_triton(_dots_kernel)[grid](
            x,
            table,
            index,
            out,
            rows,
            x.stride(0),
            x.stride(1),
            heads,
            width,
            BLOCK_ROWS=ROWS_PER_PROGRAM,
            BLOCK_WIDTH=triton.next_power_of_2(width),
        )
        return out
