"""The text stage of knee+text against a per-sample Python reference, invariants and the spec."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.methods.llm_fixtures import alone, make_layout, qk, ref_row, sample_layout, specs_st
from visprune.errors import InputError
from visprune.methods import Placement, get_method
from visprune.methods.knee_point import knee_count
from visprune.methods.text_stage import kept_images, text_relevance, text_stage


def kneedle(values):
    """Keep count for a descending list: argmax_i (1 - x_i - y_i) + 1 on the normalised curve."""
    n = len(values)
    if n == 1 or values[0] == values[-1]:
        return 1
    best, arg = -math.inf, 0
    for i, v in enumerate(values):
        d = 1 - i / (n - 1) - (v - values[-1]) / (values[0] - values[-1])
        if d > best:
            best, arg = d, i
    return arg + 1


def ref_keep_group(rel, group, rows, ratio, detector):
    """The kept members of `group`: the query `rows` among them always; under a ratio they take its first
    places, under a knee it is found on the others' curve."""
    protected = [j for j in group if j in rows]
    others = sorted((j for j in group if j not in rows), key=lambda j: (-float(rel[j]), j))
    if ratio is not None:
        count = max(1, math.floor(len(group) * ratio + 1e-9)) if group else 0
        return set((protected + others)[:count])
    if not others:
        return set(protected)
    values = [float(rel[j]) for j in others]
    # the other detectors: the shared knee_count on the unpadded single curve
    count = kneedle(values) if detector == "kneedle" else int(knee_count(torch.tensor([values]), detector))
    return set(others[: min(count, len(others))]) | set(protected)


def ref_text_stage(q, k, lay, ratio=None, detector="kneedle", prune_text=False):
    b, s = lay.attention_mask.shape
    keep = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        real = [j for j in range(s) if lay.attention_mask[i, j]]
        rows = [j for j in real if lay.query[i, j]] or [real[-1]]
        rel = sum(ref_row(q, k, lay.attention_mask, i, r).mean(0) for r in rows) / len(rows)
        vis = [j for j in real if lay.visual[i, j]]
        kept_vis = ref_keep_group(rel, vis, rows, ratio, detector)
        system = [j for j in real[1:] if lay.system[i, j] and not lay.visual[i, j]] if prune_text else []
        kept_sys = ref_keep_group(rel, system, rows, ratio, detector)
        for j in real:
            keep[i, j] = (j in kept_vis) if j in vis else (j in kept_sys) if j in system else True
    return keep


