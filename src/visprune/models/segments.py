"""Attention over a packed token sequence split into independent segments (images, frames or windows).

Vision towers that pack several images into one sequence (the Qwen-VL family) attend within each
image, frame or window only. transformers runs that, without FlashAttention, as one attention call
per segment from Python: at 1008 px, Qwen2.5-VL makes about 2,300 calls per image. Here the segments
of equal length are folded into the batch dimension, so a sequence costs one attention call per
distinct segment length (one in the common case of equal windows or equal images); when there are
many distinct lengths (windows thinned by a reduction) the segments are padded to the longest and a
key mask hides the padding, in one call. The plan (which rows go where) is built on the host once per
layout and reused by every block, so the blocks launch no host synchronisation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.host_reads import host_to_device
from visprune.methods.signals import attention_with_lse

# Above this many distinct segment lengths, pad every segment to the longest (one masked call).
MAX_GROUPS = 4


@dataclass(frozen=True)
class Segments:
    """A packed sequence of `sum(lengths)` tokens split into consecutive runs that attend only within
    themselves (the block-diagonal mask transformers describes with `cu_seqlens`)."""

    lengths: tuple[int, ...]
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"segments need at least one token each, got lengths {self.lengths}")

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def starts(self) -> list[int]:
        return [0, *itertools.accumulate(self.lengths)][:-1]

    def cu_seqlens(self, device: torch.device | str | None = None) -> Tensor:
        """The int32 cumulative bounds [len + 1] (0 first, total last), as transformers takes them."""
        return torch.tensor([0, *itertools.accumulate(self.lengths)], dtype=torch.int32, device=device)

    def plan(self, device: torch.device, max_groups: int = MAX_GROUPS) -> _Plan:
        """How rows are folded into batched calls on `device` (built once, then cached)."""
        key = (str(device), max_groups)
        if key not in self._plans:
            self._plans[key] = _Plan.build(self, device, max_groups)
        return self._plans[key]


@dataclass
class _Plan:
    """uniform: the one segment length, when all are equal (the rows fold with a view).
    groups: per distinct length L, the rows [n_L * L] of its segments (a gather per length).
    padded: rows [n, L_max] of every segment padded with row 0, `valid` [n, L_max] for the mask, and
    `slots` [T]: where each token sits in the flattened padded layout (results are read back from there
    by index, with no data-dependent shapes on the device)."""

    uniform: int | None = None
    groups: list[tuple[int, Tensor]] = field(default_factory=list)
    padded: Tensor | None = None
    valid: Tensor | None = None
    slots: Tensor | None = None

    @classmethod
    def build(cls, segments: Segments, device: torch.device, max_groups: int) -> _Plan:
        lengths = segments.lengths
        if len(set(lengths)) == 1:
            return cls(uniform=lengths[0])
        starts = torch.tensor(segments.starts)
        sizes = torch.tensor(lengths)
        if len(set(lengths)) <= max_groups:
            groups = []
            for length in sorted(set(lengths)):
                first = starts[sizes == length]
                rows = (first.unsqueeze(1) + torch.arange(length)).flatten()
                groups.append((length, host_to_device(rows, device)))
            return cls(groups=groups)
        offsets = torch.arange(max(lengths))
        valid = offsets.unsqueeze(0) < sizes.unsqueeze(1)
        padded = torch.where(valid, starts.unsqueeze(1) + offsets, 0)
        slots = valid.flatten().nonzero().squeeze(1)  # in token order: segments are consecutive runs
        # copied without waiting for the device's queue (a tower planned anew mid-forward, say)
        return cls(
            padded=host_to_device(padded, device),
            valid=host_to_device(valid, device),
            slots=host_to_device(slots, device),
        )


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Segments, *, scale: float, eager: bool = False
) -> Tensor:
    """Attention of every token over the tokens of its own segment: q, k [T, H, d], v [T, H, e] -> [T, H, e]
    (q and k may be wider than v: `qwen_tower.widen` appends a key-bias column to them).

    eager=True computes softmax(q k^T * scale) v explicitly with the softmax in float32, as
    transformers' eager attention does; otherwise torch's scaled_dot_product_attention.
    """
    return _segment_attention(q, k, v, segments, scale, eager, False)[0]


def segment_attention_lse(
    q: Tensor, k: Tensor, v: Tensor, segments: Segments, *, scale: float, eager: bool = False
) -> tuple[Tensor, Tensor | None]:
    """`segment_attention` and each query row's log-normaliser log sum_j exp(q_i k_j * scale) over its
    segment, [T, H] float32, which the fused kernels compute anyway (the CLS-free signal reads it instead
    of a pass of its own). The log-normaliser is None where no kernel returns it (a padded layout, q and k
    wider than v, or a shape torch's private fused operators do not take); the attention is computed either way."""
    return _segment_attention(q, k, v, segments, scale, eager, True)


def _segment_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Segments, scale: float, eager: bool, want_lse: bool
) -> tuple[Tensor, Tensor | None]:
    t, h, _ = q.shape
    e = v.shape[-1]
    if segments.total != t:
        raise ValueError(f"the segments cover {segments.total} tokens but the sequence has {t}")
    want_lse = want_lse and q.shape[-1] == e  # the fused kernels' private operators take one head size
    plan = segments.plan(q.device)
    if plan.uniform is not None:
        n = t // plan.uniform
        folded = [x.reshape(n, plan.uniform, h, x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
        out, lse = _attend(*folded, None, scale, eager, want_lse)
        return out.transpose(1, 2).reshape(t, h, e), _token_rows(lse, t, h)
    if plan.padded is not None:
        n, width = plan.padded.shape
        rows = plan.padded.flatten()
        folded = [x[rows].view(n, width, h, x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
        attended, _ = _attend(*folded, plan.valid[:, None, None, :], scale, eager, False)
        return attended.transpose(1, 2).reshape(n * width, h, e).index_select(0, plan.slots), None
    out = v.new_empty(t, h, e)
    found = []
    for length, rows in plan.groups:
        n = rows.shape[0] // length
        folded = [x[rows].view(n, length, h, x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
        attended, lse = _attend(*folded, None, scale, eager, want_lse)
        out[rows] = attended.transpose(1, 2).reshape(-1, h, e)
        found.append((rows, lse))
    if not want_lse or any(lse is None for _, lse in found):
        return out, None
    lse_all = q.new_empty(t, h, dtype=torch.float32)
    for rows, lse in found:
        lse_all[rows] = _token_rows(lse, rows.shape[0], h)
    return out, lse_all


def _token_rows(lse: Tensor | None, t: int, h: int) -> Tensor | None:
    """[n, H, L] log-normalisers as [n * L, H] token rows."""
    return None if lse is None else lse.transpose(1, 2).reshape(t, h)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, eager: bool, want_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """[n, H, L, d] attention with an optional boolean key mask [n, 1, 1, L]; with want_lse (and no mask)
    also the rows' log-normalisers [n, H, L] float32, where a kernel gives them."""
    if eager:
        scores = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return out, scores.float().logsumexp(dim=-1) if want_lse else None
    if want_lse and mask is None:
        found = attention_with_lse(q, k, v, scale)
        if found is not None:
            return found
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
