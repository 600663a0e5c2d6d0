"""PruMerge / PruMerge+: a plain reference from the formulas, invariants, options and error paths."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visprune.errors import InputError
from visprune.methods import Placement, SignalRequest, get_method
from visprune.methods.prumerge import outlier_counts, prumerge, prumerge_plus, uniform_stride

METHODS = {"prumerge": prumerge, "prumerge+": prumerge_plus}


def make_inputs(b: int, n: int, c: int = 8, d: int = 6, seed: int = 0, spike: float = 2.0):
    """Random features/keys and a long-tailed CLS attention with a few clear outliers per image."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, n, c, generator=g)
    keys = torch.randn(b, n, d, generator=g)
    logits = torch.randn(b, n, generator=g)
    logits += spike * (torch.rand(b, n, generator=g) < 0.05)
    return feats, logits.softmax(dim=1), keys


# --------------------------------------------------------------------------- plain reference


def ref_prumerge(feats, attn, keys, *, plus, fence="per-image", weights="unnormalized", order="spatial",
                 neighbors=32, extra_token=True):  # fmt: skip
    """Slow per-image, per-token reference in numpy float64, straight from METHODS.md."""
    f = feats.double().numpy()
    a = attn.double().numpy()
    k = keys.double().numpy()
    b, n, _ = f.shape
    af = attn.float().numpy()

    def fence_count(x):
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        return int((x > q3 + 1.5 * (q3 - q1)).sum())

    if fence == "batch":
        total = fence_count(af.flatten())
        ratios = [Fraction(total, b * n)] * b
    else:
        ratios = [Fraction(fence_count(af[i]), n) for i in range(b)]
    out = []
    for i in range(b):
        r = max(ratios[i], Fraction(1, n))  # guard: m >= 1
        m = int(n * r)  # floor(N r)
        m = max(m, 1)
        top = [int(j) for j in np.argsort(-af[i], kind="stable")[:m]]
        kept = list(top)
        if plus:
            step = int(1 / r)  # floor(1 / r), exact with Fractions
            kept += [x for x in range(0, n, max(1, step // 3)) if x not in top]
        if order == "spatial":
            kept = sorted(kept)
        kn = k[i] / np.maximum(np.linalg.norm(k[i], axis=1, keepdims=True), 1e-12)
        rows, nbs = [], []
        for p in kept:
            others = [j for j in range(n) if j != p]
            sims = np.array([kn[p] @ kn[j] for j in others])
            nb = [others[t] for t in np.argsort(-sims, kind="stable")[: min(neighbors, n - 1)]]
            nbs.append(nb)
            acc = np.zeros(f.shape[2])
            wsum = 0.0
            for j in nb:
                acc += a[i, j] * f[i, j]
                wsum += a[i, j]
            if weights == "normalized" and nb:
                acc /= wsum
            rows.append(f[i, p] + acc)
        pruned = [j for j in range(n) if j not in kept]
        sources = list(kept)
        has_extra = extra_token and len(pruned) > 0
        if has_extra:
            acc = sum(a[i, j] * f[i, j] for j in pruned)
            if weights == "normalized":
                acc = acc / sum(a[i, j] for j in pruned)
            rows.append(acc)
            sources.append(-1)
        assign = []
        for j in range(n):
            if j in kept:
                assign.append(kept.index(j))
                continue
            takers = [s for s, nb in enumerate(nbs) if j in nb]
            if takers:
                assign.append(max(takers, key=lambda s: kn[kept[s]] @ kn[j]))
            else:
                assign.append(len(kept) if has_extra else -1)
        out.append((np.stack(rows), np.array(sources), np.array(assign)))
    return out


def assert_matches_ref(res, ref, atol=1e-4):
    assert len(res) == len(ref)
    for r, (feats, sources, assign) in zip(res, ref, strict=True):
        np.testing.assert_array_equal(r.sources.numpy(), sources)
        np.testing.assert_allclose(r.features.double().numpy(), feats, rtol=1e-4, atol=atol)
        np.testing.assert_array_equal(r.assignment.numpy(), assign)


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
def test_registered_spec(name):
    spec = get_method(name)
    assert spec.fn is METHODS[name]
    assert spec.placement is Placement.ENCODER and spec.adaptive
    assert spec.defaults == {
        "fence": "per-image",
        "weights": "unnormalized",
        "order": "spatial",
        "neighbors": 32,
        "extra_token": True,
        "attention": "single",
        "signal": None,
    }
    assert set(spec.param_docs) == set(spec.defaults)
    assert spec.signals(spec.defaults) == {
        "cls_attn": SignalRequest("cls_attn", (-1,), heads="single", fallback="mean_received"),
        "keys": SignalRequest("keys", (-1,), heads="single"),
    }
    assert spec.signals(spec.options(attention="mean", signal="cls")) == {
        "cls_attn": SignalRequest("cls_attn", (-1,), heads="mean"),
        "keys": SignalRequest("keys", (-1,), heads="mean"),
    }
    assert spec.signals(spec.options(attention="mean", signal="mean-received")) == {
        "cls_attn": SignalRequest("mean_received", (-1,), heads="mean"),
        "keys": SignalRequest("keys", (-1,), heads="mean"),
    }
    with pytest.raises(InputError, match="does not take"):
        spec.options(neighbours=3)


# --------------------------------------------------------------------------- reference checks


def test_outlier_counts_match_numpy_percentile():
    _, a, _ = make_inputs(4, 97, seed=3)
    q = np.percentile(a.numpy(), [25, 75], axis=1)
    expect = (a.numpy() > (q[1] + 1.5 * (q[1] - q[0]))[:, None]).sum(1)
    assert outlier_counts(a).tolist() == expect.tolist()
    flat = a.numpy().ravel()
    q1, q3 = np.percentile(flat, [25, 75])
    total = int((flat > q3 + 1.5 * (q3 - q1)).sum())
    assert outlier_counts(a, "batch").tolist() == [total] * 4
    assert total > 0 and len(set(expect.tolist())) > 1  # the data exercises both paths
    # the quartiles read off the sort are torch.quantile's "linear" ones
    tq = torch.quantile(a, torch.tensor([0.25, 0.75]), dim=1, interpolation="linear")
    expect_t = (a > (tq[1] + 1.5 * (tq[1] - tq[0])).unsqueeze(1)).sum(1)
    assert torch.equal(outlier_counts(a), expect_t)


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"weights": "normalized"},
        {"order": "score"},
        {"fence": "batch"},
        {"extra_token": False},
        {"neighbors": 3, "order": "score", "weights": "normalized"},
        {"neighbors": 0},
        {"neighbors": 1000},
    ],
)
def test_matches_reference(name, opts):
    feats, a, keys = make_inputs(3, 64, seed=11)
    res = METHODS[name](feats, cls_attn=a, keys=keys, **opts)
    assert_matches_ref(res, ref_prumerge(feats, a, keys, plus=name == "prumerge+", **opts))


