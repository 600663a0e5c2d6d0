"""The honest floor: a seeded uniform random subset, and 2-D average pooling of the token grid.

Neither needs a signal from the model. Every scored method should beat both at the same budget.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import Placement, Reduction, select_tokens
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import check_budget, check_budgeted_features, check_count, check_features, check_grid
from visprune.methods.registry import register


def check_random(*, budget: Any, seed: Any) -> None:
    """random's options: budget >= 1 (<= N is checked on the features) and an int seed."""
    check_count(budget, "budget")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")


def check_pool(*, budget: Any, output_grid: Any) -> None:
    """pool's options: budget >= 1 and output_grid None or a pair of positive ints."""
    check_count(budget, "budget")
    if output_grid is not None and (
        not isinstance(output_grid, (tuple, list))
        or len(output_grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in output_grid)
    ):
        raise InputError(f"output_grid must be a pair of positive ints (h', w'), got {output_grid!r}")


@register(
    "random",
    description="Uniform random subset of K patch tokens (seeded, identical on every device); a floor to beat.",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {},
    check=check_random,
    budget_rule=TOKENS,
)
def random_subset(
    features: Tensor,
    *,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
    seed: int = 0,
) -> list[Reduction]:
    """Keep a uniformly random subset of `budget` tokens per image, in spatial order.

    The subset comes from a CPU torch.Generator seeded with `seed`: it draws N float64 uniforms and
    keeps the tokens of the `budget` smallest draws (ties, which have probability ~0, go to the lower
    index). Every image of a batch gets the SAME subset, so an image's result never depends on its
    batch-mates or its position in the batch (batched == one by one), and it is deterministic and
    identical on CPU and CUDA. Vary `seed` for independent draws. The grid is only validated.

    Options:
        budget: number of tokens kept per image (default 64), 1 <= budget <= N.
        seed: seed of the CPU generator (default 0); a different seed gives different subsets.
    """
    check_random(budget=budget, seed=seed)
    b, n, k = check_budgeted_features(features, grid, budget)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.rand(1, n, generator=gen, dtype=torch.float64)
    idx = draws.sort(dim=1, stable=True).indices[:, :k].expand(b, k)
    return select_tokens(features, idx.to(features.device, non_blocking=True))


def pool_grid(grid: tuple[int, int], budget: int) -> tuple[int, int]:
    """The output grid (h', w') of `pool`: h' * w' == budget, h' <= h, w' <= w, with aspect ratio
    h'/w' closest to h/w in log space; ties go to the smaller h' (the wider grid)."""
    h, w = grid
    best = None
    for hp in range(1, budget + 1):
        if budget % hp:
            continue
        wp = budget // hp
        if hp > h or wp > w:
            continue
        # |log((h'/w') / (h/w))| compared exactly as the rational max/min of h' w and h w'.
        key = (Fraction(max(hp * w, h * wp), min(hp * w, h * wp)), hp)
        if best is None or key < best[0]:
            best = (key, (hp, wp))
    if best is None:
        raise InputError(
            f"budget={budget} cannot be laid out as an h' x w' grid inside the {h}x{w} token grid "
            "(every factorisation is too tall or too wide); choose a budget with a fitting factorisation "
            "(e.g. a product of two numbers <= the grid sides) or pass output_grid"
        )
    return best[1]


def _axis_cells(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Along one axis: the cell of every input position, floor(y n_out / n_in), [n_in]; and the middle
    position of each cell's positions [ceil(i n_in / n_out), ceil((i + 1) n_in / n_out)), lower one
    for an even count, [n_out]."""
    i = torch.arange(n_out, device=device)
    lo = (i * n_in + n_out - 1) // n_out
    hi = ((i + 1) * n_in + n_out - 1) // n_out
    return torch.arange(n_in, device=device) * n_out // n_in, (lo + hi - 1) // 2


@register(
    "pool",
    description="2-D adaptive average pooling of the token grid to an h' x w' grid with h' * w' = K.",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {},
    check=check_pool,
    budget_rule=TOKENS,
)
def pool(
    features: Tensor,
    *,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
    output_grid: tuple[int, int] | None = None,
) -> list[Reduction]:
    """Average-pool the (h, w) token grid to an (h', w') grid: K = h' * w' tokens per image.

    The output grid is the factorisation of `budget` whose aspect ratio is closest to the grid's
    (log-ratio distance; ties go to the smaller h'), and must fit inside the grid; a budget with no
    fitting factorisation (e.g. a prime larger than both sides) is refused. Pooling regions are those
    of torch.nn.functional.adaptive_avg_pool2d (cell i of an axis covers [floor(i n/o), ceil((i+1) n/o))),
    so when the grid divides evenly they are disjoint blocks and otherwise neighbouring cells may
    share a row or column. Means are computed in float32 and cast back to the features' dtype.
    Output cells are row-major, which is spatial order. assignment[t] is the cell (floor(y h'/h),
    floor(x w'/w)) of token t at row y, column x: a partition of the grid, each token inside its
    cell's pooling region (a token covered by two overlapping regions goes to the first). sources[j]
    is the assigned token nearest to the centre of cell j's assigned tokens (per axis the middle one,
    the lower of two), so assignment[sources[j]] == j; when the grid divides evenly this is the token
    nearest to the pooling block's centre. grid=None infers a square grid.

    Options:
        budget: number of output tokens (default 64); must factor as h' * w' with h' <= h, w' <= w.
        output_grid: (h', w') to pool to instead of deriving it from budget (default None); when
            given it overrides budget and the output has h' * w' tokens.
    """
    check_pool(budget=budget, output_grid=output_grid)
    b, n, c = check_features(features)
    h, w = check_grid(grid, n)
    if output_grid is None:
        hp, wp = pool_grid((h, w), check_budget(budget, n))
    else:
        hp, wp = output_grid
        if hp > h or wp > w:
            raise InputError(f"output_grid {hp}x{wp} does not fit inside the {h}x{w} token grid")
    dev = features.device
    x = features.float().transpose(1, 2).reshape(b, c, h, w)
    pooled = F.adaptive_avg_pool2d(x, (hp, wp)).reshape(b, c, hp * wp).transpose(1, 2).to(features.dtype)

    ys, rows = _axis_cells(h, hp, dev)
    xs, cols = _axis_cells(w, wp, dev)
    sources = (rows.unsqueeze(1) * w + cols.unsqueeze(0)).reshape(-1)
    assignment = (ys.unsqueeze(1) * wp + xs.unsqueeze(0)).reshape(-1)
    return [Reduction(features=f, sources=sources.clone(), assignment=assignment.clone()) for f in pooled.unbind(0)]
