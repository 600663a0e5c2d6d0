"""FastV keep masks against a per-sample Python reference of METHODS.md, invariants and the spec."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.methods.llm_fixtures import (
    alone,
    make_layout,
    qk,
    ref_keep_top,
    ref_ratio_count,
    ref_row,
    sample_layout,
    specs_st,
)
from visprune.errors import InputError
from visprune.methods import Placement, get_method
from visprune.methods.fastv import fastv


def ref_fastv(q, k, lay, ratio):
    frac = Fraction(ratio).limit_denominator(10**6)
    return ref_keep_top(
        lay, lambda i, real: ref_row(q, k, lay.attention_mask, i, real[-1]).mean(0), lambda n: ref_ratio_count(n, frac)
    )


@given(
    specs=specs_st,
    side=st.sampled_from(["left", "right"]),
    extra=st.integers(0, 2),
    ratio=st.sampled_from([0.5, 0.25, 0.3, 1.0, 0.01]),
    rep=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(specs, side, extra, ratio, rep, seed):
    lay = make_layout(specs, side, extra)
    q, k = qk(lay, rep=rep, seed=seed)
    got = fastv(q=q, k=k, layout=lay, keep_ratio=ratio)
    assert got.dtype == torch.bool and got.shape == lay.attention_mask.shape
    assert torch.equal(got, ref_fastv(q, k, lay, ratio))
    # invariants: padding dropped, non-visual real tokens kept, exact counts, deterministic
    assert not (got & ~lay.attention_mask).any()
    assert torch.equal(got & ~lay.visual, lay.attention_mask & ~lay.visual)
    n = lay.visual.sum(1)
    expect = torch.tensor([min(int(v), max(1, math.floor(int(v) * ratio + 1e-9))) if v else 0 for v in n])
    assert torch.equal((got & lay.visual).sum(1), expect)
    assert torch.equal(fastv(q=q, k=k, layout=lay, keep_ratio=ratio), got)


@given(specs=specs_st, seed=st.integers(0, 2**16))
def test_batch_equals_each_sample_alone(specs, seed):
    lay = make_layout(specs, "left", 1)
    q, k = qk(lay, seed=seed)
    got = fastv(q=q, k=k, layout=lay)
    s = lay.attention_mask.shape[1]
    for i, (a, b, c) in enumerate(specs):
        o = s - (a + b + c)
        one = fastv(q=alone(q, i, o), k=alone(k, i, o), layout=sample_layout(lay, i, o))
        assert torch.equal(got[i, o:], one[0])


def test_scores_follow_the_last_token_attention():
    # one head, d=1: the last token's logits are q_last * k_j, so the largest keys win
    lay = make_layout([(1, 6, 2)])
    q = torch.ones(1, 1, 9, 1)
    k = torch.tensor([0.0, 1, 5, 2, 4, 3, 0.5, 0, 0]).view(1, 1, 9, 1)
    keep = fastv(q=q, k=k, layout=lay, keep_ratio=0.5)
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 4, 5, 7, 8]


def test_no_visual_and_no_query_tokens():
    lay = make_layout([(3, 0, 2), (2, 4, 0)], "left")
    q, k = qk(lay)
    keep = fastv(q=q, k=k, layout=lay)
    assert torch.equal(keep[0], lay.attention_mask[0])  # nothing to prune
    assert int((keep[1] & lay.visual[1]).sum()) == 2  # scored by the last real (visual) token


def test_spec():
    spec = get_method("fastv")
    o = spec.bind({}, llm_layers=32, vision_layers=None)
    assert o == {"layer": 2, "keep_ratio": 0.5}
    assert spec.layers(spec.options()) == (2,)
    assert spec.placement is Placement.LLM and not spec.adaptive
    assert spec.layers(o) == (2,) and spec.layers(spec.options(layer=5)) == (5,)
    sig = spec.signals(o)
    assert set(sig) == {"q", "k"} and sig["q"].kind == "q" and sig["k"].kind == "k"
    assert sig["q"].layers == (1,) and sig["k"].layers == (1,)  # scores from layer K - 1
    assert spec.fn is fastv and "keep_ratio" in spec.param_docs


def test_errors():
    lay = make_layout([(1, 4, 2)])
    q, k = qk(lay)
    with pytest.raises(InputError, match="keep_ratio"):
        fastv(q=q, k=k, layout=lay, keep_ratio=0.0)
    with pytest.raises(InputError, match="layer"):
        fastv(q=q, k=k, layout=lay, layer=0)
    with pytest.raises(InputError, match="stage"):
        fastv(q=q, k=k, layout=lay, stage=1)
    with pytest.raises(InputError, match="q and k"):
        fastv(k=k, layout=lay)
    with pytest.raises(InputError, match="shape"):
        fastv(q=q[:, :, :-1], k=k, layout=lay)
    with pytest.raises(InputError):
        get_method("fastv").options(keep=0.3)
