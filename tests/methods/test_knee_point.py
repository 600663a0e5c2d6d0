"""Knee detectors on curves whose knee is known by construction."""

import pytest
import torch

from visprune.errors import InputError
from visprune.methods.knee_point import knee_count


def step_curve(high: int, n: int) -> torch.Tensor:
    return torch.cat([torch.full((high,), 1.0), torch.full((n - high,), 0.1)]) - torch.linspace(0, 1e-3, n)


@pytest.mark.parametrize("high", [3, 10, 40])
def test_step_curve(high):
    c = step_curve(high, 100).unsqueeze(0)
    assert knee_count(c, "max-gap").item() == high
    # Kneedle and max-curvature include the knee point itself: the first token after the drop.
    assert knee_count(c, "kneedle").item() == high + 1
    assert knee_count(c, "max-curvature").item() == high + 1


def test_kneedle_matches_reference_on_exponential():
    n = 200
    s = torch.exp(-torch.linspace(0, 1, n) * 12)
    x = torch.arange(n) / (n - 1)
    y = (s - s[-1]) / (s[0] - s[-1])
    expect = int(torch.argmax(1 - x - y)) + 1
    assert knee_count(s.unsqueeze(0)).item() == expect
    assert 10 < expect < 60


def test_batch_rows_are_independent_and_valid_lengths_respected():
    a, b = step_curve(5, 50), step_curve(20, 50)
    both = knee_count(torch.stack([a, b]), "max-gap")
    assert both.tolist() == [5, 20]
    padded = torch.stack([a, torch.cat([b[:30], torch.full((20,), -5.0)])])
    got = knee_count(padded, "max-gap", valid=torch.tensor([50, 30]))
    assert got.tolist() == [5, 20]
    assert torch.all(knee_count(padded, "kneedle", valid=torch.tensor([50, 30])) <= torch.tensor([50, 30]))


def test_flat_curve_keeps_one_and_tiny_curves_work():
    assert knee_count(torch.ones(2, 7)).tolist() == [1, 1]
    for det in ("kneedle", "max-gap", "max-curvature"):
        assert knee_count(torch.tensor([[1.0]]), det).item() == 1
        assert 1 <= knee_count(torch.tensor([[1.0, 0.5]]), det).item() <= 2


def test_smoothing_changes_the_curve_but_keeps_the_step():
    c = step_curve(30, 100).unsqueeze(0)
    c[0, 29] = 0.55  # a half-way point makes two equal gaps; smoothing keeps the knee near the step
    for window in (3, 5):
        assert abs(knee_count(c, "max-gap", smooth=window).item() - 30) <= 2
        assert abs(knee_count(c, "kneedle", smooth=window).item() - 31) <= 3


def test_errors():
    with pytest.raises(InputError, match="detector"):
        knee_count(torch.ones(1, 3), "elbow")
    with pytest.raises(InputError, match=r"\[B, N\]"):
        knee_count(torch.ones(3))
    with pytest.raises(InputError, match="smooth"):
        knee_count(torch.ones(1, 3), smooth=0)


def test_max_curvature_padded_short_row_matches_unpadded():
    short = torch.tensor([[1.0, 0.2]])
    padded = torch.tensor([[1.0, 0.2, -9.0, -9.0]])
    alone = knee_count(short, "max-curvature")
    assert knee_count(padded, "max-curvature", valid=torch.tensor([2])).tolist() == alone.tolist() == [1]
