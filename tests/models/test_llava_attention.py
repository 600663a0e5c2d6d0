"""visprune keeps the model's attention implementation: sdpa and eager give the same tokens, and with
sdpa no attention map is ever materialised (no square softmax over the sequence or the patches)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import visprune
from tests.models import tiny

N_NEW = 4
METHODS = ["prumerge+", "visionzip", "fastv", "pdrop", "sparsevlm", "dart", "knee+text", "flowcut"]


@pytest.fixture(scope="module")
def sdpa():
    return tiny.tiny_llava("sdpa")


@pytest.fixture(scope="module")
def eager(sdpa):
    return tiny.same_weights(sdpa, "eager")


@pytest.fixture(scope="module")
def inputs(sdpa):
    inp = tiny.make_inputs(sdpa, [2, 8, 5], seed=19)
    inp["pixel_values"] = tiny.varied_pixels(sdpa, 3)
    return inp


class SoftmaxRecorder(TorchFunctionMode):
    """Records the output shape of every softmax and every scaled_dot_product_attention call."""

    SOFTMAX: ClassVar[set] = {
        torch.softmax,
        F.softmax,
        torch.Tensor.softmax,
        torch.special.softmax,
        torch.nn.Softmax.forward,
    }

    def __init__(self):
        super().__init__()
        self.softmax: list[tuple[int, ...]] = []
        self.sdpa = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.SOFTMAX:
            self.softmax.append(tuple(out.shape))
        elif func is F.scaled_dot_product_attention:
            self.sdpa += 1
        return out


def _square_maps(shapes, sizes) -> list[tuple[int, ...]]:
    return [s for s in shapes if len(s) >= 2 and s[-1] == s[-2] and s[-1] in sizes]


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_agree(sdpa, eager, inputs, method):
    outs = []
    for model in (sdpa, eager):
        handle = tiny.apply_method(model, method)
        try:
            outs.append((tiny.greedy(model, inputs, N_NEW), handle.stats))
        finally:
            visprune.remove(model)
    (a, sa), (b, sb) = outs
    assert sa.visual_tokens_out == sb.visual_tokens_out
    assert sa.tokens_per_layer == sb.tokens_per_layer
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_no_attention_map_with_sdpa(sdpa, inputs, method):
    handle = tiny.apply_method(sdpa, method)
    try:
        with torch.no_grad(), SoftmaxRecorder() as rec:
            sdpa.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    finally:
        visprune.remove(sdpa)
    prefill = max(row[0] for row in handle.stats.tokens_per_layer)
    pruned = {n for row in handle.stats.tokens_per_layer for n in row}
    assert rec.sdpa > 0  # the recorder sees the attention calls
    assert _square_maps(rec.softmax, {prefill, *pruned, 65}) == []
    # A softmax over a whole sequence has only a few query rows (a CLS row, the last token, raters).
    over_sequence = [s for s in rec.softmax if len(s) >= 2 and s[-1] in {prefill, *pruned, 65}]
    assert all(s[-2] < 16 for s in over_sequence), over_sequence


def test_recorder_catches_eager_attention_maps(eager, inputs):
    """The check above can fail: eager attention's [.., S, S] and the tower's [.., 65, 65] are seen."""
    handle = tiny.apply_method(eager, "fastv")
    try:
        with torch.no_grad(), SoftmaxRecorder() as rec:
            eager.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        visprune.remove(eager)
    prefill = max(row[0] for row in handle.stats.tokens_per_layer)
    shapes = _square_maps(rec.softmax, {prefill, 65})
    assert (3, 4, 65, 65) in shapes
    assert (3, 4, prefill, prefill) in shapes
