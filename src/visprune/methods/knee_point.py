"""Knee (inflection point) detection on descending score curves, batched.

Used by the `knee` method (cut the sorted CLS-attention curve) and by the text stage of `knee+text`
(cut the sorted text-relevance curve). All detectors return how many of the top scores to keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.checks import check_choice

DETECTORS = ("kneedle", "max-gap", "max-curvature")
# Criterion values closer to the maximum than TIES times the curve's magnitude (64 float32 ulps)
# are ties: they are below what float32 scores resolve, and the same curve computed in a batch or
# alone, with other padding, may differ there. Ties go to the first (smallest) count.
TIES = 64 * torch.finfo(torch.float32).eps


def first_max(values: Tensor, tolerance: Tensor) -> Tensor:
    """[B] long: the first index of each row of `values` [B, N] within `tolerance` [B, 1] of its max."""
    near = values >= values.amax(dim=1, keepdim=True) - tolerance
    return (near.long().cumsum(dim=1) == 0).sum(dim=1)


def _smooth(curve: Tensor, window: int) -> Tensor:
    """Moving average along the last dim with replicate padding; window <= 1 returns the curve."""
    if window <= 1:
        return curve
    left = (window - 1) // 2
    padded = F.pad(curve.unsqueeze(1), (left, window - 1 - left), mode="replicate")
    return F.avg_pool1d(padded, window, stride=1).squeeze(1)


def knee_count(
    sorted_scores: Tensor,
    detector: str = "kneedle",
    smooth: int = 1,
    valid: Tensor | None = None,
) -> Tensor:
    """Number of top scores before the knee of each descending curve: [B] long, each in [1, n_b].

    sorted_scores: [B, N] sorted descending along dim 1. valid: optional [B] long, the number of real
    entries per row (the rest is padding at the end); defaults to N for every row.
    Detectors (x normalised to [0, 1] over the valid length, y min-max normalised):
      kneedle       argmax_i (1 - x_i - y_i): the point farthest below the chord of the curve;
                    keeps i + 1 scores. A flat curve (s_1 == s_N) keeps 1.
      max-gap       the largest drop s_i - s_{i+1}; keeps the i + 1 scores above the drop.
      max-curvature the largest discrete second difference s_{i-1} - 2 s_i + s_{i+1}; keeps i + 1.
    smooth: moving-average window applied to the curve first (1 = none).
    Ties: criterion values within TIES x max(|s_1|, |s_n|) of the best (in score units; for kneedle
    divided by s_1 - s_n) count as equal and the smallest count wins, so rounding noise in the
    scores (e.g. a batch and a lone sample padded differently) cannot move the knee.
    """
    check_choice(detector, "detector", DETECTORS)
    if sorted_scores.dim() != 2:
        raise InputError(f"sorted_scores must be [B, N], got shape {tuple(sorted_scores.shape)}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise InputError(f"smooth must be an int window >= 1, got {smooth!r}")
    s = _smooth(sorted_scores.float(), smooth)
    b, n = s.shape
    idx = torch.arange(n, device=s.device)
    if valid is None:
        valid = torch.full((b,), n, dtype=torch.long, device=s.device)
    inside = idx.unsqueeze(0) < valid.unsqueeze(1)  # [B, N]
    neg_inf = torch.finfo(s.dtype).min
    top = s[:, :1]
    bottom = s.gather(1, (valid - 1).clamp(min=0).unsqueeze(1))
    noise = TIES * torch.maximum(top.abs(), bottom.abs())  # [B, 1], in score units
    if detector == "kneedle":
        span = (top - bottom).clamp(min=torch.finfo(s.dtype).tiny)
        y = (s - bottom) / span
        x = idx.unsqueeze(0) / (valid - 1).clamp(min=1).unsqueeze(1)
        diff = torch.where(inside, 1.0 - x - y, neg_inf)
        return first_max(diff, noise / span + TIES) + 1
    if detector == "max-gap":
        gaps = s[:, :-1] - s[:, 1:]
        ok = inside[:, 1:]
        gaps = torch.where(ok, gaps, neg_inf)
        count = first_max(gaps, noise) + 1 if n > 1 else torch.ones(b, dtype=torch.long, device=s.device)
        return torch.minimum(count, valid.clamp(min=1))
    second = s[:, :-2] - 2 * s[:, 1:-1] + s[:, 2:]  # centred at i = 1 .. N-2
    ok = inside[:, 2:]
    second = torch.where(ok, second, neg_inf)
    if n < 3:
        return valid.clamp(min=1, max=1)
    count = first_max(second, noise) + 2  # centre index i = argmax + 1, keep i + 1
    return torch.where(valid < 3, 1, torch.minimum(count, valid.clamp(min=1)))
