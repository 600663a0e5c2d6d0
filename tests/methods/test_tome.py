"""tome: bipartite soft matching, one round against a Python loop, many rounds against invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visprune.errors import InputError
from visprune.methods import Placement, SignalRequest, get_method
from visprune.methods.tome import tome

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference_one_round(x: torch.Tensor, keys: torch.Tensor, r: int):
    """One image, one round of bipartite soft matching on unit-size tokens, token by token."""
    n = x.shape[0]
    unit = [keys[i].double() / max(float(keys[i].double().norm()), 1e-12) for i in range(n)]
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    edges = []  # (similarity, A rank, a, b)
    for rank, a in enumerate(a_set):
        sims = [float(unit[a] @ unit[b]) for b in b_set]
        j = max(range(len(b_set)), key=lambda q: (sims[q], -q))
        edges.append((sims[j], rank, a, b_set[j]))
    edges.sort(key=lambda e: (-e[0], e[1]))
    dest = {a: b for _, _, a, b in edges[:r]}
    survivors = [i for i in range(n) if i not in dest]
    slot = {s: j for j, s in enumerate(survivors)}
    assignment = [slot[dest.get(i, i)] for i in range(n)]
    feats = []
    for s in survivors:
        group = [i for i in range(n) if dest.get(i, i) == s]
        feats.append(sum(x[i].double() for i in group) / len(group))
    return torch.stack(feats), survivors, assignment


@given(n=st.integers(2, 30), data=st.data())
def test_one_round_matches_reference(n, data):
    r = data.draw(st.integers(1, (n + 1) // 2))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 4, generator=g)
    keys = torch.randn(2, n, 3, generator=g)
    out = tome(x, keys=keys, budget=n - r)
    for i, res in enumerate(out):
        feats, sources, assignment = reference_one_round(x[i], keys[i], r)
        assert res.sources.tolist() == sources
        assert res.assignment.tolist() == assignment
        torch.testing.assert_close(res.features.double(), feats, rtol=1e-5, atol=1e-5)


@given(b=st.integers(1, 3), n=st.integers(1, 60), data=st.data())
def test_many_rounds_invariants(b, n, data):
    budget = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 4, generator=g, dtype=torch.float64).float()
    keys = torch.randn(b, n, 3, generator=g)
    out = tome(x, keys=keys, budget=budget)
    assert len(out) == b
    for i, r in enumerate(out):
        assert r.count == budget
        assert torch.equal(r.sources, r.sources.unique())  # unique, ascending
        assert r.assignment.shape == (n,)
        assert bool((r.assignment >= 0).all()) and bool((r.assignment < budget).all())
        assert torch.equal(r.assignment[r.sources], torch.arange(budget))
        for j in range(budget):
            # size-weighted merging means every output is the plain mean of its original tokens
            members = x[i][r.assignment == j]
            torch.testing.assert_close(r.features[j], members.mean(0), rtol=1e-5, atol=1e-5)


def test_budget_equals_n_is_identity_and_paper_budget_runs():
    x = torch.randn(2, 10, 3)
    out = tome(x, keys=torch.randn(2, 10, 2), budget=10)
    assert all(torch.equal(r.features, x[i]) and r.sources.tolist() == list(range(10)) for i, r in enumerate(out))
    x = torch.randn(2, 576, 16)
    out = tome(x, keys=torch.randn(2, 576, 8))
    assert [r.count for r in out] == [64, 64]


def test_identical_keys_merge_neighbours():
    # All keys equal: every A token ties, so the first A tokens merge into B token 1 (first maximum).
    x = torch.arange(6.0).view(1, 6, 1)
    r = tome(x, keys=torch.ones(1, 6, 2), budget=5)[0]
    assert r.sources.tolist() == [1, 2, 3, 4, 5]
    assert r.assignment.tolist() == [0, 0, 1, 2, 3, 4]
    assert r.features.squeeze(1).tolist() == [0.5, 2.0, 3.0, 4.0, 5.0]


def test_batch_equals_per_image_dtype_and_determinism():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 49, 6, generator=g)
    keys = torch.randn(3, 49, 4, generator=g)
    batch = tome(x, keys=keys, budget=9)
    again = tome(x, keys=keys, budget=9)
    for i in range(3):
        single = tome(x[i : i + 1], keys=keys[i : i + 1], budget=9)[0]
        for r in (single, again[i]):
            assert torch.equal(batch[i].sources, r.sources)
            assert torch.equal(batch[i].assignment, r.assignment)
            torch.testing.assert_close(batch[i].features, r.features)
    for dtype in (torch.float16, torch.bfloat16):
        out = tome(x.to(dtype), keys=keys.to(dtype), budget=9)
        assert all(r.features.dtype == dtype and r.count == 9 for r in out)


def test_registered_spec():
    spec = get_method("tome")
    assert spec.fn is tome
    assert spec.placement is Placement.ENCODER and spec.adaptive is False
    assert spec.defaults == {"budget": 64}
    assert spec.signals(spec.defaults) == {"keys": SignalRequest("keys", (-1,), "mean")}
    with pytest.raises(InputError, match="does not take"):
        spec.options(r=8)


def test_errors():
    x, keys = torch.randn(2, 16, 4), torch.randn(2, 16, 3)
    with pytest.raises(InputError, match=r"\[B, N, C\]"):
        tome(x.unsqueeze(0), keys=keys)
    for budget in (0, 17, None):
        with pytest.raises(InputError, match="budget"):
            tome(x, keys=keys, budget=budget)
    with pytest.raises(InputError, match="keys must have shape"):
        tome(x, keys=keys[0], budget=4)
    with pytest.raises(InputError, match="does not match"):
        tome(x, keys=keys, grid=(4, 5), budget=4)
    bad = keys.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        tome(x, keys=bad, budget=4)


@CUDA
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 576, 32, generator=g)
    keys = torch.randn(2, 576, 64, generator=g)
    cpu = tome(x, keys=keys)
    gpu = tome(x.cuda(), keys=keys.cuda())
    for r, s in zip(cpu, gpu, strict=True):
        assert torch.equal(r.sources, s.sources.cpu())
        assert torch.equal(r.assignment, s.assignment.cpu())
        torch.testing.assert_close(r.features, s.features.cpu())
