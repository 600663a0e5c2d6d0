"""Probe: SCOPE's greedy step three ways at Qwen2.5-VL-7B's 1008 px batch 8 shapes (8 x 1296 tokens, 5120-wide
bf16 features): "current" (the step before session 21: the taken mask updated by a scatter), "or" (updated
elementwise, the library's step since), "kernel" (the gains compiled, then one Triton program per image for the
argmax and both updates). Each loop is replayed from a CUDA graph as scope runs it; prints the median of 10
calls and whether the picks equal the first variant's. Needs CUDA and Triton.

    python scripts/probe_scope_step.py > scope-step.txt
"""

import torch
import triton
import triton.language as tl

from visprune.bench.timing import time_fn
from visprune.methods.graphs import fused, replayed, row_at
from visprune.methods.similarity import pairwise_cosine


@fused
def step_scatter(similarity, similarity_t, saliency, coverage, taken):
    gain = (similarity_t - coverage.unsqueeze(1)).clamp(min=0).sum(dim=2)
    best = (gain * saliency).masked_fill(taken, float("-inf")).argmax(dim=1)
    return best, torch.maximum(coverage, row_at(similarity, best)), taken.scatter(1, best.unsqueeze(1), True)


@fused
def step_or(similarity, similarity_t, saliency, coverage, taken):
    gain = (similarity_t - coverage.unsqueeze(1)).clamp(min=0).sum(dim=2)
    best = (gain * saliency).masked_fill(taken, float("-inf")).argmax(dim=1)
    ids = torch.arange(taken.shape[1], device=taken.device)
    return best, torch.maximum(coverage, row_at(similarity, best)), taken | (ids == best.unsqueeze(1))


def loop_scatter(features, saliency, k):
    return _loop(step_scatter, features, saliency, k)


def loop_or(features, saliency, k):
    return _loop(step_or, features, saliency, k)


def _loop(step, features, saliency, k):
    similarity = pairwise_cosine(features).to(features.dtype)
    similarity_t = similarity.transpose(1, 2).contiguous()
    coverage = torch.zeros_like(saliency, dtype=torch.float32)
    taken = torch.zeros_like(saliency, dtype=torch.bool)
    chosen = []
    for _ in range(k):
        best, coverage, taken = step(similarity, similarity_t, saliency, coverage, taken)
        chosen.append(best)
    return torch.stack(chosen, dim=1)


@fused
def gains(similarity_t, saliency, coverage):
    return (similarity_t - coverage.unsqueeze(1)).clamp(min=0).sum(dim=2) * saliency


@triton.jit
def _pick(score_ptr, sim_ptr, cov_ptr, taken_ptr, chosen_ptr, step, n, k, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    base = b.to(tl.int64) * n
    s = tl.load(score_ptr + base + offs, mask=ok, other=float("-inf"))
    t = tl.load(taken_ptr + base + offs, mask=ok, other=1)
    s = tl.where(t != 0, float("-inf"), s)
    best = tl.argmax(s, axis=0, tie_break_left=True)
    row = tl.load(sim_ptr + base * n + best.to(tl.int64) * n + offs, mask=ok, other=0.0).to(tl.float32)
    cov = tl.load(cov_ptr + base + offs, mask=ok, other=0.0)
    tl.store(cov_ptr + base + offs, tl.maximum(cov, row), mask=ok)
    tl.store(taken_ptr + base + offs, (t != 0) | (offs == best), mask=ok)
    tl.store(chosen_ptr + b * k + step, best.to(tl.int64))


def loop_kernel(features, saliency, k):
    similarity = pairwise_cosine(features).to(features.dtype)
    similarity_t = similarity.transpose(1, 2).contiguous()
    b, n = saliency.shape
    coverage = torch.zeros_like(saliency, dtype=torch.float32)
    taken = torch.zeros_like(saliency, dtype=torch.bool)
    chosen = torch.empty(b, k, dtype=torch.long, device=saliency.device)
    for i in range(k):
        score = gains(similarity_t, saliency, coverage)
        _pick[(b,)](score, similarity, coverage, taken, chosen, i, n, k, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return chosen


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    features = torch.randn(8, 1296, 5120, device="cuda", dtype=torch.bfloat16, generator=g)
    sal = torch.rand(8, 1296, device="cuda", generator=g).softmax(-1)
    ref = {k: replayed(loop_scatter, features, sal, k=k) for k in (324, 81)}
    for name, loop in [("current", loop_scatter), ("or", loop_or), ("kernel", loop_kernel)]:
        for k in (324, 162, 81):
            got = replayed(loop, features, sal, k=k)
            same = "" if k not in ref else f" same picks: {bool((got == ref[k]).all())}"
            r = time_fn(lambda f=loop, n=k: replayed(f, features, sal, k=n), 10, 2, torch.device("cuda"))
            print(f"{name:8s} {k:4d} {r['median_ms']:.2f} [{r['min_ms']:.2f}-{r['max_ms']:.2f}] ms{same}", flush=True)


if __name__ == "__main__":
    main()
