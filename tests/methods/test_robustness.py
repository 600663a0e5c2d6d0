"""Properties every method must keep on awkward but finite inputs: finite outputs, and a batch that
gives each image exactly what it gets alone, also when scores or keys tie exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.methods.llm_fixtures import make_layout
from visprune.methods import Placement, get_method, list_methods
from visprune.methods.knee_point import knee_count
from visprune.methods.prumerge import normalize_weights, prumerge, prumerge_plus
from visprune.methods.text_stage import text_stage

ENCODER = [s.name for s in list_methods() if s.placement is Placement.ENCODER]
# Options that fit 16 tokens on a 4 x 4 grid; the adaptive methods run at every choice of theirs.
OPTIONS = {
    "fastervlm": [{"budget": 5}],
    "vtc-cls": [{"budget": 5}],
    "visionzip": [{"dominant": 3, "contextual": 2}, {"budget": 6}],
    "tome": [{"budget": 5}],
    "random": [{"budget": 5}],
    "pool": [{"budget": 4}],
    "divprune": [{"budget": 5}],
    "flowcut": [{"budget": 16}],  # its features are the rows the tower kept: all 16 here
    "cdpruner": [{"budget": 5}],
    "scope": [{"budget": 5}, {"budget": 7, "alpha": 0.0}, {"budget": 6, "alpha": 2.5}],
    "vispruner": [{"budget": 5}, {"budget": 7, "important_ratio": 0.0}, {"budget": 6, "important_ratio": 1.0}],
    "knee": [{"k_min": 2}, {"k_min": 1, "detector": "max-gap", "smooth": 3}, {"k_min": 1, "detector": "max-curvature"}],
    "prumerge": [
        {"weights": w, "neighbors": k, "fence": f}
        for w in ("normalized", "unnormalized")
        for k in (0, 3, 32)
        for f in ("per-image", "batch")
    ],
}
OPTIONS["prumerge+"] = OPTIONS["prumerge"]


def test_every_encoder_method_is_covered():
    assert set(OPTIONS) == set(ENCODER)


def scores_of(kind: str, b: int, n: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    """[B, N] finite scores of one awkward kind."""
    if kind == "equal":
        return torch.full((b, n), scale)
    if kind == "zero":
        return torch.zeros(b, n)
    if kind == "signed":
        return torch.randn(b, n, generator=gen) * scale
    if kind == "negative-equal":
        return torch.full((b, n), -scale)
    if kind == "ties":
        return torch.randint(-2, 3, (b, n), generator=gen).float() * scale
    if kind == "one-hot":
        return torch.zeros(b, n).index_fill_(1, torch.tensor([n // 2]), scale)
    return torch.rand(b, n, generator=gen).softmax(dim=1)


def inputs_for(name: str, options: dict, features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor) -> dict:
    """The signals `name` requests, built from the given scores and keys."""
    spec = get_method(name)
    kwargs = {}
    for arg, req in spec.signals(spec.bind(options, llm_layers=None, vision_layers=24)).items():
        if req.kind in ("cls_attn", "cls_cosine"):  # [B, N] scores of either kind
            kwargs[arg] = scores
        elif req.kind == "keys":
            kwargs[arg] = keys
        elif req.kind == "projected":
            kwargs[arg] = keys  # any [B, N, D] rows: zero and equal ones included
        elif req.kind == "prompt":
            kwargs[arg] = keys[:, 0]  # any [B, D] vector: zero included
        elif req.kind == "flowcut":
            kwargs[arg] = torch.arange(features.shape[1]).expand(features.shape[0], -1)
        elif req.kind == "cls_feature":
            kwargs[arg] = features[:, 0]  # any [B, C] row
        else:  # cls_attn_layers: the same row at every layer, with a sign flip to mix things up
            rows = [scores * (-1) ** i for i in range(len(req.layers))]
            kwargs[arg] = torch.stack(rows, dim=1)
    return kwargs


@pytest.mark.parametrize("name", ENCODER)
@settings(max_examples=30, deadline=None)
@given(
    choice=st.integers(0, 11),
    kind=st.sampled_from(["equal", "zero", "signed", "negative-equal", "ties", "one-hot", "softmax"]),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3]),
    keys_kind=st.sampled_from(["random", "zero", "equal"]),
    b=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_finite_inputs_give_finite_outputs(name, choice, kind, scale, keys_kind, b, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 16
    options = OPTIONS[name][choice % len(OPTIONS[name])]
    features = torch.randn(b, n, 8, generator=gen) * 100
    keys = {
        "random": torch.randn(b, n, 8, generator=gen),
        "zero": torch.zeros(b, n, 8),
        "equal": torch.ones(b, n, 8),
    }[keys_kind]
    scores = scores_of(kind, b, n, gen, scale)
    out = get_method(name).fn(features, **inputs_for(name, options, features, scores, keys), **options)
    assert len(out) == b
    for r in out:
        assert r.count >= 1
        assert torch.isfinite(r.features).all(), (name, options, kind, scale)


@pytest.mark.parametrize("fn", [prumerge, prumerge_plus])
def test_normalized_weights_with_signed_or_equal_scores(fn):
    """The cases that divided by a zero or negative total before: all-equal negative scores and
    scores summing to zero."""
    feats = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    keys = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    signed = torch.tensor([[1.0, -1.0] * 8, [-0.5] * 16])
    for scores in (signed, torch.zeros(2, 16), -torch.ones(2, 16)):
        for r in fn(feats, cls_attn=scores, keys=keys, weights="normalized", neighbors=4):
            assert torch.isfinite(r.features).all()


def test_normalize_weights():
    w = torch.tensor([[0.2, 0.6, 0.2], [0.0, 0.0, 0.0], [1.0, -1.0, 2.0], [5.0, 5.0, 5.0]])
    members = torch.ones_like(w, dtype=torch.bool)
    got = normalize_weights(w, members)
    assert torch.allclose(got[0], w[0])  # probabilities: the plain weighted average
    assert torch.allclose(got[1], torch.full((3,), 1 / 3))  # all zero: the plain mean
    assert torch.allclose(got[2], torch.tensor([0.25, -0.25, 0.5]))  # |w| total 4
    assert torch.allclose(got[3], torch.full((3,), 1 / 3))
    some = torch.tensor([[True, False, True]])
    assert torch.equal(normalize_weights(torch.zeros(1, 3), some), torch.tensor([[0.5, 0.0, 0.5]]))
    assert torch.equal(normalize_weights(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 3))


def tied_prumerge_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores from {0, 0.1, 0.2} with a few outliers (a different count per image, so the batch's
    widest kept set differs from each image's), keys from 3 directions scaled by 1 or 2 (exact ties
    in cosine similarity)."""
    g = torch.Generator().manual_seed(seed)
    b, n = 3, 36
    feats = torch.randn(b, n, 4, generator=g)
    scores = torch.randint(0, 3, (b, n), generator=g).float() / 10
    for i in range(b):
        scores[i, : 2 * i + seed % 3] = 5.0
    base = torch.randn(b, 3, 8, generator=g)
    pick = torch.randint(0, 3, (b, n, 1), generator=g).expand(-1, -1, 8)
    keys = base.gather(1, pick) * torch.randint(1, 3, (b, n, 1), generator=g)
    return feats, scores, keys


