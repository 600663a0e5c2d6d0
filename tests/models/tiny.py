"""Tiny random-weight LLaVA models built from configs (no downloads), and inputs shaped like the
processor's: left-padded prompts with one run of image placeholders per image."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 100
PAD = 0
VOCAB = 128


def tiny_llava_config(
    attn: str = "sdpa", image_size: int = 112, patch: int = 14, layers: int = 4, select_strategy: str = "default"
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu",
    )
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    return cfg


def build(model_class: type, cfg, attn: str, seed: int):
    """`model_class(cfg)` with attention `attn` in every sub-config, weights drawn from `seed`, in eval
    mode, generating with the PAD token and no end token (so every test generates its full length)."""
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        if c is not None:
            c._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as a left-padded batch, as processors pad for generation: (input_ids, attention_mask)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def tiny_llava(attn: str = "sdpa", seed: int = 0, **kw) -> LlavaForConditionalGeneration:
    return build(LlavaForConditionalGeneration, tiny_llava_config(attn, **kw), attn, seed)


def make_inputs(model, prompt_lengths: list[int], images_per_prompt: list[int] | None = None, seed: int = 0) -> dict:
    """Left-padded batch: each prompt = system text, its images' placeholder runs, question text."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config.vision_config
    n_tokens = (cfg.image_size // cfg.patch_size) ** 2
    if model.config.vision_feature_select_strategy == "full" and cfg.model_type == "clip_vision_model":
        n_tokens += 1  # the CLS token is fed too (SigLIP has none)
    images_per_prompt = images_per_prompt or [1] * len(prompt_lengths)
    rows = []
    for length, n_img in zip(prompt_lengths, images_per_prompt, strict=True):
        system = torch.randint(3, 90, (3,), generator=g).tolist()
        row = list(system)
        for _ in range(n_img):
            row += [IMAGE_TOKEN] * n_tokens + torch.randint(3, 90, (1,), generator=g).tolist()
        row += torch.randint(3, 90, (length,), generator=g).tolist()
        rows.append(row)
    ids, mask = left_pad(rows)
    n_images = sum(images_per_prompt)
    pixels = torch.randn(n_images, 3, cfg.image_size, cfg.image_size, generator=g)
    out = {"input_ids": ids, "attention_mask": mask}
    if n_images:
        out["pixel_values"] = pixels
    return out


def varied_batch(model) -> dict:
    """Three left-padded prompts (2-, 9- and 5-token questions) with three images of different structure:
    the batch the generation and cache tests share."""
    inputs = make_inputs(model, [2, 9, 5], seed=17)
    inputs["pixel_values"] = varied_pixels(model, 3)
    return inputs


def select(inputs: dict, i: int, images_per_prompt: list[int] | None = None) -> dict:
    """Sample i alone, with its padding removed, as the processor would give it."""
    keep = inputs["attention_mask"][i].bool()
    out = {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
    }
    if "pixel_values" in inputs:
        counts = images_per_prompt or [1] * inputs["input_ids"].shape[0]
        start = sum(counts[:i])
        if counts[i]:
            out["pixel_values"] = inputs["pixel_values"][start : start + counts[i]]
    return out


def tiny_llava_next(attn: str = "sdpa", seed: int = 0):
    """A tiny LLaVA-NeXT: 56-px crops of 14-px patches (4 x 4 tokens), anyres pinpoints up to 112 x 112."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = tiny_llava_config(attn, image_size=56)
    cfg = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
    )
    return build(LlavaNextForConditionalGeneration, cfg, attn, seed)


def make_next_inputs(model, image_sizes: list[tuple[int, int]], prompt_lengths: list[int], seed: int = 0) -> dict:
    """Left-padded LLaVA-NeXT batch, one image per prompt, placeholder runs as long as the dense model's
    packed features (so the processor's count is reproduced exactly)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    patches = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in image_sizes
    ]
    side = cfg.vision_config.image_size
    pixel_values = torch.randn(len(image_sizes), max(patches), 3, side, side, generator=g)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes).pooler_output
    rows = []
    for f, length in zip(feats, prompt_lengths, strict=True):
        row = torch.randint(3, 90, (3,), generator=g).tolist() + [IMAGE_TOKEN] * f.shape[0]
        rows.append(row + torch.randint(3, 90, (length,), generator=g).tolist())
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": sizes}


