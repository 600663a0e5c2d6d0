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
from visprune.host_reads import host_to_device
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
    real_tokens: list[int] | None = None  # per sample, the real (unpadded) tokens of the new sequence (host)
    visual_tokens: list[int] | None = None  # per sample, the image rows among them (host)


def image_runs(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per sample, the (start, length) of each contiguous run of image placeholders among real tokens (read on
    the host: on a GPU one synchronisation, which callers make before they launch the image path)."""
    is_img = (input_ids.cpu() == image_token_id) & attention_mask.cpu().bool()
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

    The layout is planned on the host from `attention_mask` (pass a CPU copy: then nothing here waits for
    the device, so the host prepares generate while the GPU still encodes the images) and the rows are
    gathered on the device in a few calls, whatever the number of samples and images.
    """
    b, s = input_ids.shape
    real = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.to("cpu", torch.bool)
    n_runs = sum(len(r) for r in runs)
    if n_runs != len(image_features):
        raise InputError(
            f"the prompts contain {n_runs} image placeholder runs but {len(image_features)} images were encoded; "
            "pass one <image> per image in the text (the processor expands it)"
        )
    counts = [f.shape[0] for f in image_features]
    plan = _plan(real, runs, counts)
    width = -(-max(len(p[0]) for p in plan) // pad_to) * pad_to
    host = _lay_out(plan, b, s, width)
    device = text_embeds.device
    planes = host_to_device(host, device)
    text_at, feature_at, start_at = planes[:3, :, :width]
    position_map = planes[3, :, :s]
    mask = (text_at >= 0) | (feature_at >= 0)
    visual_mask = feature_at >= 0
    d = text_embeds.shape[-1]
    feats = [f.to(text_embeds.dtype) for f in image_features]
    pool = torch.cat([text_embeds.reshape(b * s, d), *feats, text_embeds.new_zeros(1, d)])
    padding_row = pool.shape[0] - 1
    rows = torch.where(visual_mask, b * s + feature_at, torch.where(mask, text_at, padding_row))
    embeds = pool[rows]
    flat_ids = input_ids.reshape(-1)
    new_ids = torch.where(visual_mask, image_token_id, flat_ids[text_at.clamp(min=0)])
    new_ids = torch.where(mask, new_ids, 0).to(input_ids.dtype)
    new_labels = None
    if labels is not None:
        new_labels = torch.where(mask & ~visual_mask, labels.reshape(-1)[text_at.clamp(min=0)], IGNORE_INDEX)
        new_labels = new_labels.to(labels.dtype)
    source_index = None
    if image_offsets is not None:
        offsets = torch.cat([o.to(device) for o in image_offsets]) if image_offsets else start_at.new_zeros(1)
        placeholder = start_at + offsets[feature_at.clamp(min=0)]
        source_index = torch.where(visual_mask, placeholder, torch.where(mask, text_at - _row_starts(b, s, device), 0))
    return Spliced(
        inputs_embeds=embeds,
        attention_mask=mask.long(),
        input_ids=new_ids,
        layout=layout_from_masks(mask, visual_mask),
        labels=new_labels,
        position_map=position_map,
        source_index=source_index,
        real_tokens=[len(p[0]) for p in plan],
        visual_tokens=_per_sample(counts, runs),
    )


def _per_sample(counts: list[int], runs: list[list[tuple[int, int]]]) -> list[int]:
    """The image rows of each sample: `counts` per image in batch order, `runs` the samples' placeholder runs."""
    out, first = [], 0
    for sample in runs:
        out.append(sum(counts[first : first + len(sample)]))
        first += len(sample)
    return out


def _plan(real: Tensor, runs: list[list[tuple[int, int]]], counts: list[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per sample (host): for each token of its new sequence, the caller's position of the text token it is
    (-1 for a visual row), the row in the concatenated image features (-1 for text) and, for a visual row,
    the start of its placeholder run."""
    s = real.shape[1]
    feature_rows = iter(torch.arange(sum(counts)).split(counts))
    plan = []
    for i, sample in enumerate(runs):
        text, feature, start_of = [], [], []
        cursor = 0
        for start, length in [*sample, (s, 0)]:
            seg = torch.arange(cursor, start)[real[i, cursor:start]]
            text.append(seg)
            feature.append(torch.full_like(seg, -1))
            start_of.append(torch.zeros_like(seg))
            if length:
                rows = next(feature_rows)
                text.append(torch.full_like(rows, -1))
                feature.append(rows)
                start_of.append(torch.full_like(rows, start))
            cursor = start + length
        plan.append((torch.cat(text), torch.cat(feature), torch.cat(start_of)))
    return plan


def _lay_out(plan: list[tuple[Tensor, Tensor, Tensor]], b: int, s: int, width: int) -> Tensor:
    """[4, B, max(width, S)] long on the host: the plan left-padded to `width` (text: the flat index b * S +
    position into the caller's batch; -1 where absent), and position_map [B, S] in the last plane."""
    columns = max(width, s)
    host = torch.full((4, b, columns), -1, dtype=torch.long)
    host[2] = 0
    for i, (text, feature, start_of) in enumerate(plan):
        n = text.shape[0]
        off = width - n
        is_text = text >= 0
        host[0, i, off:width] = torch.where(is_text, text + i * s, -1)
        host[1, i, off:width] = feature
        host[2, i, off:width] = start_of
        host[3, i, text[is_text]] = torch.arange(off, width)[is_text]
    return host


def _row_starts(b: int, s: int, device: torch.device) -> Tensor:
    """[B, 1]: the flat index of each sample's first token in a [B, S] batch."""
    return (torch.arange(b, device=device) * s).unsqueeze(1)


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