@pytest.mark.parametrize("fn", [prumerge, prumerge_plus])
@pytest.mark.parametrize("weights", ["unnormalized", "normalized"])
def test_prumerge_batch_equals_one_by_one_with_exact_ties(fn, weights):
    for seed in range(12):
        feats, scores, keys = tied_prumerge_inputs(seed)
        batch = fn(feats, cls_attn=scores, keys=keys, weights=weights, neighbors=5)
        for i, r in enumerate(batch):
            row = slice(i, i + 1)
            one = fn(feats[row], cls_attn=scores[row], keys=keys[row], weights=weights, neighbors=5)[0]
            assert torch.equal(one.sources, r.sources), seed
            assert torch.equal(one.assignment, r.assignment), seed
            # The same merge; the weighted sums may differ in the last bit where a CPU's BLAS blocks a
            # batched product differently from a single one.
            torch.testing.assert_close(one.features, r.features, rtol=1e-6, atol=1e-6)


# Layouts (system, visual, query) per sample, left padding + `extra` padding slots, integer q/k
# (exact ties everywhere), that once gave a sample a different keep mask in the batch than alone.
TEXT_CASES = [
    (346, [(1, 3, 1), (2, 0, 6), (2, 5, 5)], "left", 0, "kneedle", False, 3),
    (422, [(0, 3, 3), (2, 4, 6), (3, 4, 6)], "right", 0, "max-gap", True, 3),
    (509, [(2, 1, 5), (3, 3, 1)], "left", 1, "max-gap", True, 3),
    (560, [(1, 3, 0), (0, 4, 4), (2, 4, 0)], "left", 2, "max-gap", True, 3),
    (1222, [(1, 2, 6), (3, 4, 0), (1, 3, 0)], "left", 2, "kneedle", True, 2),
]


