"""DivPrune: greedy max-min diversity in cosine distance, against a plain per-image reference."""

from __future__ import annotations

import pytest
import torch

from visprune.errors import InputError
from visprune.methods import get_method
from visprune.methods.divprune import divprune, max_min_selection


def reference(x: torch.Tensor, k: int) -> list[int]:
    """The paper's greedy max-min selection for one image, written plainly (x [N, D])."""
    n = x.shape[0]
    unit = [v / v.norm() for v in x.double()]
    dist = [[1 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda j: (min(dist[j][i] for i in range(n) if i != j), -j))
    chosen = [first]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(dist[j][i] for i in chosen), -j)))
    return chosen


@pytest.mark.parametrize("k", [1, 2, 5, 12])
def test_selection_equals_the_plain_greedy(k):
    x = torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(k))
    got = max_min_selection(x, k)
    for i in range(3):
        assert got[i].tolist() == reference(x[i], k)


def test_the_selection_is_diverse_and_kept_in_spatial_order():
    g = torch.Generator().manual_seed(0)
    # Four tight clusters of 10 tokens: four picks take one token from each cluster.
    centres = torch.eye(4, 8) * 10
    x = (centres.repeat_interleave(10, dim=0) + 0.01 * torch.randn(40, 8, generator=g)).unsqueeze(0)
    features = torch.randn(1, 40, 3, generator=g)
    (r,) = divprune(features, projected=x, budget=4)
    assert sorted(int(s) // 10 for s in r.sources) == [0, 1, 2, 3]
    assert r.sources.tolist() == sorted(r.sources.tolist())
    torch.testing.assert_close(r.features, features[0, r.sources])
    assert int((r.assignment >= 0).sum()) == 4


def test_batch_equals_alone_identical_tokens_and_errors():
    g = torch.Generator().manual_seed(1)
    x, f = torch.randn(3, 20, 5, generator=g), torch.randn(3, 20, 4, generator=g)
    batch = divprune(f, projected=x, budget=6)
    for i in range(3):
        (alone,) = divprune(f[i : i + 1], projected=x[i : i + 1], budget=6)
        assert torch.equal(batch[i].sources, alone.sources)
    same = torch.ones(1, 8, 4)  # all tokens identical: still 5 distinct tokens, lowest indices first
    (r,) = divprune(torch.randn(1, 8, 2, generator=g), projected=same, budget=5)
    assert r.sources.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="budget"):
        divprune(f, projected=x, budget=21)
    with pytest.raises(InputError, match="projected"):
        divprune(f, projected=x[:, :5], budget=2)
    assert get_method("divprune").signals({"budget": 4})["projected"].kind == "projected"
