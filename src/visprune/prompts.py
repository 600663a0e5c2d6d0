"""The instruction each image is asked about, as one vector per image: the "prompt" signal.

Instruction-conditioned encoder-side methods (CDPruner) score visual tokens by their similarity to the
text of the request. visprune reads that text from the prompt the model is called with: for the image
whose placeholders start at (b, s) with length n, its instruction is every real token of sample b after
its placeholder run, other images' placeholders excluded (the question and what follows it; an image at
the very end of its prompt uses the sample's other real tokens instead). The vector is the mean of the
L2-normalised LLM input embeddings of those tokens, so a token-wise cosine similarity averaged over the
instruction equals one dot product with it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visprune.models.splice import image_runs


def prompt_vectors(
    input_ids: Tensor,
    attention_mask: Tensor,
    runs: list[list[tuple[int, int]]],
    image_token_id: int,
    embedding: nn.Module,
) -> Tensor:
    """[images, D] float32: one instruction vector per placeholder run of `runs` (image_runs' order: sample
    0's runs first), from the model's input `embedding`. A sample with no real token besides its image
    placeholders gives a zero vector (no instruction: every visual token is equally relevant)."""
    real = attention_mask.bool() & (input_ids != image_token_id)
    owners = torch.tensor([b for b, sample in enumerate(runs) for _ in sample], dtype=torch.long)
    ends = torch.tensor([start + length for sample in runs for start, length in sample], dtype=torch.long)
    owners, ends = owners.to(input_ids.device), ends.to(input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    after = real[owners] & (positions >= ends.unsqueeze(1))  # [images, S]
    chosen = torch.where(after.any(dim=1, keepdim=True), after, real[owners]).float()
    unit = F.normalize(embedding(input_ids).float(), dim=-1)[owners]  # [images, S, D]
    return (chosen.unsqueeze(-1) * unit).sum(1) / chosen.sum(1, keepdim=True).clamp(min=1)


def prompts_for(
    adapter: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    runs: list[list[tuple[int, int]]] | None = None,
) -> Tensor:
    """`prompt_vectors` of a model call: the images' placeholder runs in `input_ids` (`runs`, read here on the
    host when not given), the adapter's image token and its LLM's input embedding."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if runs is None:
        runs = image_runs(input_ids, mask, adapter.image_token_id)
    embedding = adapter.language_model.get_input_embeddings()
    return prompt_vectors(input_ids, mask, runs, adapter.image_token_id, embedding)
