"""random and pool: the signal-free floor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from visprune.errors import InputError
from visprune.methods import Placement, get_method
from visprune.methods.simple import pool, pool_grid, random_subset

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------- random


@given(b=st.integers(1, 4), n=st.integers(1, 50), data=st.data())
def test_random_invariants(b, n, data):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31))
    x = torch.randn(b, n, 3)
    out = random_subset(x, budget=k, seed=seed)
    assert len(out) == b
    for i, r in enumerate(out):
        assert r.count == k
        assert torch.equal(r.sources, r.sources.unique())
        assert torch.equal(r.features, x[i, r.sources])
        assert torch.equal(r.assignment[r.sources], torch.arange(k))
        assert int((r.assignment >= 0).sum()) == k
    again = random_subset(x, budget=k, seed=seed)
    assert all(torch.equal(r.sources, s.sources) for r, s in zip(out, again, strict=True))
    # an image's subset depends neither on the batch size nor on its position in the batch
    for i in range(b):
        alone = random_subset(x[i : i + 1], budget=k, seed=seed)[0]
        assert torch.equal(alone.sources, out[i].sources)


def test_random_seed_changes_the_subset_and_rows_share_it():
    x = torch.randn(3, 576, 4)
    a = random_subset(x, budget=64, seed=0)
    b = random_subset(x, budget=64, seed=1)
    assert not torch.equal(a[0].sources, b[0].sources)
    assert torch.equal(a[0].sources, a[1].sources) and torch.equal(a[1].sources, a[2].sources)


def test_random_is_roughly_uniform():
    counts = torch.zeros(20)
    for seed in range(200):
        counts[random_subset(torch.zeros(1, 20, 1), budget=5, seed=seed)[0].sources] += 1
    assert counts.sum() == 1000
    assert counts.min() > 20 and counts.max() < 80  # expectation 50 per token


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_dtype(dtype):
    x = torch.randn(2, 16, 4).to(dtype)
    assert all(r.features.dtype == dtype for r in random_subset(x, budget=3))


# ---------------------------------------------------------------- pool


def test_pool_grid_choice():
    assert pool_grid((24, 24), 64) == (8, 8)
    assert pool_grid((24, 24), 144) == (12, 12)
    assert pool_grid((24, 24), 8) == (2, 4)  # tie between 2x4 and 4x2: the smaller h'
    assert pool_grid((12, 24), 8) == (2, 4)
    assert pool_grid((24, 12), 8) == (4, 2)
    assert pool_grid((24, 24), 48) == (6, 8)
    assert pool_grid((2, 30), 10) == (1, 10)  # 1:10 is closer to 1:15 than 2:5 is
    assert pool_grid((24, 24), 23) == (1, 23)
    with pytest.raises(InputError, match="factorisation"):
        pool_grid((24, 24), 29)  # a prime above the sides


def test_pool_matches_block_means_on_non_square_grid():
    g = torch.Generator().manual_seed(0)
    h, w, c = 4, 6, 3
    x = torch.randn(2, h * w, c, generator=g)
    out = pool(x, grid=(h, w), budget=6)  # 2 x 3 output grid: 2 x 2 blocks
    for i, r in enumerate(out):
        img = x[i].view(h, w, c)
        expect, src = [], []
        for by in range(2):
            for bx in range(3):
                block = img[2 * by : 2 * by + 2, 2 * bx : 2 * bx + 2]
                expect.append(block.reshape(-1, c).mean(0))
                src.append((2 * by) * w + 2 * bx)  # even-sized block: the lower middle token
        torch.testing.assert_close(r.features, torch.stack(expect))
        assert r.sources.tolist() == src
        assign = [(y // 2) * 3 + (xx // 2) for y in range(h) for xx in range(w)]
        assert r.assignment.tolist() == assign


def test_pool_odd_blocks_centre_source():
    x = torch.randn(1, 9 * 6, 2)
    r = pool(x, grid=(9, 6), output_grid=(3, 2))[0]
    assert r.count == 6
    assert r.sources.tolist() == [1 * 6 + 1, 1 * 6 + 4, 4 * 6 + 1, 4 * 6 + 4, 7 * 6 + 1, 7 * 6 + 4]


@given(h=st.integers(1, 12), w=st.integers(1, 12), data=st.data())
def test_pool_any_grid_matches_adaptive_pooling(h, w, data):
    hp = data.draw(st.integers(1, h))
    wp = data.draw(st.integers(1, w))
    x = torch.randn(2, h * w, 3)
    out = pool(x, grid=(h, w), budget=hp * wp, output_grid=(hp, wp))
    ref = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 3, h, w), (hp, wp)).flatten(2).transpose(1, 2)
    for i, r in enumerate(out):
        assert r.count == hp * wp
        torch.testing.assert_close(r.features, ref[i])
        assert torch.equal(r.sources, r.sources.unique())
        assert torch.equal(r.assignment[r.sources], torch.arange(hp * wp))
        # every token is assigned to a cell whose pooling region covers it
        for t in range(h * w):
            y, xx = divmod(t, w)
            cy, cx = divmod(int(r.assignment[t]), wp)
            assert (cy * h) // hp <= y < -(-(cy + 1) * h // hp)
            assert (cx * w) // wp <= xx < -(-(cx + 1) * w // wp)


def test_pool_default_budget_and_batch_and_dtype():
    x = torch.randn(3, 576, 8)
    out = pool(x)
    assert [r.count for r in out] == [64, 64, 64]
    single = pool(x[1:2])[0]
    torch.testing.assert_close(single.features, out[1].features)
    assert torch.equal(single.sources, out[1].sources)
    for dtype in (torch.float16, torch.bfloat16):
        assert all(r.features.dtype == dtype for r in pool(x.to(dtype), budget=36))


def test_pool_errors():
    x = torch.randn(2, 24, 3)
    with pytest.raises(InputError, match="square grid"):
        pool(x, budget=4)
    with pytest.raises(InputError, match="does not match"):
        pool(x, grid=(5, 5), budget=4)
    with pytest.raises(InputError, match="out of range"):
        pool(x, grid=(4, 6), budget=0)
    with pytest.raises(InputError, match="out of range"):
        pool(x, grid=(4, 6), budget=25)
    with pytest.raises(InputError, match="factorisation"):
        pool(x, grid=(4, 6), budget=7)
    with pytest.raises(InputError, match="does not fit"):
        pool(x, grid=(4, 6), output_grid=(5, 2))
    for bad in ((0, 2), (2,), "2x2", (2.0, 2)):
        with pytest.raises(InputError, match="output_grid"):
            pool(x, grid=(4, 6), output_grid=bad)
    with pytest.raises(InputError, match=r"\[B, N, C\]"):
        pool(x[0], grid=(4, 6))


# ---------------------------------------------------------------- shared


def test_registered_specs_and_errors():
    for name, defaults in (("random", {"budget": 64, "seed": 0}), ("pool", {"budget": 64, "output_grid": None})):
        spec = get_method(name)
        assert spec.placement is Placement.ENCODER and spec.adaptive is False
        assert spec.defaults == defaults
        assert spec.signals(spec.defaults) == {}
        assert set(spec.param_docs) == set(defaults)
    assert get_method("random").fn is random_subset and get_method("pool").fn is pool
    with pytest.raises(InputError, match="does not take"):
        get_method("random").options(sed=1)
    x = torch.randn(2, 16, 3)
    with pytest.raises(InputError, match="seed"):
        random_subset(x, budget=3, seed="a")
    with pytest.raises(InputError, match="out of range"):
        random_subset(x, budget=17)
    with pytest.raises(InputError, match="out of range"):
        random_subset(x, budget=0)
    with pytest.raises(InputError, match="does not match"):
        random_subset(x, grid=(3, 3), budget=2)
    with pytest.raises(InputError, match=r"\[B, N, C\]"):
        random_subset(x[0], budget=2)


@CUDA
def test_cuda_matches_cpu():
    x = torch.randn(2, 576, 8)
    for fn in (random_subset, pool):
        for r, s in zip(fn(x, budget=64), fn(x.cuda(), budget=64), strict=True):
            assert torch.equal(r.sources, s.sources.cpu())
            assert torch.equal(r.assignment, s.assignment.cpu())
            torch.testing.assert_close(r.features, s.features.cpu())
