"""Cosine similarity between token sets, in float32, for the diversity methods (CDPruner, DivPrune,
SCOPE, VisPruner).

Their selection starts from all pairs' similarities of the tokens of each image ([B, N, N]: 8 x 1296
tokens of width 5120 on Qwen2.5-VL at 1008 px). Normalising the rows first and multiplying the unit
vectors in float32 costs 3.5 ms there on an H200; casting the unit vectors to half precision to use the
tensor cores is 10x faster but rounds them first (errors up to 2.3e-5).

Here the raw rows are multiplied as they are and the products scaled by the inverse norms afterwards:
cos(x_i, y_j) = (x_i . y_j) / (|x_i| |y_j|). Half-precision CUDA inputs go through the tensor cores
with float32 results (`torch.bmm(..., out_dtype=torch.float32)`): their elements are exact in float32,
so every product is, and the sums are float32 sums, equal to the float32 computation up to summation
order (against float64: 1.85e-5 at most at width 5120, where the float32 product of unit rows gave 1.10e-5;
`scripts/check_similarity.py`, which also shows that the selections of CDPruner, DivPrune and SCOPE equal
float64's). Everything else is multiplied in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12  # the floor of a row's norm, as torch.nn.functional.normalize uses


def cosine_similarity(x: Tensor, y: Tensor) -> Tensor:
    """[B, N, M] float32: the cosine similarity of every row of x [B, N, C] with every row of y [B, M, C]
    (0 against a zero row)."""
    return _scaled(_products(x, y), _inverse_norm(x), _inverse_norm(y))


def pairwise_cosine(x: Tensor) -> Tensor:
    """[B, N, N] float32: the cosine similarity of every pair of rows of x [B, N, C]."""
    inverse = _inverse_norm(x)
    return _scaled(_products(x, x), inverse, inverse)


def _products(x: Tensor, y: Tensor) -> Tensor:
    """[B, N, M] float32 dot products of the rows: on the tensor cores for half-precision CUDA rows."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and y.dtype == x.dtype:
        return torch.bmm(x, y.transpose(1, 2), out_dtype=torch.float32)
    xf = x.float()
    return xf @ (xf if y is x else y.float()).transpose(1, 2)


def _scaled(products: Tensor, inverse_x: Tensor, inverse_y: Tensor) -> Tensor:
    """The products divided by both rows' norms, in place (the [B, N, M] product is this call's own)."""
    return products.mul_(inverse_x.unsqueeze(2)).mul_(inverse_y.unsqueeze(1))


def _inverse_norm(x: Tensor) -> Tensor:
    """[B, N] float32: 1 / max(|x_i|, EPS) per row (half-precision rows summed in float32 without a float32
    copy of x)."""
    rows = x if x.dtype in (torch.float16, torch.bfloat16) else x.float()
    return torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).clamp(min=EPS).reciprocal()
