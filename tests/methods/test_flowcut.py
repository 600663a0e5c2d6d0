"""flowcut's pure parts: the pruning schedule, the per-layer score (CLIP's and the CLS-free one of Qwen-VL,
per merge unit), the flow, the entropy-driven counts and the selection, each against the formula written
out here; the registered method's output and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from visprune.errors import InputError
from visprune.methods import Placement, SignalRequest, get_method
from visprune.methods.checks import DeviceChecks, deferred_device_checks
from visprune.methods.flowcut import (
    accumulate,
    flow_terms,
    flowcut,
    keep_top,
    prune_counts,
    prune_layers,
    prune_schedule,
    relation_terms,
    top_mask,
    unit_sums,
    unit_terms,
)


def test_prune_layers_follow_the_feature_layer():
    # CLIP ViT-L (24 layers) read at hidden_states[-2] = index 23: layers 1, 3, ..., 21, with 20, ..., 0 left
    assert prune_layers(23) == {21: 0, 19: 2, 17: 4, 15: 6, 13: 8, 11: 10, 9: 12, 7: 14, 5: 16, 3: 18, 1: 20}
    assert prune_layers(5) == {3: 0, 1: 2}
    assert prune_layers(2) == {0: 0}
    assert prune_layers(1) == {}
    # a Qwen-VL tower of 32 blocks prunes after blocks 31 (none left), 29, ..., 1; of 3 blocks after 2 and 0
    assert prune_schedule(31) == {b: 31 - b for b in range(31, 0, -2)}
    assert prune_schedule(2) == {2: 0, 0: 2} and prune_schedule(3) == {3: 0, 1: 2}


def test_accumulate_averages_the_flow_with_each_score():
    first, second = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(accumulate(None, first), first)
    assert accumulate(accumulate(None, first), second).tolist() == [2.0, 2.0]


def test_relation_terms_and_unit_sums_are_the_formula_per_image():
    """The CLS-free terms on a packed sequence of two images (12 and 8 tokens) against a per-image loop of
    explicit softmaxes; unit sums over 4 consecutive tokens."""
    g = torch.Generator().manual_seed(1)
    sizes, h, d, scale = [12, 8], 3, 4, 0.5
    q, k, v = (torch.randn(sum(sizes), h, d, generator=g) * 2 for _ in range(3))
    image = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    counts = torch.tensor(sizes)
    score, a = relation_terms(q.half(), k.half(), v.half(), image, counts, scale)  # float32 out from any dtype
    assert score.dtype == a.dtype == torch.float32
    score, a = relation_terms(q, k, v, image, counts, scale)
    start = 0
    for n in sizes:
        qi, ki, vi = (x[start : start + n].double() for x in (q, k, v))
        want_a = torch.zeros(n, dtype=torch.float64)
        for head in range(h):
            mean_q = qi[:, head].mean(0)
            logits = torch.tensor([float(mean_q @ ki[j, head]) * scale for j in range(n)], dtype=torch.float64)
            want_a += logits.exp() / logits.exp().sum() / h
        want_score = want_a * vi.mean(1).abs().sum(-1)
        torch.testing.assert_close(a[start : start + n].double(), want_a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(score[start : start + n].double(), want_score, rtol=1e-5, atol=1e-7)
        start += n
    units = unit_sums(a)
    assert units.shape == (5,)
    torch.testing.assert_close(units[3], a[12:16].sum())
    torch.testing.assert_close(units[:3].sum(), torch.tensor(1.0))  # a distribution over the image's units


def test_relation_terms_of_interleaved_images_and_an_image_without_tokens():
    """The terms do not assume each image's tokens contiguous, and an image with no tokens left changes
    nothing for the others (its mean query divides by one row, not zero)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(10, 2, 4, generator=g) for _ in range(3))
    image = torch.tensor([0, 2, 0, 2, 2, 0, 0, 2, 0, 2])
    score, a = relation_terms(q, k, v, image, torch.tensor([5, 0, 5]), 0.7)
    for i in (0, 2):
        rows = image == i
        alone_score, alone_a = relation_terms(
            q[rows], k[rows], v[rows], torch.zeros(int(rows.sum()), dtype=torch.long), torch.tensor([5]), 0.7
        )
        torch.testing.assert_close(a[rows], alone_a)
        torch.testing.assert_close(score[rows], alone_score)
    assert torch.isfinite(score).all() and torch.isfinite(a).all()


