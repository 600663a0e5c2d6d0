"""Towers without a CLS token (SigLIP): the CLS-scoring methods run on the mean-received signal, the
"full" feature strategy is all patches, and the mean-received signal equals the tower's own attention."""

from __future__ import annotations

import pytest
import torch

import visprune
from tests.models import tiny
from visprune.errors import InputError, UnsupportedModelError
from visprune.methods import SignalRequest
from visprune.models import vision

CLS_METHODS = ["prumerge", "prumerge+", "knee", "knee+text", "fastervlm", "vtc-cls", "visionzip", "vispruner"]
N_NEW = 4


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava_siglip()


@pytest.fixture(scope="module")
def inputs(model):
    inp = tiny.make_inputs(model, [2, 7, 11], seed=3)
    inp["pixel_values"] = tiny.varied_pixels(model, 3)
    return inp


def test_siglip_tower_parts(model):
    tower = model.model.vision_tower
    assert not vision.has_cls_token(tower)
    assert vision.num_encoder_layers(tower) == 3
    assert "cls_attn" not in vision.available_signals(tower)
    assert vision.has_cls_token(tiny.tiny_llava().model.vision_tower)


def test_encoder_features_are_the_models_own_hidden_state(model):
    pixels = tiny.varied_pixels(model, 2)
    out = vision.encode(model.model.vision_tower, pixels, -2, "full", {})
    with torch.no_grad():
        ref = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    assert out.features.shape == (2, 64, 32)
    torch.testing.assert_close(out.features, ref)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("heads", ["single", "mean", "sum"])
def test_mean_received_equals_the_towers_attention_map(tower, heads):
    """Column mean of the layer's eager attention map (CLS row and column left out) == the signal."""
    model = tiny.tiny_llava_siglip(attn="eager") if tower == "siglip" else tiny.tiny_llava(attn="eager")
    net = model.model.vision_tower
    skip = int(tower == "clip")
    pixels = tiny.varied_pixels(model, 2)
    requests = {
        "one": SignalRequest("mean_received", (-1,), heads),
        "several": SignalRequest("mean_received_layers", (-2, -1), heads),
    }
    with torch.no_grad():
        out = vision.encode(net, pixels, -2, "default" if skip else "full", requests)
        maps = net(pixels, output_attentions=True).attentions  # [n, H, T, T] per layer
    assert out.signals["one"].shape == (2, 64) and out.signals["several"].shape == (2, 2, 64)
    if heads == "single":  # one full-width head: recompute that map from the layer's own projections
        layer = vision._parts(net)[2][-1]
        with torch.no_grad():
            x = layer.layer_norm1(net(pixels, output_hidden_states=True).hidden_states[-2])
            q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
        ref = torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1)[:, skip:, skip:].mean(1)
    else:
        per_head = maps[-1][:, :, skip:, skip:].mean(2)
        ref = per_head.sum(1) if heads == "sum" else per_head.mean(1)
        per_head_2 = maps[-2][:, :, skip:, skip:].mean(2)
        ref_2 = per_head_2.sum(1) if heads == "sum" else per_head_2.mean(1)
        torch.testing.assert_close(out.signals["several"], torch.stack([ref_2, ref], dim=1))
    torch.testing.assert_close(out.signals["one"], ref)


def test_cls_request_without_fallback_is_refused_with_a_clear_error(model):
    with pytest.raises(UnsupportedModelError, match=r"SiglipVisionModel has no CLS token.*signal='mean-received'"):
        vision.encode(
            model.model.vision_tower,
            tiny.varied_pixels(model, 1),
            -2,
            "full",
            {"cls_attn": SignalRequest("cls_attn", (-1,))},
        )


def test_visionzip_keeps_patches_only_without_cls_and_refuses_cls_token(model, inputs):
    """VisionZip keeps the CLS token where the tower has one; SigLIP has none, so D patches, and asking
    for the CLS token explicitly is refused at apply with the option to change."""
    handle = visprune.apply(model, "visionzip", dominant=6, contextual=2)
    try:
        with torch.no_grad():
            model(**inputs)
        assert all(bool((crops[0].sources >= 0).all()) for crops in handle.stats.reductions)
        assert handle.stats.visual_tokens_out == [8] * len(handle.stats.visual_tokens_out)
    finally:
        visprune.remove(model)
    with pytest.raises(UnsupportedModelError, match=r"cls_token=True needs the CLS token.*cls_token=False"):
        visprune.apply(model, "visionzip", dominant=6, contextual=2, cls_token=True)
    assert getattr(model, "_visprune_handle", None) is None


@pytest.mark.parametrize("method", CLS_METHODS)
def test_signal_cls_on_siglip_raises_at_apply(model, method):
    with pytest.raises(UnsupportedModelError, match="has no CLS token"):
        visprune.apply(model, method, **{**tiny.METHOD_OPTIONS[method], "signal": "cls"})
    assert getattr(model, "_visprune_handle", None) is None


