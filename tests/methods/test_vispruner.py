"""VisPruner: important tokens by score, diverse ones by rounds of near-duplicate removal; against a plain
per-image reference of the same procedure."""

from __future__ import annotations

import pytest
import torch

from visprune.errors import InputError
from visprune.methods import vispruner as vispruner_module
from visprune.methods.vispruner import vispruner


def reference(features: torch.Tensor, scores: torch.Tensor, budget: int, ratio: float) -> list[int]:
    """The procedure for one image, with lists: top important by score, then thinning rounds of 8."""
    n = features.shape[0]
    ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    important = int(budget * ratio)
    rest, keep = ranked[important:], budget - important
    unit = features / features.norm(dim=-1, keepdim=True)
    while len(rest) > keep:
        drop = min(8, len(rest) - keep)
        a, b = rest[0::2], rest[1::2]
        sim = [max((float(unit[i] @ unit[j]) for j in b), default=0.0) for i in a]
        order = sorted(range(len(a)), key=lambda p: (-sim[p], p))
        rest = [a[p] for p in order[drop:]] + b
    return sorted(ranked[:important] + rest)


@pytest.mark.parametrize("all_pairs", [True, False], ids=["all-pairs", "per-round"])
@pytest.mark.parametrize(("n", "budget", "ratio"), [(64, 16, 0.5), (50, 13, 0.75), (37, 9, 0.0), (30, 5, 1.0)])
def test_selection_equals_the_plain_procedure(n, budget, ratio, all_pairs, monkeypatch):
    """Both ways of getting the similarities (one all-pairs product, or per round for large inputs)."""
    if not all_pairs:
        monkeypatch.setattr(vispruner_module, "SIMILARITY_ELEMENTS", 0)
    g = torch.Generator().manual_seed(n)
    features, scores = torch.randn(2, n, 6, generator=g), torch.rand(2, n, generator=g)
    out = vispruner(features, cls_attn=scores, budget=budget, important_ratio=ratio)
    for i, r in enumerate(out):
        assert r.sources.tolist() == reference(features[i], scores[i], budget, ratio)
        assert r.count == budget
        torch.testing.assert_close(r.features, features[i, r.sources])


def test_duplicates_are_removed_before_distinct_tokens():
    # 8 important tokens score high; among the rest, 20 near-copies of one token and 4 distinct ones.
    g = torch.Generator().manual_seed(0)
    distinct = torch.eye(6)[1:5] * 3
    dup = torch.eye(6)[5].repeat(20, 1) + 1e-3 * torch.randn(20, 6, generator=g)
    features = torch.cat([torch.randn(8, 6, generator=g), dup, distinct]).unsqueeze(0)
    scores = torch.cat([torch.full((8,), 10.0), torch.linspace(1, 0.5, 24)]).unsqueeze(0)
    (r,) = vispruner(features, cls_attn=scores, budget=14, important_ratio=8 / 14)
    kept = set(r.sources.tolist())
    assert set(range(8)) <= kept  # the important tokens
    # By score alone the 6 other slots would all go to duplicates (they score higher than the distinct
    # tokens); the thinning rounds trade duplicates for distinct tokens.
    assert len(kept & set(range(28, 32))) >= 2 and len(kept & set(range(8, 28))) <= 4


def test_errors():
    f, s = torch.randn(1, 16, 4), torch.rand(1, 16)
    with pytest.raises(InputError, match="budget"):
        vispruner(f, cls_attn=s, budget=17)
    with pytest.raises(InputError, match="important_ratio"):
        vispruner(f, cls_attn=s, budget=4, important_ratio=2)


def test_descending_rank_is_the_position_in_a_stable_descending_sort():
    """Equal values (many here, +0.0 and -0.0 among them) go in the order of their positions; the GPU's
    way (counting by comparisons) and the CPU's (a stable sort) agree."""
    from visprune.methods.vispruner import _compared_rank, descending_rank

    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (5, 33), generator=g).float() - 1.5
    values[0, :6] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, 1.0])
    for rank in (descending_rank(values), _compared_rank(values)):
        for row, got in zip(values.tolist(), rank.tolist(), strict=True):
            order = sorted(range(len(row)), key=lambda p, row=row: (-row[p], p))
            assert got == [order.index(p) for p in range(len(row))]


def test_the_thinning_rounds_give_the_same_list_with_either_rank(monkeypatch):
    """The rounds put the list together from ranks; with the comparison ranks (the GPU's) the selection is
    the one the reference procedure gives."""
    from visprune.methods.vispruner import _compared_rank

    monkeypatch.setattr(vispruner_module, "descending_rank", _compared_rank)
    g = torch.Generator().manual_seed(3)
    features, scores = torch.randn(3, 61, 6, generator=g), torch.rand(3, 61, generator=g)
    for i, r in enumerate(vispruner(features, cls_attn=scores, budget=14, important_ratio=0.25)):
        assert r.sources.tolist() == reference(features[i], scores[i], 14, 0.25)