@given(
    b=st.integers(1, 3),
    n=st.integers(2, 50),
    c=st.integers(1, 5),
    d=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    neighbors=st.integers(0, 8),
    plus=st.booleans(),
    fence=st.sampled_from(["per-image", "batch"]),
)
def test_matches_reference_random(b, n, c, d, seed, neighbors, plus, fence):
    feats, a, keys = make_inputs(b, n, c, d, seed=seed)
    fn = prumerge_plus if plus else prumerge
    res = fn(feats, cls_attn=a, keys=keys, neighbors=neighbors, fence=fence)
    assert_matches_ref(res, ref_prumerge(feats, a, keys, plus=plus, neighbors=neighbors, fence=fence))


# --------------------------------------------------------------------------- invariants


@given(
    b=st.integers(1, 4),
    n=st.integers(1, 80),
    seed=st.integers(0, 10_000),
    plus=st.booleans(),
    order=st.sampled_from(["spatial", "score"]),
    extra=st.booleans(),
)
def test_invariants(b, n, seed, plus, order, extra):
    feats, a, keys = make_inputs(b, n, c=4, d=3, seed=seed)
    fn = prumerge_plus if plus else prumerge
    res = fn(feats, cls_attn=a, keys=keys, order=order, extra_token=extra)
    counts = outlier_counts(a)
    assert len(res) == b
    for i, r in enumerate(res):
        kept = r.sources[r.sources >= 0]
        m = max(int(counts[i]), 1)
        assert 1 <= len(kept) <= n
        if not plus:
            assert len(kept) == m
        assert len(kept) >= m
        assert (r.sources[: len(kept)] >= 0).all()  # the extra token, if any, is last
        assert r.count == len(kept) + int(extra and len(kept) < n)
        assert r.features.shape == (r.count, 4) and r.sources.shape == (r.count,)
        assert r.assignment.shape == (n,)
        assert len(set(kept.tolist())) == len(kept)
        if order == "spatial":
            assert torch.equal(kept, kept.sort().values)
        # the top-m scores are always kept
        assert set(a[i].argsort(descending=True, stable=True)[:m].tolist()) <= set(kept.tolist())
        # every kept token maps to its own slot; every slot index is valid
        assert torch.equal(r.assignment[kept], torch.arange(len(kept)))
        assert ((r.assignment >= -1) & (r.assignment < r.count)).all()
        if extra:
            assert (r.assignment >= 0).all()


