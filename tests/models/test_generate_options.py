"""generate's options on a patched model mean what they mean unpatched: lengths count the caller's
prompt, beams / sampling / several return sequences / a static cache work for every kind of method,
a missing attention mask is inferred as unpatched generate infers it, unsupported options are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

import visprune
from tests.models import tiny

KINDS = ["none", "prumerge+", "fastv", "pdrop", "knee+text", tiny.COMPOSITION[0]]


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.varied_batch(model)


def _apply(model, method):
    return visprune.apply(model, "none") if method == "none" else tiny.apply_method(model, method)


def _generate(model, method, inputs, **kw):
    _apply(model, method)
    try:
        with torch.no_grad():
            return model.generate(**inputs, **kw)
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_max_length_counts_the_callers_prompt(model, inputs, method):
    width = inputs["input_ids"].shape[1]
    out = _generate(model, method, inputs, max_length=width + 3, do_sample=False)
    assert out.shape == (3, width + 3)
    same = _generate(model, method, inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, same)
    config = GenerationConfig(max_length=width + 2, do_sample=False, pad_token_id=tiny.PAD)
    assert _generate(model, method, inputs, generation_config=config).shape == (3, width + 2)


def test_max_length_below_the_prompt_is_refused(model, inputs):
    with pytest.raises(visprune.InputError, match="max_length=10 leaves no room"):
        _generate(model, "prumerge+", inputs, max_length=10)


def test_min_length_counts_the_callers_prompt(model, inputs):
    """min_length forbids the end token until the caller's prompt + new tokens reach it."""
    width = inputs["input_ids"].shape[1]
    logits_eos = _generate(
        model,
        "prumerge+",
        inputs,
        max_new_tokens=4,
        min_length=width + 3,
        eos_token_id=5,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    scores = torch.stack(logits_eos.scores)  # [steps, B, V] after logits processors
    assert torch.isinf(scores[:3, :, 5]).all() and torch.isfinite(scores[3, :, 5]).all()


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_beams_and_return_sequences(model, inputs, method):
    width = inputs["input_ids"].shape[1]
    out = _generate(model, method, inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert out.shape == (6, width + 3)
    assert torch.equal(out[:, :width], inputs["input_ids"].repeat_interleave(2, dim=0))
    # Beam search with one returned sequence keeps the greedy prompt layout too, and beam 1 == greedy.
    beam1 = _generate(model, method, inputs, max_new_tokens=3, num_beams=1, do_sample=False)
    greedy = _generate(model, method, inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(beam1, greedy)


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_sampling_is_seeded_and_batched(model, inputs, method):
    width = inputs["input_ids"].shape[1]
    torch.manual_seed(3)
    a = _generate(model, method, inputs, max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=2)
    torch.manual_seed(3)
    b = _generate(model, method, inputs, max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=2)
    assert a.shape == (6, width + 4) and torch.equal(a, b)


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_static_cache_equals_dynamic(model, inputs, method):
    dynamic = _generate(model, method, inputs, max_new_tokens=4, do_sample=False)
    static = _generate(model, method, inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_compiled_static_decoding_follows_apply_and_remove(model, inputs):
    """Under a static cache transformers compiles the decoding step (on a GPU; forced here on the CPU with
    the plain dynamo backend). torch.compile does not guard on module hooks, so code compiled dense must not
    serve the patched model (it would decode without fastv's stages) nor code compiled patched the model
    after `remove`: each is equal to the uncompiled, dynamic-cache generation, in that order."""
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True  # transformers' switch for compiling off the GPU
    compiled = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static", "compile_config": config}
    with torch.no_grad():
        dense = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(**inputs, **compiled), dense)
        before = {k: v for k, v in model.__dict__.items() if k in ("_compiled_call", "_last_compile_config")}
        pruned = _generate(model, "fastv", inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(_generate(model, "fastv", inputs, **compiled), pruned)
        assert {k: v for k, v in model.__dict__.items() if k in before} == before
        assert torch.equal(model.generate(**inputs, **compiled), dense)
        # an encoder-side method adds no hooks and keeps the compiled code: its patched call is guarded
        merged = _generate(model, "prumerge+", inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(_generate(model, "prumerge+", inputs, **compiled), merged)
        assert torch.equal(model.generate(**inputs, **compiled), dense)


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_missing_attention_mask_is_inferred_like_unpatched(model, inputs, method):
    """Without a mask, generate takes pad tokens for padding (pad id 0 here), patched or not."""
    no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with_mask = _generate(model, method, inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(_generate(model, method, no_mask, max_new_tokens=4, do_sample=False), with_mask)
    if method == "none":
        with torch.no_grad():
            unpatched = model.generate(**no_mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(with_mask, unpatched)


@pytest.mark.parametrize("method", KINDS, ids=tiny.method_id)
def test_right_padding_equals_left_padding(model, inputs, method):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        real = ids[i, mask[i].bool()]
        right_ids[i, : real.numel()], right_mask[i, : real.numel()] = real, 1
    right = {**inputs, "input_ids": right_ids, "attention_mask": right_mask}
    left_out = _generate(model, method, inputs, max_new_tokens=3, do_sample=False)
    right_out = _generate(model, method, right, max_new_tokens=3, do_sample=False)
    width = ids.shape[1]
    assert torch.equal(right_out[:, :width], right_ids)
    assert torch.equal(right_out[:, width:], left_out[:, width:])


def test_prefill_chunking_is_refused(model, inputs):
    with pytest.raises(visprune.InputError, match="prefill_chunk_size is not supported"):
        _generate(model, "fastv", inputs, max_new_tokens=2, prefill_chunk_size=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: transformers compiles decoding there")
def test_static_cache_decoding_compiled_on_the_gpu_equals_dynamic():
    """On a GPU, generate under a static cache compiles the decoding step (inductor, CUDA graphs): the
    patched model generates the same tokens as with the dynamic cache, and the model after remove the dense
    ones (not the patched model's compiled step)."""
    gpu = tiny.tiny_llava(attn="sdpa").to("cuda")
    inp = {k: v.to("cuda") for k, v in tiny.make_inputs(gpu, [2, 9, 5], seed=17).items()}
    inp["pixel_values"] = tiny.varied_pixels(gpu, 3).to("cuda")
    static = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        dense = gpu.generate(**inp, max_new_tokens=4, do_sample=False)
        _apply(gpu, "fastv")
        pruned = gpu.generate(**inp, max_new_tokens=4, do_sample=False)
        assert torch.equal(gpu.generate(**inp, **static), pruned)
        visprune.remove(gpu)
        assert torch.equal(gpu.generate(**inp, **static), dense)
