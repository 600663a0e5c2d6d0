"""The guarantees of the LLaVA integration, on the Qwen-VL family: the merged-token order is the
model's own, sdpa and eager agree, generate resumed from its cache equals one generate, save / load
keeps working, bad inputs raise visprune's errors, and remove restores the model exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForImageTextToText

import visprune
from tests.models import tiny, tiny_qwen
from tests.models.tiny import left_pad

GRIDS = [(1, 8, 8), (1, 6, 10)]
N_NEW = 4


@pytest.fixture(scope="module", params=tiny_qwen.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_qwen.tiny_qwen(family)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_qwen.make_inputs(model, GRIDS, [3, 6], seed=5)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, **kw)


def test_dense_tokens_are_the_models_merged_output_in_order(model, inputs):
    handle = visprune.apply(model, "none")
    try:
        adapter = handle.adapter
        with torch.no_grad():
            mine = adapter.image_tokens(inputs["pixel_values"], None, {"image_grid_thw": inputs["image_grid_thw"]})
            own = model.model.get_image_features(inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    finally:
        visprune.remove(model)
    pooled = own.pooler_output if hasattr(own, "pooler_output") else own
    for a, b in zip(mine.features, pooled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prumerge+", "fastv", "flowcut"])
def test_sdpa_and_eager_agree(family, model, inputs, method):
    eager = tiny_qwen.tiny_qwen(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    outs = []
    for m in (model, eager):
        visprune.apply(m, method, **({"budget": 4} if method == "flowcut" else {}))
        try:
            outs.append(_generate(m, inputs))
        finally:
            visprune.remove(m)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", ["none", "visionzip", "fastv", "flowcut"])
def test_generate_resumed_from_its_cache_equals_one_generate(model, inputs, method):
    """(A hand-written forward loop over the cache is not shown: the unpatched Qwen-VL models of
    transformers 5.17-5.24 themselves fail on it when given the full attention mask.)"""
    kw = {"visionzip": {"dominant": 3, "contextual": 1}, "flowcut": {"budget": 4}}.get(method, {})
    visprune.apply(model, method, **kw)
    try:
        whole, resumed = tiny.whole_and_resumed(model, inputs, N_NEW)
    finally:
        visprune.remove(model)
    assert torch.equal(resumed, whole)


def test_save_pretrained_then_from_pretrained(model, inputs, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded.generation_config.pad_token_id = tiny_qwen.PAD
    loaded.generation_config.eos_token_id = None
    outs = []
    for m in (model, loaded):
        visprune.apply(m, "fastervlm", budget=4)
        try:
            outs.append(_generate(m, inputs))
        finally:
            visprune.remove(m)
    assert torch.equal(outs[0], outs[1])


def test_remove_restores_exactly(model, inputs):
    ref = _generate(model, inputs)
    before = dict(model.__dict__)
    visprune.apply(model, ["visionzip", "fastv"], visionzip={"dominant": 3, "contextual": 1}, fastv={"layer": 2})
    _generate(model, inputs)
    visprune.remove(model)
    assert model.__dict__.keys() == before.keys()
    assert torch.equal(_generate(model, inputs), ref)


def test_bad_inputs_raise_visprune_errors(model, inputs):
    visprune.apply(model, "random", budget=4)
    try:
        with pytest.raises(visprune.InputError, match="flattened patches"):
            _generate(model, {**inputs, "pixel_values": inputs["pixel_values"][:, :10]})
        with pytest.raises(visprune.InputError, match="does not describe"):
            _generate(model, {**inputs, "image_grid_thw": inputs["image_grid_thw"] * 2})
        with pytest.raises(visprune.UnsupportedModelError, match="keep_positions is not supported"):
            visprune.remove(model)
            visprune.apply(model, "random", budget=4, keep_positions=True)
        with pytest.raises(visprune.UnsupportedModelError, match="no CLS token"):
            visprune.apply(model, "fastervlm", budget=4, signal="cls")
        with pytest.raises(visprune.UnsupportedModelError, match="cls_token=True needs the CLS token"):
            visprune.apply(model, "visionzip", dominant=3, contextual=1, cls_token=True)
    finally:
        if getattr(model, "_visprune_handle", None) is not None:
            visprune.remove(model)


def _with_video(model, inputs: dict, frames: int = 2) -> dict:
    """`inputs` with a video of `frames` x 8 x 8 patches prepended to the first prompt (left padding kept),
    laid out as each family's processor does: one placeholder run (Qwen2-VL, Qwen2.5-VL) or one run per
    frame, each between its own start and end tokens (Qwen3-VL)."""
    vc = model.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    t, h, w = frames, 8, 8
    per_frame = h * w // vc.spatial_merge_size**2
    runs = [t] if type(model).__name__ != "Qwen3VLForConditionalGeneration" else [1] * t
    run = torch.cat(
        [torch.tensor([tiny_qwen.START] + [tiny_qwen.VIDEO] * (n * per_frame) + [tiny_qwen.END]) for n in runs]
    )
    rows = [
        torch.cat([run, r[m.bool()]]) if i == 0 else r[m.bool()]
        for i, (r, m) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"], strict=True))
    ]
    ids, mask = left_pad(rows)
    g = torch.Generator().manual_seed(9)
    types = (ids == tiny_qwen.IMAGE).long() + 2 * (ids == tiny_qwen.VIDEO).long()
    return {
        **inputs,
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": types,
        "pixel_values_videos": torch.randn(t * h * w, width, generator=g),
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }


def test_videos_pass_through_unreduced(family, model, inputs):
    """A prompt with a video next to prompts with images: with 'none' the patched model gives exactly
    the unpatched tokens; with a method the images are reduced and the video is not."""
    video = _with_video(model, inputs)
    ref = _generate(model, video)
    with torch.no_grad():
        ref_logits = model(**video).logits
    handle = visprune.apply(model, "none")
    try:
        assert torch.equal(_generate(model, video), ref)
        with torch.no_grad():
            logits = model(**video).logits
    finally:
        visprune.remove(model)
    real = handle.stats.position_map >= 0  # the same computation: every text token's logits agree
    gathered = logits.gather(1, handle.stats.position_map.clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
    torch.testing.assert_close(gathered[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    handle = visprune.apply(model, "random", budget=4)
    try:
        out = _generate(model, video)
    finally:
        visprune.remove(model)
    assert handle.stats.visual_tokens_out == [4, 4]
    assert out.shape == ref.shape


@pytest.mark.parametrize("method", ["fastervlm", "knee", "flowcut"])
def test_dense_positions_are_worked_out_before_the_image_path_reads_the_device(
    family, model, inputs, method, monkeypatch
):
    """The M-RoPE positions of the dense prompt (host work, ~20 ms at batch 8) must come before the first
    host read of the reduction (a method's count or check, FlowCut's reads of what its pruning points kept),
    which waits for the tower: after it, the device would idle while the host works them out."""
    from visprune.models import qwen2_vl

    if method == "flowcut":  # a tower of 8 blocks: its first read comes after block 3
        model = tiny_qwen.tiny_qwen(family, depth=8)
    events = []
    handle = visprune.apply(model, method, **({"budget": 4} if method != "knee" else {}))
    try:
        adapter, spec = handle.adapter, handle.encoder
        dense_positions = adapter.dense_positions
        monkeypatch.setattr(adapter, "dense_positions", lambda *a: events.append("positions") or dense_positions(*a))
        wrapped = replace(spec, fn=lambda *a, **k: events.append("method") or spec.fn(*a, **k))
        monkeypatch.setattr(handle, "encoder", wrapped)

        class RecordedRead(qwen2_vl.StagedRead):
            def value(self):
                events.append("read")
                return super().value()

        monkeypatch.setattr(qwen2_vl, "StagedRead", RecordedRead)
        with torch.no_grad():
            model(**inputs)
    finally:
        visprune.remove(model)
    assert events[0] == "positions" and events.count("positions") == 1
    assert len(events) > 1  # the method (or FlowCut's reads) ran after it
    if method == "flowcut":
        assert "read" in events


@pytest.mark.parametrize("method", ["fastervlm", "divprune", "knee"])
def test_a_tower_that_overflows_raises_the_methods_error_not_a_silent_result(model, inputs, method):
    """Finite pixels, NaN features (a tower weight overflowed): the method's finite-value check must still
    stop the call with its InputError, also where it is read only after the splice (fixed-count methods)."""
    import copy

    from visprune.errors import InputError

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.visual.blocks[0].norm1.weight.fill_(float("nan"))
    visprune.apply(broken, method, **({"budget": 4} if method != "knee" else {}))
    try:
        with pytest.raises(InputError, match="NaN or inf"), torch.no_grad():
            broken(**inputs)
        with pytest.raises(InputError, match="NaN or inf"), torch.no_grad():
            broken.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        visprune.remove(broken)
