"""The tiny LLaVA's architecture, tokenizer and processor, built from code (no downloads).

The tokenizer is word-level over the synthetic suite's vocabulary (`visprune.synth.vocabulary()`),
lowercasing and splitting exactly as `visprune.synth.tokenize` does, with the special tokens LLaVA
needs. The processor is a stock `LlavaProcessor` (CLIP image processor at 336 px + that tokenizer),
so `AutoProcessor.from_pretrained(folder)` loads it offline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from visprune.synth import vocabulary

UNK, PAD, BOS, EOS, IMAGE = "<unk>", "<pad>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, PAD, BOS, EOS, IMAGE)
CAPTION_QUESTION = "What is in the image?"
# The same split as visprune.synth.vocab's tokenizer, applied after lowercasing and whitespace splitting.
WORD_PATTERN = r"[a-z0-9]+(?:-[a-z0-9]+)*|[^\sa-z0-9]"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny LLaVA: a CLIP vision tower at 336 px / patch 14 and a small Llama LM."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 256
    vision_layers: int = 8
    vision_heads: int = 4
    vision_mlp: int = 1024
    text_hidden: int = 256
    text_layers: int = 8
    text_heads: int = 4
    text_mlp: int = 768
    max_positions: int = 1024

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vocab_tokens() -> list[str]:
    """Token strings in id order: the special tokens, then the suite's words (sorted)."""
    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    return [*SPECIAL_TOKENS, *words]


def token_ids() -> dict[str, int]:
    """token string -> id, identical to the built tokenizer's vocabulary."""
    return {t: i for i, t in enumerate(vocab_tokens())}


def build_tokenizer() -> Any:
    """The word-level fast tokenizer (transformers `PreTrainedTokenizerFast`), bos added, left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = token_ids()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN), "isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=TinyConfig.max_positions,
    )


def build_processor(cfg: TinyConfig | None = None) -> Any:
    """LlavaProcessor: CLIP preprocessing at `image_size` + the word-level tokenizer + chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    cfg = cfg or TinyConfig()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(cfg: TinyConfig | None = None) -> Any:
    """The LlavaConfig: CLIP vision tower, Llama LM, 2-layer GELU projector, layer -2, CLS dropped."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = cfg or TinyConfig()
    ids = token_ids()
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(ids),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    side = cfg.image_size // cfg.patch_size
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE],
        image_seq_length=side * side,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def build_model(cfg: TinyConfig | None = None, seed: int = 0) -> Any:
    """A freshly initialised LlavaForConditionalGeneration with the tiny config (fp32, sdpa)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = build_config(cfg)
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model
