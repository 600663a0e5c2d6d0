"""visionzip: dominant + contextual tokens, checked against a token-by-token Python reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visprune.errors import InputError
from visprune.methods import Placement, SignalRequest, get_method
from visprune.methods.visionzip import split_budget, visionzip

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference(x: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, d: int, c: int, cls: torch.Tensor | None = None):
    """One image, straight from the description: returns (features [D+C, C], sources, assignment).
    With `cls` (the CLS token's features) it is the first dominant token and D-1 patches join it."""
    n = x.shape[0]
    score = attn.tolist()
    first = 0 if cls is None else 1
    dom = sorted(sorted(range(n), key=lambda i: (-score[i], i))[: d - first])
    rest = [i for i in range(n) if i not in dom]
    assignment = [-1] * n
    for slot, i in enumerate(dom):
        assignment[i] = first + slot
    feats = [x[i].double() for i in dom]
    sources = list(dom)
    if cls is not None:
        feats.insert(0, cls.double())
        sources.insert(0, -1)
    if c:
        step = max(1, len(rest) // c)
        targets = [rest[p] for p in range(0, len(rest), step)][:c]
        unit = {i: keys[i].double() / max(float(keys[i].double().norm()), 1e-12) for i in rest}
        members: dict[int, list[int]] = {t: [] for t in targets}
        for i in rest:
            if i in members:
                continue
            sims = [float(unit[i] @ unit[t]) for t in targets]
            best = max(range(c), key=lambda j: (sims[j], -j))  # first maximum
            members[targets[best]].append(i)
        for j, t in enumerate(targets):
            merged = x[t].double()
            if members[t]:
                merged = merged + sum(x[i].double() for i in members[t]) / len(members[t])
            feats.append(merged)
            sources.append(t)
            assignment[t] = d + j
            for i in members[t]:
                assignment[i] = d + j
    return torch.stack(feats), sources, assignment


@given(b=st.integers(1, 2), n=st.integers(1, 30), with_cls=st.booleans(), data=st.data())
def test_matches_reference(b, n, with_cls, data):
    d = data.draw(st.integers(1, n))
    c = data.draw(st.integers(0, n - d))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 5, generator=g)
    attn = torch.randint(0, 4, (b, n), generator=g).float()  # ties on purpose
    keys = torch.randn(b, n, 3, generator=g)
    cls = torch.randn(b, 5, generator=g) if with_cls else None
    out = visionzip(x, cls_attn=attn, keys=keys, cls_feature=cls, dominant=d, contextual=c)
    assert len(out) == b
    first = int(with_cls)
    for i, r in enumerate(out):
        feats, sources, assignment = reference(x[i], attn[i], keys[i], d, c, None if cls is None else cls[i])
        assert r.count == d + c
        assert r.sources.tolist() == sources
        assert r.assignment.tolist() == assignment
        torch.testing.assert_close(r.features.double(), feats, rtol=1e-5, atol=1e-5)
        # dominant block and contextual block are each in spatial order, after the CLS token
        assert r.sources[first:d].tolist() == sorted(sources[first:d])
        assert r.sources[d:].tolist() == sorted(sources[d:])
        patches = r.sources[first:]
        assert torch.equal(r.assignment[patches], torch.arange(first, d + c))
        if c:
            assert bool((r.assignment >= first).all())


def test_cls_token_is_the_first_dominant_token():
    """The official selection: with the CLS token, the top D-1 patches join it, so visionzip with the CLS
    token at D keeps the same patches as without it at D-1, and the CLS features come first, unmerged."""
    g = torch.Generator().manual_seed(3)
    x, attn, keys, cls = (
        torch.randn(2, 40, 6, generator=g),
        torch.rand(2, 40, generator=g),
        torch.randn(2, 40, 4, generator=g),
        torch.randn(2, 6, generator=g),
    )
    with_cls = visionzip(x, cls_attn=attn, keys=keys, cls_feature=cls, dominant=9, contextual=3)
    without = visionzip(x, cls_attn=attn, keys=keys, dominant=8, contextual=3)
    for r, s, c in zip(with_cls, without, cls, strict=True):
        assert r.count == 12 and s.count == 11
        assert torch.equal(r.features[0], c)
        assert torch.equal(r.sources[1:], s.sources)
        torch.testing.assert_close(r.features[1:], s.features)
        assert torch.equal(r.assignment, s.assignment + 1)
    only_cls = visionzip(x, cls_attn=attn, keys=keys, cls_feature=cls, budget=1)  # D=1: the CLS token alone
    assert [r.sources.tolist() for r in only_cls] == [[-1], [-1]]


def test_published_defaults_and_budget_split():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(192) == (162, 30)
    for budget in range(1, 600):
        d, c = split_budget(budget)
        assert d >= 1 and c >= 0 and d + c == budget
        assert abs(d - budget * 54 / 64) <= 0.5
    x = torch.randn(2, 576, 8)
    attn, keys = torch.rand(2, 576), torch.randn(2, 576, 4)
    assert [r.count for r in visionzip(x, cls_attn=attn, keys=keys)] == [64, 64]
    out = visionzip(x, cls_attn=attn, keys=keys, budget=192, dominant=1, contextual=0)
    assert [r.count for r in out] == [192, 192]
    ref = visionzip(x, cls_attn=attn, keys=keys, dominant=162, contextual=30)
    assert torch.equal(out[0].sources, ref[0].sources)


def test_no_contextual_drops_the_rest_and_full_budget():
    x = torch.randn(1, 9, 2)
    attn = torch.arange(9.0).unsqueeze(0)
    keys = torch.randn(1, 9, 3)
    r = visionzip(x, cls_attn=attn, keys=keys, dominant=3, contextual=0)[0]
    assert r.sources.tolist() == [6, 7, 8]
    assert r.assignment.tolist() == [-1] * 6 + [0, 1, 2]
    # D + C == N: every remaining token is its own target, contextual tokens are the tokens themselves
    r = visionzip(x, cls_attn=attn, keys=keys, dominant=4, contextual=5)[0]
    assert r.sources.tolist() == [5, 6, 7, 8, 0, 1, 2, 3, 4]
    assert torch.equal(r.features, x[0, r.sources])


def test_batch_equals_per_image_dtype_and_determinism():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, 8, generator=g)
    attn = torch.rand(3, 64, generator=g)
    keys = torch.randn(3, 64, 4, generator=g)
    batch = visionzip(x, cls_attn=attn, keys=keys, dominant=10, contextual=6)
    again = visionzip(x, cls_attn=attn, keys=keys, dominant=10, contextual=6)
    for i in range(3):
        single = visionzip(x[i : i + 1], cls_attn=attn[i : i + 1], keys=keys[i : i + 1], dominant=10, contextual=6)[0]
        for r in (single, again[i]):
            assert torch.equal(batch[i].sources, r.sources)
            assert torch.equal(batch[i].assignment, r.assignment)
            torch.testing.assert_close(batch[i].features, r.features)
    for dtype in (torch.float16, torch.bfloat16):
        out = visionzip(x.to(dtype), cls_attn=attn.to(dtype), keys=keys.to(dtype), dominant=10, contextual=6)
        assert all(r.features.dtype == dtype and r.count == 16 for r in out)


