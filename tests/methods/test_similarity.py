"""The diversity methods' cosine similarity: products of the raw rows scaled by inverse norms, against the
normalise-first definition in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visprune.methods.similarity import cosine_similarity, pairwise_cosine


def _reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1) @ F.normalize(y.double(), dim=-1).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_equals_the_normalised_product(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, 40, generator=g) * torch.rand(3, 17, 1, generator=g) * 50).to(dtype)
    y = torch.randn(3, 5, 40, generator=g).to(dtype)
    got = cosine_similarity(x, y)
    assert got.dtype == torch.float32 and got.shape == (3, 17, 5)
    torch.testing.assert_close(got.double(), _reference(x, y), rtol=0, atol=1e-6)
    pair = pairwise_cosine(x)
    torch.testing.assert_close(pair.double(), _reference(x, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.diagonal(pair, dim1=1, dim2=2), torch.ones(3, 17))


def test_a_zero_row_is_dissimilar_to_everything():
    x = torch.randn(1, 4, 6)
    x[0, 2] = 0
    pair = pairwise_cosine(x)
    assert torch.equal(pair[0, 2], torch.zeros(4)) and torch.equal(pair[0, :, 2], torch.zeros(4))
    assert torch.isfinite(pair).all()


def test_mixed_dtypes_are_compared_in_float32():
    x, y = torch.randn(2, 6, 8).to(torch.bfloat16), torch.randn(2, 1, 8)
    torch.testing.assert_close(cosine_similarity(x, y).double(), _reference(x, y), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core path needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_gpu_is_float32_accurate(dtype):
    """The tensor cores multiply the half-precision rows exactly: the error is float32's summation error
    (1e-5 at width 5120 on an H200, bf16 2e-6 and fp16 7e-6 here), far below that of unit rows rounded to
    half precision before the product."""
    x = torch.randn(4, 300, 1280, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = pairwise_cosine(x.cuda()).cpu()
    exact = _reference(x, x)
    unit = F.normalize(x.float().cuda(), dim=-1).to(dtype)
    rounded = (unit @ unit.transpose(1, 2)).double().cpu()
    ours, theirs = (got.double() - exact).abs().max(), (rounded - exact).abs().max()
    assert ours <= 1e-5 and ours < theirs, f"{dtype}: {ours:.2e}; rounded unit rows {theirs:.2e}"
