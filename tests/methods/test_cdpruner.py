"""CDPruner: greedy MAP of the conditional DPP against a brute-force log-det greedy, relevance to the
prompt, batch == alone, duplicates, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visprune.errors import InputError
from visprune.methods.cdpruner import cdpruner, conditional_kernel, greedy_map


def _greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """The greedy MAP definition: each step adds the token that maximises det of the selected submatrix."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_det = None, None
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor([*chosen, j])
            det = float(torch.linalg.det(kernel[idx][:, idx].double()))
            if best_det is None or det > best_det + 1e-12:
                best, best_det = j, det
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_map_is_the_log_det_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    projected, prompt = torch.randn(2, 9, 5, generator=g), torch.randn(2, 5, generator=g)
    kernel = conditional_kernel(projected, prompt)
    ours = greedy_map(kernel, 4)
    for i in range(2):
        assert ours[i].tolist() == _greedy_logdet(kernel[i], 4)


def test_kernel_is_relevance_weighted_similarity():
    g = torch.Generator().manual_seed(3)
    projected, prompt = torch.randn(1, 6, 4, generator=g), torch.randn(1, 4, generator=g)
    unit = F.normalize(projected, dim=-1)
    r = unit[0] @ F.normalize(prompt[0], dim=0)
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    expected = r[:, None] * (unit[0] @ unit[0].T) * r[None, :]
    torch.testing.assert_close(conditional_kernel(projected, prompt)[0], expected)


def test_one_token_is_the_most_relevant_one():
    """With a budget of one the kernel's diagonal r_i^2 decides: the token closest to the prompt."""
    g = torch.Generator().manual_seed(4)
    prompt = torch.randn(1, 8, generator=g)
    projected = torch.randn(1, 12, 8, generator=g)
    projected[0, 7] = 3 * prompt[0] + 0.1 * torch.randn(8, generator=g)
    out = cdpruner(torch.randn(1, 12, 3), projected=projected, prompt=prompt, budget=1)
    assert out[0].sources.tolist() == [7]


def test_no_instruction_is_diversity_alone():
    """A zero prompt makes every token equally relevant: the kernel is the plain cosine similarity."""
    projected = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(5))
    unit = F.normalize(projected, dim=-1)
    kernel = conditional_kernel(projected, torch.zeros(2, 6))
    torch.testing.assert_close(kernel, unit @ unit.transpose(1, 2))


def test_duplicates_are_not_taken_twice_and_batch_equals_alone():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(2, 3, 4, generator=g)
    projected = base.repeat(1, 3, 1)  # rank 3, nine tokens
    prompt = torch.randn(2, 4, generator=g)
    features = torch.randn(2, 9, 5, generator=g)
    batch = cdpruner(features, projected=projected, prompt=prompt, budget=6)
    for i, r in enumerate(batch):
        alone = cdpruner(features[i : i + 1], projected=projected[i : i + 1], prompt=prompt[i : i + 1], budget=6)[0]
        assert r.sources.tolist() == alone.sources.tolist()
        assert len(set(r.sources.tolist())) == 6 and r.sources.tolist() == sorted(r.sources.tolist())
        assert {s % 3 for s in r.sources.tolist()} == {0, 1, 2}  # the three distinct tokens come first
        torch.testing.assert_close(r.features, features[i, r.sources])


def test_errors():
    features, projected = torch.randn(1, 5, 3), torch.randn(1, 5, 4)
    with pytest.raises(InputError, match="prompt"):
        cdpruner(features, projected=projected, prompt=torch.randn(1, 3), budget=2)
    with pytest.raises(InputError, match="budget"):
        cdpruner(features, projected=projected, prompt=torch.randn(1, 4), budget=6)
    with pytest.raises(InputError, match="budget"):
        cdpruner(features, projected=projected, prompt=torch.randn(1, 4), budget=0)
