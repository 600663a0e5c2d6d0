"""Signals computed from attention projections, without ever materialising a full attention map.

These are the formulas adapters use to turn a layer's q/k into the rows a method asks for; they are
here, in pure tensor code, so tests can check them against a plain attention computation.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from visprune.errors import InputError
from visprune.methods.checks import check_choice


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, T, C] -> [B, H, T, C/H]."""
    b, t, c = x.shape
    if c % num_heads:
        raise InputError(f"width {c} is not divisible by num_heads={num_heads}")
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)


def cls_attention(q_cls: Tensor, keys: Tensor, num_heads: int, heads: str = "mean") -> Tensor:
    """Attention probabilities from the CLS query to the patch keys: [B, N].

    q_cls: [B, C] the CLS token's query projection; keys: [B, 1 + N, C] key projections with the CLS
    key first. The softmax runs over all 1 + N keys (as in the model) and the CLS column is dropped.
    heads="single" treats the full width C as one head with scale C^-1/2 (PruMerge's official code);
    "mean"/"sum" split into `num_heads` heads with scale (C/H)^-1/2 and average/sum the per-head rows.
    Computed in float32; returns float32.
    """
    check_choice(heads, "heads", ("single", "mean", "sum"))
    if q_cls.dim() != 2 or keys.dim() != 3 or keys.shape[0] != q_cls.shape[0] or keys.shape[2] != q_cls.shape[1]:
        raise InputError(f"q_cls must be [B, C] and keys [B, 1+N, C]; got {tuple(q_cls.shape)} and {tuple(keys.shape)}")
    q = q_cls.float().unsqueeze(1)
    k = keys.float()
    h = 1 if heads == "single" else num_heads
    qh, kh = _split_heads(q, h), _split_heads(k, h)  # [B, H, 1, d], [B, H, 1+N, d]
    probs = ((qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5).softmax(dim=-1)[:, :, 0, 1:]  # [B, H, N]
    return probs.sum(dim=1) if heads == "sum" else probs.mean(dim=1)


def cls_cosine(hidden: Tensor) -> Tensor:
    """[B, N] float32: cosine similarity between the CLS token and each patch token of one layer's hidden
    states [B, 1 + N, C] (CLS first): the "similarity between visual and CLS tokens" of Yu, Chen & Xu."""
    if hidden.dim() != 3 or hidden.shape[1] < 2:
        raise InputError(f"hidden must be [B, 1+N, C] with the CLS token first, got {tuple(hidden.shape)}")
    h = hidden.float()
    return torch.nn.functional.cosine_similarity(h[:, 1:], h[:, :1], dim=-1)


def patch_keys(keys: Tensor, num_heads: int, heads: str = "mean", has_cls: bool = True) -> Tensor:
    """Patch keys without the CLS key: [B, N, C] ("single") or head-averaged [B, N, C/H] ("mean").

    keys: [B, 1 + N, C] with the CLS key first, or [B, N, C] when has_cls is False.
    """
    check_choice(heads, "heads", ("single", "mean"))
    k = keys[:, 1:] if has_cls else keys
    if heads == "single":
        return k
    return _split_heads(k, num_heads).mean(dim=1)


# Default bound on the elements of one chunk's score block [n, H, rows, keys] (128 MiB in float32).
CHUNK_ELEMENTS = 1 << 25


def mean_received_attention(
    q: Tensor,
    k: Tensor,
    num_heads: int,
    heads: str = "mean",
    *,
    skip: int = 0,
    cu_seqlens: Tensor | None = None,
    chunk: int | None = None,
    lse: Tensor | None = None,
) -> Tensor:
    """Attention each token RECEIVES, averaged over the query rows (and heads) of one block.

    The CLS-free score ("mean-received"): for every key token j, the mean over query rows i of
    softmax_j(q_i k^T / sqrt(d)), i.e. a column mean of the block's attention map, computed in chunks
    of query rows so that the map is never materialised. Computed in float32; returns float32.

    q, k: the block's query and key projections (RoPE applied where the model applies it), width
    C = num_heads * head_dim. Per-head tensors [..., T, H, d] go in as `x.flatten(-2)`.
      - batched: [n, T, C] -> returns [n, T - skip]; every image attends over its own T tokens.
      - packed (cu_seqlens given): [T_total, C] several images in one sequence, as the Qwen-VL towers
        pack them; cu_seqlens [S + 1] the cumulative segment lengths (0 first, T_total last). Tokens
        attend only within their own segment (block-diagonal mask). Returns [T_total - S * skip]: each
        segment's tokens in order, its first `skip` dropped. Chunks may span segments (no loop over
        images); the segment bounds are read on the host once.
    heads: "single" treats the full width C as one head (scale C^-1/2); "mean"/"sum" split into
        `num_heads` heads (scale (C/H)^-1/2) and average/sum the per-head received attention.
    skip: leading special tokens per image (1 for CLIP's CLS). Their key columns stay in the softmax
        (the model's own attention) but are dropped from the output, and their query rows are not
        averaged: the result is the attention each patch receives from the patch queries.
    chunk: query rows per step (default: as many as keep a step's [n, H, rows, keys] scores within
        CHUNK_ELEMENTS elements).
    lse: optional, the log-normaliser log sum_j exp(q_i k_j / sqrt(d)) of every query row and head,
        [n, T, H] (batched) or [T_total, H] (packed), float32: what the block's own fused attention call
        returned (`attention_with_lse`). Where the two-pass fused computation runs it replaces the first
        pass; elsewhere it is not needed. Only for heads="mean"/"sum" (per-head normalisers).
    """
    check_choice(heads, "heads", ("single", "mean", "sum"))
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise InputError(f"skip must be an int >= 0, got {skip!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk must be an int >= 1 or None, got {chunk!r}")
    h = 1 if heads == "single" else num_heads
    if lse is not None:
        expected = (*q.shape[:-1], h)
        if heads == "single" or not isinstance(lse, Tensor) or tuple(lse.shape) != expected:
            raise InputError(
                f"lse must be the per-head log-normalisers {expected} (heads='mean' or 'sum'); got "
                f"{getattr(lse, 'shape', lse)} with heads={heads!r}"
            )
    if cu_seqlens is None:
        if q.dim() != 3 or q.shape != k.shape:
            raise InputError(f"q and k must both be [n, T, C]; got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[1] <= skip:
            raise InputError(f"{q.shape[1]} tokens leave no token after skipping {skip}")
        lse_h = None if lse is None else lse.transpose(1, 2)
        total = _received(_split_heads(q, h), _split_heads(k, h), skip, chunk, lse_h)
        rows: Tensor | int = q.shape[1] - skip
    else:
        if q.dim() != 2 or q.shape != k.shape:
            raise InputError(f"with cu_seqlens, q and k must both be [T, C]; got {tuple(q.shape)} and {tuple(k.shape)}")
        bounds = _check_cu_seqlens(cu_seqlens, q.shape[0], skip)
        total, rows = _received_by_length(q, k, h, bounds, skip, chunk, lse), 1
    mean = total / rows  # averaged over query rows, summed over heads
    return mean if heads == "sum" else mean / h


def _received(qh: Tensor, kh: Tensor, skip: int, chunk: int | None, lse: Tensor | None = None) -> Tensor:
    """[n, T - skip] column sums (`_received_batched`), through fused attention kernels for half-precision
    CUDA inputs (`_received_fused`, reading the rows' normalisers `lse` [n, H, T] where given) and in
    query chunks otherwise."""
    if qh.is_cuda and qh.dtype in (torch.float16, torch.bfloat16) and chunk is None:
        fused = _received_fused(qh, kh, skip, lse)
        if fused is not None:
            return fused
    return _received_batched(qh, kh, skip, chunk)


def _received_fused(qh: Tensor, kh: Tensor, skip: int, lse: Tensor | None = None) -> Tensor | None:
    """[n, T - skip] column sums over heads and query rows skip.. of softmax(q k^T / sqrt(d)), from two passes
    of a fused attention kernel (no score matrix in memory); None where torch has no such kernel.

    Pass 1 gives each query row's log-normaliser lse_i. The column sum is sum_i exp(s_ij - lse_i): pass 2
    runs attention with the roles swapped (key j as the query, query row i as the key) and reads ITS
    log-normaliser, log sum_i exp(s_ij - lse_i). Where the caller has lse [n, H, T] already (from the
    block's own attention call), pass 1 is skipped. The -lse_i offsets ride in two extra dimensions (a
    high and a low half-precision part of lse_i / scale, against ones), so the kernel's float32
    accumulation adds them at nearly float32 precision."""
    d = qh.shape[-1]
    scale = d**-0.5
    if lse is None:
        lse = _attention_lse(qh, kh, scale)
        if lse is None:
            return None
    offset = lse[:, :, skip:] / scale
    high = offset.to(qh.dtype)
    low = (offset - high.float()).to(qh.dtype)
    width = -(-(d + 2) // 8) * 8  # fused kernels take head sizes in multiples of 8
    queries = F.pad(kh, (0, width - d))
    queries[..., d : d + 2] = 1
    keys = F.pad(qh[:, :, skip:], (0, width - d))
    keys[..., d], keys[..., d + 1] = -high, -low
    swapped = _attention_lse(queries, keys, scale)
    if swapped is None:
        return None
    return swapped.exp().sum(dim=1)[:, skip:]


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor] | None:
    """Unmasked attention [n, H, L, d] and its rows' log-normalisers [n, H, L] float32 from one of torch's
    fused kernels (the ones scaled_dot_product_attention dispatches to; their private operators return
    the log-normaliser): on CUDA cuDNN's kernel where it takes the shape, else FlashAttention-2, both for
    half precision and head sizes that are multiples of 8; on the CPU the flash kernel, any float type.
    None where none applies (the caller runs the public function)."""
    d = q.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    ops = torch.ops.aten
    if not q.is_cuda:
        op = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
        if op is None or not q.is_floating_point():
            return None
        out, lse = op(q, k, v, 0.0, False, scale=scale)[:2]
        return out, lse.float()
    if q.dtype not in (torch.float16, torch.bfloat16) or d % 8 or d > 256:
        return None
    cudnn = getattr(ops, "_scaled_dot_product_cudnn_attention", None)
    if cudnn is not None and torch.backends.cudnn.is_available() and d <= 128:
        try:
            out, lse = cudnn(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
            return out, lse.reshape(q.shape[:-1]).float()
        except RuntimeError:  # a shape or GPU cuDNN's kernel does not take: FlashAttention-2 below
            pass
    op = getattr(ops, "_scaled_dot_product_flash_attention", None)
    if op is None:
        return None
    out, lse = op(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse.float()


def _attention_lse(q: Tensor, k: Tensor, scale: float) -> Tensor | None:
    """Each query row's log-normaliser log sum_j exp(q_i k_j * scale): [B, H, L] float32, from
    `attention_with_lse` with zero values (only the normaliser is read); None where no kernel applies."""
    found = attention_with_lse(q, k, torch.zeros_like(k), scale)
    return None if found is None else found[1]


def _received_batched(qh: Tensor, kh: Tensor, skip: int, chunk: int | None) -> Tensor:
    """[n, T - skip]: column sums over query rows skip.. and over heads of [n, H, T, T] attention, a chunk of
    query rows at a time, in float32. Half-precision CUDA inputs are multiplied as they are with float32
    results (their elements are exact in float32, so the products equal float32 ones up to summation
    order): at Qwen2.5-VL's 1280-wide single head (PruMerge's and the knee's default) that took 2.4 ms
    against 15.5 ms in float32 for 8 x 5184 tokens on an H200."""
    n, h, t, d = qh.shape
    native = qh.is_cuda and qh.dtype in (torch.float16, torch.bfloat16)
    if not native:
        qh, kh = qh.float(), kh.float()
    step = chunk or max(1, CHUNK_ELEMENTS // (n * h * t))
    acc = qh.new_zeros(n, t, dtype=torch.float32)
    keys_t = kh.transpose(-1, -2).reshape(n * h, d, t)
    scale = d**-0.5
    for r0 in range(skip, t, step):
        rows = qh[:, :, r0 : r0 + step].reshape(n * h, -1, d)
        scores = torch.bmm(rows, keys_t, out_dtype=torch.float32) if native else rows @ keys_t
        acc += (scores * scale).softmax(dim=-1).view(n, h, -1, t).sum(dim=(1, 2))
    return acc[:, skip:]


def _check_cu_seqlens(cu_seqlens: Tensor, total: int, skip: int) -> list[int]:
    """The segment bounds as a host list (the one synchronisation), validated."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise InputError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens!r}")
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if not lengths or bounds[0] != 0 or bounds[-1] != total or min(lengths) <= skip:
        raise InputError(
            f"cu_seqlens must rise from 0 to T={total} with every segment longer than skip={skip}; got {bounds}"
        )
    return bounds


def _received_by_length(
    q: Tensor, k: Tensor, h: int, bounds: list[int], skip: int, chunk: int | None, lse: Tensor | None = None
) -> Tensor:
    """[T - S * skip]: per packed segment (in order, its first `skip` tokens dropped), the column sums over
    heads of its attention averaged over its query rows. The segments of each distinct length are folded
    into one batch (`_received`: fused kernels where they apply), so no mask and no score matrix spanning
    segments is needed; images of one size are one batch."""
    starts, lengths = bounds[:-1], [b - a for a, b in itertools.pairwise(bounds)]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    parts: list[Tensor] = [q.new_empty(0)] * len(lengths)
    packed = [x for x in (q, k, lse) if x is not None]  # folded alike: q, k and the normalisers if given
    for n, members in by_length.items():
        if len(members) == len(lengths):  # one length: the segments are already a batch in order
            folded = [x.reshape(len(members), n, -1) for x in packed]
        else:
            rows = torch.cat([torch.arange(starts[i], starts[i] + n) for i in members]).to(q.device)
            folded = [x[rows].reshape(len(members), n, -1) for x in packed]
        lse_h = None if lse is None else folded[2].transpose(1, 2)
        sums = _received(_split_heads(folded[0], h), _split_heads(folded[1], h), skip, chunk, lse_h) / (n - skip)
        for j, i in enumerate(members):
            parts[i] = sums[j]
    return torch.cat(parts)
