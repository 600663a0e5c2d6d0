"""forward(**inputs, labels=...) with pruning: the loss is the causal-LM loss of the returned logits
against the caller's labels placed with stats.position_map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visprune
from tests.models import tiny


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    inp = tiny.make_inputs(model, [4, 10, 6], seed=23)
    inp["pixel_values"] = tiny.varied_pixels(model, 3)
    return inp


def _labels(inputs):
    labels = inputs["input_ids"].clone()
    labels[(labels == tiny.IMAGE_TOKEN) | (inputs["attention_mask"] == 0)] = -100
    return labels


def _reference_loss(logits, labels, position_map):
    """Place each caller label at its returned position, then the usual shifted cross-entropy."""
    placed = torch.full(logits.shape[:2], -100, dtype=torch.long)
    for b in range(labels.shape[0]):
        at = position_map[b] >= 0
        placed[b, position_map[b][at]] = labels[b][at]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), placed[:, 1:].reshape(-1))


@pytest.mark.parametrize(
    "method", ["prumerge+", "visionzip", "fastv", "pdrop", "knee+text", tiny.COMPOSITION[0]], ids=tiny.method_id
)
def test_loss_with_pruning(model, inputs, method):
    labels = _labels(inputs)
    handle = tiny.apply_method(model, method)
    try:
        with torch.no_grad():
            out = model(**inputs, labels=labels)
    finally:
        visprune.remove(model)
    stats = handle.stats
    pmap = stats.position_map
    assert torch.isfinite(out.loss)
    assert pmap.shape == inputs["input_ids"].shape
    # Text tokens map to distinct returned positions; placeholders and padding map to -1.
    text = (inputs["attention_mask"] == 1) & (inputs["input_ids"] != tiny.IMAGE_TOKEN)
    assert ((pmap >= 0) == text).all()
    # The logits cover the sequence the last decoder layer saw (padded to the longest sample).
    assert out.logits.shape[:2] == (3, max(row[-1] for row in stats.tokens_per_layer))
    for b in range(3):
        idx = pmap[b][pmap[b] >= 0]
        assert idx.unique().numel() == idx.numel() and int(idx.max()) < out.logits.shape[1]
        assert torch.all(idx[1:] > idx[:-1])  # order kept
        assert int(idx.max()) == out.logits.shape[1] - 1  # the last prompt token is the last position
    torch.testing.assert_close(out.loss, _reference_loss(out.logits, labels, pmap), rtol=1e-5, atol=1e-6)


def test_loss_uses_the_returned_logits_not_the_dense_ones(model, inputs):
    """Pruning changes the loss (the reference above is not comparing a value to itself)."""
    labels = _labels(inputs)
    with torch.no_grad():
        dense = model(**inputs, labels=labels).loss
    visprune.apply(model, "fastv", layer=1, keep_ratio=0.1)
    try:
        with torch.no_grad():
            pruned = model(**inputs, labels=labels).loss
    finally:
        visprune.remove(model)
    assert torch.isfinite(pruned) and not torch.allclose(pruned, dense)


def test_logits_of_text_tokens_match_generate_first_step(model, inputs):
    """The last prompt token's forward logits equal generate's first-step logits (LLM method)."""
    visprune.apply(model, "pdrop", layers=(1, 2, 3))
    try:
        with torch.no_grad():
            fwd = model(**inputs)
            last = fwd.logits[:, -1]
        gen = tiny.greedy(model, inputs, 1)
    finally:
        visprune.remove(model)
    torch.testing.assert_close(last, gen.logits[0], rtol=1e-4, atol=1e-4)