@given(
    specs=specs_st,
    side=st.sampled_from(["left", "right"]),
    ratio=st.sampled_from([None, None, 0.5, 0.2]),
    detector=st.sampled_from(["kneedle", "kneedle", "max-gap", "max-curvature"]),
    prune_text=st.booleans(),
    rep=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(specs, side, ratio, detector, prune_text, rep, seed):
    lay = make_layout(specs, side, 1)
    q, k = qk(lay, rep=rep, seed=seed)
    opts = {"text_keep_ratio": ratio, "text_detector": detector, "prune_text": prune_text}
    got = text_stage(q=q, k=k, layout=lay, **opts)
    assert torch.equal(got, ref_text_stage(q, k, lay, ratio, detector, prune_text))
    # invariants: padding dropped, query tokens kept, >= 1 image token where there are any
    assert not (got & ~lay.attention_mask).any()
    assert torch.equal(got & lay.query, lay.query)
    assert torch.all((got & lay.visual).sum(1) >= lay.visual.sum(1).clamp(max=1))
    if not prune_text:
        assert torch.equal(got & ~lay.visual, lay.attention_mask & ~lay.visual)
    assert torch.equal(got, text_stage(q=q, k=k, layout=lay, **opts))
    rule = kept_images((lay.visual & lay.attention_mask).sum(1), opts)
    if ratio is None or prune_text:
        assert rule is None  # counts from the data: the launch-free path refuses these options
    else:  # the count rule the decoder pruner plans with, also where the last real token is an image token
        assert torch.equal((got & lay.visual).sum(1), rule)


@given(specs=specs_st, prune_text=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_equals_each_sample_alone(specs, prune_text, seed):
    lay = make_layout(specs, "left", 2)
    q, k = qk(lay, seed=seed)
    got = text_stage(q=q, k=k, layout=lay, prune_text=prune_text)
    s = lay.attention_mask.shape[1]
    for i, (a, b, c) in enumerate(specs):
        o = s - (a + b + c)
        one = text_stage(q=alone(q, i, o), k=alone(k, i, o), layout=sample_layout(lay, i, o), prune_text=prune_text)
        assert torch.equal(got[i, o:], one[0])


def test_relevance_is_the_question_attention():
    lay = make_layout([(1, 3, 2)])
    q, k = qk(lay, seed=5)
    rel = text_relevance(q, k, lay)[0]
    expect = (ref_row(q, k, lay.attention_mask, 0, 4).mean(0) + ref_row(q, k, lay.attention_mask, 0, 5).mean(0)) / 2
    torch.testing.assert_close(rel.double(), expect, atol=1e-6, rtol=1e-5)


def test_knee_cuts_a_long_tail():
    # one head, d=1, question keys 0: relevance ~ exp(k_j); 4 strong image tokens and a flat tail of 20
    lay = make_layout([(2, 24, 2)])
    k = torch.zeros(1, 1, 28, 1)
    strong = torch.tensor([2, 9, 15, 20]) + 2
    k[0, 0, 2:26, 0] = torch.linspace(0, -0.2, 24)
    k[0, 0, strong, 0] = 4.0
    q = torch.ones(1, 1, 28, 1)
    keep = text_stage(q=q, k=k, layout=lay, text_keep_ratio=None)
    kept = (keep & lay.visual)[0].nonzero().flatten()
    assert set(strong.tolist()) <= set(kept.tolist()) and len(kept) <= 5
    assert torch.equal(keep & ~lay.visual, lay.attention_mask & ~lay.visual)


def test_prune_text_keeps_the_first_token_and_no_visual_is_fine():
    lay = make_layout([(5, 0, 2), (4, 3, 1)], "left")
    q, k = qk(lay, seed=2)
    keep = text_stage(q=q, k=k, layout=lay, prune_text=True, text_keep_ratio=0.25)
    first = lay.attention_mask.long().argmax(1)
    assert keep[torch.arange(2), first].all()
    assert (keep & lay.system).sum(1).tolist() == [2, 1 + 1]  # BOS + floor(4 * .25) / BOS + max(1, 0)
    assert torch.equal(keep & lay.query, lay.query)
    keep = text_stage(q=q, k=k, layout=lay)
    assert torch.equal(keep[0], lay.attention_mask[0])


def test_spec_and_encoder_options():
    spec = get_method("knee+text")
    knee = get_method("knee")
    o = spec.bind({}, llm_layers=32, vision_layers=24)
    assert spec.placement is Placement.BOTH and spec.adaptive and spec.encoder_stage == "knee"
    own = {"text_layer": 2, "text_keep_ratio": 0.5, "text_detector": "kneedle", "text_smooth": 1, "prune_text": False}
    assert o == {**knee.defaults, **own}
    assert not set(own) & set(knee.defaults)
    assert spec.layers(o) == (2,) and spec.layers(spec.options(text_layer=4)) == (4,)
    sig = spec.signals(o)
    assert set(sig) == {"q", "k"} and sig["q"].layers == (2,) and sig["k"].layers == (2,)
    # the merged option dict can be passed straight to the stage function
    lay = make_layout([(1, 5, 2)])
    q, k = qk(lay)
    assert torch.equal(spec.fn(q=q, k=k, layout=lay, **o), text_stage(q=q, k=k, layout=lay))


def test_errors():
    lay = make_layout([(1, 4, 2)])
    q, k = qk(lay)
    with pytest.raises(InputError, match="text_keep_ratio"):
        text_stage(q=q, k=k, layout=lay, text_keep_ratio=1.5)
    with pytest.raises(InputError, match="text_detector"):
        text_stage(q=q, k=k, layout=lay, text_detector="elbow")
    with pytest.raises(InputError, match="text_smooth"):
        text_stage(q=q, k=k, layout=lay, text_smooth=0)
    with pytest.raises(InputError, match="prune_text"):
        text_stage(q=q, k=k, layout=lay, prune_text="yes")
    with pytest.raises(InputError, match="stage"):
        text_stage(q=q, k=k, layout=lay, stage=1)
    with pytest.raises(InputError, match="q and k"):
        text_stage(q=q, layout=lay)
    with pytest.raises(InputError):
        get_method("knee+text").options(keep_ratio=0.5)
