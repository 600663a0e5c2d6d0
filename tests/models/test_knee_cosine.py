"""knee / knee+text's `signal="cosine"`: the CLS-patch cosine similarity of the hidden states entering the
last encoder layer (the paper's "similarity between visual and CLS tokens", read literally)."""

from __future__ import annotations

import pytest
import torch

import visprune
from tests.models import tiny
from visprune.errors import InputError, UnsupportedModelError
from visprune.methods import get_method
from visprune.methods.signals import cls_cosine
from visprune.models.vision import encode


def test_cls_cosine_is_the_cosine_between_cls_and_each_patch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 1 + 6, 8, generator=g)
    expected = torch.stack(
        [torch.stack([torch.dot(h[0], p) / (h[0].norm() * p.norm()) for p in h[1:]]) for h in hidden]
    )
    torch.testing.assert_close(cls_cosine(hidden), expected)
    with pytest.raises(InputError, match="CLS token first"):
        cls_cosine(hidden[:, :1])


def test_knee_cosine_requests_the_feature_layer_similarity():
    spec = get_method("knee")
    (req,) = spec.signals(spec.bind({"signal": "cosine"}, llm_layers=8, vision_layers=8)).values()
    assert (req.kind, req.layers, req.fallback) == ("cls_cosine", (-1,), None)
    with pytest.raises(InputError, match="signal"):
        spec.options(signal="cosines")


def test_the_signal_is_computed_from_the_llava_feature_layer():
    model = tiny.tiny_llava()
    tower = model.model.vision_tower
    pixels = tiny.varied_pixels(model, n=2)
    spec = get_method("knee")
    requests = spec.signals(spec.bind({"signal": "cosine"}, llm_layers=4, vision_layers=2))
    with torch.no_grad():
        out = encode(tower, pixels, -2, "default", requests)
        states = tower(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.signals["cls_attn"], cls_cosine(states[-2]))


def test_knee_plus_text_with_cosine_runs_batched_as_alone_and_refuses_siglip():
    model = tiny.tiny_llava()
    inputs = tiny.make_inputs(model, [3, 5], seed=2)
    opts = {**tiny.METHOD_OPTIONS["knee+text"], "signal": "cosine"}
    visprune.apply(model, "knee+text", **opts)
    try:
        batch = tiny.greedy(model, inputs, max_new_tokens=3).sequences
        alone = [tiny.greedy(model, tiny.select(inputs, i), max_new_tokens=3).sequences for i in range(2)]
    finally:
        visprune.remove(model)
    for i, out in enumerate(alone):
        assert batch[i, -3:].tolist() == out[0, -3:].tolist()
    siglip = tiny.tiny_llava_siglip()
    with pytest.raises(UnsupportedModelError, match="signal='cosine' needs the CLS token"):
        visprune.apply(siglip, "knee", signal="cosine")
