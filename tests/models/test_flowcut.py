"""flowcut inside the CLIP tower: the runner's progressive pruning equals a per-image reference written
from the formula (float64 scores, explicit token lists, no padding), a batch equals its images alone
although they keep different counts on the way, and the method runs through apply on LLaVA and is
refused where it does not apply."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import visprune
from tests.methods.test_flowcut import reference_count
from tests.models import tiny
from visprune.methods import SignalRequest
from visprune.models import vision

TARGET = 6


@pytest.fixture(scope="module")
def model():
    cfg = tiny.tiny_llava_config()
    cfg.vision_config.num_hidden_layers = 6  # hidden_states[-2] = index 5: prunes after layers 1 (2 left) and 3
    model = tiny.build(LlavaForConditionalGeneration, cfg, "sdpa", 0)
    tower = model.model.vision_tower
    with torch.no_grad():  # sharper attention than random weights give, so that images prune differently
        for layer in getattr(tower, "vision_model", tower).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


def project(linear, rows: torch.Tensor, heads: int) -> torch.Tensor:
    """A linear projection in float64, split into heads: [T, H, d]."""
    return (rows @ linear.weight.double().T + linear.bias.double()).view(rows.shape[0], heads, -1)


def reference(model, pixels: torch.Tensor, target: int) -> tuple[torch.Tensor, list[int], int]:
    """One image: (feature rows [T, C], kept patch indices, patches kept after the first pruning layer)."""
    tower = model.model.vision_tower
    body = getattr(tower, "vision_model", tower)  # transformers 5 keeps the parts on the model itself
    layers = body.encoder.layers
    h = body.pre_layrnorm(body.embeddings(pixels[None]))
    kept = list(range(h.shape[1] - 1))
    flow, first = None, None
    plan = {3: 0, 1: 2}
    for index in range(5):
        layer = layers[index]
        if index <= 3:
            attn = layer.self_attn
            x = layer.layer_norm1(h)[0].double()
            heads, d = attn.num_heads, x.shape[1] // attn.num_heads
            q, k, v = (
                project(lin, rows, heads) for lin, rows in ((attn.q_proj, x[:1]), (attn.k_proj, x), (attn.v_proj, x))
            )
            a = torch.stack([((k[:, i] @ q[0, i]) * d**-0.5).softmax(0) for i in range(heads)]).mean(0)[1:]
            s = torch.stack([(v[:, i] @ v[0, i]).softmax(0) for i in range(heads)]).mean(0)[1:]
            value = v.mean(1)[1:].abs().sum(1)
            score = (a / a.sum() + s / s.sum()) * value
            flow = score if flow is None else (flow + score) / 2
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
        if index in plan:
            count = reference_count(a.tolist(), target, plan[index])
            order = sorted(sorted(range(len(kept)), key=lambda i: (-float(flow[i]), i))[:count])
            h = torch.cat([h[:, :1], h[:, 1:][:, order]], dim=1)
            kept, flow = [kept[i] for i in order], flow[order]
            first = count if first is None else first
    return h[0, 1:], kept, first


def encode(model, pixels: torch.Tensor, target: int = TARGET):
    with torch.no_grad():
        return vision.encode(
            model.model.vision_tower, pixels, -2, "default", {"kept": SignalRequest("flowcut", keep=target)}
        )


def test_runner_equals_the_per_image_reference_and_batch_equals_alone(model, monkeypatch):
    pixels = tiny.varied_pixels(model, 3)
    counts = []
    real = vision.prune_counts
    monkeypatch.setattr(vision, "prune_counts", lambda *a: counts.append(real(*a)) or counts[-1])
    out = encode(model, pixels)
    assert out.patches == 64 and out.features.shape == (3, TARGET, 32)
    firsts = []
    for i in range(3):
        with torch.no_grad():
            feats, kept, first = reference(model, pixels[i], TARGET)
        firsts.append(first)
        assert out.signals["kept"][i].tolist() == kept
        torch.testing.assert_close(out.features[i], feats, rtol=1e-4, atol=1e-5)
        alone = encode(model, pixels[i : i + 1])
        assert torch.equal(alone.signals["kept"][0], out.signals["kept"][i])
        torch.testing.assert_close(alone.features[0], out.features[i], rtol=1e-5, atol=1e-6)
    assert counts[0].tolist() == firsts
    assert len(set(firsts)) > 1  # the images kept different counts: the padded path ran
    assert all(TARGET < c < 64 for c in firsts)


def test_apply_generates_batch_equal_alone_and_removes_exactly(model):
    inputs = tiny.make_inputs(model, [3, 8, 5], seed=4)
    inputs["pixel_values"] = tiny.varied_pixels(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = visprune.apply(model, "flowcut", budget=TARGET)
    try:
        batched = tiny.greedy(model, inputs, 3).sequences[:, -3:]
        alone = torch.cat([tiny.greedy(model, tiny.select(inputs, i), 3).sequences[:, -3:] for i in range(3)])
    finally:
        visprune.remove(model)
    assert torch.equal(batched, alone)
    assert handle.stats.visual_tokens_in == [64] and handle.stats.visual_tokens_out == [TARGET]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "_visprune_handle")


def test_budget_larger_than_the_patches_is_refused(model):
    with pytest.raises(visprune.InputError, match="budget=65 exceeds the N=64 patches"):
        encode(model, tiny.varied_pixels(model, 1), 65)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (tiny.tiny_llava_next, "flowcut is for LLaVA-1.5-class models"),
        (tiny.tiny_llava_siglip, "has no CLS token"),
    ],
)
def test_refused_where_it_does_not_apply(build, match):
    other = build()
    with pytest.raises(visprune.UnsupportedModelError, match=match):
        visprune.apply(other, "flowcut", budget=4)
    assert not hasattr(other, "_visprune_handle")


def test_refused_on_qwen():
    from tests.models import tiny_qwen

    qwen = tiny_qwen.tiny_qwen("qwen2-vl")
    with pytest.raises(visprune.UnsupportedModelError, match="flowcut prunes a CLIP tower"):
        visprune.apply(qwen, "flowcut", budget=4)


def test_refused_for_several_feature_layers():
    cfg = tiny.tiny_llava_config()
    cfg.vision_feature_layer = [-3, -2]
    other = tiny.build(LlavaForConditionalGeneration, cfg, "sdpa", 0)
    with pytest.raises(visprune.UnsupportedModelError, match="several"):
        visprune.apply(other, "flowcut", budget=4)
    assert not hasattr(other, "_visprune_handle")
