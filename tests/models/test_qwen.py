"""The Qwen-VL family through the adapter contract (tiny random-weight models, CPU): the dense path is
the model's own computation, every method runs batched exactly as one by one on images of different
sizes, kept tokens keep their dense M-RoPE positions and decoding continues after them."""

from __future__ import annotations

import pytest
import torch

import visprune
from tests.models import tiny_qwen
from tests.models.tiny import METHOD_OPTIONS

GRIDS = [(1, 8, 8), (1, 6, 10), None, (1, 10, 6)]  # 16, 15, no image, 15 merged tokens
LENGTHS = [2, 7, 4, 11]
N_NEW = 4
QWEN_OPTIONS = {
    **METHOD_OPTIONS,
    "fastervlm": {"budget": 4},
    "vtc-cls": {"budget": 4, "start_layer": -2},
    "visionzip": {"dominant": 3, "contextual": 1},
    "tome": {"budget": 4},
    "random": {"budget": 4},
    "pool": {"budget": 4},
    "knee": {"k_min": 2},
    "knee+text": {"k_min": 2, "text_layer": 2},
    "sparsevlm": {"layers": (1, 2), "keep_counts": (8, 4)},
    "dart": {"layer": 2, "budget": 4},
}


@pytest.fixture(scope="module", params=tiny_qwen.FAMILIES)
def model(request):
    return tiny_qwen.tiny_qwen(request.param)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_qwen.make_inputs(model, GRIDS, LENGTHS, seed=3)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, **kw)


def test_dense_path_is_the_models_own(model, inputs):
    ref = _generate(model, inputs)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    handle = visprune.apply(model, "none")
    try:
        out = _generate(model, inputs)
        with torch.no_grad():
            logits = model(**inputs).logits
        position_map = handle.stats.position_map
    finally:
        visprune.remove(model)
    assert torch.equal(out, ref)
    real = position_map >= 0
    gathered = logits.gather(1, position_map.clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
    torch.testing.assert_close(gathered[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert handle.stats.visual_tokens_in == [16, 15, 15]


@pytest.mark.parametrize("method", list(QWEN_OPTIONS))
def test_batch_equals_one_by_one(model, inputs, method):
    handle = visprune.apply(model, method, **QWEN_OPTIONS[method])
    try:
        batched = _generate(model, inputs)
        counts = list(handle.stats.visual_tokens_out)
        alone, alone_counts = [], []
        for i in range(len(GRIDS)):
            alone.append(_generate(model, tiny_qwen.select(inputs, i, GRIDS))[0, -N_NEW:])
            alone_counts += handle.stats.visual_tokens_out
    finally:
        visprune.remove(model)
    assert batched[:, -N_NEW:].tolist() == [a.tolist() for a in alone]
    assert counts == alone_counts
    budget = QWEN_OPTIONS[method].get("budget")
    if budget is not None and visprune.get_method(method).placement.value == "encoder":
        assert counts == [budget] * 3


def test_kept_tokens_keep_their_dense_mrope_positions(model, inputs):
    """Row 0 numbers the shorter sequence; rows 1-3 at each kept token equal the dense M-RoPE position of
    its placeholder; the first decoded token's positions follow the dense prompt's last position."""
    dense, _ = model.model.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True
    )
    handle = visprune.apply(model, "random", budget=4)
    try:
        _generate(model, inputs)
    finally:
        visprune.remove(model)
        hook.remove()
    prefill, first_step = seen[0], seen[1]
    assert prefill.shape[0] == 4
    image = 0
    for b, grid in enumerate(GRIDS):
        row, real = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        keep = real.clone()  # the caller's tokens that reach the LLM, in order
        if grid is not None:
            start = int((row == tiny_qwen.IMAGE).nonzero()[0])
            run = torch.arange(start, start + handle.stats.visual_tokens_in[image])
            keep[run] = False
            keep[start + handle.stats.reductions[image][0].kept] = True
            image += 1
        want = dense[:, b, keep]
        n = want.shape[1]
        assert torch.equal(prefill[1:, b, -n:], want), b
        assert torch.equal(prefill[0, b, -n:], torch.arange(n)), b
        assert torch.equal(first_step[1:, b, 0], dense[:, b, -1] + 1), b


def test_videos_and_missing_grids_are_refused(model, inputs):
    visprune.apply(model, "random", budget=4)
    try:
        with pytest.raises(visprune.InputError, match="video inputs are not supported yet"):
            _generate(
                model,
                {**inputs, "pixel_values_videos": inputs["pixel_values"], "video_grid_thw": inputs["image_grid_thw"]},
            )
        no_grid = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
        with pytest.raises(visprune.InputError, match="needs image_grid_thw"):
            _generate(model, no_grid)
    finally:
        visprune.remove(model)
