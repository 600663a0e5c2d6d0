"""The stage-3 reduced-sequence augmentation: which rows a reduced step keeps."""

from __future__ import annotations

import torch

from visprune.train.data import N_PATCHES
from visprune.train.tiny import TrainArgs, _reduced_rows


def _patch(batch: int, content: list[list[int]]) -> torch.Tensor:
    """[B, N, 6] patch labels with the given object rows (field 0 > 0) per image."""
    patch = torch.zeros(batch, N_PATCHES, 6)
    for i, rows in enumerate(content):
        patch[i, rows, 0] = 1
    return patch


def test_reduced_rows_are_a_sorted_subset_of_the_drawn_size():
    args = TrainArgs(reduce_min=0.1, reduce_max=0.3, reduce_content=0.0)
    gen = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(20):
        rows = _reduced_rows(_patch(3, [[], [], []]), args, gen)
        k = rows.shape[1]
        sizes.add(k)
        assert round(0.1 * N_PATCHES) <= k <= round(0.3 * N_PATCHES)
        assert torch.equal(rows, rows.sort(dim=1).values) and rows.min() >= 0 and rows.max() < N_PATCHES
        assert all(len(set(r.tolist())) == k for r in rows)  # no row twice
    assert len(sizes) > 5  # the kept share varies from step to step


def test_content_steps_keep_the_object_rows_first():
    objects = [[3, 40, 41, 300], [7, 500]]
    args = TrainArgs(reduce_min=0.05, reduce_max=0.05, reduce_content=1.0, sparse_background=0.0)
    rows = _reduced_rows(_patch(2, objects), args, torch.Generator().manual_seed(0))
    assert rows.shape[1] == round(0.05 * N_PATCHES)
    for kept, obj in zip(rows.tolist(), objects, strict=True):
        assert set(obj) <= set(kept)


def test_uniform_steps_ignore_the_objects():
    """Without the content preference the kept rows are drawn uniformly: over many draws the object rows
    are kept about as often as the kept share."""
    args = TrainArgs(reduce_min=0.1, reduce_max=0.1, reduce_content=0.0)
    gen = torch.Generator().manual_seed(1)
    hits = sum(int(3 in _reduced_rows(_patch(1, [[3]]), args, gen)[0].tolist()) for _ in range(300))
    assert 10 < hits < 60  # ~30 expected at a 10% share
