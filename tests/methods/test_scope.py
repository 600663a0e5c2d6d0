"""SCOPE: greedy saliency x coverage-gain selection against a plain per-image reference."""

from __future__ import annotations

import pytest
import torch

from visprune.errors import InputError
from visprune.methods.scope import scope
from visprune.methods.similarity import pairwise_cosine


def reference(features: torch.Tensor, saliency: torch.Tensor, k: int, sim: torch.Tensor | None = None) -> list[int]:
    """The procedure for one image with Python loops: coverage gains summed over every token (`sim`: the
    similarity to use, by default the cosine computed here)."""
    n = features.shape[0]
    if sim is None:
        unit = features / features.norm(dim=-1, keepdim=True)
        sim = unit @ unit.T
    coverage = [0.0] * n
    chosen: list[int] = []
    for _ in range(k):
        best, best_score = None, None
        for i in range(n):
            if i in chosen:
                continue
            gain = sum(max(0.0, float(sim[j, i]) - coverage[j]) for j in range(n))
            score = gain * float(saliency[i])
            if best_score is None or score > best_score:
                best, best_score = i, score
        chosen.append(best)
        coverage = [max(c, float(sim[j, best])) for j, c in enumerate(coverage)]
    return sorted(chosen)


@pytest.mark.parametrize(("n", "k", "alpha"), [(20, 5, 1.0), (17, 8, 0.0), (12, 12, 2.0)])
def test_selection_equals_the_plain_procedure(n, k, alpha):
    g = torch.Generator().manual_seed(n)
    features, attn = torch.randn(2, n, 6, generator=g, dtype=torch.float64), torch.rand(2, n, generator=g)
    out = scope(features.float(), cls_attn=attn, budget=k, alpha=alpha)
    for i, r in enumerate(out):
        assert r.sources.tolist() == reference(features[i], attn[i] ** alpha, k)
        torch.testing.assert_close(r.features, features[i, r.sources].float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_features_select_by_their_similarity_held_in_their_dtype(dtype, monkeypatch):
    """Half-precision features: the similarity is rounded once to their dtype (as the official code holds
    it; each step reads half the bytes), then the greedy procedure runs in float32 on those values."""
    from visprune.methods import scope as module

    read = []
    step = module._coverage_step
    monkeypatch.setattr(
        module, "_coverage_step", lambda sim, sim_t, *a: read.append((sim.dtype, sim_t.dtype)) or step(sim, sim_t, *a)
    )
    g = torch.Generator().manual_seed(7)
    features, attn = torch.randn(2, 20, 6, generator=g).to(dtype), torch.rand(2, 20, generator=g)
    out = scope(features, cls_attn=attn, budget=6)
    assert read == [(dtype, dtype)] * 6
    for i, r in enumerate(out):
        sim = pairwise_cosine(features[i : i + 1])[0].to(dtype).double()
        assert r.sources.tolist() == reference(features[i], attn[i], 6, sim)
        assert r.features.dtype == dtype


def test_a_covered_region_is_not_taken_twice():
    """Two tight clusters, one much more salient: the second pick covers the other cluster instead of
    a near-duplicate of the first pick."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    feats = torch.stack(
        [a + 0.01 * torch.randn(6, generator=g) for _ in range(4)]
        + [b + 0.01 * torch.randn(6, generator=g) for _ in range(4)]
    )
    attn = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.03, 0.03, 0.02, 0.02]])
    kept = scope(feats.unsqueeze(0), cls_attn=attn, budget=2)[0].sources.tolist()
    assert len([i for i in kept if i < 4]) == 1 and len([i for i in kept if i >= 4]) == 1


def test_errors():
    feats, attn = torch.randn(1, 5, 3), torch.rand(1, 5)
    with pytest.raises(InputError, match="alpha"):
        scope(feats, cls_attn=attn, budget=2, alpha=-1)
    with pytest.raises(InputError, match="budget"):
        scope(feats, cls_attn=attn, budget=6)
    with pytest.raises(InputError, match="cls_attn"):
        scope(feats, cls_attn=torch.rand(1, 4), budget=2)
