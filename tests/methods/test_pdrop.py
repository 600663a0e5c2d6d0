"""PyramidDrop keep masks against a per-sample Python reference, the stage chain, invariants, spec."""

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
from visprune.methods.base import TokenLayout
from visprune.methods.pdrop import pdrop


def ref_pdrop(q, k, lay, ratios, stage):
    frac = Fraction(ratios[stage]).limit_denominator(10**6)
    if stage:
        frac /= Fraction(ratios[stage - 1]).limit_denominator(10**6)
    return ref_keep_top(
        lay, lambda i, real: ref_row(q, k, lay.attention_mask, i, real[-1]).mean(0), lambda n: ref_ratio_count(n, frac)
    )


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
    ratios = (0.5, 0.25, 0.125)
    got = pdrop(q=q, k=k, layout=lay, stage=stage)
    assert torch.equal(got, ref_pdrop(q, k, lay, ratios, stage))
    assert not (got & ~lay.attention_mask).any()
    assert torch.equal(got & ~lay.visual, lay.attention_mask & ~lay.visual)
    assert torch.equal(got, pdrop(q=q, k=k, layout=lay, stage=stage))


@given(specs=specs_st, seed=st.integers(0, 2**16))
def test_batch_equals_each_sample_alone(specs, seed):
    lay = make_layout(specs, "left", 2)
    q, k = qk(lay, seed=seed)
    got = pdrop(q=q, k=k, layout=lay, stage=1)
    s = lay.attention_mask.shape[1]
    for i, (a, b, c) in enumerate(specs):
        o = s - (a + b + c)
        one = pdrop(q=alone(q, i, o), k=alone(k, i, o), layout=sample_layout(lay, i, o), stage=1)
        assert torch.equal(got[i, o:], one[0])


def test_stage_chain_reaches_cumulative_fractions_of_the_original():
    lay = make_layout([(3, 576, 5)])
    q, k = qk(lay, rep=1, d=4, seed=3)
    counts = []
    for stage in range(3):
        keep = pdrop(q=q, k=k, layout=lay, stage=stage)
        counts.append(int((keep & lay.visual).sum()))
        idx = keep[0].nonzero().flatten()
        lay = TokenLayout(*(getattr(lay, n)[:, idx] for n in ("attention_mask", "visual", "query", "system")))
        q, k = q[:, :, idx], k[:, :, idx]
    assert counts == [288, 144, 72]
    assert int(lay.attention_mask.sum()) == 3 + 72 + 5


def test_custom_ratios_and_counts():
    lay = make_layout([(1, 30, 2), (0, 7, 1)], "left")
    q, k = qk(lay)
    keep = pdrop(q=q, k=k, layout=lay, stage=1, layers=(4, 9), keep_ratios=(0.6, 0.3))
    assert (keep & lay.visual).sum(1).tolist() == [15, 3]  # 30 * 1/2, floor(7 * 1/2)


def test_spec():
    spec = get_method("pdrop")
    o = spec.bind({}, llm_layers=32, vision_layers=None)
    assert o == {"layers": (8, 16, 24), "keep_ratios": (0.5, 0.25, 0.125)}
    assert spec.layers(spec.options()) == (8, 16, 24)  # an unbound default reads as the published layers
    assert spec.placement is Placement.LLM and not spec.adaptive
    assert spec.layers(o) == (8, 16, 24)
    sig = spec.signals(o)
    assert set(sig) == {"q", "k"} and sig["q"].layers == (8, 16, 24) and sig["k"].layers == (8, 16, 24)
    assert spec.layers(spec.options(layers=(3, 5), keep_ratios=(0.5, 0.2))) == (3, 5)


def test_errors():
    lay = make_layout([(1, 4, 2)])
    q, k = qk(lay)
    with pytest.raises(InputError, match="one per layer"):
        pdrop(q=q, k=k, layout=lay, keep_ratios=(0.5, 0.25))
    with pytest.raises(InputError, match="non-increasing"):
        pdrop(q=q, k=k, layout=lay, keep_ratios=(0.25, 0.5, 0.1))
    with pytest.raises(InputError, match="increasing"):
        pdrop(q=q, k=k, layout=lay, layers=(8, 8, 24))
    with pytest.raises(InputError, match="keep_ratios"):
        pdrop(q=q, k=k, layout=lay, keep_ratios=[0.5, 0.25, 0.125])
    with pytest.raises(InputError, match=r"keep_ratios\[2\]"):
        pdrop(q=q, k=k, layout=lay, keep_ratios=(0.5, 0.25, 0.0))
    with pytest.raises(InputError, match="stage"):
        pdrop(q=q, k=k, layout=lay, stage=3)
    with pytest.raises(InputError, match="stage"):
        pdrop(q=q, k=k, layout=lay, stage=True)
