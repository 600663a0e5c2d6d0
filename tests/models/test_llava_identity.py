"""apply(model, 'none') and apply -> remove leave LlavaForConditionalGeneration's outputs and the
instance itself exactly as they were; a checkpoint saved and reloaded patches like the original."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import visprune
from tests.models import tiny

N_NEW = 5


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.make_inputs(model, [2, 6, 9], seed=3)


def _labels(inputs: dict) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    labels[(labels == tiny.IMAGE_TOKEN) | (inputs["attention_mask"] == 0)] = -100
    return labels


@pytest.fixture(scope="module")
def reference(model, inputs):
    """The unpatched model's generate and forward outputs."""
    gen = tiny.greedy(model, inputs, N_NEW)
    with torch.no_grad():
        fwd = model(**inputs, labels=_labels(inputs))
    return gen, fwd


def _assert_same_as_reference(model, inputs, reference) -> None:
    gen_ref, fwd_ref = reference
    gen = tiny.greedy(model, inputs, N_NEW)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    assert len(gen.logits) == len(gen_ref.logits) == N_NEW
    for got, want in zip(gen.logits, gen_ref.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        fwd = model(**inputs, labels=_labels(inputs))
    assert fwd.logits.shape == fwd_ref.logits.shape
    torch.testing.assert_close(fwd.logits, fwd_ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fwd.loss, fwd_ref.loss, rtol=1e-5, atol=1e-6)


def test_none_matches_unpatched(model, inputs, reference):
    handle = visprune.apply(model, "none")
    try:
        _assert_same_as_reference(model, inputs, reference)
        assert handle.stats.visual_tokens_in == [64, 64, 64]
        assert handle.stats.visual_tokens_out == [64, 64, 64]
        real = (inputs["attention_mask"].sum(1)).tolist()
        assert handle.stats.tokens_per_layer == [[r] * 4 for r in real]
    finally:
        visprune.remove(model)


def _hooks(model) -> dict[str, tuple]:
    return {
        name: (
            dict(m._forward_pre_hooks),
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks_with_kwargs),
            dict(m._forward_hooks_with_kwargs),
        )
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize(
    "method", ["none", "prumerge+", "fastv", "sparsevlm", "knee+text", tiny.COMPOSITION[0]], ids=tiny.method_id
)
def test_apply_remove_restores_model(model, inputs, reference, method):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)  # transformers installs its own output-capturing hooks on the first call
    lm_hooks = {k: v for k, v in hooks.items() if k.startswith("model.language_model")}
    assert lm_hooks and all(not any(h) for h in lm_hooks.values())
    keys = set(model.__dict__)
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__

    handle = tiny.apply_method(model, method) if method != "none" else visprune.apply(model, "none")
    assert "generate" in model.__dict__ and "forward" in model.__dict__
    if handle.pruner is not None:
        assert _hooks(model) != hooks  # the decoder hooks are really there while patched
    out = tiny.greedy(model, inputs, N_NEW)
    if method != "none":  # the method changed what the LLM saw
        pruned = handle.stats.visual_tokens_out != [64, 64, 64] or handle.stats.tokens_per_layer[0][-1] < 64
        assert pruned
    assert out.sequences.shape == reference[0].sequences.shape

    visprune.remove(model)
    assert set(model.__dict__) == keys
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    assert not hasattr(model, "_visprune_handle")
    assert _hooks(model) == hooks
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    _assert_same_as_reference(model, inputs, reference)


def test_handle_remove_same_as_visprune_remove(model, inputs, reference):
    handle = visprune.apply(model, "fastv", layer=2)
    handle.remove()
    assert "generate" not in model.__dict__
    _assert_same_as_reference(model, inputs, reference)


@pytest.mark.parametrize("method", ["prumerge+", "fastv", "knee+text"])
def test_save_pretrained_then_from_pretrained(model, inputs, tmp_path, method):
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlavaForConditionalGeneration
    handles = [tiny.apply_method(m, method) for m in (model, loaded)]
    try:
        want, got = (tiny.greedy(m, inputs, N_NEW) for m in (model, loaded))
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert handles[0].stats.visual_tokens_out == handles[1].stats.visual_tokens_out
        assert handles[0].stats.tokens_per_layer == handles[1].stats.tokens_per_layer
        with torch.no_grad():
            fwd_want, fwd_got = (m(**inputs).logits for m in (model, loaded))
        torch.testing.assert_close(fwd_got, fwd_want, rtol=1e-5, atol=1e-5)
    finally:
        visprune.remove(model)
        visprune.remove(loaded)


def test_patched_forward_keeps_its_signature(model):
    want = inspect.signature(model.forward)
    visprune.apply(model, "none")
    try:
        assert inspect.signature(model.forward) == want
    finally:
        visprune.remove(model)


def _positions_seen(model, inputs) -> list[torch.Tensor]:
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    h = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tiny.greedy(model, inputs, 3)
    finally:
        h.remove()
    return seen


def test_patched_generate_positions_match_unpatched(model, inputs):
    """Left-padded samples get positions 0.. from their first real token (prefill and decode)."""
    want = _positions_seen(model, inputs)
    assert want[0][0, -1] < want[0][2, -1]  # the unpatched positions really depend on the padding
    visprune.apply(model, "none")
    try:
        got = _positions_seen(model, inputs)
    finally:
        visprune.remove(model)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        real = b.shape[-1]
        assert torch.equal(a.expand(b.shape[0], -1)[:, -real:], b)


def test_patched_generate_prefill_computes_last_logits_only(model, inputs):
    """Unpatched generate asks forward for the last position's logits only (logits_to_keep=1)."""
    shapes = []
    h = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    visprune.apply(model, "prumerge+")
    try:
        tiny.greedy(model, inputs, 2)
    finally:
        visprune.remove(model)
        h.remove()
    assert shapes[0] == (3, 1, tiny.VOCAB)
