"""What apply / remove / the patched calls refuse, with messages that say how to fix it; a refused
apply leaves the model untouched and a refused call leaves the patched model usable."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import visprune
from tests.models import tiny


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.make_inputs(model, [2, 5, 3], seed=29)


def _untouched(model) -> None:
    assert not hasattr(model, "_visprune_handle")
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    lm = model.model.language_model
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in lm.modules())


def test_unsupported_model_class_lists_supported_ones():
    llama = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    )
    with pytest.raises(
        visprune.UnsupportedModelError,
        match=r"does not support LlamaForCausalLM.*"
        r"Supported model classes:.*LlavaForConditionalGeneration",
    ):
        visprune.apply(llama, "fastv")
    assert "generate" not in llama.__dict__


@pytest.mark.parametrize(
    ("name", "suggestion"), [("prumerge++", "prumerge+"), ("fastvv", "fastv"), ("visionzipp", "visionzip")]
)
def test_unknown_method_suggests_closest(model, name, suggestion):
    pattern = rf"unknown method {re.escape(repr(name))}\. Did you mean: .*{re.escape(repr(suggestion))}"
    with pytest.raises(visprune.UnknownMethodError, match=pattern):
        visprune.apply(model, name)
    _untouched(model)


def test_unknown_method_in_composition(model):
    with pytest.raises(visprune.UnknownMethodError, match="Did you mean: 'fastv'"):
        visprune.apply(model, ["visionzip", "fast_v"])
    _untouched(model)


def test_unknown_option_suggests_closest(model):
    with pytest.raises(
        visprune.InputError,
        match=r"'fastervlm' does not take option\(s\) 'budgt'.*"
        r"Did you mean: 'budget'.*Its options are: budget",
    ):
        visprune.apply(model, "fastervlm", budgt=8)
    _untouched(model)
    with pytest.raises(visprune.InputError, match=r"'fastv' does not take option\(s\) 'budget'"):
        visprune.apply(model, ["visionzip", "fastv"], fastv={"budget": 8})
    _untouched(model)
    with pytest.raises(visprune.InputError, match="method 'none' takes no options"):
        visprune.apply(model, "none", budget=8)
    _untouched(model)


def test_composition_options_must_be_per_method(model):
    with pytest.raises(visprune.InputError, match="pass options per method as dicts keyed by method name"):
        visprune.apply(model, ["visionzip", "fastv"], budget=8)
    with pytest.raises(visprune.InputError, match="compose at most one encoder-side method and one LLM-side"):
        visprune.apply(model, ["visionzip", "prumerge+"])
    _untouched(model)


def test_apply_twice_says_to_remove_first(model, inputs):
    visprune.apply(model, "prumerge+")
    try:
        with pytest.raises(
            visprune.InputError,
            match=r"already patched with \['prumerge\+'\].*"
            r"call visprune.remove\(model\) before applying again",
        ):
            visprune.apply(model, "fastv")
        # The first patch is intact.
        assert model._visprune_handle.methods == ("prumerge+",)
        tiny.greedy(model, inputs, 2)
        assert model._visprune_handle.stats.visual_tokens_out != [64, 64, 64]
    finally:
        visprune.remove(model)
    _untouched(model)


def test_remove_unpatched_model(model):
    with pytest.raises(visprune.InputError, match="not patched by visprune"):
        visprune.remove(model)
    visprune.apply(model, "none")
    visprune.remove(model)
    with pytest.raises(visprune.InputError, match="not patched by visprune"):
        visprune.remove(model)


@pytest.fixture(scope="module")
def full_model():
    return tiny.tiny_llava(select_strategy="full")


@pytest.mark.parametrize("method", ["fastervlm", "prumerge+", "knee+text", tiny.COMPOSITION[0]], ids=tiny.method_id)
def test_cls_method_on_full_strategy_model(full_model, method):
    with pytest.raises(
        visprune.UnsupportedModelError,
        match=r"vision_feature_select_strategy='default'.*"
        r"this model uses 'full'.*LLM-side method",
    ):
        tiny.apply_method(full_model, method)
    _untouched(full_model)


def test_llm_method_works_on_full_strategy_model(full_model):
    """The error's advice holds: an LLM-side method runs on a 'full' model, 65 tokens per image."""
    inputs = tiny.make_inputs(full_model, [2, 6], seed=31)
    handle = visprune.apply(full_model, "fastv", layer=2)
    try:
        out = tiny.greedy(full_model, inputs, 3)
    finally:
        visprune.remove(full_model)
    assert handle.stats.visual_tokens_in == [65, 65]
    assert all(row[2] < row[1] for row in handle.stats.tokens_per_layer)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("fastv", {"layer": 4}, r"fastv': layer=4 does not fit this model's 4-layer LLM"),
        ("fastv", {"layer": 0}, r"layer must be an int >= 1, got 0"),
        ("pdrop", {"layers": (1, 2, 4)}, r"pdrop': layers=\(1, 2, 4\) does not fit this model's 4-layer LLM"),
        ("sparsevlm", {"layers": (1, 3), "keep_counts": (20, 10)}, r"sparsevlm': layers=\(1, 3\) does not fit"),
        ("dart", {"layer": 7, "budget": 8}, r"dart': layer=7 does not fit this model's 4-layer LLM"),
        ("knee+text", {"text_layer": 4}, r"knee\+text': text_layer=4 does not fit this model's 4-layer LLM"),
    ],
)
def test_llm_layer_out_of_range(model, method, options, match):
    """An explicit layer that the model does not have is refused at apply, saying what fits."""
    with pytest.raises(visprune.InputError, match=match):
        visprune.apply(model, method, **options)
    _untouched(model)


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm", "fastv", "dart", "knee+text", "vtc-cls"])
def test_layer_defaults_fit_any_depth(model, inputs, method):
    """Published layer defaults move to the same relative depth of a 4-layer LLM / 3-layer tower."""
    handle = visprune.apply(model, method)
    try:
        out = tiny.greedy(model, inputs, 2)
    finally:
        visprune.remove(model)
    assert out.sequences.shape[0] == 3
    if handle.pruner is not None:
        assert all(1 <= layer <= 3 for layer in handle.pruner.stage_layers)


