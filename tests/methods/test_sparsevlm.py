"""SparseVLM keep masks against a per-sample Python reference of METHODS.md, invariants and the spec."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.methods.llm_fixtures import alone, make_layout, qk, ref_keep_top, ref_row, sample_layout, specs_st
from visprune.errors import InputError
from visprune.methods import Placement, get_method
from visprune.methods.sparsevlm import raters, sparsevlm


def hidden_for(lay, c=6, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(*lay.attention_mask.shape, c, generator=g) * 0.7


def ref_raters(hidden, lay, i):
    s = lay.attention_mask.shape[1]
    real = [j for j in range(s) if lay.attention_mask[i, j]]
    text = [j for j in real if lay.query[i, j]] or [real[-1]]
    vis = [j for j in real if lay.visual[i, j]]
    if not vis:
        return text
    score = [0.0] * len(text)
    for v in vis:
        rel = torch.stack([hidden[i, v].double() @ hidden[i, t].double() for t in text]).softmax(0)
        for r in range(len(text)):
            score[r] += float(rel[r]) / len(vis)
    mean = sum(score) / len(score)
    chosen = [t for t, sc in zip(text, score, strict=True) if sc > mean]
    return chosen or text


def ref_sparsevlm(q, k, hidden, lay, counts, stage):
    def score(i, real):
        rs = ref_raters(hidden, lay, i)
        return sum(ref_row(q, k, lay.attention_mask, i, r).mean(0) for r in rs) / len(rs)

    return ref_keep_top(lay, score, lambda n: min(counts[stage], n))


@given(
    specs=specs_st,
    side=st.sampled_from(["left", "right"]),
    stage=st.integers(0, 2),
    rep=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(specs, side, stage, rep, seed):
    lay = make_layout(specs, side, 1)
    q, k = qk(lay, rep=rep, seed=seed)
    hidden = hidden_for(lay, seed=seed)
    counts = (6, 4, 2)
    got = sparsevlm(q=q, k=k, hidden=hidden, layout=lay, stage=stage, keep_counts=counts)
    for i in range(len(specs)):
        assert raters(hidden, lay)[i].nonzero().flatten().tolist() == sorted(ref_raters(hidden, lay, i))
    assert torch.equal(got, ref_sparsevlm(q, k, hidden, lay, counts, stage))
    assert not (got & ~lay.attention_mask).any()
    assert torch.equal(got & ~lay.visual, lay.attention_mask & ~lay.visual)
    assert torch.equal((got & lay.visual).sum(1), lay.visual.sum(1).clamp(max=counts[stage]))


@given(specs=specs_st, seed=st.integers(0, 2**16))
def test_batch_equals_each_sample_alone(specs, seed):
    lay = make_layout(specs, "left", 2)
    q, k = qk(lay, seed=seed)
    hidden = hidden_for(lay, seed=seed)
    opts = {"keep_counts": (5, 3, 1), "stage": 0}
    got = sparsevlm(q=q, k=k, hidden=hidden, layout=lay, **opts)
    s = lay.attention_mask.shape[1]
    for i, (a, b, c) in enumerate(specs):
        o = s - (a + b + c)
        one = sparsevlm(
            q=alone(q, i, o), k=alone(k, i, o), hidden=alone(hidden, i, o), layout=sample_layout(lay, i, o), **opts
        )
        assert torch.equal(got[i, o:], one[0])


def test_raters_are_the_text_tokens_aligned_with_the_image():
    # visual tokens along e0; text token 0 along e0 (related), text token 1 along e1 (unrelated)
    lay = make_layout([(0, 3, 2)])
    hidden = torch.zeros(1, 5, 2)
    hidden[0, :3, 0] = 1.0
    hidden[0, 3] = torch.tensor([3.0, 0.0])
    hidden[0, 4] = torch.tensor([0.0, 3.0])
    assert raters(hidden, lay)[0].tolist() == [False, False, False, True, False]
    hidden[0, 4] = torch.tensor([3.0, 0.0])  # both equally related: everyone rates
    assert raters(hidden, lay)[0].tolist() == [False, False, False, True, True]


def test_default_counts_on_llava_sized_input():
    lay = make_layout([(4, 576, 6)])
    q, k = qk(lay, rep=1, seed=1)
    hidden = hidden_for(lay, c=8)
    keep = sparsevlm(q=q, k=k, hidden=hidden, layout=lay)
    assert int((keep & lay.visual).sum()) == 300
    assert math.isclose(float(keep.sum()), 4 + 300 + 6)


def test_spec():
    spec = get_method("sparsevlm")
    o = spec.bind({}, llm_layers=32, vision_layers=None)
    assert o == {"layers": (2, 6, 15), "keep_counts": (300, 200, 110)}
    assert spec.layers(spec.options()) == (3, 7, 16)
    assert spec.placement is Placement.LLM and not spec.adaptive
    assert spec.layers(o) == (3, 7, 16)  # pruning applies from the layer after the scoring layer
    sig = spec.signals(o)
    assert set(sig) == {"q", "k", "hidden"}
    assert all(sig[n].layers == (2, 6, 15) for n in sig)


def test_errors():
    lay = make_layout([(1, 4, 2)])
    q, k = qk(lay)
    hidden = hidden_for(lay)
    with pytest.raises(InputError, match="hidden"):
        sparsevlm(q=q, k=k, layout=lay)
    with pytest.raises(InputError, match="keep_counts"):
        sparsevlm(q=q, k=k, hidden=hidden, layout=lay, keep_counts=(300, 200))
    with pytest.raises(InputError, match=r"keep_counts\[1\]"):
        sparsevlm(q=q, k=k, hidden=hidden, layout=lay, keep_counts=(300, 0, 1))
    with pytest.raises(InputError, match="stage"):
        sparsevlm(q=q, k=k, hidden=hidden, layout=lay, stage=-1)
    with pytest.raises(InputError, match="shape"):
        sparsevlm(q=q, k=k, hidden=hidden[:, :-1], layout=lay)
    with pytest.raises(InputError, match="NaN"):
        sparsevlm(q=q, k=k, hidden=hidden * float("inf"), layout=lay)
