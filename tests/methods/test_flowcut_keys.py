"""FlowCut's per-row key terms (`flowcut_keys.key_terms`): the GPU kernel against the float32 expression."""

from __future__ import annotations

import pytest
import torch

from visprune.methods.flowcut_keys import key_terms
from visprune.models.qwen_tower import KEY_BIAS, widen


def test_key_terms_are_the_formula():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 7, 3, 5, generator=g).unbind(0)
    mean_q = torch.randn(3, 3, 5, generator=g)
    image = torch.tensor([0, 0, 2, 2, 2, 0, 2])  # interleaved, image 1 without rows
    dots, norms = key_terms(k, v, mean_q, image)
    for t in range(7):
        for h in range(3):
            assert dots[t, h].item() == pytest.approx(float(k[t, h] @ mean_q[image[t], h]), rel=1e-5)
        assert norms[t].item() == pytest.approx(float(v[t].mean(dim=0).abs().sum()), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", [[1024, 3072], [20, 30, 0, 100, 7, 250], [37]])
@pytest.mark.parametrize(("heads", "width"), [(16, 80), (12, 72)])
def test_key_terms_on_a_gpu_match_the_float32_expression(dtype, sizes, heads, width):
    """The Triton kernel (k widened by a key mask as a masked Qwen-VL block records it, v a strided view of one
    qkv tensor; images of uneven sizes, several in one program's rows, one without rows; Qwen-VL's 16 heads of
    80 and a head count that is not a power of two) against the float32 expression of the same values, up to
    summation order."""
    g = torch.Generator().manual_seed(len(sizes))
    t = sum(sizes)
    q, k, v = torch.randn(t, 3, heads, width, generator=g).to(dtype).unbind(1)
    image = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    _, k = widen(q, k, torch.where(torch.rand(t, generator=g) > 0.3, 0.0, KEY_BIAS))
    mean_q = torch.randn(len(sizes), heads, width, generator=g)
    got = key_terms(k.cuda(), v.cuda(), mean_q.cuda(), image.cuda())
    want = key_terms(k.float(), v.float(), mean_q, image)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-5)
