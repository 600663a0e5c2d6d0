"""Time the ways a Qwen-VL block can hide masked keys from its attention, on a GPU: visprune's segment
attention at Qwen2.5-VL-7B's shapes (batch 8 x 1008 px: 41,472 patch rows, 16 heads of 80; 64-row windows
and 5,184-row full-attention images), bfloat16, 30% of the keys masked. Three variants: no mask; an
explicit boolean key mask (scaled_dot_product_attention's attn_mask); q and k widened by a key-bias column
(`qwen_tower.widen`, what FlowCut's masked blocks run). Median of 20 CUDA-event timings after 3 warm-ups.

    python scripts/time_key_mask.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from visprune.bench.timing import time_samples
from visprune.models import qwen_tower
from visprune.models.segments import Segments, segment_attention

ROWS, HEADS, WIDTH = 8 * 5184, 16, 80


def timed(fn) -> float:
    device = torch.device("cuda")
    return statistics.median(time_samples(fn, 20, 3, device))


def main() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(ROWS, HEADS, WIDTH, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attended = torch.rand(ROWS, device="cuda") > 0.3
    bias = torch.where(attended, 0.0, qwen_tower.KEY_BIAS)
    scale = WIDTH**-0.5
    wide_q, wide_k = qwen_tower.widen(q, k, bias)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; ms per call")
    for name, length in (("windows of 64 rows", 64), ("full attention, 5184 rows per image", 5184)):
        n = ROWS // length
        segments = Segments((length,) * n)
        folded = [x.view(n, length, HEADS, WIDTH).transpose(1, 2) for x in (q, k, v)]
        mask = attended.view(n, 1, 1, length)
        plain = timed(lambda s=segments: segment_attention(q, k, v, s, scale=scale))
        masked = timed(lambda f=folded, m=mask: F.scaled_dot_product_attention(*f, attn_mask=m, scale=scale))
        widened = timed(lambda s=segments: segment_attention(wide_q, wide_k, v, s, scale=scale))
        print(f"{name}: no mask {plain:.3f}, boolean key mask {masked:.3f}, key-bias column {widened:.3f}")


if __name__ == "__main__":
    main()
