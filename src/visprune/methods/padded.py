"""Padded outputs of the adaptive methods, so that a CUDA graph can hold their reduction.

An adaptive method (prumerge, prumerge+, knee) decides each image's token count from the data. Returning
one tensor per image of that length means reading the counts on the host, which a graph capture cannot do.
Inside `padded_outputs`, such a method instead pads every image's Reduction to a width the host knows (the
most it can keep) and gives the count on the device (`Reduction.size`); the rows past it are filler. The
caller cuts them off after the graph, with one host read for the whole batch (`trim`). The kept rows are
those the method returns outside the block (the merges are computed over the padded width, so their sums
can differ in the last bits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from visprune.errors import VisPruneError
from visprune.methods.base import Reduction

_PADDED: ContextVar[bool] = ContextVar("visprune_padded_outputs", default=False)


@contextmanager
def padded_outputs() -> Iterator[None]:
    """Within the block, adaptive methods return padded Reductions with their counts on the device."""
    token = _PADDED.set(True)
    try:
        yield
    finally:
        _PADDED.reset(token)


def padding() -> bool:
    """Whether the calling method is inside `padded_outputs`."""
    return _PADDED.get()


def trim_counts(reductions: list[Reduction]) -> list[int] | None:
    """The token count of each Reduction (one host read for all), or None when none is padded."""
    sizes = [r.size for r in reductions]
    if all(s is None for s in sizes):
        return None
    if any(s is None for s in sizes):
        raise VisPruneError("a batch mixes padded and unpadded reductions; please report this bug")
    return torch.stack(sizes).tolist()


def trim(reduction: Reduction, count: int) -> Reduction:
    """`reduction` cut to its first `count` rows (no longer padded)."""
    return Reduction(reduction.features[:count], reduction.sources[:count], reduction.assignment)
