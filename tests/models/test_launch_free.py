"""The launch-free path (apply's launch_free=True) on the CPU: its static shapes (the prompt padded to a
bucket, a static cache sized for prompt + new tokens, decode masks padded to the cache) give the plain
path's tokens for every method it supports; what it cannot run is refused; remove releases everything.
The CUDA-graph capture itself runs on a GPU only and is exercised by `visprune bench --launch-free`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import StaticCache

import visprune
from tests.models import graph_standin, tiny, tiny_qwen
from visprune import compat
from visprune.errors import InputError
from visprune.launch_free import CACHE_BUCKET, SEQUENCE_BUCKET
from visprune.methods import Placement, get_method
from visprune.patch import _prepare

LLM_METHODS = [  # the methods with LLM-side stages whose counts the host plans (knee+text's too, with its defaults)
    name
    for name in tiny.METHOD_OPTIONS
    if get_method(name).placement is not Placement.ENCODER
    and get_method(name).counts_planned(get_method(name).options(**tiny.METHOD_OPTIONS[name]))
]
ENCODER_METHODS = [name for name in tiny.METHOD_OPTIONS if get_method(name).placement is Placement.ENCODER]
N_NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.varied_batch(model)


def _greedy(model, method, inputs, launch_free, **kw):
    if method == "none":
        handle = visprune.apply(model, "none", launch_free=launch_free)
    else:
        handle = tiny.apply_method(model, method, launch_free=launch_free)
    try:
        out = tiny.greedy(model, inputs, max_new_tokens=N_NEW, **kw)
        return out, handle
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("method", ["none", *ENCODER_METHODS])
def test_launch_free_generates_the_plain_paths_tokens(model, inputs, method):
    plain, _ = _greedy(model, method, inputs, False)
    fast, _ = _greedy(model, method, inputs, True)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert compat.output_cache(fast) is not None and isinstance(compat.output_cache(fast), StaticCache)


def test_one_prompt_matches_plain_and_reuses_its_cache(model, inputs):
    """Batch 1, generate called twice (the second reuses the static cache): both equal the plain path."""
    one = tiny.select(inputs, 1)
    plain, _ = _greedy(model, "fastervlm", one, False)
    handle = visprune.apply(model, "fastervlm", launch_free=True, budget=8)
    try:
        first = tiny.greedy(model, one, max_new_tokens=N_NEW)
        kept = [t.clone() for layer in compat.output_cache(first).layers for t in (layer.keys, layer.values)]
        second = tiny.greedy(model, one, max_new_tokens=N_NEW)
        assert len(handle.launch_free._slots) == 1  # the path's own cache was reused
        # ... while each caller got a copy, which the second call left as it was
        path_cache = handle.launch_free._slots[next(iter(handle.launch_free._slots))].cache
        assert compat.output_cache(first) is not path_cache and compat.output_cache(second) is not path_cache
        after = [t for layer in compat.output_cache(first).layers for t in (layer.keys, layer.values)]
        assert all(torch.equal(a, b) for a, b in zip(kept, after, strict=True))
    finally:
        visprune.remove(model)
    assert torch.equal(first.sequences, plain.sequences)
    assert torch.equal(second.sequences, plain.sequences)


def test_sampling_follows_the_plain_path(model, inputs):
    def sample(launch_free):
        tiny.apply_method(model, "visionzip", launch_free=launch_free)
        try:
            torch.manual_seed(3)
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=N_NEW, do_sample=True, top_k=5)
        finally:
            visprune.remove(model)

    assert torch.equal(sample(True), sample(False))


def test_static_cache_is_sized_for_prompt_and_new_tokens(model, inputs):
    handle = visprune.apply(model, "prumerge+", launch_free=True)
    try:
        out = tiny.greedy(model, inputs, max_new_tokens=N_NEW)
        spliced = handle.stats.tokens_per_layer
        cache = compat.output_cache(out)
    finally:
        visprune.remove(model)
    longest = max(t[0] for t in spliced)
    width = -(-longest // SEQUENCE_BUCKET) * SEQUENCE_BUCKET
    assert cache.layers[0].max_cache_len == -(-(width + N_NEW) // CACHE_BUCKET) * CACHE_BUCKET
    assert int(cache.get_seq_length()) == width + N_NEW - 1  # the last token is sampled, never fed


def test_bucketed_prompt_keeps_masks_positions_and_logits(model, inputs):
    """The reduced prompt padded to a bucket: the same real tokens, more left padding, the same logits
    for every real token (generate numbers positions from the mask), hence the same first token."""
    handle = visprune.apply(model, "fastervlm", budget=8)
    try:
        with torch.no_grad():
            plain = _prepare(handle, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], {}, None)
            bucketed = _prepare(
                handle, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], {}, None, 32
            )
    finally:
        visprune.remove(model)
    width, extra = bucketed.attention_mask.shape[1], bucketed.attention_mask.shape[1] - plain.attention_mask.shape[1]
    assert width % 32 == 0 and extra > 0
    assert torch.equal(bucketed.attention_mask[:, extra:], plain.attention_mask)
    assert not bucketed.attention_mask[:, :extra].any()
    assert torch.equal(bucketed.input_ids[:, extra:], plain.input_ids)
    assert torch.equal(bucketed.inputs_embeds[:, extra:], plain.inputs_embeds)
    assert torch.equal(bucketed.layout.visual[:, extra:], plain.layout.visual)

    def last_logits(batch):
        positions = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=positions)
        return out.logits[:, -1]

    torch.testing.assert_close(last_logits(bucketed), last_logits(plain), rtol=1e-5, atol=1e-5)


def test_keep_positions_on_the_launch_free_path(model, inputs):
    plain = visprune.apply(model, "fastervlm", budget=8, keep_positions=True)
    try:
        expected = tiny.greedy(model, inputs, max_new_tokens=N_NEW).sequences
    finally:
        visprune.remove(model)
    visprune.apply(model, "fastervlm", budget=8, keep_positions=True, launch_free=True)
    try:
        got = tiny.greedy(model, inputs, max_new_tokens=N_NEW).sequences
    finally:
        visprune.remove(model)
    assert plain is not None and torch.equal(got, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 2}, "beam search is not supported on the launch-free path"),
        ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences > 1 is not supported"),
        ({"cache_implementation": "dynamic"}, "cache_implementation='dynamic' is not supported"),
        ({"use_cache": False}, "use_cache=False is not supported"),
        ({"prompt_lookup_num_tokens": 3}, "assisted decoding is not supported"),
    ],
)
def test_unsupported_generate_options_are_refused(model, inputs, kwargs, message):
    visprune.apply(model, "fastervlm", budget=8, launch_free=True)
    try:
        with pytest.raises(visprune.InputError, match=message), torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, **kwargs)
    finally:
        visprune.remove(model)


def test_a_cache_passed_in_is_refused(model, inputs):
    visprune.apply(model, "fastervlm", budget=8, launch_free=True)
    try:
        first = tiny.greedy(model, inputs, max_new_tokens=2)
        ones = torch.ones(3, 2, dtype=torch.long)
        with pytest.raises(visprune.InputError, match="cannot continue from a cache passed in"), torch.no_grad():
            model.generate(
                input_ids=first.sequences,
                attention_mask=torch.cat([inputs["attention_mask"], ones], 1),
                max_new_tokens=2,
                **{compat.cache_keyword(model): compat.output_cache(first)},
            )
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("options", [{"text_keep_ratio": None}, {"prune_text": True}])
def test_an_llm_stage_without_fixed_counts_is_refused_at_apply(model, options):
    """knee+text's text stage cut at its knee, or cutting system tokens too, decides its counts in the prefill."""
    assert "knee+text" in LLM_METHODS  # with a text_keep_ratio it runs (the tests above)
    with pytest.raises(visprune.InputError, match="text prunes inside the LLM with token counts decided"):
        tiny.apply_method(model, "knee+text", launch_free=True, **options)
    assert not hasattr(model, "_visprune_handle")