def test_registered_spec():
    spec = get_method("visionzip")
    assert spec.fn is visionzip
    assert spec.placement is Placement.ENCODER and spec.adaptive is False
    assert spec.defaults == {"dominant": 54, "contextual": 10, "budget": None, "signal": None, "cls_token": None}
    assert spec.signals(spec.defaults) == {
        "cls_attn": SignalRequest("cls_attn", (-2,), "sum", fallback="mean_received"),
        "keys": SignalRequest("keys", (-2,), "mean"),
        "cls_feature": SignalRequest("cls_feature", optional=True),
    }
    assert spec.signals(spec.options(cls_token=True))["cls_feature"] == SignalRequest("cls_feature")
    assert "cls_feature" not in spec.signals(spec.options(cls_token=False))
    with pytest.raises(InputError, match="cls_token"):
        spec.options(cls_token="yes")
    assert spec.signals(spec.options(signal="mean-received"))["cls_attn"] == SignalRequest(
        "mean_received", (-2,), "sum"
    )
    with pytest.raises(InputError, match="does not take"):
        spec.options(dominat=3)


def test_errors():
    x = torch.randn(2, 16, 4)
    attn, keys = torch.rand(2, 16), torch.randn(2, 16, 3)
    with pytest.raises(InputError, match=r"\[B, N, C\]"):
        visionzip(x[0], cls_attn=attn, keys=keys)
    with pytest.raises(InputError, match="dominant must be"):
        visionzip(x, cls_attn=attn, keys=keys, dominant=0, contextual=2)
    with pytest.raises(InputError, match="contextual must be"):
        visionzip(x, cls_attn=attn, keys=keys, dominant=2, contextual=-1)
    with pytest.raises(InputError, match="exceeds"):
        visionzip(x, cls_attn=attn, keys=keys, dominant=10, contextual=7)
    with pytest.raises(InputError, match="exceeds"):
        visionzip(x, cls_attn=attn, keys=keys)  # defaults 54 + 10 > 16
    for budget in (0, 17, 2.5):
        with pytest.raises(InputError, match="budget"):
            visionzip(x, cls_attn=attn, keys=keys, budget=budget)
    with pytest.raises(InputError, match="keys must have shape"):
        visionzip(x, cls_attn=attn, keys=keys[:, :15], budget=4)
    with pytest.raises(InputError, match="cls_attn must have shape"):
        visionzip(x, cls_attn=attn[:1], keys=keys, budget=4)
    with pytest.raises(InputError, match="does not match"):
        visionzip(x, cls_attn=attn, keys=keys, grid=(5, 3), budget=4)
    with pytest.raises(InputError, match="cls_token=True needs cls_feature"):
        visionzip(x, cls_attn=attn, keys=keys, budget=4, cls_token=True)
    with pytest.raises(InputError, match="cls_token=False"):
        visionzip(x, cls_attn=attn, keys=keys, budget=4, cls_token=False, cls_feature=x[:, 0])
    with pytest.raises(InputError, match="cls_feature must have shape"):
        visionzip(x, cls_attn=attn, keys=keys, budget=4, cls_feature=x[:, :2])
    bad = keys.clone()
    bad[0, 0, 0] = math.inf
    with pytest.raises(InputError, match="NaN or inf"):
        visionzip(x, cls_attn=attn, keys=bad, budget=4)
    bad = attn.clone()
    bad[1, 1] = math.nan
    with pytest.raises(InputError, match="NaN"):
        visionzip(x, cls_attn=bad, keys=keys, budget=4)


@CUDA
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 576, 32, generator=g)
    attn = torch.rand(2, 576, generator=g)
    keys = torch.randn(2, 576, 64, generator=g)
    cpu = visionzip(x, cls_attn=attn, keys=keys)
    gpu = visionzip(x.cuda(), cls_attn=attn.cuda(), keys=keys.cuda())
    for r, s in zip(cpu, gpu, strict=True):
        assert torch.equal(r.sources, s.sources.cpu())
        assert torch.equal(r.assignment, s.assignment.cpu())
        torch.testing.assert_close(r.features, s.features.cpu())
