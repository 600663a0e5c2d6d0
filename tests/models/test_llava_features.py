"""The visual tokens that reach the LLM are exactly projector(method(features, signals)) with the
features and signals computed here independently, from the plain Hugging Face vision tower."""

from __future__ import annotations

import pytest
import torch

import visprune
from tests.models import tiny

ENCODER = ["prumerge", "prumerge+", "knee", "fastervlm", "vtc-cls", "visionzip", "tome", "random", "pool"]


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def eager(model):
    return tiny.same_weights(model, "eager")


@pytest.fixture(scope="module")
def inputs(model):
    inp = tiny.make_inputs(model, [3, 8, 5], seed=13)
    inp["pixel_values"] = tiny.varied_pixels(model, 3)
    return inp


@pytest.fixture(scope="module")
def tower_outputs(model, eager, inputs):
    """(hidden_states, attentions) of the plain tower: sdpa for the states, eager for the attentions."""
    with torch.no_grad():
        plain = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        att = eager.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    for a, b in zip(plain.hidden_states, att.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(att.attentions) == 3 and att.attentions[0].shape == (3, 4, 65, 65)
    return plain.hidden_states, att.attentions


def _signal(model, hidden_states, attentions, req) -> torch.Tensor:
    """One SignalRequest computed the plain way. Request layers index encoder LAYERS: the input of
    layer L is hidden_states[L] and its attention map attentions[L]."""
    layers = model.model.vision_tower.encoder.layers
    n = len(layers)

    def qk(layer_idx):
        layer = layers[layer_idx]
        x = layer.layer_norm1(hidden_states[layer_idx])
        return layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)

    def cls_row(layer_idx):
        if req.heads == "single":  # one full-width head (PruMerge's official formula)
            q, k = qk(layer_idx)
            logits = torch.einsum("bc,btc->bt", q[:, 0], k) / q.shape[-1] ** 0.5
            return logits.softmax(-1)[:, 1:]
        rows = attentions[layer_idx][:, :, 0, 1:]  # [B, H, N] from the eager attention map
        return rows.sum(1) if req.heads == "sum" else rows.mean(1)

    if req.kind == "cls_feature":  # the CLS row of the layer LLaVA reads (vision_feature_layer=-2)
        assert model.config.vision_feature_layer == -2
        return hidden_states[-2][:, 0]
    idx = [layer % n for layer in req.layers]
    if req.kind == "cls_cosine":  # CLS-patch cosine similarity of the hidden states entering the layer
        h = hidden_states[idx[0]].double()
        return torch.nn.functional.cosine_similarity(h[:, 1:], h[:, :1], dim=-1).float()
    if req.kind == "cls_attn":
        return cls_row(idx[0])
    if req.kind == "cls_attn_layers":
        return torch.stack([cls_row(i) for i in idx], dim=1)
    assert req.kind == "keys"
    _, k = qk(idx[0])
    k = k[:, 1:]
    if req.heads == "single":
        return k
    b, t, c = k.shape
    heads = model.config.vision_config.num_attention_heads
    return k.view(b, t, heads, c // heads).mean(2)


def _llm_visual_rows(model, inputs) -> tuple[list[torch.Tensor], visprune.Stats]:
    """The rows of the LLM's inputs_embeds at image positions, per sample, from a patched forward."""
    captured = {}

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()
        captured["mask"] = kwargs["attention_mask"].clone()

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    stats = model._visprune_handle.stats
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        text = set(stats.position_map[b][stats.position_map[b] >= 0].tolist())
        real = captured["mask"][b].bool()
        image_pos = [p for p in range(real.shape[0]) if real[p] and p not in text]
        rows.append(captured["embeds"][b, image_pos])
    return rows, stats


@pytest.mark.parametrize("method", ENCODER)
def test_llm_receives_projected_method_output(model, eager, inputs, tower_outputs, method):
    hidden_states, attentions = tower_outputs
    spec = visprune.get_method(method)
    options = spec.options(**tiny.METHOD_OPTIONS[method])
    with torch.no_grad():
        features = hidden_states[-2][:, 1:]
        signals = {name: _signal(model, hidden_states, attentions, req) for name, req in spec.signals(options).items()}
        expected = spec.fn(features, grid=(8, 8), **signals, **options)
        projected = [model.model.multi_modal_projector(r.features) for r in expected]

    handle = visprune.apply(model, method, **tiny.METHOD_OPTIONS[method])
    try:
        rows, stats = _llm_visual_rows(model, inputs)
    finally:
        visprune.remove(model)
    assert stats is handle.stats
    assert stats.visual_tokens_in == [64, 64, 64]
    assert stats.visual_tokens_out == [r.count for r in expected] == [r.shape[0] for r in rows]
    assert all(k < 64 for k in stats.visual_tokens_out)
    for got, want in zip(rows, projected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The recorded reductions are the method's own (same kept sources, per image, one crop each).
    assert [len(r) for r in stats.reductions] == [1, 1, 1]
    for rec, exp in zip(stats.reductions, expected, strict=True):
        assert torch.equal(rec[0].sources, exp.sources)
    if method in tiny.FIXED_BUDGET:
        assert stats.visual_tokens_out == [tiny.FIXED_BUDGET[method]] * 3
    if method == "visionzip":  # the official selection: the CLS token's features first, then the patches
        cls_rows = model.model.multi_modal_projector(hidden_states[-2][:, 0])
        for got, cls_row, exp in zip(rows, cls_rows, expected, strict=True):
            torch.testing.assert_close(got[0], cls_row, rtol=1e-5, atol=1e-5)
            assert exp.sources[0] == -1 and bool((exp.sources[1:] >= 0).all())


def test_signals_depend_on_the_requested_layer(model, tower_outputs):
    """Sanity of the independent reference: different encoder layers give different CLS rows."""
    hidden_states, attentions = tower_outputs
    spec = visprune.get_method("fastervlm")
    req = spec.signals(spec.defaults)["cls_attn"]
    assert req.layers == (-2,)
    a = _signal(model, hidden_states, attentions, req)
    b = _signal(model, hidden_states, attentions, type(req)(kind=req.kind, layers=(-1,), heads=req.heads))
    assert a.shape == (3, 64)
    torch.testing.assert_close(a.sum(-1) + attentions[1][:, :, 0, 0].mean(1), torch.ones(3))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("method", ["knee", "prumerge+"])
def test_adaptive_counts_differ_across_images(model, inputs, method):
    handle = tiny.apply_method(model, method)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        visprune.remove(model)
    counts = handle.stats.visual_tokens_out
    assert visprune.get_method(method).adaptive
    assert len(set(counts)) > 1, counts
