"""Splice reduced image features into the text embeddings: one sequence per sample with K_i visual
rows per image, left-padded, with the attention mask, labels and the token layout of the result.

Model-agnostic: it needs the caller's input ids, their embeddings, the image placeholder id and the
per-image features (already projected to the LLM width) in the order the images appear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import TokenLayout

IGNORE_INDEX = -100


@dataclass
class Spliced:
    """The rebuilt batch. position_map[b, s] is the index in the new sequence of the caller's token s
    (text tokens), or -1 for image placeholders and caller padding."""

    inputs_embeds: Tensor  # [B, S', D]
    attention_mask: Tensor  # [B, S'] long
    input_ids: Tensor  # [B, S'] the caller's text ids with K_i image placeholders per image
    layout: TokenLayout
    labels: Tensor | None
    position_map: Tensor  # [B, S] long
    source_index: Tensor | None = None  # [B, S'] each token's index in the caller's sequence (with image_offsets)
    position_ids: Tensor | None = None  # the adapter's position ids for this sequence (None: the model's default)


def image_runs(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per sample, the (start, length) of each contiguous run of image placeholders among real tokens."""
    is_img = (input_ids == image_token_id) & attention_mask.bool()
    prev = torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
    nxt = torch.nn.functional.pad(is_img[:, 1:], (0, 1), value=False)
    starts = (is_img & ~prev).nonzero().tolist()
    ends = (is_img & ~nxt).nonzero().tolist()
    runs: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
    for (b, s), (_, e) in zip(starts, ends, strict=True):
        runs[b].append((s, e - s + 1))
    return runs


def splice(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    text_embeds: Tensor,
    image_token_id: int,
    image_features: list[Tensor],
    runs: list[list[tuple[int, int]]],
    labels: Tensor | None = None,
    image_offsets: list[Tensor] | None = None,
    pad_to: int = 1,
) -> Spliced:
    """Replace each placeholder run (in `runs`, from image_runs) by the next image's features.

    image_features[i] is [K_i, D] for the i-th run in batch order (sample 0's runs first). The result is
    left-padded (generation appends on the right), with zero embeddings at padding.
    image_offsets[i] ([K_i] long), when given, is each row's offset inside its image's placeholder run;
    the result then carries `source_index`: for every token, the index in the caller's sequence of the
    token it stands at (text: itself; a kept visual token: its placeholder; padding: 0), from which
    adapters gather the DENSE sequence's position ids.
    pad_to: the sequence length is rounded up to a multiple of it with more left padding (static shapes for
    the launch-free path: prompts whose lengths round to the same bucket share one prefill shape).
    """
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n_runs = sum(len(r) for r in runs)
    if n_runs != len(image_features):
        raise InputError(
            f"the prompts contain {n_runs} image placeholder runs but {len(image_features)} images were encoded; "
            "pass one <image> per image in the text (the processor expands it)"
        )
    real = attention_mask.bool()
    device = text_embeds.device
    feats = iter(image_features)
    offsets = iter(image_offsets) if image_offsets is not None else None
    seq_embeds, seq_ids, seq_visual, seq_labels, seq_text_pos, seq_pos = [], [], [], [], [], []
    for i in range(b):
        pieces, ids, visual, labs, text_pos, pos = [], [], [], [], [], []
        cursor = 0
        for start, length in [*runs[i], (s, 0)]:
            seg = torch.arange(cursor, start, device=device)
            seg = seg[real[i, cursor:start]]
            pieces.append(text_embeds[i, seg])
            ids.append(input_ids[i, seg])
            visual.append(torch.zeros(seg.numel(), dtype=torch.bool, device=device))
            text_pos.append(seg)
            pos.append(seg)
            if labels is not None:
                labs.append(labels[i, seg])
            if length:
                f = next(feats).to(text_embeds.dtype)
                if offsets is not None:
                    pos.append(start + next(offsets).to(device))
                pieces.append(f)
                ids.append(torch.full((f.shape[0],), image_token_id, dtype=input_ids.dtype, device=device))
                visual.append(torch.ones(f.shape[0], dtype=torch.bool, device=device))
                text_pos.append(torch.full((f.shape[0],), -1, dtype=torch.long, device=device))
                if labels is not None:
                    labs.append(torch.full((f.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=device))
            cursor = start + length
        seq_embeds.append(torch.cat(pieces))
        seq_ids.append(torch.cat(ids))
        seq_visual.append(torch.cat(visual))
        seq_text_pos.append(torch.cat(text_pos))
        seq_pos.append(torch.cat(pos))
        if labels is not None:
            seq_labels.append(torch.cat(labs))

    lengths = [e.shape[0] for e in seq_embeds]
    width = -(-max(lengths) // pad_to) * pad_to
    d = text_embeds.shape[-1]
    embeds = text_embeds.new_zeros(b, width, d)
    new_ids = input_ids.new_zeros(b, width)
    mask = torch.zeros(b, width, dtype=torch.long, device=device)
    visual_mask = torch.zeros(b, width, dtype=torch.bool, device=device)
    new_labels = None if labels is None else labels.new_full((b, width), IGNORE_INDEX)
    position_map = torch.full((b, s), -1, dtype=torch.long, device=device)
    source_index = torch.zeros(b, width, dtype=torch.long, device=device) if offsets is not None else None
    for i, n in enumerate(lengths):
        off = width - n
        embeds[i, off:] = seq_embeds[i]
        new_ids[i, off:] = seq_ids[i]
        mask[i, off:] = 1
        visual_mask[i, off:] = seq_visual[i]
        if new_labels is not None:
            new_labels[i, off:] = seq_labels[i]
        if source_index is not None:
            source_index[i, off:] = seq_pos[i]
        src = seq_text_pos[i]
        is_text = src >= 0
        position_map[i, src[is_text]] = torch.arange(off, width, device=device)[is_text]
    return Spliced(
        inputs_embeds=embeds,
        attention_mask=mask,
        input_ids=new_ids,
        layout=layout_from_masks(mask.bool(), visual_mask),
        labels=new_labels,
        position_map=position_map,
        source_index=source_index,
    )


def layout_from_masks(real: Tensor, visual: Tensor) -> TokenLayout:
    """TokenLayout from real-token and visual masks: system = text before the first visual token,
    query = text after the last one (all text when a sample has no image)."""
    s = real.shape[1]
    pos = torch.arange(s, device=real.device).expand_as(real)
    has_img = visual.any(dim=1, keepdim=True)
    first = torch.where(visual, pos, s).amin(dim=1, keepdim=True)
    last = torch.where(visual, pos, -1).amax(dim=1, keepdim=True)
    text = real & ~visual
    system = text & (pos < first) & has_img
    query = text & ((pos > last) | ~has_img)
    return TokenLayout(attention_mask=real, visual=visual & real, query=query, system=system)