def alone_layout(lay, i, sl):
    return type(lay)(*(getattr(lay, n)[i : i + 1, sl] for n in ("attention_mask", "visual", "query", "system")))


@pytest.mark.parametrize(("seed", "specs", "side", "extra", "detector", "prune_text", "smooth"), TEXT_CASES)
def test_text_stage_batch_equals_one_by_one_with_exact_ties(seed, specs, side, extra, detector, prune_text, smooth):
    lay = make_layout(specs, side, extra)
    g = torch.Generator().manual_seed(seed)
    b, s = lay.attention_mask.shape
    q = torch.randint(-1, 2, (b, 2, s, 4), generator=g).float()
    k = torch.randint(-1, 2, (b, 2, s, 4), generator=g).float()
    opts = {"text_detector": detector, "prune_text": prune_text, "text_smooth": smooth}
    got = text_stage(q=q, k=k, layout=lay, **opts)
    for i, (a, v, c) in enumerate(specs):
        o = s - (a + v + c) if side == "left" else 0
        sl = slice(o, o + a + v + c)
        one = text_stage(q=q[i : i + 1, :, sl], k=k[i : i + 1, :, sl], layout=alone_layout(lay, i, sl), **opts)
        assert torch.equal(one[0], got[i, sl]), i


@pytest.mark.parametrize("detector", ["kneedle", "max-gap", "max-curvature"])
def test_knee_of_a_straight_line_is_its_first_point(detector):
    """Every point of a straight line (or of a 3-point curve smoothed with window 3) ties; in float32
    the criterion differs by rounding only, and the first point must win whatever the rounding."""
    g = torch.Generator().manual_seed(0)
    n = torch.randint(3, 12, (1,), generator=g).item()
    top = torch.rand(300, 1, generator=g) * 10
    step = torch.rand(300, 1, generator=g) * 0.1 + 1e-3
    line = top - step * torch.arange(n)
    expect = 2 if detector == "max-curvature" else 1
    assert knee_count(line, detector).tolist() == [expect] * 300
    three = torch.rand(300, 3, generator=g).sort(dim=1, descending=True).values
    assert knee_count(three, detector, smooth=3).tolist() == [expect] * 300


def test_deferred_device_checks_raise_at_verify_and_only_then():
    """Inside `deferred_device_checks` a method's NaN input is recorded, not read (the patched model reads it
    after its host work); `verify` raises the same error the immediate check does, naming the input."""
    from visprune.errors import InputError
    from visprune.methods.checks import DeviceChecks, deferred_device_checks

    features = torch.randn(2, 16, 8)
    scores = torch.rand(2, 16)
    scores[1, 3] = float("nan")
    fn = get_method("fastervlm").fn
    with pytest.raises(InputError, match="cls_attn contains NaN or inf"):
        fn(features, grid=(4, 4), cls_attn=scores, budget=5)
    checks = DeviceChecks()
    with deferred_device_checks(checks):
        fn(features, grid=(4, 4), cls_attn=scores, budget=5)  # recorded, not raised
    fn(features, grid=(4, 4), cls_attn=torch.rand(2, 16), budget=5)  # outside the block: checked at once
    with pytest.raises(InputError, match="cls_attn contains NaN or inf"):
        checks.verify()
    checks.verify()  # read once: nothing left to raise


def test_staged_device_checks_raise_at_verify_and_only_then():
    """`stage` starts the checks' copy to the host and leaves them for `verify`, which raises for them (and for
    checks recorded after the stage) once; what is staged is not lost to later records."""
    from visprune.errors import InputError
    from visprune.methods.checks import DeviceChecks

    checks = DeviceChecks()
    checks.add("features contains NaN or inf", torch.tensor(True))
    checks.add("cls_attn contains NaN or inf", torch.tensor(False))
    checks.stage()  # nothing raised yet
    assert len(checks) == 0  # staged checks are no longer recorded ones (a graph's take_since cannot take them)
    checks.add("keys contains NaN or inf", torch.tensor(True))
    with pytest.raises(InputError, match="cls_attn contains NaN or inf"):
        checks.verify()
    checks.verify()  # read once: nothing left to raise
    checks.add("keys contains NaN or inf", torch.tensor(False))
    checks.stage()
    checks.stage()  # nothing more to stage
    with pytest.raises(InputError, match="keys contains NaN or inf"):
        checks.verify()
