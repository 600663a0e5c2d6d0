"""The plugin's loading and batched generation on a family other than the bundled LLaVA-1.5: a tiny
random LLaVA-NeXT saved with its processor, loaded through AutoModelForImageTextToText, prompted through
its chat template, with images of two sizes (their own crops and token counts) in one batch. (Qwen-VL
processors need torchvision in transformers 5, which the test environments do not have.)"""

from __future__ import annotations

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
from transformers.models.llava_next import LlavaNextImageProcessorPil

import visprune
from tests.models.tiny import IMAGE_TOKEN, PAD, VOCAB, tiny_llava_next
from visprune.lmms import generation, loading

TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder with a tiny LLaVA-NeXT and a processor over a word-level vocabulary of its 128 ids."""
    special = {PAD: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", IMAGE_TOKEN: "<image>"}
    words = Tokenizer(models.WordLevel({special.get(i, f"w{i}"): i for i in range(VOCAB)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    model = tiny_llava_next()
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    folder = tmp_path_factory.mktemp("tiny-llava-next")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_llava_next_loads_and_batches_images_of_two_sizes(checkpoint):
    loaded = loading.load(str(checkpoint), device="cpu")
    assert type(loaded.model).__name__ == "LlavaNextForConditionalGeneration"
    assert (loaded.rank, loaded.world_size, str(loaded.device)) == (0, 1, "cpu")
    handle = visprune.apply(loaded.model, "fastervlm", budget=8)
    try:
        images = [[Image.new("RGB", (56, 56), (200, 10, 10))], [Image.new("RGB", (112, 56), (10, 200, 10))]]
        gen = generation.generation({"max_new_tokens": 3})
        result = generation.run_batch(loaded.model, loaded.processor, handle, ["w5 w6", "w7"], images, gen)
        stats = handle.stats
    finally:
        visprune.remove(loaded.model)
    assert [a.visual_tokens_in for a in result.answers] == stats.visual_tokens_in
    assert [a.visual_tokens_llm for a in result.answers] == stats.visual_tokens_out
    assert stats.visual_tokens_in[0] != stats.visual_tokens_in[1]  # one crop vs a 2-tile grid
    assert all(a.visual_tokens_llm < a.visual_tokens_in for a in result.answers)
    assert all(a.text for a in result.answers)


def test_an_unsupported_checkpoint_is_refused_before_its_weights_load(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(visprune.UnsupportedModelError, match="BertModel checkpoint; visprune supports"):
        loading.load(str(tmp_path), device="cpu")
