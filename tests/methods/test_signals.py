"""CLS-attention rows from q/k must equal the corresponding row of a full attention computation."""

import pytest
import torch

from visprune.errors import InputError
from visprune.methods.signals import cls_attention, mean_received_attention, patch_keys


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


def naive_received(q, k, heads, mode, skip=0):
    """Column mean over query rows skip.. of the full [n, H, T, T] map, heads combined; CLS columns dropped."""
    h = 1 if mode == "single" else heads
    attn = full_attention(q.float(), k.float(), h)[:, :, skip:, skip:]  # softmax over all T keys first
    per_head = attn.mean(dim=2)  # [n, H, T - skip]
    return per_head.sum(1) if mode == "sum" else per_head.mean(1)


@pytest.mark.parametrize("mode", ["single", "mean", "sum"])
@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 40])
@pytest.mark.parametrize("skip", [0, 1])
def test_mean_received_matches_full_map(mode, chunk, skip):
    torch.manual_seed(1)
    q, k = torch.randn(3, 11, 8), torch.randn(3, 11, 8)
    got = mean_received_attention(q, k, 4, mode, skip=skip, chunk=chunk)
    assert got.shape == (3, 11 - skip) and got.dtype == torch.float32
    torch.testing.assert_close(got, naive_received(q, k, 4, mode, skip))


def test_mean_received_without_skip_sums_to_one_per_head():
    q, k = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    torch.testing.assert_close(mean_received_attention(q, k, 2, "mean").sum(-1), torch.ones(2))
    torch.testing.assert_close(mean_received_attention(q, k, 2, "sum").sum(-1), torch.full((2,), 2.0))


def test_mean_received_bf16_inputs_agree_with_float32_reference():
    torch.manual_seed(2)
    q, k = torch.randn(2, 17, 16, dtype=torch.bfloat16), torch.randn(2, 17, 16, dtype=torch.bfloat16)
    got = mean_received_attention(q, k, 4, "mean", skip=1, chunk=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_received(q, k, 4, "mean", 1), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 1, 4, 6, 13, 100])
@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("mode", ["single", "mean"])
@pytest.mark.parametrize("lengths", [[5, 12, 2, 9], [6, 6, 6]], ids=["ragged", "equal"])
def test_mean_received_packed_segments_equal_each_image_alone(chunk, skip, mode, lengths):
    torch.manual_seed(3)
    q, k = torch.randn(sum(lengths), 8), torch.randn(sum(lengths), 8)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = mean_received_attention(q, k, 2, mode, skip=skip, cu_seqlens=cu, chunk=chunk)
    parts = [
        naive_received(qi[None], ki[None], 2, mode, skip)[0]
        for qi, ki in zip(q.split(lengths), k.split(lengths), strict=True)
    ]
    assert got.shape == (sum(lengths) - len(lengths) * skip,)
    torch.testing.assert_close(got, torch.cat(parts))


def test_mean_received_packed_single_segment_equals_batched():
    q, k = torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    packed = mean_received_attention(q[0], k[0], 2, cu_seqlens=torch.tensor([0, 10]), chunk=3)
    torch.testing.assert_close(packed, mean_received_attention(q, k, 2)[0])


def test_mean_received_errors():
    q = torch.randn(2, 4, 8)
    with pytest.raises(InputError, match="heads"):
        mean_received_attention(q, q, 2, "max")
    with pytest.raises(InputError, match=r"\[n, T, C\]"):
        mean_received_attention(q, q[:, :3], 2)
    with pytest.raises(InputError, match="no token"):
        mean_received_attention(q, q, 2, skip=4)
    with pytest.raises(InputError, match="chunk"):
        mean_received_attention(q, q, 2, chunk=0)
    with pytest.raises(InputError, match="cu_seqlens must rise"):
        mean_received_attention(q[0], q[0], 2, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(InputError, match="cu_seqlens must rise"):
        mean_received_attention(q[0], q[0], 2, cu_seqlens=torch.tensor([0, 1, 4]), skip=1)
    with pytest.raises(InputError, match="1-D integer"):
        mean_received_attention(q[0], q[0], 2, cu_seqlens=torch.tensor([0.0, 4.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skip", [0, 1])
def test_fused_received_equals_the_chunked_scores(dtype, skip):
    """The two-pass fused-kernel path (used for half-precision CUDA inputs; here through torch's CPU flash
    kernel) gives the column sums of the float32 chunked computation, to bf16 input precision."""
    from visprune.methods.signals import _received_batched, _received_fused

    g = torch.Generator().manual_seed(0)
    q, k = (2 * torch.randn(2, 4, 50, 16, generator=g) for _ in range(2))
    ref = _received_batched(q.to(dtype).float(), k.to(dtype).float(), skip, None)
    got = _received_fused(q.to(dtype), k.to(dtype), skip)
    assert got is not None and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fused_received_reads_given_normalisers_instead_of_its_first_pass():
    """Given the rows' log-normalisers (from the block's own attention call), the fused path skips its
    first pass and gives the same column sums; the normalisers are really read (wrong ones change them)."""
    from visprune.methods.signals import _received_batched, _received_fused, attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(2, 4, 50, 16, generator=g) for _ in range(3))
    found = attention_with_lse(q, k, v, 16**-0.5)
    assert found is not None
    out, lse = found
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    got = _received_fused(q, k, 1, lse)
    torch.testing.assert_close(got, _received_batched(q, k, 1, None), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_received_fused(q, k, 1, lse + 1.0), got)


def test_mean_received_lse_errors():
    q = torch.randn(2, 6, 8)
    with pytest.raises(InputError, match=r"lse must be the per-head log-normalisers \(2, 6, 2\)"):
        mean_received_attention(q, q, 2, lse=torch.zeros(2, 6))
    with pytest.raises(InputError, match="heads='mean' or 'sum'"):
        mean_received_attention(q, q, 2, heads="single", lse=torch.zeros(2, 6, 1))
    with pytest.raises(InputError, match=r"\(12, 2\)"):
        mean_received_attention(
            q.flatten(0, 1), q.flatten(0, 1), 2, cu_seqlens=torch.tensor([0, 6, 12]), lse=torch.zeros(12, 3)
        )
