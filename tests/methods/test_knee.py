"""knee (stage 1 of Yu, Chen & Xu): knee cut of the sorted CLS-attention curve, clamps, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visprune.errors import InputError
from visprune.methods import Placement, SignalRequest, get_method
from visprune.methods.knee import knee


def step_scores(n: int, high: list[int], hi: float = 0.05, lo: float = 0.001) -> torch.Tensor:
    s = torch.full((n,), lo)
    s[high] = hi
    return s


def curve_scores(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, generator=g) * 1.5).softmax(dim=1)


def ref_knee_objective(curve: np.ndarray, detector: str, smooth: int = 1) -> np.ndarray:
    """Per-position objective of each detector (plain numpy, float64); keep argmax + offset tokens."""
    s = curve.astype(np.float64)
    if smooth > 1:
        left = (smooth - 1) // 2
        padded = np.concatenate([np.full(left, s[0]), s, np.full(smooth - 1 - left, s[-1])])
        s = np.array([padded[i : i + smooth].mean() for i in range(len(s))])
    n = len(s)
    if detector == "kneedle":
        span = s[0] - s[-1]
        y = (s - s[-1]) / span if span > 0 else np.zeros(n)
        x = np.arange(n) / max(n - 1, 1)
        return 1 - x - y  # keep argmax + 1
    if detector == "max-gap":
        return s[:-1] - s[1:]  # keep argmax + 1
    return s[:-2] - 2 * s[1:-1] + s[2:]  # centre argmax + 1, keep argmax + 2


def ref_count(curve: np.ndarray, detector: str, smooth: int, k_min: int, k_max: int | None) -> set[int]:
    """Every count the reference accepts (near-ties within float32 noise are all accepted)."""
    n = len(curve)
    if n == 1 or (detector == "max-curvature" and n < 3):
        raw = {1}
    else:
        obj = ref_knee_objective(curve, detector, smooth)
        offset = 2 if detector == "max-curvature" else 1
        raw = {int(i) + offset for i in np.flatnonzero(obj >= obj.max() - 1e-5)}
    hi = n if k_max is None else min(k_max, n)
    return {min(max(r, min(k_min, n)), hi) for r in raw}


# --------------------------------------------------------------------------- registry


def test_registered_spec():
    spec = get_method("knee")
    assert spec.fn is knee
    assert spec.placement is Placement.ENCODER and spec.adaptive
    assert spec.defaults == {
        "detector": "kneedle",
        "smooth": 1,
        "k_min": 16,
        "k_max": None,
        "attention": "single",
        "signal": None,
    }
    assert set(spec.param_docs) == set(spec.defaults)
    # default: the CLS-patch cosine where the tower has CLS (chosen on validation items), else mean-received
    assert spec.signals(spec.defaults) == {
        "cls_attn": SignalRequest("cls_cosine", (-1,), heads="single", fallback="mean_received")
    }
    assert spec.signals(spec.options(signal="cosine")) == {
        "cls_attn": SignalRequest("cls_cosine", (-1,), heads="single")
    }
    assert spec.signals(spec.options(attention="mean", signal="cls")) == {
        "cls_attn": SignalRequest("cls_attn", (-1,), heads="mean")
    }
    assert spec.signals(spec.options(signal="mean-received")) == {
        "cls_attn": SignalRequest("mean_received", (-1,), heads="single")
    }


# --------------------------------------------------------------------------- known knees


HIGH = [3, 17, 18, 40, 41, 42, 50, 60, 61, 63]


def test_two_level_step_max_gap_keeps_exactly_the_high_level():
    a = step_scores(64, HIGH).unsqueeze(0)
    feats = torch.randn(1, 64, 5)
    (r,) = knee(feats, cls_attn=a, detector="max-gap", k_min=1)
    assert r.sources.tolist() == HIGH
    torch.testing.assert_close(r.features, feats[0, HIGH])
    expect = torch.full((64,), -1)
    expect[HIGH] = torch.arange(len(HIGH))
    assert torch.equal(r.assignment, expect)


@pytest.mark.parametrize("detector", ["kneedle", "max-curvature"])
def test_two_level_step_point_detectors_keep_the_first_low_point(detector):
    # On an exact step the farthest-below-chord / largest-curvature point is the first low score,
    # which (ties broken towards the lower index) is token 0.
    a = step_scores(64, HIGH).unsqueeze(0)
    (r,) = knee(torch.randn(1, 64, 5), cls_attn=a, detector=detector, k_min=1)
    assert r.sources.tolist() == sorted([0, *HIGH])


def test_long_tail_curve_matches_reference():
    a = curve_scores(3, 200, seed=4)
    for detector in ("kneedle", "max-gap", "max-curvature"):
        for smooth in (1, 5):
            res = knee(torch.randn(3, 200, 2), cls_attn=a, detector=detector, smooth=smooth, k_min=1)
            for i, r in enumerate(res):
                sorted_curve = np.sort(a[i].numpy())[::-1]
                assert r.count in ref_count(sorted_curve, detector, smooth, 1, None)


# --------------------------------------------------------------------------- clamps


def test_clamps():
    feats = torch.randn(1, 64, 3)
    a = step_scores(64, HIGH[:3]).unsqueeze(0)
    (r,) = knee(feats, cls_attn=a, detector="max-gap")  # default k_min = 16
    assert r.count == 16 and set(HIGH[:3]) <= set(r.sources.tolist())
    a = step_scores(64, HIGH).unsqueeze(0)
    (r,) = knee(feats, cls_attn=a, detector="max-gap", k_min=1, k_max=5)
    assert r.count == 5 and set(r.sources.tolist()) <= set(HIGH)
    (r,) = knee(feats, cls_attn=a, k_min=100)  # more than N: everything
    assert r.sources.tolist() == list(range(64))
    (r,) = knee(feats, cls_attn=a, k_min=7, k_max=7)
    assert r.count == 7
    (r,) = knee(feats, cls_attn=a, k_min=1, k_max=1000)
    assert r.count == 11


def test_flat_curve_keeps_k_min():
    (r,) = knee(torch.randn(1, 30, 2), cls_attn=torch.full((1, 30), 0.1), k_min=4)
    assert r.sources.tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- invariants


@given(
    b=st.integers(1, 4),
    n=st.integers(1, 120),
    seed=st.integers(0, 10_000),
    detector=st.sampled_from(["kneedle", "max-gap", "max-curvature"]),
    smooth=st.integers(1, 4),
    k_min=st.integers(1, 20),
    extra=st.integers(0, 30),
    unbounded=st.booleans(),
)
def test_invariants(b, n, seed, detector, smooth, k_min, extra, unbounded):
    k_max = None if unbounded else k_min + extra
    a = curve_scores(b, n, seed)
    feats = torch.randn(b, n, 3)
    res = knee(feats, cls_attn=a, detector=detector, smooth=smooth, k_min=k_min, k_max=k_max)
    assert len(res) == b
    for i, r in enumerate(res):
        k = r.count
        assert min(k_min, n) <= k <= (n if k_max is None else min(k_max, n))
        assert k in ref_count(np.sort(a[i].numpy())[::-1], detector, smooth, k_min, k_max)
        assert r.features.shape == (k, 3) and r.sources.shape == (k,) and r.assignment.shape == (n,)
        assert torch.equal(r.sources, r.sources.sort().values) and len(set(r.sources.tolist())) == k
        # kept = the top-k scores
        assert set(r.sources.tolist()) == set(a[i].argsort(descending=True, stable=True)[:k].tolist())
        torch.testing.assert_close(r.features, feats[i, r.sources])
        assert torch.equal(r.assignment[r.sources], torch.arange(k))
        assert (r.assignment >= 0).sum() == k and (r.assignment >= -1).all()


def test_batch_equals_per_image_and_ragged():
    a = curve_scores(6, 150, seed=2)
    feats = torch.randn(6, 150, 4)
    batch = knee(feats, cls_attn=a, k_min=1)
    assert len({r.count for r in batch}) > 1
    for i, r in enumerate(batch):
        (single,) = knee(feats[i : i + 1], cls_attn=a[i : i + 1], k_min=1)
        assert torch.equal(r.sources, single.sources) and torch.equal(r.assignment, single.assignment)
        assert torch.equal(r.features, single.features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_preserved_and_deterministic(dtype):
    a = curve_scores(2, 100, seed=7)
    feats = torch.randn(2, 100, 4).to(dtype)
    r1 = knee(feats, cls_attn=a.to(dtype))
    r2 = knee(feats, cls_attn=a.to(dtype))
    for i, (x, y) in enumerate(zip(r1, r2, strict=True)):
        assert x.features.dtype == dtype
        assert torch.equal(x.features, y.features) and torch.equal(x.sources, y.sources)
        assert torch.equal(x.features, feats[i, x.sources])


def test_grid_accepted():
    a = curve_scores(1, 12)
    assert knee(torch.randn(1, 12, 2), cls_attn=a, grid=(3, 4))[0].count >= 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f, a: (f[0], a), r"features must have shape \[B, N, C\]"),
        (lambda f, a: (f.int(), a), "floating point"),
        (lambda f, a: (f, a[:, :-1]), r"cls_attn must have shape \[2, 20\]"),
        (lambda f, a: (f, a[0]), "cls_attn must have shape"),
        (lambda f, a: (f, a.unsqueeze(-1)), "cls_attn must have shape"),
        (lambda f, a: (f, a.tolist()), "cls_attn must be a torch.Tensor"),
        (lambda f, a: (f, a.index_fill(1, torch.tensor([2]), float("nan"))), "cls_attn contains NaN"),
        (lambda f, a: (f, a.index_fill(1, torch.tensor([2]), float("-inf"))), "cls_attn contains NaN or inf"),
        (lambda f, a: (f, (a * 100).long()), "cls_attn must be a floating point"),
    ],
)
def test_bad_tensors(mutate, match):
    f, a = mutate(torch.randn(2, 20, 3), curve_scores(2, 20))
    with pytest.raises(InputError, match=match):
        knee(f, cls_attn=a)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"detector": "elbow"}, "detector='elbow' is not valid"),
        ({"attention": "sum"}, "attention='sum' is not valid"),
        ({"smooth": 0}, "smooth must be an int >= 1"),
        ({"smooth": 2.0}, "smooth must be an int >= 1"),
        ({"k_min": 0}, "k_min must be an int >= 1"),
        ({"k_min": True}, "k_min must be an int >= 1"),
        ({"k_min": 4.0}, "k_min must be an int >= 1"),
        ({"k_max": 0}, "k_max must be an int >= 1"),
        ({"k_max": 8}, "k_max=8 must be >= k_min=16"),
        ({"k_min": 5, "k_max": 4}, "k_max=4 must be >= k_min=5"),
        ({"grid": (4, 4)}, "does not match N=20"),
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(InputError, match=match):
        knee(torch.randn(2, 20, 3), cls_attn=curve_scores(2, 20), **opts)
    with pytest.raises(InputError, match="does not take"):
        get_method("knee").options(kmin=3)