def test_other_bad_requests_are_refused_at_apply(model):
    with pytest.raises(visprune.InputError, match="launch_free must be True or False"):
        visprune.apply(model, "fastervlm", budget=8, launch_free="yes")
    with pytest.raises(visprune.InputError, match="sync_timings synchronises the host"):
        visprune.apply(model, "fastervlm", budget=8, launch_free=True, sync_timings=True)
    with pytest.raises(visprune.UnsupportedModelError, match="launch_free is not supported for Qwen2_5_VL"):
        visprune.apply(tiny_qwen.tiny_qwen2_5_vl(), "fastervlm", budget=8, launch_free=True)


def test_remove_releases_caches_and_restores_the_model(model, inputs):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(model.__dict__)
    handle = visprune.apply(model, "pool", launch_free=True, budget=16)
    adapter = handle.adapter
    wrapped = adapter.image_tokens
    tiny.greedy(model, inputs, max_new_tokens=2)
    assert handle.launch_free._slots
    visprune.remove(model)
    assert not handle.launch_free._slots and not handle.launch_free._images
    assert adapter.image_tokens != wrapped
    assert set(model.__dict__) == attrs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        unpatched = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert unpatched.shape[1] == inputs["input_ids"].shape[1] + 2


def test_decode_steps_share_one_graph_key_and_no_host_state(model, inputs, monkeypatch):
    """What a replayed graph cannot see must not change between the calls that share it: every decode
    step of a generate (and of a second generate) has the same key, and the cache keeps no per-step state
    on the host (a replay would not advance it). Prompts of different lengths in one bucket share the
    prefill key. This guards the GPU path against a transformers release that adds per-step host state."""
    from visprune import launch_free

    seen: list[tuple] = []
    real = launch_free.call_key

    def recording(piece, kwargs, cache):
        host = [
            {k: v for k, v in vars(layer).items() if isinstance(v, (int, float, bool)) and k != "is_initialized"}
            for layer in cache.layers
        ]
        key = real(piece, kwargs, cache)
        seen.append((piece, key, repr(host)))
        return key

    monkeypatch.setattr(launch_free, "call_key", recording)
    one, two = tiny.select(inputs, 1), tiny.select(inputs, 2)  # 9- and 5-token questions: one 32-token bucket
    visprune.apply(model, "fastervlm", budget=8, launch_free=True)
    try:
        for x in (one, one, two):
            tiny.greedy(model, x, max_new_tokens=N_NEW)
    finally:
        visprune.remove(model)
    prefill = {key for piece, key, _ in seen if piece == "prefill"}
    decode = {key for piece, key, _ in seen if piece == "decode"}
    assert len(prefill) == 1 and len(decode) == 1
    assert len([1 for piece, _, _ in seen if piece == "decode"]) == 3 * (N_NEW - 1)
    assert len({host for piece, _, host in seen if piece == "decode"}) == 1


