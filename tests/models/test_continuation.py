"""Continuing from the KV cache of a patched call gives what one uninterrupted generate gives: a
hand-written decode loop over forward, and generate resumed with the cache it returned. A cache that
does not belong to the last patched prefill is refused, never silently misread. And a deep copy of a
patched model runs on its own weights, with its own handle."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import visprune
from tests.models import tiny
from visprune import compat

KINDS = ["none", "prumerge+", "visionzip", "fastv", "pdrop", "dart", "knee+text", tiny.COMPOSITION[0]]
N_NEW = 4


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def single(model):
    inp = tiny.make_inputs(model, [6], seed=11)
    inp["pixel_values"] = tiny.varied_pixels(model, 1)
    return inp


@pytest.fixture(scope="module")
def batch(model):
    return tiny.varied_batch(model)


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_manual_decode_loop_equals_generate(model, single, method):
    tiny.apply_method(model, method) if method != "none" else visprune.apply(model, "none")
    try:
        with torch.no_grad():
            want = model.generate(**single, max_new_tokens=N_NEW, do_sample=False)
            cache = DynamicCache(config=model.config.text_config)
            out = model(**single, **{compat.cache_keyword(model): cache}, use_cache=True)
            mask = single["attention_mask"]
            tokens = []
            for _ in range(N_NEW):
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(
                    input_ids=token, attention_mask=mask, **{compat.cache_keyword(model): cache}, use_cache=True
                )
    finally:
        visprune.remove(model)
    assert torch.cat(tokens, dim=1).tolist() == want[:, -N_NEW:].tolist()


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_generate_resumed_from_its_cache_equals_one_generate(model, batch, method):
    tiny.apply_method(model, method) if method != "none" else visprune.apply(model, "none")
    try:
        whole, resumed = tiny.whole_and_resumed(model, batch, N_NEW)
    finally:
        visprune.remove(model)
    assert torch.equal(resumed, whole)


def test_foreign_or_stale_cache_is_refused(model, single, batch):
    tiny.apply_method(model, "fastv")
    try:
        with torch.no_grad():
            first = model.generate(**single, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            stale = compat.output_cache(first)
            model.generate(**batch, max_new_tokens=2, do_sample=False)  # a new prefill: the old cache is stale
            mask = torch.cat([single["attention_mask"], torch.ones(1, 2, dtype=torch.long)], dim=1)
            with pytest.raises(visprune.InputError, match="not filled by the last patched call"):
                model.generate(
                    input_ids=first.sequences,
                    attention_mask=mask,
                    max_new_tokens=2,
                    **{compat.cache_keyword(model): stale},
                )
            with pytest.raises(visprune.InputError, match="not filled by the last patched call"):
                model(input_ids=first.sequences[:, -1:], attention_mask=mask, **{compat.cache_keyword(model): stale})
    finally:
        visprune.remove(model)


def test_resumed_generate_refuses_new_images(model, single):
    tiny.apply_method(model, "prumerge+")
    try:
        with torch.no_grad():
            first = model.generate(**single, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            more = torch.cat([first.sequences, torch.full((1, 3), tiny.IMAGE_TOKEN)], dim=1)
            with pytest.raises(visprune.InputError, match="new images cannot be added"):
                model.generate(
                    input_ids=more,
                    pixel_values=single["pixel_values"],
                    attention_mask=torch.ones_like(more),
                    max_new_tokens=2,
                    **{compat.cache_keyword(model): compat.output_cache(first)},
                )
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("method", ["prumerge+", "fastv", tiny.COMPOSITION[0]], ids=tiny.method_id)
def test_deepcopy_runs_on_its_own_weights(model, batch, method):
    handle = tiny.apply_method(model, method)
    try:
        with torch.no_grad():
            before = model.generate(**batch, max_new_tokens=3, do_sample=False)
            twin = copy.deepcopy(model)
            twin_handle = twin._visprune_handle
            assert twin_handle is not handle and twin_handle.model is twin
            assert torch.equal(twin.generate(**batch, max_new_tokens=3, do_sample=False), before)
            twin.lm_head.weight.mul_(-1)  # the copy's own weights change; the original's must not matter
            flipped = twin.generate(**batch, max_new_tokens=3, do_sample=False)
            assert not torch.equal(flipped, before)
            assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), before)
            assert twin_handle.stats.visual_tokens_out and handle.stats is not twin_handle.stats
            visprune.remove(twin)
            assert "generate" not in twin.__dict__ and "forward" not in twin.__dict__
    finally:
        visprune.remove(model)


def test_handle_repr_is_short(model):
    handle = visprune.apply(model, "fastervlm", budget=8)
    try:
        text = repr(handle)
    finally:
        visprune.remove(model)
    assert "fastervlm" in text and "LlavaForConditionalGeneration" not in text and len(text) < 400