@pytest.mark.parametrize("fn", [prumerge, prumerge_plus])
def test_batch_equals_per_image(fn):
    feats, a, keys = make_inputs(5, 100, seed=5)
    batch = fn(feats, cls_attn=a, keys=keys)
    assert len({r.count for r in batch}) > 1  # ragged
    for i, r in enumerate(batch):
        (single,) = fn(feats[i : i + 1], cls_attn=a[i : i + 1], keys=keys[i : i + 1])
        assert torch.equal(r.sources, single.sources)
        assert torch.equal(r.assignment, single.assignment)
        torch.testing.assert_close(r.features, single.features)


@pytest.mark.parametrize("fn", [prumerge, prumerge_plus])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_preserved_and_deterministic(fn, dtype):
    feats, a, keys = make_inputs(2, 64, seed=8)
    ref = fn(feats, cls_attn=a, keys=keys)
    x, k = feats.to(dtype), keys.to(dtype)
    out1 = fn(x, cls_attn=a, keys=k)
    out2 = fn(x, cls_attn=a, keys=k)
    for r0, r1, r2 in zip(ref, out1, out2, strict=True):
        assert r1.features.dtype == dtype
        assert torch.equal(r1.features, r2.features) and torch.equal(r1.sources, r2.sources)
        assert torch.equal(r1.sources, r0.sources)
        tol = 1e-6 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(r1.features.float(), r0.features, atol=tol, rtol=tol)


def test_accepts_low_precision_scores_and_valid_grid():
    feats, a, keys = make_inputs(2, 36, seed=2)
    res = prumerge(feats, cls_attn=a.half(), keys=keys.bfloat16(), grid=(4, 9))
    assert all(r.count >= 2 for r in res)


# --------------------------------------------------------------------------- options