def test_sliding_window_models_are_refused():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    base = tiny.tiny_llava_config()
    text = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tiny.VOCAB,
        sliding_window=16,
    )
    cfg = LlavaConfig(vision_config=base.vision_config, text_config=text, image_token_id=tiny.IMAGE_TOKEN)
    mistral = LlavaForConditionalGeneration(cfg).eval()
    with pytest.raises(visprune.UnsupportedModelError, match="does not support sliding-window attention"):
        visprune.apply(mistral, "fastervlm", budget=8, launch_free=True)
    assert not hasattr(mistral, "_visprune_handle")


@pytest.mark.parametrize("launch_free", [False, True])
def test_generate_encodes_images_without_gradients(model, inputs, launch_free):
    """generate outside torch.no_grad(): the tower and the reduction build no autograd graph (unpatched
    generate runs under no_grad; on the launch-free path gradients would also stop the graphs)."""
    handle = tiny.apply_method(model, "visionzip", launch_free=launch_free)
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert not any(r.features.requires_grad for crops in handle.stats.reductions for r in crops)
    finally:
        visprune.remove(model)


@pytest.fixture
def simulated_graphs(monkeypatch, model):
    """The launch-free path capturing and replaying on the CPU (`graph_standin`)."""
    graph_standin.install(monkeypatch, model)


@pytest.mark.parametrize("method", ["none", *ENCODER_METHODS])
def test_replayed_pieces_generate_the_plain_paths_tokens(model, inputs, method, simulated_graphs):
    """The pieces are captured on the first calls (the prefill on the second: the first allocates the cache)
    and replayed afterwards; every call gives the plain path's tokens."""
    plain, _ = _greedy(model, method, inputs, False)
    handle = visprune.apply(model, "none", launch_free=True) if method == "none" else None
    handle = handle or tiny.apply_method(model, method, launch_free=True)
    outs = []
    try:
        for _ in range(3):
            outs.append(tiny.greedy(model, inputs, max_new_tokens=N_NEW))
            captures = list(handle.launch_free.captures)
    finally:
        visprune.remove(model)
    # once each, then replays; an adaptive method's reduction too (padded, its counts read after the graph)
    assert sorted(c["piece"] for c in captures) == sorted(["vision tower + reduction", "prefill", "decode"])
    for out in outs:
        assert torch.equal(out.sequences, plain.sequences)