def test_images_not_matching_placeholders(model, inputs):
    handle = visprune.apply(model, "visionzip", dominant=6, contextual=2)
    try:
        two_images = dict(inputs, pixel_values=inputs["pixel_values"][:2])
        with pytest.raises(
            visprune.InputError,
            match=r"placeholder runs of lengths \[64, 64, 64\] do not match "
            r"the \[64, 64\] visual tokens",
        ):
            model.generate(**two_images, max_new_tokens=2)
        with pytest.raises(visprune.InputError, match="placeholder"):
            model(**two_images)
        # A placeholder run one token short.
        short = {k: v.clone() for k, v in inputs.items()}
        row = short["input_ids"][0]
        first = int((row == tiny.IMAGE_TOKEN).nonzero()[0])
        row[first] = 5
        with pytest.raises(visprune.InputError, match=r"lengths \[63, 64, 64\]"):
            model.generate(**short, max_new_tokens=2)
        # Placeholders with no image at all.
        no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
        with pytest.raises(visprune.InputError, match="3 image placeholder runs but 0 images"):
            model.generate(**no_pixels, max_new_tokens=2)
        # The patched model still works after the refused calls.
        out = tiny.greedy(model, inputs, 2)
        assert handle.stats.visual_tokens_out == [8, 8, 8]
        assert out.sequences.shape[0] == 3
    finally:
        visprune.remove(model)
    _untouched(model)


def test_patched_generate_refuses_inputs_embeds(model, inputs):
    visprune.apply(model, "prumerge+")
    try:
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(visprune.InputError, match="needs input_ids"):
            model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=2)
    finally:
        visprune.remove(model)


def test_errors_are_value_or_type_errors(model):
    with pytest.raises(ValueError):
        visprune.apply(model, "fastervlm", budgt=8)
    with pytest.raises(KeyError):
        visprune.apply(model, "nope")
    with pytest.raises(TypeError):
        visprune.apply(torch.nn.Linear(2, 2), "fastv")


def test_signal_layer_beyond_the_tower_is_refused(model, inputs):
    assert len(model.model.vision_tower.encoder.layers) == 3
    with pytest.raises(visprune.InputError, match=r"start_layer=-5 does not fit"):
        visprune.apply(model, "vtc-cls", budget=8, start_layer=-5)  # layers -5..-2 of a 3-layer tower
    _untouched(model)


def _bad_calls(inputs):
    px = inputs["pixel_values"]
    return {
        "pixels of another size": ({**inputs, "pixel_values": px[..., :56, :56]}, "pixel_values must be a floating"),
        "pixels without a batch dim": ({**inputs, "pixel_values": px[0]}, "pixel_values must be a floating"),
        "integer pixels": ({**inputs, "pixel_values": px.long()}, "pixel_values must be a floating"),
        "NaN pixels": ({**inputs, "pixel_values": torch.full_like(px, float("nan"))}, "NaN or inf"),
        "mask one column short": (
            {**inputs, "attention_mask": inputs["attention_mask"][:, 1:]},
            "attention_mask must have the shape of input_ids",
        ),
        "ids as a list": ({**inputs, "input_ids": inputs["input_ids"].tolist()}, "input_ids must be an integer tensor"),
        "one prompt without batch dim": (
            {**inputs, "input_ids": inputs["input_ids"][0], "attention_mask": inputs["attention_mask"][0]},
            "input_ids must be an integer tensor",
        ),
        "float ids": ({**inputs, "input_ids": inputs["input_ids"].float()}, "input_ids must be an integer tensor"),
    }


BAD_CALLS = [
    "pixels of another size",
    "pixels without a batch dim",
    "integer pixels",
    "NaN pixels",
    "mask one column short",
    "ids as a list",
    "one prompt without batch dim",
    "float ids",
]


@pytest.mark.parametrize("method", ["prumerge+", "fastv"])
@pytest.mark.parametrize("case", BAD_CALLS)
def test_malformed_call_inputs_are_input_errors(model, inputs, method, case):
    """Ordinary mistakes in what is passed to generate / forward raise visprune's error, not torch's."""
    call, match = _bad_calls(inputs)[case]
    tiny.apply_method(model, method)
    try:
        with pytest.raises(visprune.InputError, match=match):
            model.generate(**call, max_new_tokens=2)
        with pytest.raises(visprune.InputError, match=match):
            model(**call)
    finally:
        visprune.remove(model)