def test_batch_fence_gives_one_m_for_all_images():
    feats, a, keys = make_inputs(4, 100, seed=21)
    sharp = torch.randn(2, 100).mul(4).softmax(1)  # very different images
    a = torch.cat([a[:2], sharp])
    per_image = prumerge(feats, cls_attn=a, keys=keys)
    batch = prumerge(feats, cls_attn=a, keys=keys, fence="batch")
    assert len({r.count for r in per_image}) > 1
    assert len({r.count for r in batch}) == 1
    total = int(outlier_counts(a, "batch")[0])
    assert batch[0].count == max(total // 4, 1) + 1
    # with one image the batch fence is the per-image fence
    one = prumerge(feats[:1], cls_attn=a[:1], keys=keys[:1], fence="batch")
    assert torch.equal(one[0].sources, per_image[0].sources)


def test_score_order_is_descending_score():
    feats, a, keys = make_inputs(1, 100, seed=4)
    (r,) = prumerge(feats, cls_attn=a, keys=keys, order="score")
    kept = r.sources[:-1]
    assert (a[0, kept].diff() <= 0).all()
    (s,) = prumerge(feats, cls_attn=a, keys=keys)
    assert torch.equal(kept.sort().values, s.sources[:-1])


def test_unnormalized_vs_normalized_and_extra_token():
    feats, a, keys = make_inputs(1, 49, seed=9)
    (u,) = prumerge(feats, cls_attn=a, keys=keys, neighbors=2)
    (w,) = prumerge(feats, cls_attn=a, keys=keys, neighbors=2, weights="normalized")
    pruned = u.assignment == u.count - 1
    kept = u.sources[:-1]
    mask = torch.ones(49, dtype=torch.bool)
    mask[kept] = False
    expect = (a[0, mask, None] * feats[0, mask]).sum(0)
    torch.testing.assert_close(u.features[-1], expect)
    torch.testing.assert_close(w.features[-1], expect / a[0, mask].sum())
    assert u.sources[-1] == -1 and pruned.any()
    (n,) = prumerge(feats, cls_attn=a, keys=keys, neighbors=2, extra_token=False)
    assert n.count == u.count - 1 and (n.sources >= 0).all()
    assert torch.equal(n.assignment, torch.where(pruned, -1, u.assignment))
    torch.testing.assert_close(n.features, u.features[:-1])


def test_no_merge_keeps_features_unchanged():
    feats, a, keys = make_inputs(2, 64, seed=6)
    for r, f in zip(prumerge(feats, cls_attn=a, keys=keys, neighbors=0, extra_token=False), feats, strict=True):
        torch.testing.assert_close(r.features, f[r.sources])
        assert (r.assignment[r.assignment >= 0] < r.count).all()
        assert (r.assignment >= 0).sum() == r.count


# --------------------------------------------------------------------------- PruMerge+ edge cases


def test_uniform_stride():
    n = 576
    counts = torch.tensor([0, 1, 10, 96, 150, 200, 400, 576])
    got = uniform_stride(counts, n).tolist()
    for c, s in zip(counts.tolist(), got, strict=True):
        r = max(Fraction(c, n), Fraction(1, n))
        assert s == max(1, int(1 / r) // 3)
    assert got[0] == 192 and got[-1] == 1  # r -> 0 and r > 1/3 (official: stride 0, crash)
    assert uniform_stride(torch.tensor([30, 30]), n, images=4).tolist() == [(4 * n // 30) // 3] * 2


def test_plus_flat_attention_has_no_outliers():
    feats, _, keys = make_inputs(2, 576, seed=1)
    flat = torch.full((2, 576), 1 / 577)
    assert outlier_counts(flat).tolist() == [0, 0]
    for fn, expect in [(prumerge, [0]), (prumerge_plus, [0, 192, 384])]:
        for fence in ("per-image", "batch"):
            res = fn(feats, cls_attn=flat, keys=keys, fence=fence)
            for r in res:
                assert r.sources.tolist() == [*expect, -1]


def test_plus_large_ratio_keeps_everything():
    # r = 1/4 (the most the IQR fence allows) -> floor(1/r) = 4 -> stride 1: every token is sampled.
    feats = torch.randn(3, 4, 5)
    keys = torch.randn(3, 4, 2)
    a = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    assert outlier_counts(a).tolist() == [1, 1, 0]
    res = prumerge_plus(feats, cls_attn=a, keys=keys)
    for r in res:  # (r = 0 in the last image counts as m = 1: floor(4 / 1) // 3 = 1 as well)
        assert r.sources.tolist() == [0, 1, 2, 3]  # nothing pruned: no extra token
        assert r.assignment.tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(r.features.shape, (4, 5))


def test_single_token():
    res = prumerge_plus(torch.randn(2, 1, 3), cls_attn=torch.ones(2, 1), keys=torch.randn(2, 1, 2))
    for r in res:
        assert r.sources.tolist() == [0] and r.assignment.tolist() == [0]


# --------------------------------------------------------------------------- errors


def _good():
    return make_inputs(2, 16, c=4, d=3)


@pytest.mark.parametrize("fn", [prumerge, prumerge_plus])
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f, a, k: (f[0], a, k), r"features must have shape \[B, N, C\]"),
        (lambda f, a, k: (f.numpy(), a, k), "features must be a torch.Tensor"),
        (lambda f, a, k: (f.long(), a, k), "floating point"),
        (lambda f, a, k: (f, a[:, :-1], k), r"cls_attn must have shape \[2, 16\]"),
        (lambda f, a, k: (f, a.unsqueeze(1), k), "cls_attn must have shape"),
        (lambda f, a, k: (f, a[:1], k), "cls_attn must have shape"),
        (lambda f, a, k: (f, a, k[:, :-1]), r"keys must have shape \[2, 16, \*\]"),
        (lambda f, a, k: (f, a, k[..., 0]), "keys must have shape"),
        (lambda f, a, k: (f, a, [k]), "keys must be a torch.Tensor"),
        (lambda f, a, k: (f, torch.where(a > a.median(), float("nan"), a), k), "cls_attn contains NaN"),
        (lambda f, a, k: (f, a, k.index_fill(1, torch.tensor([3]), float("inf"))), "keys contains NaN or inf"),
        (lambda f, a, k: (f, (a * 100).long(), k), "floating point"),
        (lambda f, a, k: (f, a, k[..., :0]), "empty channel"),
    ],
)
def test_bad_tensors(fn, mutate, match):
    f, a, k = mutate(*_good())
    with pytest.raises(InputError, match=match):
        fn(f, cls_attn=a, keys=k)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"fence": "global"}, "fence='global' is not valid"),
        ({"weights": "mean"}, "weights='mean' is not valid"),
        ({"order": "random"}, "order='random' is not valid"),
        ({"attention": "sum"}, "attention='sum' is not valid"),
        ({"neighbors": -1}, "neighbors must be an int >= 0"),
        ({"neighbors": 2.5}, "neighbors must be an int >= 0"),
        ({"neighbors": True}, "neighbors must be an int >= 0"),
        ({"extra_token": 1}, "extra_token must be True or False"),
        ({"grid": (3, 5)}, "does not match N=16"),
        ({"grid": (4,)}, "grid must be a pair"),
    ],
)
def test_bad_options(opts, match):
    f, a, k = _good()
    for fn in (prumerge, prumerge_plus):
        with pytest.raises(InputError, match=match):
            fn(f, cls_attn=a, keys=k, **opts)


def test_non_square_n_without_grid_is_fine():
    f, a, k = make_inputs(2, 15)
    assert len(prumerge(f, cls_attn=a, keys=k)) == 2