def test_relation_terms_count_only_the_tokens_taking_part():
    """Pruned tokens still in the sequence (`taking_part` False) score 0 and change nothing for the others,
    however large their keys: the terms equal those of the sequence without them."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(12, 2, 4, generator=g) for _ in range(3))
    image = torch.tensor([0] * 7 + [1] * 5)
    taking_part = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    k[~taking_part] *= 1e4  # their logits would dominate every softmax (and overflow exp) if counted
    counts = torch.tensor([5, 4])
    score, a = relation_terms(q, k, v, image, counts, 0.7, taking_part)
    alone = (q[taking_part], k[taking_part], v[taking_part], image[taking_part])
    alone_score, alone_a = relation_terms(*alone, counts, 0.7)
    torch.testing.assert_close(a[taking_part], alone_a)
    torch.testing.assert_close(score[taking_part], alone_score)
    assert a[~taking_part].eq(0).all() and score[~taking_part].eq(0).all()
    # q and k as a masked Qwen-VL block records them (widened by the key bias of the same mask): the same terms
    from visprune.models.qwen_tower import KEY_BIAS, widen

    wide_q, wide_k = widen(q, k, torch.where(taking_part, 0.0, KEY_BIAS))
    for x, y in zip(relation_terms(wide_q, wide_k, v, image, counts, 0.7, taking_part), (score, a), strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relation_terms_of_half_precision_cuda_inputs_match_their_float32_values(dtype):
    """The GPU path (the mean queries on the tensor cores, the keys and values read in their own dtype by
    `flowcut_keys`' kernel) against the float32 computation of the same values."""
    g = torch.Generator().manual_seed(3)
    # q, k, v as a block's projection gives them: strided views of one [T, 3, H, d] tensor
    q, k, v = torch.randn(4096, 3, 16, 80, generator=g).to(dtype).cuda().unbind(1)
    image = torch.arange(4096, device="cuda") // 1024
    counts = torch.full((4,), 1024, device="cuda")
    score, a = relation_terms(q, k, v, image, counts, 80**-0.5)
    want_score, want_a = relation_terms(*(x.cpu().float() for x in (q, k, v)), image.cpu(), counts.cpu(), 80**-0.5)
    torch.testing.assert_close(a.cpu(), want_a, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(score.cpu(), want_score, rtol=1e-5, atol=1e-9)


def reference_count(attention: list[float], target: int, remaining: int) -> int:
    n = len(attention)
    if remaining == 0:
        return target
    total = sum(attention)
    p = [x / total for x in attention]
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    rho = entropy / math.log(n)
    pruned = round((n - target) / math.sqrt(remaining) * (1 - rho**2))  # Python's round: halves to even
    return max(n - pruned, target)


@pytest.mark.parametrize("remaining", [0, 2, 4, 20])
def test_prune_counts_match_the_formula_per_image(remaining):
    g = torch.Generator().manual_seed(remaining)
    peaked = torch.rand(40, generator=g) ** 8
    flat = torch.full((40,), 0.025)
    sparse = torch.zeros(40).index_fill_(0, torch.tensor([3, 7]), 0.5)
    attention = torch.stack([peaked, flat, sparse, peaked])
    valid = torch.ones(4, 40, dtype=torch.bool)
    valid[3, 30:] = False  # an image that kept 30 patches so far
    got = prune_counts(attention, valid, 8, remaining)
    for b in range(4):
        want = reference_count(attention[b][valid[b]].tolist(), 8, remaining)
        assert int(got[b]) == want, (b, remaining)
    assert int(got[1]) == (8 if remaining == 0 else 40)  # uniform attention: entropy ln N, nothing pruned
    targets = torch.tensor([8, 3, 40, 30])  # one per image (Qwen-VL: images smaller than the budget keep all)
    got = prune_counts(attention, valid, targets, remaining)
    for b in range(4):
        want = reference_count(attention[b][valid[b]].tolist(), int(targets[b]), remaining)
        assert int(got[b]) == want, (b, remaining)
    assert got[2:].tolist() == [40, 30]
    if remaining:  # sqrt(r) as a 0-d tensor, as the Qwen-VL tower's compiled pruning points pass it
        root = torch.tensor(math.sqrt(remaining))
        assert torch.equal(prune_counts(attention, valid, targets, root), got)


def test_keep_top_keeps_the_highest_flow_in_position_order_with_padding():
    flow = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.0], [0.3, 0.2, 0.1, 0.7, 0.6]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    positions, kept = keep_top(flow, valid, torch.tensor([3, 2]))
    assert positions.tolist() == [[1, 2, 3], [0, 3, 3]]  # ties to the lower position; padding repeats the last
    assert kept.tolist() == [[True, True, True], [True, True, False]]


def test_top_mask_marks_the_tokens_keep_top_keeps():
    flow = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.0], [0.3, 0.2, 0.1, 0.7, 0.6], [0.4, 0.4, 0.4, 0.4, 0.4]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False], [False, True, True, True, True]])
    counts = torch.tensor([3, 2, 2])
    marked = top_mask(flow, valid, counts)
    assert marked.tolist() == [
        [False, True, True, True, False],  # 0.5 and 0.5 tie: both fit
        [True, False, False, True, False],  # the invalid 0.6 never counts
        [False, True, True, False, False],  # equal flows: the lower positions
    ]
    positions, kept = keep_top(flow, valid, counts)
    for row, pos, k in zip(marked, positions, kept, strict=True):
        assert row.nonzero().squeeze(1).tolist() == pos[k].tolist()


