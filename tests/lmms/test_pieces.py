"""The plugin's pieces that need no lmms-eval: model_args parsing and checks (the library's own errors),
token budgets through the registry's rules, generation kwargs, prompts, and the per-task tallies."""

from __future__ import annotations

import pytest

import visprune
from visprune.budgets import options_for_budget
from visprune.lmms import args, generation, records
from visprune.lmms.generation import Answer, BatchResult
from visprune.synth import load_split


@pytest.fixture(scope="module")
def tiny():
    return visprune.bundled.load()


def test_values_are_parsed_as_lmms_eval_leaves_them():
    assert args.parse_value("None") is None
    assert args.parse_value("[2,4,6]") == (2, 4, 6)
    assert args.parse_value("[visionzip,fastv]") == ("visionzip", "fastv")
    assert args.parse_value("[0.5,true]") == (0.5, True)
    assert args.parse_value('{"budget": 128, "layers": [1, 2]}') == {"budget": 128, "layers": (1, 2)}
    assert args.parse_value("{'keep_ratio': 0.5}") == {"keep_ratio": 0.5}
    assert args.parse_value("'per-image'") == "per-image"
    assert args.parse_value(64) == 64 and args.parse_value(True) is True


def test_settings_and_options_are_split_and_checked():
    s = args.parse({"pretrained": "tiny-llava", "method": "prumerge+", "fence": "batch", "batch_size": "8"})
    assert (s.method, s.options, s.batch_size, s.pretrained) == ("prumerge+", {"fence": "batch"}, 8, "tiny-llava")
    s = args.parse({"method": "[visionzip,fastv]", "visionzip": '{"budget": 64}', "fastv": "{'keep_ratio': 0.25}"})
    assert s.method == ("visionzip", "fastv")
    assert s.options == {"visionzip": {"budget": 64}, "fastv": {"keep_ratio": 0.25}}
    assert args.parse({}).method == "none"


def _message(fn, *a, **k) -> str:
    with pytest.raises(visprune.VisPruneError) as info:
        fn(*a, **k)
    return str(info.value)


def test_bad_model_args_give_the_librarys_errors(tiny):
    model, _ = tiny
    # The same messages as visprune.apply / visprune.get_method.
    for given, call in [
        ({"method": "fastervm"}, lambda: visprune.get_method("fastervm")),
        ({"method": "fastervlm", "budget": -3}, lambda: visprune.apply(model, "fastervlm", budget=-3)),
        ({"method": "fastervlm", "budget": "[1,2]"}, lambda: visprune.apply(model, "fastervlm", budget=(1, 2))),
        ({"method": "pdrop", "layers": "[3,2,1]"}, lambda: visprune.apply(model, "pdrop", layers=(3, 2, 1))),
    ]:
        assert _message(args.parse, given) == _message(call)
    # An unknown key names the model's settings and the method's options.
    text = _message(args.parse, {"method": "fastervlm", "budgte": 64})
    assert "'budgte'" in text and "Did you mean: 'budget'" in text and "pretrained" in text and "budget" in text
    text = _message(args.parse, {"method": "none", "budget": 64})
    assert "unknown model_args key(s) 'budget'" in text and "method 'none' takes no options" in text
    assert "expected one of" in _message(args.parse, {"dtype": "float8"})
    assert "integer >= 1" in _message(args.parse, {"batch_size": 0})
    assert "auto" in _message(args.parse, {"max_batch_size": 4})
    assert "adaptive" in _message(args.parse, {"method": "prumerge+", "tokens": 64})
    assert "single method" in _message(args.parse, {"method": "[visionzip,fastv]", "tokens": 64})
    assert "must be a dict" in _message(args.parse, {"method": "[visionzip,fastv]", "fastv": 3})


def test_tokens_go_through_the_registered_budget_rule(tiny):
    model, _ = tiny
    layers = model.config.text_config.num_hidden_layers
    for method in ("fastervlm", "fastv", "pdrop", "divprune"):
        s = args.parse({"method": method, "tokens": 192})
        assert args.resolve(s, model) == (method, options_for_budget(method, 192, 576, layers))
    assert args.resolve(args.parse({"method": "fastv", "tokens": 64}), model)[1]["keep_ratio"] == 64 / 576
    clash = args.parse({"method": "fastv", "tokens": 64, "keep_ratio": 0.5})
    assert "give either tokens= or keep_ratio=" in _message(args.resolve, clash, model)
    assert args.resolve(args.parse({"method": "prumerge+"}), model) == ("prumerge+", {})