@pytest.mark.parametrize("signal", [None, "mean-received"])
@pytest.mark.parametrize("method", CLS_METHODS)
def test_cls_methods_run_on_siglip_and_batch_equals_alone(model, inputs, method, signal):
    opts = {**tiny.METHOD_OPTIONS[method], **({} if signal is None else {"signal": signal})}
    handle = visprune.apply(model, method, **opts)
    try:
        batched = tiny.greedy(model, inputs, N_NEW)
        counts = list(handle.stats.visual_tokens_out)
        assert handle.stats.visual_tokens_in == [64, 64, 64]
        assert all(1 <= k < 64 for k in counts), counts
        if method in tiny.FIXED_BUDGET:
            assert counts == [tiny.FIXED_BUDGET[method]] * 3
        width = inputs["input_ids"].shape[1]
        for i in range(3):
            alone = tiny.greedy(model, tiny.select(inputs, i), N_NEW)
            assert batched.sequences[i, width:].tolist() == alone.sequences[0, -N_NEW:].tolist(), f"sample {i}"
            assert handle.stats.visual_tokens_out == [counts[i]]
    finally:
        visprune.remove(model)


def test_default_signal_is_mean_received_on_siglip_and_cls_on_clip(inputs, model):
    """The default (signal unset) keeps exactly what the explicit best signal keeps, on each tower."""
    clip = tiny.tiny_llava()
    clip_inputs = tiny.make_inputs(clip, [2, 7, 11], seed=3)
    clip_inputs["pixel_values"] = tiny.varied_pixels(clip, 3)
    for net, inp, best, other in ((model, inputs, "mean-received", None), (clip, clip_inputs, "cls", "mean-received")):
        kept = {}
        for signal in [None, best, *([other] if other else [])]:
            opts = {"budget": 8} if signal is None else {"budget": 8, "signal": signal}
            handle = visprune.apply(net, "fastervlm", **opts)
            try:
                with torch.no_grad():
                    net(**inp)
                kept[signal] = [r[0].kept.tolist() for r in handle.stats.reductions]
            finally:
                visprune.remove(net)
        assert kept[None] == kept[best]
        if other is not None:  # on CLIP the two signals rank differently (so the test can tell them apart)
            assert kept["mean-received"] != kept["cls"]


def test_keeping_every_token_equals_dense(model, inputs):
    """'full' on a tower without CLS: all 64 tokens are patches, so a budget of all of them is the identity."""
    with torch.no_grad():
        ref = model(**inputs).logits
    visprune.apply(model, "fastervlm", budget=64)
    try:
        with torch.no_grad():
            got = model(**inputs).logits
    finally:
        visprune.remove(model)
    torch.testing.assert_close(got, ref)
    with pytest.raises(InputError, match="exceeds the 64 visual tokens"):
        visprune.apply(model, "fastervlm", budget=65)


def test_encoder_methods_need_the_patch_grid_strategy():
    """A SigLIP LLaVA configured with 'default' drops a patch, not a CLS: encoder methods refuse it."""
    net = tiny.tiny_llava_siglip()
    net.config.vision_feature_select_strategy = "default"
    with pytest.raises(UnsupportedModelError, match="vision_feature_select_strategy='full'"):
        visprune.apply(net, "pool", budget=16)


@pytest.mark.parametrize("method", ["prumerge", "vtc-cls", "visionzip"])
def test_llava_next_crops_take_the_mean_received_signal(method):
    """LLaVA-NeXT selects each crop's surviving tokens from the signal of whichever kind it is."""
    net = tiny.tiny_llava_next()
    inp = tiny.make_next_inputs(net, [(40, 100), (100, 40)], [3, 6])
    opts = {**tiny.METHOD_OPTIONS[method], "signal": "mean-received"}
    handle = visprune.apply(net, method, **opts)
    try:
        with torch.no_grad():
            batched = net.generate(**inp, max_new_tokens=N_NEW, do_sample=False)[:, -N_NEW:]
        for i in range(2):
            keep = inp["attention_mask"][i].bool()
            one = {
                "input_ids": inp["input_ids"][i : i + 1, keep],
                "attention_mask": inp["attention_mask"][i : i + 1, keep],
                "pixel_values": inp["pixel_values"][i : i + 1],
                "image_sizes": inp["image_sizes"][i : i + 1],
            }
            with torch.no_grad():
                alone = net.generate(**one, max_new_tokens=N_NEW, do_sample=False)[:, -N_NEW:]
            assert torch.equal(batched[i], alone[0])
        assert handle.options[method]["signal"] == "mean-received"
    finally:
        visprune.remove(net)