def test_registered_spec_and_method_output():
    spec = get_method("flowcut")
    assert spec.placement is Placement.ENCODER and not spec.adaptive and spec.published_attention == "vision"
    assert spec.defaults == {"budget": 64}
    assert spec.signals(spec.options(budget=32)) == {"kept": SignalRequest("flowcut", keep=32)}
    features = torch.randn(2, 3, 4)
    kept = torch.tensor([[0, 5, 8], [2, 3, 4]])
    out = flowcut(features, kept=kept, grid=(3, 3), budget=3)
    for r, f, k in zip(out, features, kept, strict=True):
        assert torch.equal(r.features, f) and torch.equal(r.sources, k)
        assert r.assignment.shape == (9,) and torch.equal(r.assignment[k], torch.arange(3))
        assert int((r.assignment == -1).sum()) == 6


def test_method_errors():
    features = torch.randn(2, 3, 4)
    kept = torch.tensor([[0, 5, 8], [2, 3, 4]])
    with pytest.raises(InputError, match="budget=4"):
        flowcut(features, kept=kept, grid=(3, 3), budget=4)
    with pytest.raises(InputError, match="ascending patch indices"):
        flowcut(features, kept=kept.flip(1), grid=(3, 3), budget=3)
    with pytest.raises(InputError, match="pass grid"):
        flowcut(features, kept=kept, budget=3)
    with pytest.raises(InputError, match="kept must have shape"):
        flowcut(features, kept=kept[:1], grid=(3, 3), budget=3)
    with pytest.raises(InputError, match=r"as torch\.long; got torch\.int32"):
        flowcut(features, kept=kept.int(), grid=(3, 3), budget=3)


def test_kept_indices_are_checked_at_the_callers_verify_inside_deferred_checks():
    """Inside `deferred_device_checks` (the patched model's path, so that the host need not wait for the tower)
    indices out of range are recorded, not read: the call returns without an index error, and `verify` raises
    the same InputError."""
    features, kept = torch.randn(2, 3, 4), torch.tensor([[0, 5, 9], [2, 3, 4]])
    checks = DeviceChecks()
    with deferred_device_checks(checks):
        flowcut(features, kept=kept, grid=(3, 3), budget=3)
    with pytest.raises(InputError, match=r"ascending patch indices in \[0, 9\)"):
        checks.verify()
    with pytest.raises(InputError, match="budget must be"):
        get_method("flowcut").options(budget=0)


