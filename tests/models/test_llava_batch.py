"""Batched greedy generation equals generating each sample alone, for every registered method, the
composition of an encoder and an LLM method, prompts without images and prompts with two images."""

from __future__ import annotations

import pytest
import torch

import visprune
from tests.models import tiny

N_NEW = 5
ALL = [m.name for m in visprune.list_methods()]


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    """3 different images, prompts of 2, 7 and 11 question tokens (so the batch is left-padded)."""
    inp = tiny.make_inputs(model, [2, 7, 11], seed=5)
    inp["pixel_values"] = tiny.varied_pixels(model, 3)
    return inp


def test_options_table_covers_every_method():
    assert set(tiny.METHOD_OPTIONS) == set(ALL)
    assert len(ALL) == 19
    for name, opts in tiny.METHOD_OPTIONS.items():
        visprune.get_method(name).options(**opts)  # every tiny option is a real option of its method


def _check_batch_equals_alone(model, inputs, method, images_per_prompt=None):
    handle = tiny.apply_method(model, method)
    try:
        batched = tiny.greedy(model, inputs, N_NEW)
        stats = handle.stats
        n_prompts = inputs["input_ids"].shape[0]
        width = inputs["input_ids"].shape[1]
        # The caller's prompt comes back as passed, new tokens after it.
        assert batched.sequences.shape == (n_prompts, width + N_NEW)
        assert torch.equal(batched.sequences[:, :width], inputs["input_ids"])
        image_of = [i for i, n in enumerate(images_per_prompt or [1] * n_prompts) for _ in range(n)]
        for i in range(n_prompts):
            one = tiny.select(inputs, i, images_per_prompt)
            alone = tiny.greedy(model, one, N_NEW)
            assert torch.equal(alone.sequences[0, : one["input_ids"].shape[1]], one["input_ids"][0])
            assert batched.sequences[i, width:].tolist() == alone.sequences[0, -N_NEW:].tolist(), f"sample {i}"
            torch.testing.assert_close(
                torch.stack([step[i] for step in batched.logits]),
                torch.stack([step[0] for step in alone.logits]),
                rtol=1e-4,
                atol=1e-4,
            )
            mine = [k for k, owner in enumerate(image_of) if owner == i]
            assert handle.stats.visual_tokens_out == [stats.visual_tokens_out[k] for k in mine]
            assert handle.stats.tokens_per_layer == [stats.tokens_per_layer[i]]
    finally:
        visprune.remove(model)
    return stats


@pytest.mark.parametrize(
    "method",
    [*ALL, tiny.COMPOSITION[0]],
    ids=tiny.method_id,
)
def test_batch_equals_alone(model, inputs, method):
    stats = _check_batch_equals_alone(model, inputs, method)
    assert stats.visual_tokens_in == [64, 64, 64]
    spec_names = method if isinstance(method, list) else [method]
    placements = {visprune.get_method(n).placement.value for n in spec_names}
    if placements & {"encoder", "encoder+llm"}:
        assert all(k < 64 for k in stats.visual_tokens_out), stats.visual_tokens_out
    else:
        assert stats.visual_tokens_out == [64, 64, 64]
    if placements & {"llm", "encoder+llm"}:  # the LLM stage shortened the sequence at its layer(s)
        assert all(row[-1] < row[0] for row in stats.tokens_per_layer), stats.tokens_per_layer
    else:
        assert all(len(set(row)) == 1 for row in stats.tokens_per_layer)
    if isinstance(method, str) and method in tiny.FIXED_BUDGET:
        assert stats.visual_tokens_out == [tiny.FIXED_BUDGET[method]] * 3


MIXED = [1, 0, 2]


@pytest.fixture(scope="module")
def mixed_inputs(model):
    """A prompt with one image, one without any, one with two images; different lengths."""
    return tiny.make_inputs(model, [3, 9, 5], images_per_prompt=MIXED, seed=7)


@pytest.mark.parametrize(
    "method", ["prumerge+", "visionzip", "fastv", "pdrop", tiny.COMPOSITION[0]], ids=tiny.method_id
)
def test_mixed_images_batch_equals_alone(model, mixed_inputs, method):
    stats = _check_batch_equals_alone(model, mixed_inputs, method, MIXED)
    assert stats.visual_tokens_in == [64, 64, 64]  # three images in prompt order
    assert len(stats.visual_tokens_out) == 3
    # The prompt without an image is untouched by any stage.
    n_text = int(mixed_inputs["attention_mask"][1].sum())
    assert stats.tokens_per_layer[1] == [n_text] * 4


def test_two_images_in_one_prompt_reach_the_llm_in_order(model):
    """Swapping the two images of a prompt changes the output (both images are used, in order)."""
    inputs = tiny.make_inputs(model, [4], images_per_prompt=[2], seed=11)
    inputs["pixel_values"] = tiny.varied_pixels(model, 2)
    handle = tiny.apply_method(model, "visionzip")
    try:
        a = tiny.greedy(model, inputs, N_NEW)
        assert handle.stats.visual_tokens_out == [8, 8]
        swapped = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
        b = tiny.greedy(model, swapped, N_NEW)
        assert not torch.allclose(a.logits[0], b.logits[0])
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("fill", [0.0, 1.5], ids=["zeros", "constant"])
def test_flat_images_work_for_every_method(model, inputs, fill):
    """All-equal pixels make every score tie: every method still runs, keeps what its budget says,
    and hands the LLM finite features (no NaN from normalising flat scores)."""
    flat = {**inputs, "pixel_values": torch.full_like(inputs["pixel_values"], fill)}
    for name in ALL:
        handle = tiny.apply_method(model, name)
        try:
            out = tiny.greedy(model, flat, 2)
        finally:
            visprune.remove(model)
        assert all(torch.isfinite(step).all() for step in out.logits), name
        if name in tiny.FIXED_BUDGET:
            assert handle.stats.visual_tokens_out == [tiny.FIXED_BUDGET[name]] * 3, name


@pytest.mark.parametrize("method", ["fastv", "pdrop", "knee+text"])
def test_stats_say_which_visual_tokens_each_llm_stage_keeps(model, inputs, method):
    """Stats.llm_visual_kept: one mask per stage over the prefill sequence, each within the previous one
    and within the visual tokens, counting the visual tokens tokens_per_layer reports for that layer."""
    handle = tiny.apply_method(model, method)
    try:
        tiny.greedy(model, inputs, 1)
    finally:
        visprune.remove(model)
    stats = handle.stats
    stages = stats.llm_visual_kept
    assert [layer for layer, _ in stages] == list(visprune.get_method(method).layers(handle.options[method]))
    previous = stats.llm_visual
    for layer, kept in stages:
        assert kept.shape == stats.llm_visual.shape and not (kept & ~previous).any()
        text = [t[0] - v for t, v in zip(stats.tokens_per_layer, stats.visual_tokens_out, strict=True)]
        assert kept.sum(1).tolist() == [t[layer] - x for t, x in zip(stats.tokens_per_layer, text, strict=True)]
        previous = kept