@pytest.mark.parametrize(("method", "options"), [("fastervlm", {"budget": 8}), ("prumerge+", {})])
def test_a_replayed_image_path_still_checks_the_methods_inputs(model, inputs, simulated_graphs, method, options):
    """A replay runs none of the method's Python, so the finite-value checks it recorded at capture come back
    with the graph's outputs: a tower that turns out NaN features raises the method's InputError on a replay
    too, instead of generating from them."""
    one = tiny.select(inputs, 1)
    weight = model.model.vision_tower.embeddings.patch_embedding.weight
    kept = weight.detach().clone()
    handle = visprune.apply(model, method, launch_free=True, **options)
    try:
        good = tiny.greedy(model, one, max_new_tokens=N_NEW)
        assert any(c["piece"] == "vision tower + reduction" for c in handle.launch_free.captures)
        with torch.no_grad():
            weight.fill_(float("nan"))  # in place: the graph reads the same memory
        with pytest.raises(InputError, match="NaN or inf"):  # read after the prefill is launched, before sampling
            tiny.greedy(model, one, max_new_tokens=N_NEW)
        assert handle.launch_free.image_checks is None  # nothing left for a later call to raise
        with torch.no_grad():
            weight.copy_(kept)
        again = tiny.greedy(model, one, max_new_tokens=N_NEW)  # the graph still serves good weights
    finally:
        with torch.no_grad():
            weight.copy_(kept)
        visprune.remove(model)
    assert torch.equal(again.sequences, good.sequences)


@pytest.mark.parametrize("method", [*LLM_METHODS, tiny.COMPOSITION[0]], ids=tiny.method_id)
def test_llm_side_stages_generate_the_plain_paths_tokens(model, inputs, method):
    """The LLM-side methods with fixed counts (and a composition) on the static cache and padded prompt:
    the plain path's tokens and logits, and its tokens per layer."""
    plain, plain_handle = _greedy(model, method, inputs, False)
    plain_layers = plain_handle.stats.tokens_per_layer
    fast, handle = _greedy(model, method, inputs, True)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert isinstance(compat.output_cache(fast), StaticCache)
    padding = [f[0] - p[0] for f, p in zip(handle.stats.tokens_per_layer, plain_layers, strict=True)]
    assert padding == [0] * len(padding)  # the bucket's padding is not a token


@pytest.mark.parametrize("method", [*LLM_METHODS, tiny.COMPOSITION[0]], ids=tiny.method_id)
def test_replayed_llm_stages_generate_the_plain_paths_tokens(model, inputs, method, simulated_graphs):
    """The prefill with its stages and the decode steps over the shorter caches are captured once and
    replayed: every call gives the plain path's tokens and tokens per layer, also when the batch's prompts
    change between calls (other lengths, two images in one prompt and none in another)."""
    other = tiny.make_inputs(model, [5, 3, 8], [2, 0, 1], seed=4)
    calls = [inputs, other, inputs, other]
    expected = []
    for batch in calls[:2]:
        out, plain_handle = _greedy(model, method, batch, False)
        expected.append((out.sequences, plain_handle.stats.tokens_per_layer))
    handle = tiny.apply_method(model, method, launch_free=True)
    try:
        for i, batch in enumerate(calls):
            out = tiny.greedy(model, batch, max_new_tokens=N_NEW)
            assert torch.equal(out.sequences, expected[i % 2][0])
            assert handle.stats.tokens_per_layer == expected[i % 2][1]
        pieces = [c["piece"] for c in handle.launch_free.captures]
    finally:
        visprune.remove(model)
    assert pieces.count("prefill") >= 1 and pieces.count("decode") >= 1
    assert len(pieces) <= 2 * 3  # at most one image path, prefill and decode graph per prompt shape