def test_flow_terms_are_the_formula():
    """flow_terms against the formula from q, k, v: patches that are not valid (anywhere, as a cut in the
    tower leaves them) are out of both softmaxes and score 0."""
    g = torch.Generator().manual_seed(3)
    b, h, n, d = 3, 3, 7, 4
    q, k, v = (torch.randn(b, h, t, d, generator=g) for t in (1, n + 1, n + 1))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 5:] = False
    valid[2, [0, 3, 4]] = False
    score, a = flow_terms(q, k, v, valid, 0.5)
    for i in range(b):
        keep = torch.cat([torch.tensor([True]), valid[i]])
        att = ((q[i] @ k[i][:, keep].transpose(-1, -2)) * 0.5).softmax(-1)[:, 0, 1:].mean(0)
        sem = (v[i][:, :1] @ v[i][:, keep].transpose(-1, -2)).softmax(-1)[:, 0, 1:].mean(0)
        norm = v[i].mean(0)[1:][valid[i]].abs().sum(-1)
        m = valid[i]
        torch.testing.assert_close(a[i, m], att, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(score[i, m], (att / att.sum() + sem / sem.sum()) * norm, rtol=1e-5, atol=1e-6)
        assert not a[i, ~m].any() and not score[i, ~m].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_flow_terms_of_half_inputs_on_the_gpu_equal_float32(dtype, split):
    """On a GPU, half inputs are multiplied without a float32 copy: the scores equal the float32 ones on the
    same values (CLIP ViT-L's shapes at batch 4), for k and v laid out [B, H, T, d] or split from one
    [B, T, H * d] projection as a layer's are."""
    g = torch.Generator().manual_seed(5)
    shape = (lambda t: (4, t, 16, 64)) if split else (lambda t: (4, 16, t, 64))
    q, k, v = (torch.randn(*shape(t), generator=g).to(dtype) for t in (1, 577, 577))
    if split:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    valid = torch.rand(4, 576, generator=g) > 0.3
    score, a = flow_terms(q.cuda(), k.cuda(), v.cuda(), valid.cuda(), 0.125)
    want_score, want_a = flow_terms(q.float(), k.float(), v.float(), valid, 0.125)
    torch.testing.assert_close(a.cpu(), want_a, rtol=1e-4, atol=1e-9)  # summation order: the products are exact
    torch.testing.assert_close(score.cpu(), want_score, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("pruned", [False, True])
def test_unit_terms_trace_as_one_graph_and_are_the_unit_sums_of_the_relation_terms(monkeypatch, pruned):
    """Qwen-VL's per-block terms (`unit_terms`, compiled whole on a GPU by the adapters; traced here with
    aot_eager): the per-unit sums of `relation_terms` over the patch rows, pruned units taking no part."""
    from visprune.methods import graphs

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(24, 2, 4, generator=g) for _ in range(3))
    unit_image = torch.tensor([0, 0, 1, 0, 1, 1])
    taking_part = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool) if pruned else None
    rows = None if taking_part is None else taking_part.repeat_interleave(4)
    counts = torch.tensor([2, 1]) if pruned else torch.tensor([3, 3])  # units taking part per image
    score, a = relation_terms(q, k, v, unit_image.repeat_interleave(4), counts * 4, 0.5, rows)
    monkeypatch.setattr(graphs, "FUSE_BACKEND", "aot_eager")
    monkeypatch.setattr(graphs, "_fusable", lambda args: True)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a graph break would warn and run unfused
        fused = graphs.fused(unit_terms)(q, k, v, unit_image, counts, 0.5, taking_part)
    torch._dynamo.reset()
    torch.testing.assert_close(fused[0], unit_sums(score))
    torch.testing.assert_close(fused[1], unit_sums(a))


def test_flow_terms_trace_as_one_graph_and_compute_the_same(monkeypatch):
    """The tower compiles flow_terms whole on a GPU (`graphs.fused`); traced here with aot_eager."""
    from visprune.methods import graphs

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, t, 4, generator=g) for t in (1, 8, 8))
    valid = torch.rand(2, 7, generator=g) > 0.4
    monkeypatch.setattr(graphs, "FUSE_BACKEND", "aot_eager")
    monkeypatch.setattr(graphs, "_fusable", lambda args: True)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a graph break would warn and run unfused
        fused = graphs.fused(flow_terms)(q, k, v, valid, 0.5)
    for a, b in zip(fused, flow_terms(q, k, v, valid, 0.5), strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
