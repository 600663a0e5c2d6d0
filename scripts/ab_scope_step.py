"""A/B on a GPU: SCOPE's selection with this tree's step against the previous one (pick, then update), at
Qwen2.5-VL-7B's shapes, batch 8 x 1296 tokens of 5120 features, bfloat16; CUDA graphs as the method runs.

    python scripts/ab_scope_step.py
"""

import statistics

import torch

from visprune.bench.timing import time_samples
from visprune.methods import scope as module
from visprune.methods.graphs import fused, replayed, row_at
from visprune.methods.similarity import pairwise_cosine


@fused
def old_step(similarity, similarity_t, saliency, coverage, taken):
    gain = (similarity_t - coverage.unsqueeze(1)).clamp(min=0).sum(dim=2)
    best = (gain * saliency).masked_fill(taken, float("-inf")).argmax(dim=1)
    return best, torch.maximum(coverage, row_at(similarity, best)), taken.scatter(1, best.unsqueeze(1), True)


def old_selection(features, saliency, k):
    similarity = pairwise_cosine(features).to(features.dtype)
    similarity_t = similarity.transpose(1, 2).contiguous()
    coverage = torch.zeros_like(saliency, dtype=torch.float32)
    taken = torch.zeros_like(saliency, dtype=torch.bool)
    chosen = []
    for _ in range(k):
        best, coverage, taken = old_step(similarity, similarity_t, saliency, coverage, taken)
        chosen.append(best)
    return torch.stack(chosen, dim=1)


dev = torch.device("cuda")
g = torch.Generator(device="cuda").manual_seed(0)
features = torch.randn(8, 1296, 5120, device=dev, dtype=torch.bfloat16, generator=g)
sal = torch.rand(8, 1296, device=dev, generator=g).softmax(-1)
for k in (324, 81):
    a = replayed(old_selection, features, sal, k=k)
    b = replayed(module.saliency_coverage_selection, features, sal, k=k)
    same = torch.equal(a, b)
    ta = statistics.median(time_samples(lambda: replayed(old_selection, features, sal, k=k), 10, 2, dev))
    tb = statistics.median(
        time_samples(lambda: replayed(module.saliency_coverage_selection, features, sal, k=k), 10, 2, dev)
    )
    print(f"k={k}: previous step {ta:.2f} ms, this tree {tb:.2f} ms, same picks {same}", flush=True)
