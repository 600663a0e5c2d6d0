"""attention_rows and the selection helpers against plain eager attention and Python references."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.methods.llm_fixtures import make_layout, qk
from visprune.errors import InputError
from visprune.methods import get_method
from visprune.methods.base import TokenLayout
from visprune.methods.llm_attention import (
    attention_rows,
    check_qk,
    mean_received_attention,
    ratio_count,
    rows_from_mask,
    top_count_mask,
)


def eager_probs(q, k, attention_mask):
    """Full [B, H, S, S] eager attention: repeat_kv, additive causal + padding mask, softmax."""
    h, h_kv, s = q.shape[1], k.shape[1], q.shape[2]
    kk = k.double().repeat_interleave(h // h_kv, dim=1)
    logits = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    allowed = causal.unsqueeze(0) & attention_mask.unsqueeze(1)  # [B, S, S]
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return logits.softmax(-1)


specs_st = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6), st.integers(1, 4)), min_size=1, max_size=3)


@given(
    specs=specs_st,
    side=st.sampled_from(["left", "right"]),
    extra=st.integers(0, 2),
    h_kv=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 3]),
    d=st.sampled_from([2, 8]),
    seed=st.integers(0, 2**16),
)
def test_rows_match_eager_attention(specs, side, extra, h_kv, rep, d, seed):
    g = torch.Generator().manual_seed(seed)
    lay = make_layout(specs, side, extra)
    b, s = lay.attention_mask.shape
    q = torch.randn(b, h_kv * rep, s, d, generator=g) * 2
    k = torch.randn(b, h_kv, s, d, generator=g) * 2
    ref = eager_probs(q, k, lay.attention_mask)
    idx, valid = rows_from_mask(lay.query)
    got = attention_rows(q, k, idx, lay.attention_mask, row_valid=valid)
    assert got.dtype == torch.float32 and got.shape == (b, h_kv * rep, idx.shape[1], s)
    for i in range(b):
        rows = lay.query[i].nonzero().flatten()
        n = len(rows)
        torch.testing.assert_close(got[i, :, :n].double(), ref[i][:, rows], atol=1e-5, rtol=1e-5)
        assert torch.all(got[i, :, n:] == 0)  # filler rows are zero
        torch.testing.assert_close(got[i, :, :n].sum(-1), torch.ones(q.shape[1], n))
    # the head/row mean
    mean = mean_received_attention(q, k, lay.query, lay.attention_mask)
    for i in range(b):
        rows = lay.query[i].nonzero().flatten()
        torch.testing.assert_close(mean[i].double(), ref[i][:, rows].mean((0, 1)), atol=1e-5, rtol=1e-5)


def test_half_precision_inputs_and_positions_argument():
    lay = make_layout([(2, 4, 3), (1, 2, 2)], "left", 1)
    b, s = lay.attention_mask.shape
    q, k = torch.randn(b, 4, s, 8), torch.randn(b, 2, s, 8)
    idx, valid = rows_from_mask(lay.query)
    full = attention_rows(q, k, idx, lay.attention_mask, row_valid=valid)
    half = attention_rows(q.bfloat16(), k.bfloat16(), idx, lay.attention_mask, row_valid=valid)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.05)
    # explicit position ids (left padding: cumulative count of real tokens) give the same result
    pos = lay.attention_mask.long().cumsum(1) - 1
    torch.testing.assert_close(
        attention_rows(q, k, idx, lay.attention_mask, row_valid=valid, positions=pos.clamp(min=0)), full
    )


def test_causality_future_keys_get_nothing():
    lay = make_layout([(0, 5, 3)])
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    idx, valid = rows_from_mask(lay.query)
    p = attention_rows(q, k, idx, lay.attention_mask, row_valid=valid)
    assert torch.all(p[0, :, 0, 6:] == 0) and torch.all(p[0, :, 1, 7:] == 0)
    assert torch.all(p[0, :, 2] > 0)


def test_rows_from_mask_and_empty_rows():
    m = torch.tensor([[False, True, False, True], [False, False, False, False]])
    idx, valid = rows_from_mask(m)
    assert idx[0].tolist()[:2] == [1, 3] and valid.tolist() == [[True, True], [False, False]]
    lay = TokenLayout(m | True, torch.zeros_like(m), m, torch.zeros_like(m))
    out = mean_received_attention(torch.randn(2, 1, 4, 2), torch.randn(2, 1, 4, 2), m, lay.attention_mask)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("specs", [[(3, 9, 2), (1, 0, 3), (2, 5, 1)], [(0, 16, 1), (4, 1, 0)]])
def test_a_host_bound_on_text_rows_changes_no_result(specs):
    """`TokenLayout.text_rows` (the most text tokens of a row, known on the host) sizes the text-row gathers
    without a device read: the same rows, padded further with invalid ones, and the same sparsevlm keep mask."""
    lay = make_layout(specs)
    text = (lay.attention_mask & ~lay.visual).sum(1)
    bound = int(text.max())
    idx, valid = rows_from_mask(lay.query)
    bounded_idx, bounded_valid = rows_from_mask(lay.query, bound)
    assert bounded_idx.shape[1] == max(1, bound) >= idx.shape[1]
    assert torch.equal(bounded_idx[:, : idx.shape[1]][valid], idx[valid])
    assert torch.equal(bounded_valid[:, : idx.shape[1]], valid) and not bounded_valid[:, idx.shape[1] :].any()
    spec = get_method("sparsevlm")
    options = spec.options(layers=(1, 2), keep_counts=(6, 2))
    q, k = qk(lay)
    hidden = torch.randn(*lay.attention_mask.shape, 8, generator=torch.Generator().manual_seed(1))
    bounded = TokenLayout(lay.attention_mask, lay.visual, lay.query, lay.system, text_rows=bound)
    for stage in (0, 1):
        plain = spec.fn(q=q, k=k, hidden=hidden, layout=lay, stage=stage, **options)
        assert torch.equal(spec.fn(q=q, k=k, hidden=hidden, layout=bounded, stage=stage, **options), plain)


@given(
    scores=st.lists(st.lists(st.integers(0, 4), min_size=6, max_size=6), min_size=1, max_size=3),
    seed=st.integers(0, 999),
)
def test_top_count_mask_matches_python_ranking(scores, seed):
    g = torch.Generator().manual_seed(seed)
    sc = torch.tensor(scores, dtype=torch.float32)  # small integers: many ties
    cand = torch.rand(sc.shape, generator=g) < 0.7
    counts = torch.randint(0, 8, (sc.shape[0],), generator=g)
    got = top_count_mask(sc, cand, counts)
    for i in range(sc.shape[0]):
        members = [j for j in range(6) if cand[i, j]]
        ranked = sorted(members, key=lambda j: (-scores[i][j], j))  # ties: lower index first
        expect = set(ranked[: int(counts[i])])
        assert {j for j in range(6) if got[i, j]} == expect


def test_ratio_count_exact():
    n = torch.tensor([0, 1, 2, 100, 576, 577, 7])
    assert ratio_count(n, 0.5).tolist() == [0, 1, 1, 50, 288, 288, 3]
    assert ratio_count(n, 0.29).tolist() == [0, 1, 1, 29, 167, 167, 2]  # 100 * 0.29 is 28.999... in floats
    assert ratio_count(n, 1.0).tolist() == n.tolist()
    assert ratio_count(n, 0.001).tolist() == [0, 1, 1, 1, 1, 1, 1]


def test_check_qk_errors():
    lay = make_layout([(1, 2, 1)])
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 4, 8)
    assert check_qk(q, k, lay) == (1, 4)
    with pytest.raises(InputError, match="q and k"):
        check_qk(None, k, lay)
    with pytest.raises(InputError, match="shape"):
        check_qk(q[:, :, :3], k, lay)
    with pytest.raises(InputError, match="shape"):
        check_qk(q, k[..., :4], lay)
    with pytest.raises(InputError, match="multiple"):
        check_qk(torch.randn(1, 3, 4, 8), k, lay)
    with pytest.raises(InputError, match="NaN"):
        check_qk(q.index_fill(2, torch.tensor([1]), float("nan")), k, lay)
    with pytest.raises(InputError, match="TokenLayout"):
        check_qk(q, k, {"attention_mask": None})
    with pytest.raises(InputError, match="multiple"):
        attention_rows(torch.randn(1, 3, 4, 8), k, torch.zeros(1, 1, dtype=torch.long), lay.attention_mask)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart", "sparsevlm"])
@pytest.mark.parametrize("specs", [[(3, 9, 2), (1, 0, 3), (2, 5, 1)], [(0, 16, 1), (4, 1, 0)]])
def test_each_count_rule_is_what_its_method_keeps(name, specs):
    """`MethodSpec.visual_kept` (the count the decoder pruner plans on the host) equals the image tokens the
    method's keep mask holds, at every stage, on layouts with padding, no image tokens and no query tokens."""
    spec = get_method(name)
    options = {"fastv": {"layer": 2}, "dart": {"layer": 2, "budget": 3}, "pdrop": {"layers": (1, 2, 3)}}.get(
        name, {"layers": (1, 2), "keep_counts": (6, 2)}
    )
    options = spec.options(**options)
    lay = make_layout(specs)
    q, k = qk(lay)
    hidden = torch.randn(*lay.attention_mask.shape, 8, generator=torch.Generator().manual_seed(1))
    present = (lay.visual & lay.attention_mask).sum(dim=1)
    for stage in range(len(spec.layers(options))):
        keep = spec.fn(q=q, k=k, hidden=hidden, layout=lay, stage=stage, **options)
        kept = (keep & lay.visual).sum(dim=1)
        assert kept.tolist() == spec.visual_kept(present, options, stage).tolist()
        present = kept  # the next stage sees what this one kept (its layout keeps the same positions here)
        lay = type(lay)(lay.attention_mask & keep, lay.visual & keep, lay.query & keep, lay.system & keep)
