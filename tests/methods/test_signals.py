"""CLS-attention rows from q/k must equal the corresponding row of a full attention computation."""

import pytest
import torch

from visprune.errors import InputError
from visprune.methods.signals import cls_attention, patch_keys


def full_attention(x_q, x_k, heads):
    b, t, c = x_k.shape
    d = c // heads
    q = x_q.view(b, t, heads, d).transpose(1, 2)
    k = x_k.view(b, t, heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # [B, H, T, T]


@pytest.mark.parametrize("heads", [1, 4])
def test_cls_row_matches_full_attention(heads):
    torch.manual_seed(0)
    q, k = torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    attn = full_attention(q, k, heads)
    mode = "single" if heads == 1 else "mean"
    got = cls_attention(q[:, 0], k, num_heads=heads, heads=mode)
    torch.testing.assert_close(got, attn[:, :, 0, 1:].mean(1))
    if heads > 1:
        torch.testing.assert_close(cls_attention(q[:, 0], k, heads, "sum"), attn[:, :, 0, 1:].sum(1))


def test_cls_row_excludes_cls_column_without_renormalising():
    q, k = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    got = cls_attention(q[:, 0], k, num_heads=1, heads="single")
    assert got.shape == (2, 4)
    assert torch.all(got.sum(-1) < 1)


def test_half_precision_inputs_give_float32():
    q, k = torch.randn(1, 6, 8, dtype=torch.float16), torch.randn(1, 6, 8, dtype=torch.float16)
    assert cls_attention(q[:, 0], k, 2).dtype == torch.float32


def test_patch_keys_drop_cls_and_average_heads():
    k = torch.randn(2, 5, 8)
    assert torch.equal(patch_keys(k, 2, "single"), k[:, 1:])
    torch.testing.assert_close(patch_keys(k, 2, "mean"), (k[:, 1:, :4] + k[:, 1:, 4:]) / 2)


def test_errors():
    with pytest.raises(InputError, match="heads"):
        cls_attention(torch.randn(1, 4), torch.randn(1, 3, 4), 2, "max")
    with pytest.raises(InputError, match="q_cls must be"):
        cls_attention(torch.randn(1, 4), torch.randn(1, 3, 5), 1)
    with pytest.raises(InputError, match="divisible"):
        cls_attention(torch.randn(1, 6), torch.randn(1, 3, 6), 4)