def test_a_replayed_prefill_still_checks_its_count_rule(model, inputs, simulated_graphs, monkeypatch):
    """The counts a replayed prefill kept are read after the graph and checked against the host's plan."""
    handle = tiny.apply_method(model, "fastv", launch_free=True)
    try:
        tiny.greedy(model, inputs, max_new_tokens=N_NEW)
        tiny.greedy(model, inputs, max_new_tokens=N_NEW)
        assert any(c["piece"] == "prefill" for c in handle.launch_free.captures)
        spec = handle.pruner.spec
        monkeypatch.setattr(handle.pruner, "spec", dataclasses.replace(spec, visual_kept=lambda n, o, s: n - 1))
        with pytest.raises(visprune.VisPruneError, match="its count rule"):
            tiny.greedy(model, inputs, max_new_tokens=N_NEW)
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("launch_free", [False, True])
def test_an_llm_stage_on_nan_states_raises_after_the_prefill(model, inputs, launch_free, simulated_graphs):
    """An LLM-side stage records its inputs' finite-value checks on the device and the prefill's end reads
    them (after its graph on the launch-free path, replays included): NaN hidden states raise the method's
    InputError instead of generating."""
    weight = model.model.language_model.layers[0].mlp.down_proj.weight
    kept = weight.detach().clone()
    handle = tiny.apply_method(model, "fastv", launch_free=launch_free)
    try:
        for _ in range(2):  # on the launch-free path the second call captures the prefill, a third replays it
            tiny.greedy(model, inputs, max_new_tokens=2)
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(InputError, match="NaN or inf"):
            tiny.greedy(model, inputs, max_new_tokens=2)
        if launch_free:
            assert any(c["piece"] == "prefill" for c in handle.launch_free.captures)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
        visprune.remove(model)


NEXT_CASES = [
    ("none", {}),
    ("fastervlm", {"budget": 8}),
    ("prumerge+", {}),
    ("fastv", {"layer": 2}),
    (tiny.COMPOSITION[0], tiny.COMPOSITION[1]),
]


@pytest.mark.parametrize(("method", "options"), NEXT_CASES, ids=[tiny.method_id(m) for m, _ in NEXT_CASES])
def test_llava_next_on_the_launch_free_path_generates_the_plain_paths_tokens(monkeypatch, method, options):
    """LLaVA-NeXT (images of different sizes, so different crop counts per prompt): its tower is captured (the
    crops' packing is host work), the prefill and the decode steps too, and every call, replays included,
    gives the plain path's tokens."""
    model = tiny.tiny_llava_next()
    inputs = tiny.make_next_inputs(model, [(56, 112), (112, 112), (56, 56)], [4, 9, 2], seed=3)
    visprune.apply(model, method, **options)
    try:
        plain = tiny.greedy(model, inputs, max_new_tokens=4).sequences
    finally:
        visprune.remove(model)
    graph_standin.install(monkeypatch, model)
    handle = visprune.apply(model, method, launch_free=True, **options)
    try:
        outs = [tiny.greedy(model, inputs, max_new_tokens=4).sequences for _ in range(3)]
        pieces = sorted(c["piece"] for c in handle.launch_free.captures)
    finally:
        visprune.remove(model)
    assert pieces == ["decode", "prefill", "vision tower"]
    assert all(torch.equal(out, plain) for out in outs)


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_prompts_of_one_bucket_share_the_graphs_of_an_llm_stage(model, method, simulated_graphs):
    """A stage's shorter sequence is padded to the prompt bucket too (masked slots), so prompts whose lengths
    fall in one bucket replay one prefill graph and one decode graph; each generates the plain path's tokens."""
    batches = [tiny.make_inputs(model, [n], seed=n) for n in (2, 3, 4)]
    for batch in batches:
        batch["pixel_values"] = tiny.varied_pixels(model, 1)
    plain = [_greedy(model, method, batch, False)[0].sequences for batch in batches]
    handle = tiny.apply_method(model, method, launch_free=True)
    try:
        for _ in range(2):
            for batch, expected in zip(batches, plain, strict=True):
                assert torch.equal(tiny.greedy(model, batch, max_new_tokens=N_NEW).sequences, expected)
        pieces = [c["piece"] for c in handle.launch_free.captures]
    finally:
        visprune.remove(model)
    assert pieces.count("prefill") == 1 and pieces.count("decode") == 1


def test_forward_with_a_launch_free_handle_is_the_plain_forward(model, inputs):
    """The launch-free path changes generate only: a forward call with an LLM-side stage returns what the
    plain path returns (its sequence is not padded to the bucket)."""
    outs = []
    for launch_free in (False, True):
        tiny.apply_method(model, "fastv", launch_free=launch_free)
        try:
            with torch.no_grad():
                outs.append(model(**inputs).logits)
        finally:
            visprune.remove(model)
    assert torch.equal(outs[0], outs[1])
