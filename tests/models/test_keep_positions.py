"""apply(..., keep_positions=True): every token keeps the position id it has in the dense sequence."""

import pytest
import torch

import visprune
from tests.models import tiny
from visprune.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.make_inputs(model, [2, 7, 11], seed=3)


def prefill_positions(model, inputs):
    """The position ids the language model receives at prefill."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("position_ids", kwargs.get("position_ids"))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["position_ids"]


def positions_with(model, inputs, method: str):
    """(handle, prefill position ids, spliced layout) of `method` with the tiny options and keep_positions."""
    handle = tiny.apply_method(model, method, keep_positions=True)
    try:
        pos = prefill_positions(model, inputs)
        layout = visprune.patch._prepare(
            handle, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], None, None
        ).layout
    finally:
        visprune.remove(model)
    return handle, pos, layout


def test_positions_are_the_dense_ones(model, inputs):
    handle, pos, layout = positions_with(model, inputs, "fastervlm")
    dense_len = inputs["attention_mask"].sum(1)
    for b in range(3):
        real = layout.attention_mask[b]
        p = pos[b][real]
        assert p[-1] == dense_len[b] - 1  # the last text token keeps its dense position
        visual = p[layout.visual[b][real]]
        kept = handle.stats.reductions[b][0].sources
        assert torch.equal(visual, 3 + kept)  # 3 system tokens precede the image
        assert torch.equal(p[:3], torch.arange(3))


@pytest.mark.parametrize(("method", "first_slot"), [("visionzip", True), ("prumerge", False)])
def test_a_token_without_source_stands_at_the_first_or_last_slot(model, inputs, method, first_slot):
    """VisionZip's leading CLS token takes the image's first position, PruMerge's trailing summary token
    its last one; the patches keep their own."""
    handle, pos, layout = positions_with(model, inputs, method)
    for b in range(3):
        real = layout.attention_mask[b]
        visual = pos[b][real][layout.visual[b][real]]
        sources = handle.stats.reductions[b][0].sources
        summary = sources < 0
        assert int(summary.sum()) == 1 and bool(summary[0]) == first_slot and bool(summary[-1]) != first_slot
        assert int(visual[summary]) == 3 + (0 if first_slot else 63)  # 3 system tokens, a 64-patch run
        assert torch.equal(visual[~summary], 3 + sources[~summary])


def test_default_renumbers_the_shorter_sequence(model, inputs):
    visprune.apply(model, "fastervlm", budget=8)
    try:
        pos = prefill_positions(model, inputs)
    finally:
        visprune.remove(model)
    assert pos is None or int(pos.max()) < int(inputs["attention_mask"].sum(1).max()) - 56


@pytest.mark.parametrize("method", ["fastervlm", ["visionzip", "fastv"]], ids=["fastervlm", "visionzip+fastv"])
def test_batch_equals_alone_and_generate_matches_forward(model, inputs, method):
    opts = {"budget": 8} if method == "fastervlm" else {"visionzip": {"dominant": 6, "contextual": 2}, "fastv": {}}
    visprune.apply(model, method, keep_positions=True, **opts)
    try:
        batched = tiny.greedy(model, inputs, 4).sequences[:, -4:]
        alone = torch.cat([tiny.greedy(model, tiny.select(inputs, i), 4).sequences[:, -4:] for i in range(3)])
        with torch.no_grad():
            first = model(**inputs).logits[:, -1].argmax(-1)
    finally:
        visprune.remove(model)
    assert torch.equal(batched, alone)
    assert torch.equal(batched[:, 0], first)


def test_only_for_llava(model):
    with pytest.raises(UnsupportedModelError, match="keep_positions"):
        visprune.apply(tiny.tiny_llava_next(), "fastervlm", keep_positions=True)
    assert not hasattr(model, "_visprune_handle")
