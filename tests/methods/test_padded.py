"""Padded outputs (`methods.padded`): inside `padded_outputs` the adaptive methods return every image's
Reduction at a width the host knows, with its count on the device, and read nothing from the device; cut to
their counts they are what the methods return outside it."""

from __future__ import annotations

import pytest
import torch

from visprune.errors import VisPruneError
from visprune.methods import get_method
from visprune.methods.base import Reduction
from visprune.methods.padded import padded_outputs, trim, trim_counts

ADAPTIVE = ["prumerge", "prumerge+", "knee"]


def _inputs(seed: int, b: int = 5, n: int = 49, c: int = 12):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, n, c, generator=g)
    # peaked and flat attention rows, so that the counts differ between the images
    sharpness = torch.linspace(0.5, 8.0, b).unsqueeze(1)
    cls_attn = (torch.randn(b, n, generator=g) * sharpness).softmax(dim=1)
    keys = torch.randn(b, n, 6, generator=g)
    return features, cls_attn, keys


@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_reductions_cut_to_their_counts_are_the_methods_output(name, seed):
    spec = get_method(name)
    features, cls_attn, keys = _inputs(seed)
    signals = {"cls_attn": cls_attn} if name == "knee" else {"cls_attn": cls_attn, "keys": keys}
    options = spec.options(k_min=2) if name == "knee" else spec.options()  # its default floor is 16 tokens
    plain = spec.fn(features, grid=(7, 7), **signals, **options)
    with padded_outputs():
        padded = spec.fn(features, grid=(7, 7), **signals, **options)
    width = features.shape[1] + (0 if name == "knee" else 1)  # prumerge's summary token takes one more row
    assert all(r.features.shape[0] == width and r.sources.shape[0] == width for r in padded)
    counts = trim_counts(padded)
    assert counts == [r.count for r in plain]
    assert len(set(counts)) > 1  # the images kept different numbers of tokens
    for p, r in zip(plain, (trim(r, k) for r, k in zip(padded, counts, strict=True)), strict=True):
        torch.testing.assert_close(r.features, p.features, rtol=1e-6, atol=1e-6)  # merges sum over more rows
        assert torch.equal(r.sources, p.sources) and torch.equal(r.assignment, p.assignment)
        assert r.size is None


def test_unpadded_and_mixed_batches():
    one = Reduction(torch.zeros(2, 3), torch.arange(2))
    assert trim_counts([one, one]) is None
    padded = Reduction(torch.zeros(4, 3), torch.arange(4), size=torch.tensor(2))
    assert trim_counts([padded, padded]) == [2, 2]
    with pytest.raises(VisPruneError, match="mixes padded and unpadded"):
        trim_counts([one, padded])
