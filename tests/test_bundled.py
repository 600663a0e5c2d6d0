"""The bundled tiny LLaVA: files, offline loading, answers, tokenizer / processor round trip, and the
training code's sequence layout matching the processor's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from visprune import bundled
from visprune.synth import format_prompt, load_split, score, tokenize, vocabulary
from visprune.train.build import BOS, build_processor, token_ids
from visprune.train.data import make_example, question_suffix
from visprune.train.tiny import lm_loss, normalise, run_tower

pytestmark = pytest.mark.skipif(not bundled.available(), reason="bundled model weights missing")

# Test-split items the bundled model answers correctly: the first of each family (existence, colour,
# shape, counting, position, relation, reading), from docs/results/dense-full-test.
KNOWN_GOOD = (0, 1, 2, 3, 4, 5, 13)


@pytest.fixture(scope="module")
def loaded():
    return bundled.load()


def test_files_are_small_fp16_shards() -> None:
    shards = sorted(bundled.path().glob("*.safetensors"))
    assert shards and sum(s.stat().st_size for s in shards) <= 40e6
    assert all(s.stat().st_size <= 16 * 2**20 for s in shards)
    header = shards[0].read_bytes()[8 : 8 + int.from_bytes(shards[0].read_bytes()[:8], "little")]
    dtypes = {v["dtype"] for k, v in json.loads(header).items() if k != "__metadata__"}
    assert dtypes == {"F16"}


def test_config_is_llava_15_shaped() -> None:
    cfg = json.loads((bundled.path() / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_config"]["image_size"] == 336 and cfg["vision_config"]["patch_size"] == 14
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["projector_hidden_act"] == "gelu" and cfg["text_config"]["model_type"] == "llama"


def test_bundled_is_an_attribute_after_import_visprune() -> None:
    code = "import visprune; assert visprune.bundled.load is not None and visprune.bundled.available()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_auto_classes_read_the_architecture() -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    assert AutoConfig.from_pretrained(bundled.path()).architectures == ["LlavaForConditionalGeneration"]
    model = AutoModelForImageTextToText.from_pretrained(bundled.path())
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_loads_offline_and_answers(monkeypatch, loaded) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, processor = bundled.load()
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    split = load_split("test", n=max(KNOWN_GOOD) + 1)
    items = [split[i] for i in KNOWN_GOOD]
    inputs = processor(
        images=[it.image() for it in items], text=[it.prompt() for it in items], return_tensors="pt", padding=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [score(a, it.answer) for a, it in zip(answers, items, strict=True)] == [True] * len(items), answers


def test_tokenizer_round_trip(loaded) -> None:
    _, processor = loaded
    tok = processor.tokenizer
    ids = token_ids()
    for question in ("Is the red circle left of the blue star?", "What is written next to the cyan square?"):
        prompt = format_prompt(question)
        expected = [ids[BOS]] + [ids[t] for t in tokenize(prompt)]
        assert tok(prompt).input_ids == expected
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.split("\n", 1)[1][:-11]}]}
        ]
        assert tok(processor.apply_chat_template(chat, add_generation_prompt=True)).input_ids == expected
    for word in vocabulary():
        assert tok(word, add_special_tokens=False).input_ids == [ids[word]]
        assert tok.decode([ids[word]]) == word
    assert tok.decode(tok("TOP-LEFT").input_ids, skip_special_tokens=True) == "top-left"
    assert tok.padding_side == "left" and tok.pad_token == "<pad>" and tok.eos_token == "</s>"


def test_processor_matches_build_and_training_pixels(loaded) -> None:
    _, processor = loaded
    built = build_processor()
    assert processor.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert processor.chat_template == built.chat_template
    image = load_split("test", 1)[0].image()
    out = processor(images=[image], text=[format_prompt("What color is the square?")], return_tensors="pt")
    assert int((out["input_ids"] == token_ids()["<image>"]).sum()) == 576
    ours = normalise(torch.from_numpy(np.asarray(image).copy()).unsqueeze(0))
    assert torch.allclose(out["pixel_values"], ours, atol=1e-5)


def test_training_layout_matches_the_processor(loaded) -> None:
    model, processor = loaded
    items = list(load_split("test", 3))
    inputs = processor(
        images=[it.image() for it in items], text=[it.prompt() for it in items], return_tensors="pt", padding=True
    )
    with torch.inference_mode():
        reference = model(**inputs).logits[:, -1]
        hidden, _ = run_tower(model.model.vision_tower, inputs["pixel_values"], pooled=False)
        feats = model.model.multi_modal_projector(hidden[:, 1:])
        for i, item in enumerate(items):
            suffix = torch.tensor([question_suffix(item.text, item.answer)])
            targets = torch.zeros_like(suffix, dtype=torch.bool)
            targets[0, -2] = True  # the answer token, predicted from the last prompt position
            loss, _ = lm_loss(model, feats[i : i + 1], suffix, targets)
            expected = torch.nn.functional.cross_entropy(reference[i : i + 1], suffix[0, -2:-1])
            assert torch.allclose(loss, expected, atol=1e-4)


def test_training_example_targets() -> None:
    ex = make_example(12345)
    assert ex["image"].shape == (336, 336, 3) and ex["patch"].shape[0] == 576
    n = int((ex["q_len"] > 0).sum())
    assert n >= 5
    eos = token_ids()["</s>"]
    assert all(ex["q_ids"][i, ex["q_len"][i] - 1] == eos for i in range(n))
    assert ex["cap_ids"][ex["cap_len"] - 1] == eos


def test_training_export_names_the_architecture(tmp_path):
    """A retrained model's folder loads through the Auto classes, as the bundled one does."""
    import json

    from visprune.train.tiny import export

    export(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
