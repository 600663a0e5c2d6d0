"""Shared helpers for the LLM-stage method tests: padded token layouts, q/k, a plain-loop attention
reference, single-sample slicing and a hypothesis strategy for batch layouts."""

import math

import torch
from hypothesis import strategies as st

from visprune.methods.base import TokenLayout


def make_layout(specs, side="left", extra=0):
    """specs: per sample (n_system, n_visual, n_query); padded on `side` to max length + extra."""
    s = max(a + b + c for a, b, c in specs) + extra
    masks = {n: torch.zeros(len(specs), s, dtype=torch.bool) for n in ("attention_mask", "visual", "query", "system")}
    for i, (a, b, c) in enumerate(specs):
        o = s - (a + b + c) if side == "left" else 0
        masks["attention_mask"][i, o : o + a + b + c] = True
        masks["system"][i, o : o + a] = True
        masks["visual"][i, o + a : o + a + b] = True
        masks["query"][i, o + a + b : o + a + b + c] = True
    return TokenLayout(**masks)


def ref_row(q, k, mask, b, r):
    """[H, S] float64 attention of query row r of sample b: plain loops over heads, causal + padding."""
    h, s, d = q.shape[1], q.shape[2], q.shape[3]
    rep = h // k.shape[1]
    out = torch.zeros(h, s, dtype=torch.float64)
    keys = [j for j in range(s) if mask[b, j] and j <= r]
    for head in range(h):
        logits = torch.stack([q[b, head, r].double() @ k[b, head // rep, j].double() for j in keys]) / math.sqrt(d)
        out[head, keys] = logits.softmax(0)
    return out


def ref_keep_top(lay, score, count):
    """Reference keep mask [B, S]: per sample i, every real non-visual token plus the count(n) of its n
    visual tokens with the highest score(i, real)[j] (ties: lower index); `real` lists i's real positions."""
    b, s = lay.attention_mask.shape
    keep = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        real = [j for j in range(s) if lay.attention_mask[i, j]]
        att = score(i, real)
        vis = [j for j in real if lay.visual[i, j]]
        top = set(sorted(vis, key=lambda j: (-float(att[j]), j))[: count(len(vis))])
        for j in real:
            keep[i, j] = (not lay.visual[i, j]) or j in top
    return keep


def ref_ratio_count(n, frac):
    """floor(n * frac) visual tokens, at least 1 when any are present."""
    return min(n, max(1, math.floor(n * frac))) if n else 0


def qk(lay, h_kv=2, rep=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = lay.attention_mask.shape
    return torch.randn(b, h_kv * rep, s, d, generator=g) * 1.5, torch.randn(b, h_kv, s, d, generator=g) * 1.5


def alone(t, i, o):
    """Sample i of a left-padded batch tensor, its padding (first o positions) removed."""
    return t[i : i + 1, ..., o:, :] if t.dim() == 4 else t[i : i + 1, o:]


def sample_layout(lay, i, o):
    return TokenLayout(*(getattr(lay, n)[i : i + 1, o:] for n in ("attention_mask", "visual", "query", "system")))


specs_st = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10), st.integers(0, 4)), min_size=1, max_size=3).filter(
    lambda sp: all(a + b + c > 0 for a, b, c in sp)
)
