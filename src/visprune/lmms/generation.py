"""Batched generation for lmms-eval requests on a visprune-patched model: prompts through the checkpoint's
chat template, left padding, several images per prompt, each image with its own visual-token count, and
what each batch fed the LLM (from `handle.stats`) and how long its prefill took.

The prefill time of a batch is the time from the `generate` call to the first token's logits (the vision
tower, the method's reduction and the LLM's prefill: time to first token), read by a logits processor;
on a GPU, CUDA is synchronised at both ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from visprune.errors import InputError

# lmms-eval generation kwargs this model honours; any other key is refused with this list.
GEN_KWARGS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams")
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's own Hugging Face wrappers use the same default


@dataclass(frozen=True)
class Generation:
    """How to generate: `until` stop strings (the text is cut before the first), and generate's keywords."""

    until: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...]

    def generate_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)


def generation(gen_kwargs: dict[str, Any]) -> Generation:
    """`Generation` from a task's generation_kwargs: greedy unless temperature > 0 (lmms-eval's convention:
    temperature 0 with do_sample false is greedy; top_p / top_k only matter when sampling)."""
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise InputError(
            f"generation kwargs {unknown} are not supported by visprune's lmms-eval model; "
            f"it takes {', '.join(GEN_KWARGS)}"
        )
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise InputError(f"generation kwarg until={until!r}: expected a string or a list of strings")
    temperature = gen_kwargs.get("temperature") or 0.0
    sample = float(temperature) > 0
    if gen_kwargs.get("do_sample") and not sample:
        raise InputError("generation kwargs do_sample=True need temperature > 0 (temperature 0 is greedy decoding)")
    max_new = gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise InputError(f"generation kwarg max_new_tokens={max_new!r}: expected an integer >= 1")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sample}
    if gen_kwargs.get("num_beams") not in (None, 1):
        kwargs["num_beams"] = int(gen_kwargs["num_beams"])
    if sample:
        kwargs["temperature"] = float(temperature)
        for name in ("top_p", "top_k"):
            if gen_kwargs.get(name) is not None:
                kwargs[name] = gen_kwargs[name]
    return Generation(tuple(s for s in until if s), tuple(sorted(kwargs.items())))


@dataclass
class Answer:
    """One prompt's answer and what its images fed the LLM."""

    text: str
    images: int
    visual_tokens_in: int  # the dense model's visual tokens, summed over the prompt's images
    visual_tokens_llm: int  # visual tokens that reached the LLM (after encoder-side methods)
    visual_tokens_layers: float  # visual tokens averaged over the LLM's layers (after LLM-side methods too)
    prefill_tokens: int  # real tokens (text and visual) the LLM's first layer processed at prefill
    new_tokens: int


@dataclass
class BatchResult:
    answers: list[Answer]
    prefill_seconds: float
    seconds: float


class _FirstLogits:
    """A logits processor that notes when the first token's logits exist (the end of the prefill)."""

    def __init__(self, sync: bool) -> None:
        self.sync, self.at = sync, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            if self.sync:
                torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


def prompt(processor: Any, text: str, images: int) -> str:
    """The chat-template prompt of one user turn: its images first, then the text (as lmms-eval's chat
    wrappers place them); the template is the checkpoint's own."""
    if getattr(processor, "chat_template", None) is None:
        raise InputError(
            "this checkpoint's processor has no chat template; visprune's lmms-eval model formats every prompt "
            "with it (save one with the processor, e.g. processor.chat_template = ...)"
        )
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def cut(text: str, until: tuple[str, ...]) -> str:
    """`text` up to the first stop string."""
    for stop in until:
        if stop in text:
            text = text.split(stop, 1)[0]
    return text


def run_batch(
    model: Any, processor: Any, handle: Any, texts: list[str], images: list[list[Any]], gen: Generation
) -> BatchResult:
    """Generate for one batch of prompts (`images[i]`: the PIL images of prompt i, possibly none) on the
    patched `model`; per prompt the answer and its token counts from `handle.stats`."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompts = [prompt(processor, t, len(ims)) for t, ims in zip(texts, images, strict=True)]
    flat = [im for ims in images for im in ims]
    inputs = processor(images=flat or None, text=prompts, return_tensors="pt", padding=True).to(device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    sync = device.type == "cuda"
    first = _FirstLogits(sync)
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **gen.generate_kwargs(), logits_processor=[first])
    if sync:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[:, inputs["input_ids"].shape[1] :]
    decoded = processor.batch_decode(new, skip_special_tokens=True)
    pad = processor.tokenizer.pad_token_id
    counts = [len(ims) for ims in images]
    stats = handle.stats
    if flat:
        per_layer = stats.visual_tokens_per_layer(counts)
        tokens_in, tokens_out = stats.visual_tokens_in, stats.visual_tokens_out
    else:
        per_layer, tokens_in, tokens_out = [0.0] * len(texts), [], []
    answers, image = [], 0
    for i, (text, n) in enumerate(zip(decoded, counts, strict=True)):
        answers.append(
            Answer(
                text=cut(text, gen.until),
                images=n,
                visual_tokens_in=sum(tokens_in[image : image + n]),
                visual_tokens_llm=sum(tokens_out[image : image + n]),
                visual_tokens_layers=per_layer[i],
                prefill_tokens=stats.tokens_per_layer[i][0] if flat else int(inputs["attention_mask"][i].sum()),
                new_tokens=int((new[i] != pad).sum()) if pad is not None else new.shape[1],
            )
        )
        image += n
    prefill = (first.at - start) if first.at is not None else seconds
    return BatchResult(answers, prefill, seconds)
