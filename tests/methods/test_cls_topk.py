"""fastervlm and vtc-cls: top-K by CLS attention, checked against a plain Python reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visprune.errors import InputError
from visprune.methods import Placement, SignalRequest, get_method
from visprune.methods.cls_topk import fastervlm, vtc_cls

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference_topk(scores: list[float], k: int) -> list[int]:
    """Top-k indices by score, ties to the lower index, returned ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def check_selection(x: torch.Tensor, out, k: int) -> None:
    b, n, _ = x.shape
    assert len(out) == b
    for i, r in enumerate(out):
        assert r.count == k
        src = r.sources
        assert src.dtype == torch.long
        assert torch.equal(src, src.unique())  # unique and ascending
        assert torch.equal(r.features, x[i, src])
        assert r.assignment.shape == (n,)
        assert torch.equal(r.assignment[src], torch.arange(k))
        assert int((r.assignment >= 0).sum()) == k


@given(
    b=st.integers(1, 3),
    n=st.integers(1, 40),
    c=st.integers(1, 4),
    data=st.data(),
)
def test_fastervlm_matches_reference(b, n, c, data):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    # Coarse scores so ties happen often.
    attn = torch.randint(0, 5, (b, n), generator=g).float()
    out = fastervlm(x, cls_attn=attn, budget=k)
    check_selection(x, out, k)
    for i, r in enumerate(out):
        assert r.sources.tolist() == reference_topk(attn[i].tolist(), k)


def test_fastervlm_batch_equals_per_image_and_deterministic():
    x = torch.randn(4, 36, 8)
    attn = torch.rand(4, 36).softmax(-1)
    batch = fastervlm(x, cls_attn=attn, budget=10)
    again = fastervlm(x, cls_attn=attn, budget=10)
    for i in range(4):
        single = fastervlm(x[i : i + 1], cls_attn=attn[i : i + 1], budget=10)[0]
        for r in (single, again[i]):
            assert torch.equal(batch[i].sources, r.sources)
            assert torch.equal(batch[i].features, r.features)
            assert torch.equal(batch[i].assignment, r.assignment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_preserved(dtype):
    x = torch.randn(2, 16, 4).to(dtype)
    attn = torch.rand(2, 16).to(dtype)
    out = fastervlm(x, cls_attn=attn, budget=5)
    check_selection(x, out, 5)
    assert all(r.features.dtype == dtype for r in out)
    layers = torch.rand(2, 4, 16).to(dtype)
    assert all(r.features.dtype == dtype for r in vtc_cls(x, cls_attn_layers=layers, budget=5))


def test_full_budget_keeps_everything_and_grid_is_validated_when_given():
    x = torch.randn(1, 12, 3)
    out = fastervlm(x, cls_attn=torch.rand(1, 12), grid=(3, 4), budget=12)[0]
    assert out.sources.tolist() == list(range(12))
    assert torch.equal(out.features, x[0])


def test_vtc_cls_sums_layers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 20, 3, generator=g)
    layers = torch.rand(2, 6, 20, generator=g)
    out = vtc_cls(x, cls_attn_layers=layers, budget=7, start_layer=-7)
    check_selection(x, out, 7)
    for i, r in enumerate(out):
        score = [sum(float(layers[i, j, t]) for j in range(6)) for t in range(20)]
        assert r.sources.tolist() == reference_topk(score, 7)


def test_vtc_cls_single_layer_equals_fastervlm():
    x = torch.randn(3, 25, 4)
    attn = torch.rand(3, 25)
    a = fastervlm(x, cls_attn=attn, budget=9)
    v = vtc_cls(x, cls_attn_layers=attn.unsqueeze(1), budget=9, start_layer=-2)
    for r, s in zip(a, v, strict=True):
        assert torch.equal(r.sources, s.sources)


def test_registered_specs():
    f = get_method("fastervlm")
    assert f.fn is fastervlm
    assert f.placement is Placement.ENCODER and f.adaptive is False
    assert f.defaults == {"budget": 64, "signal": None}
    assert f.signals(f.defaults) == {"cls_attn": SignalRequest("cls_attn", (-2,), "mean", fallback="mean_received")}
    v = get_method("vtc-cls")
    assert v.fn is vtc_cls
    assert v.placement is Placement.ENCODER and v.adaptive is False
    assert v.bind({}, llm_layers=None, vision_layers=24) == {"budget": 64, "start_layer": -5, "signal": None}
    assert set(v.param_docs) == {"budget", "start_layer", "signal"}
    assert v.signals(v.defaults) == {
        "cls_attn_layers": SignalRequest("cls_attn_layers", (-5, -4, -3, -2), "mean", fallback="mean_received_layers")
    }
    assert v.signals(v.options(signal="mean-received")) == {
        "cls_attn_layers": SignalRequest("mean_received_layers", (-5, -4, -3, -2), "mean")
    }
    assert v.signals(v.options(start_layer=-13))["cls_attn_layers"].layers == tuple(range(-13, -1))
    with pytest.raises(InputError, match="does not take"):
        f.options(budgett=3)


def test_errors():
    x = torch.randn(2, 16, 4)
    attn = torch.rand(2, 16)
    with pytest.raises(InputError, match=r"\[B, N, C\]"):
        fastervlm(x[0], cls_attn=attn)
    with pytest.raises(InputError, match="out of range"):
        fastervlm(x, cls_attn=attn, budget=0)
    with pytest.raises(InputError, match="out of range"):
        fastervlm(x, cls_attn=attn, budget=17)
    with pytest.raises(InputError, match="must be an int"):
        fastervlm(x, cls_attn=attn, budget=4.0)
    with pytest.raises(InputError, match="does not match"):
        fastervlm(x, cls_attn=attn, grid=(3, 4), budget=4)
    with pytest.raises(InputError, match="cls_attn must have shape"):
        fastervlm(x, cls_attn=attn[:, :15], budget=4)
    bad = attn.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        fastervlm(x, cls_attn=bad, budget=4)
    bad[1, 3] = float("inf")
    with pytest.raises(InputError, match="NaN or inf"):
        fastervlm(x, cls_attn=bad, budget=4)
    with pytest.raises(InputError, match="floating"):
        fastervlm(x, cls_attn=torch.ones(2, 16, dtype=torch.long), budget=4)
    with pytest.raises(InputError, match="floating"):
        fastervlm(x.long(), cls_attn=attn, budget=4)
    layers = torch.rand(2, 4, 16)
    for bad_start in (-1, 0, 3, "x", True):
        with pytest.raises(InputError, match="start_layer"):
            vtc_cls(x, cls_attn_layers=layers, start_layer=bad_start, budget=4)
    with pytest.raises(InputError, match=r"cls_attn_layers must have shape \[2, 3, 16\]"):
        vtc_cls(x, cls_attn_layers=layers, start_layer=-4, budget=4)
    nan_layers = layers.clone()
    nan_layers[0, 2, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        vtc_cls(x, cls_attn_layers=nan_layers, budget=4)


@CUDA
def test_cuda_matches_cpu():
    x = torch.randn(3, 576, 16)
    attn = torch.randint(0, 7, (3, 576)).float()  # many ties
    cpu = fastervlm(x, cls_attn=attn, budget=64)
    gpu = fastervlm(x.cuda(), cls_attn=attn.cuda(), budget=64)
    for r, s in zip(cpu, gpu, strict=True):
        assert torch.equal(r.sources, s.sources.cpu())
        assert torch.equal(r.features, s.features.cpu())
