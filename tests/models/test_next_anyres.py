"""LLaVA-NeXT (anyres): per-crop reduction before packing, the budget split, newline tokens, and
images of different aspect ratios in one batch."""

import pytest
import torch

import visprune
from visprune.errors import InputError
from visprune.models.llava_next import _split_budget

from .tiny import COMPOSITION, METHOD_OPTIONS, make_next_inputs, tiny_llava_next

SIZES = [(40, 100), (100, 40), (56, 56)]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def inputs(model):
    return make_next_inputs(model, SIZES, [3, 6, 2])


def generate(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def one(inputs, i):
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
        "pixel_values": inputs["pixel_values"][i : i + 1],
        "image_sizes": inputs["image_sizes"][i : i + 1],
    }


def test_dense_path_equals_unpatched(model, inputs):
    ref = generate(model, inputs)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    handle = visprune.apply(model, "none")
    try:
        assert torch.equal(generate(model, inputs), ref)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, ref_logits)
        dense = inputs["attention_mask"].sum(1) - torch.tensor([3 + 3, 3 + 6, 3 + 2])
        assert handle.stats.visual_tokens_in == dense.tolist() == handle.stats.visual_tokens_out
    finally:
        visprune.remove(model)


def test_keeping_every_token_reproduces_the_dense_packing(model, inputs):
    """A budget at the most tokens any image can have keeps all tokens, saying so for the smaller images;
    packing must restore the dense order. A budget above that maximum is refused at apply."""
    ref = generate(model, inputs)
    with pytest.raises(InputError, match="exceeds the 80 visual tokens an image of this model can have"):
        visprune.apply(model, "fastervlm", budget=81)
    handle = visprune.apply(model, "fastervlm", budget=80)
    try:
        with pytest.warns(UserWarning, match="all .* are kept"):
            assert torch.equal(generate(model, inputs), ref)
        assert handle.stats.visual_tokens_out == handle.stats.visual_tokens_in
    finally:
        visprune.remove(model)


NEXT_OPTIONS = {**METHOD_OPTIONS, "pool": {"budget": 12}}  # per-crop shares of 12 factorise on 4 x 4 crops


# flowcut prunes a LLaVA-1.5 CLIP tower and is refused on LLaVA-NeXT (tests/models/test_flowcut.py)
@pytest.mark.parametrize("method", [*(m for m in METHOD_OPTIONS if m != "flowcut"), "composition"])
def test_batch_equals_one_by_one(model, inputs, method):
    if method == "composition":
        handle = visprune.apply(model, list(COMPOSITION[0]), **COMPOSITION[1])
    else:
        handle = visprune.apply(model, method, **NEXT_OPTIONS[method])
    try:
        batched = generate(model, inputs)[:, -4:]
        counts = list(handle.stats.visual_tokens_out)
        alone, alone_counts = [], []
        for i in range(len(SIZES)):
            alone.append(generate(model, one(inputs, i))[:, -4:])
            alone_counts += handle.stats.visual_tokens_out
        assert torch.equal(batched, torch.cat(alone))
        assert counts == alone_counts
    finally:
        visprune.remove(model)


def test_budget_is_split_across_crops_and_newlines_are_kept(model, inputs):
    handle = visprune.apply(model, "fastervlm", budget=12)
    try:
        generate(model, inputs, n=1)
        stats = handle.stats
        for i, crops in enumerate(stats.reductions):
            assert sum(r.count for r in crops) == 12
            newlines = stats.visual_tokens_out[i] - 12
            assert newlines >= 1
            dense_tiles = stats.visual_tokens_in[i] - 16 - newlines  # base crop has 4 x 4 tokens
            assert dense_tiles > 0
    finally:
        visprune.remove(model)


def test_adaptive_method_appends_one_summary_token_per_crop(model, inputs):
    handle = visprune.apply(model, "prumerge")
    try:
        generate(model, inputs, n=1)
        for crops, out in zip(handle.stats.reductions, handle.stats.visual_tokens_out, strict=True):
            extras = sum(int((r.sources < 0).sum()) for r in crops)
            assert extras == sum(1 for r in crops if r.count < r.assignment.numel())
            assert out > sum(r.count for r in crops)  # plus newlines
    finally:
        visprune.remove(model)


def test_split_budget_rule():
    assert _split_budget(12, [16, 8, 8]) == [6, 3, 3]
    assert _split_budget(10, [16, 16, 16]) == [4, 3, 3]
    assert sum(_split_budget(7, [5, 1, 9])) == 7
    with pytest.warns(UserWarning, match="budget=100 exceeds this image's 8 tokens"):
        assert _split_budget(100, [4, 4]) == [4, 4]
    assert _split_budget(None, [4, 4]) == [None, None]
    with pytest.raises(InputError, match="at least the number of crops"):
        _split_budget(2, [4, 4, 4])


def test_errors(model, inputs):
    visprune.apply(model, "fastervlm", budget=2)
    try:
        with pytest.raises(InputError, match="at least one token per crop"):
            generate(model, inputs, n=1)
        no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
        with pytest.raises(InputError, match="image_sizes"):
            generate(model, no_sizes, n=1)
    finally:
        visprune.remove(model)