# Options that fit the tiny models (8x8 = 64 visual tokens per image, a 4-layer LLM, a 3-layer tower).
METHOD_OPTIONS: dict[str, dict] = {
    "prumerge": {},
    "prumerge+": {},
    "knee": {"k_min": 4},
    "fastervlm": {"budget": 8},
    "vtc-cls": {"budget": 8, "start_layer": -3},
    "visionzip": {"dominant": 6, "contextual": 2},
    "tome": {"budget": 8},
    "random": {"budget": 8},
    "pool": {"budget": 16},
    "divprune": {"budget": 8},
    "vispruner": {"budget": 8},
    "cdpruner": {"budget": 8},
    "scope": {"budget": 8},
    "flowcut": {"budget": 8},
    "fastv": {"layer": 2},
    "sparsevlm": {"layers": (1, 2), "keep_counts": (24, 10)},
    "dart": {"layer": 2, "budget": 8},
    "pdrop": {"layers": (1, 2, 3)},
    "knee+text": {"k_min": 4, "text_layer": 2},
}
# Fixed-budget encoder methods: the exact number of tokens each image must get with METHOD_OPTIONS.
FIXED_BUDGET = {
    "fastervlm": 8,
    "vtc-cls": 8,
    "visionzip": 8,
    "tome": 8,
    "random": 8,
    "pool": 16,
    "divprune": 8,
    "vispruner": 8,
    "cdpruner": 8,
    "scope": 8,
    "flowcut": 8,
}
COMPOSITION = (["visionzip", "fastv"], {"visionzip": {"dominant": 6, "contextual": 2}, "fastv": {"layer": 2}})


def apply_method(model, name, **extra):
    """visprune.apply with the tiny options; `name` may be the COMPOSITION list."""
    import visprune

    if isinstance(name, (list, tuple)):
        return visprune.apply(model, list(name), **{**COMPOSITION[1], **extra})
    return visprune.apply(model, name, **{**METHOD_OPTIONS[name], **extra})


def method_id(name) -> str:
    return "+".join(name) if isinstance(name, (list, tuple)) else name


def greedy(model, inputs: dict, max_new_tokens: int = 5, **kw):
    """Greedy generate; returns the output object (sequences, logits)."""
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            **kw,
        )


def whole_and_resumed(model, inputs: dict, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ids of one generate of 2 * n_new tokens, and of a generate of n_new resumed for n_new more
    from its own returned cache (the caller's ids and mask extended by the new tokens)."""
    from visprune import compat

    with torch.no_grad():
        whole = model.generate(**inputs, max_new_tokens=2 * n_new, do_sample=False)
        first = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, return_dict_in_generate=True)
        ones = torch.ones(inputs["attention_mask"].shape[0], n_new, dtype=torch.long)
        resumed = model.generate(
            input_ids=first.sequences,
            attention_mask=torch.cat([inputs["attention_mask"], ones], dim=1),
            max_new_tokens=n_new,
            do_sample=False,
            **{compat.cache_keyword(model): compat.output_cache(first)},
        )
    return whole, resumed


def same_weights(model, attn: str) -> LlavaForConditionalGeneration:
    """A copy of `model` (built by tiny_llava) with another attention implementation."""
    other = tiny_llava(attn)
    other.load_state_dict(model.state_dict())
    return other


def varied_pixels(model, n: int = 3, seed: int = 1) -> torch.Tensor:
    """n images of different structure (a smooth ramp, noise, a bright square on black...)."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    ramp = torch.linspace(-2, 2, size)
    images = [
        (ramp[None, :, None] + ramp[None, None, :]).expand(3, size, size).clone(),
        torch.randn(3, size, size, generator=g),
        torch.full((3, size, size), -1.5),
    ]
    images[2][:, size // 4 : size // 2, size // 2 :] = 2.0
    while len(images) < n:
        images.append(torch.randn(3, size, size, generator=g) * (len(images) % 3 + 1))
    return torch.stack(images[:n])


def tiny_llava_siglip(attn: str = "sdpa", seed: int = 0, **kw) -> LlavaForConditionalGeneration:
    """A tiny LLaVA whose vision tower is a SiglipVisionModel: no CLS token, so the projector gets every
    token (vision_feature_select_strategy "full"). `kw` as tiny_llava_config."""
    from transformers import SiglipVisionConfig

    cfg = tiny_llava_config(attn, select_strategy="full", **kw)
    cfg.vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=cfg.vision_config.image_size,
        patch_size=cfg.vision_config.patch_size,
    )
    return build(LlavaForConditionalGeneration, cfg, attn, seed)