def test_generation_kwargs():
    greedy = {"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0, "do_sample": False, "top_p": 0}
    g = generation.generation(greedy)
    assert g.until == ("\n\n",) and g.generate_kwargs() == {"max_new_tokens": 16, "do_sample": False}
    g = generation.generation({"temperature": 0.7, "top_p": 0.9, "num_beams": 2})
    assert g.generate_kwargs() == {
        "max_new_tokens": generation.DEFAULT_MAX_NEW_TOKENS,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "num_beams": 2,
    }
    assert "image_aspect_ratio" in _message(generation.generation, {"image_aspect_ratio": "pad"})
    assert "temperature > 0" in _message(generation.generation, {"do_sample": True, "temperature": 0})
    assert generation.cut("yes ASSISTANT: no", ("ASSISTANT:",)) == "yes "


def test_prompt_is_the_one_visprune_eval_uses(tiny):
    from visprune.lmms.synth_task import doc_to_text

    _, processor = tiny
    for item in load_split("test", n=7):
        text = doc_to_text({"question": item.text})
        assert generation.prompt(processor, text, 1) == item.prompt()


def test_a_batch_reports_per_image_tokens_and_prefill(tiny):
    model, processor = tiny
    items = list(load_split("test", n=3))
    handle = visprune.apply(model, "prumerge+")
    try:
        gen = generation.generation({"max_new_tokens": 4, "temperature": 0})
        texts = [f"{it.text} Answer with a single word or number." for it in items]
        result = generation.run_batch(model, processor, handle, texts, [[it.image()] for it in items], gen)
        counts = list(handle.stats.visual_tokens_out)
    finally:
        visprune.remove(model)
    assert [a.visual_tokens_llm for a in result.answers] == counts and len(set(counts)) > 1
    assert all(a.visual_tokens_in == 576 and a.images == 1 for a in result.answers)
    assert [a.visual_tokens_layers for a in result.answers] == [float(c) for c in counts]
    assert 0 < result.prefill_seconds <= result.seconds


def test_tallies_merge_and_summarise():
    answers = [Answer("a", 1, 576, 64, 32.0, 100, 2), Answer("b", 2, 1152, 128, 64.0, 200, 3)]
    t = records.tally(BatchResult(answers, prefill_seconds=0.5, seconds=1.0), keep=[True, False])
    assert (t.items, t.images, t.visual_tokens_llm, t.prefill_seconds, t.seconds) == (1, 1, 64, 0.25, 0.5)
    merged = records.merge([records.to_dicts({"pope": t}), records.to_dicts({"pope": t, "mme": t})])
    assert merged["pope"].items == 2 and merged["mme"].items == 1
    summary = merged["pope"].summary()
    assert summary["visual_tokens_llm"] == 64 and summary["visual_tokens_llm_layer_avg"] == 32
    assert summary["prefill_ms_per_batch"] == pytest.approx(250.0)
    logged = records.metrics("pope", merged["pope"])
    assert logged["additional_metrics"]["pope/visual_tokens_llm"] == 64 and logged["total_gen_tokens"] == 4


def test_visual_tokens_per_layer_groups_images_by_sample():
    stats = visprune.Stats(visual_tokens_out=[10, 20, 30], tokens_per_layer=[[15, 15], [40, 25]])
    assert stats.visual_tokens_per_layer([1, 2]) == [10.0, 42.5]
    with pytest.raises(ValueError):
        stats.visual_tokens_per_layer([1, 1])


def test_prompts_without_images_share_a_batch_with_pictured_ones(tiny):
    model, processor = tiny
    items = list(load_split("test", n=2))
    handle = visprune.apply(model, "fastv", keep_ratio=0.25)
    try:
        gen = generation.generation({"max_new_tokens": 2})
        texts = [it.text for it in items]
        result = generation.run_batch(model, processor, handle, texts, [[items[0].image()], []], gen)
    finally:
        visprune.remove(model)
    pictured, text_only = result.answers
    assert (pictured.images, pictured.visual_tokens_llm, pictured.visual_tokens_layers) == (1, 576, 252.0)
    assert (text_only.images, text_only.visual_tokens_llm, text_only.visual_tokens_layers) == (0, 0, 0.0)
