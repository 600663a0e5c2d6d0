"""DART keep masks against a per-sample Python reference (greedy pivots), invariants and the spec."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.methods.llm_fixtures import alone, make_layout, sample_layout, specs_st
from visprune.errors import InputError
from visprune.methods import Placement, get_method
from visprune.methods.dart import dart


def inputs(lay, seed, c=5):
    g = torch.Generator().manual_seed(seed)
    b, s = lay.attention_mask.shape
    return torch.randn(b, 2, s, 3, generator=g), torch.randn(b, s, c, generator=g)


def ref_dart(k, hidden, lay, budget, pivots):
    b, s = lay.attention_mask.shape
    keep = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        real = [j for j in range(s) if lay.attention_mask[i, j]]
        vis = [j for j in real if lay.visual[i, j]]
        text = [j for j in real if lay.query[i, j]]
        norm = {j: float(k[i, :, j].abs().sum()) for j in real}
        target = min(budget, len(vis))
        img_piv = sorted(vis, key=lambda j, norm=norm: (-norm[j], j))[: min(pivots, target)]
        piv = img_piv + sorted(text, key=lambda j, norm=norm: (-norm[j], j))[:pivots]
        chosen = list(img_piv)
        remaining = target - len(img_piv)
        for n, p in enumerate(piv):
            quota = remaining // len(piv) + (1 if n < remaining % len(piv) else 0)
            cand = [j for j in vis if j not in chosen]
            cos = {j: float(torch.nn.functional.cosine_similarity(hidden[i, p], hidden[i, j], dim=0)) for j in cand}
            chosen += sorted(cand, key=lambda j: (cos[j], j))[:quota]
        for j in real:
            keep[i, j] = (not lay.visual[i, j]) or j in chosen
    return keep


@given(
    specs=specs_st,
    side=st.sampled_from(["left", "right"]),
    budget=st.integers(1, 9),
    pivots=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(specs, side, budget, pivots, seed):
    lay = make_layout(specs, side, 1)
    k, hidden = inputs(lay, seed)
    got = dart(k=k, hidden=hidden, layout=lay, budget=budget, pivots=pivots)
    assert torch.equal(got, ref_dart(k, hidden, lay, budget, pivots))
    assert not (got & ~lay.attention_mask).any()
    assert torch.equal(got & ~lay.visual, lay.attention_mask & ~lay.visual)
    assert torch.equal((got & lay.visual).sum(1), lay.visual.sum(1).clamp(max=budget))  # exact budget
    assert torch.equal(got, dart(k=k, hidden=hidden, layout=lay, budget=budget, pivots=pivots))


@given(specs=specs_st, seed=st.integers(0, 2**16))
def test_batch_equals_each_sample_alone(specs, seed):
    lay = make_layout(specs, "left", 2)
    k, hidden = inputs(lay, seed)
    got = dart(k=k, hidden=hidden, layout=lay, budget=5, pivots=2)
    s = lay.attention_mask.shape[1]
    for i, (a, b, c) in enumerate(specs):
        o = s - (a + b + c)
        one = dart(k=alone(k, i, o), hidden=alone(hidden, i, o), layout=sample_layout(lay, i, o), budget=5, pivots=2)
        assert torch.equal(got[i, o:], one[0])


def test_duplicates_are_dropped():
    # 8 image tokens: 4 copies of direction A, 4 distinct directions; the question token also points
    # along A, so both pivots (image token 1, text token 9) look for tokens unlike A: one A is kept
    lay = make_layout([(1, 8, 2)])
    hidden = torch.zeros(1, 11, 8)
    hidden[0, 1:5, 0] = 1.0  # four duplicates
    for n, j in enumerate(range(5, 9)):
        hidden[0, j, n + 1] = 1.0
    hidden[0, 0, 7] = hidden[0, 9, 0] = hidden[0, 10, 5] = 1.0
    k = torch.zeros(1, 1, 11, 2)
    k[0, 0, 1] = 10.0  # the first duplicate is the image pivot
    keep = dart(k=k, hidden=hidden, layout=lay, budget=5, pivots=1)
    kept = (keep & lay.visual)[0].nonzero().flatten().tolist()
    assert kept == [1, 5, 6, 7, 8]
    assert math.isclose(float(keep.sum()), 3 + 5)


def test_spec():
    spec = get_method("dart")
    o = spec.bind({}, llm_layers=32, vision_layers=None)
    assert o == {"layer": 2, "budget": 64, "pivots": 4}
    assert spec.layers(spec.options()) == (2,)
    assert spec.placement is Placement.LLM and not spec.adaptive
    assert spec.layers(o) == (2,)
    sig = spec.signals(o)
    assert set(sig) == {"hidden", "k"}
    assert sig["k"].layers == (1,) and sig["hidden"].layers == (2,)


def test_errors():
    lay = make_layout([(1, 4, 2)])
    k, hidden = inputs(lay, 0)
    with pytest.raises(InputError, match="budget"):
        dart(k=k, hidden=hidden, layout=lay, budget=0)
    with pytest.raises(InputError, match="pivots"):
        dart(k=k, hidden=hidden, layout=lay, pivots=1.5)
    with pytest.raises(InputError, match="needs k"):
        dart(hidden=hidden, layout=lay)
    with pytest.raises(InputError, match="hidden"):
        dart(k=k, layout=lay)
    with pytest.raises(InputError, match="shape"):
        dart(k=k[:, :, :-1], hidden=hidden, layout=lay)
    with pytest.raises(InputError, match="layer"):
        dart(k=k, hidden=hidden, layout=lay, layer=0)
