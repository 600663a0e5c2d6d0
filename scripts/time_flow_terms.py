"""Time FlowCut's per-block terms on a Qwen-VL tower (`flowcut.unit_terms`, compiled as the adapters run it
through `graphs.fused`) at Qwen2.5-VL-7B's shapes, batch 8 x 1008 px: 41,472 patch rows, 16 heads of 80,
bfloat16, q and k widened by the key bias of a mask over 30% of the units. Prints the GPU time of each
kernel per call (torch.profiler, 20 calls after warm-up) of the terms and, for scale, of a compiled pass
that only reads the keys (their row sums).

    python scripts/time_flow_terms.py
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from visprune.methods import flowcut, graphs
from visprune.models import qwen_tower

ROWS, HEADS, WIDTH, IMAGES = 8 * 5184, 16, 80, 8
CALLS = 20


def kernel_times(fn) -> dict[str, float]:
    """{kernel: GPU microseconds per call of fn}."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            times[event.name] += event.device_time / CALLS
    return dict(times)


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    # q, k, v as a block's projection gives them: views of one [T, 3, H, d] tensor
    q, k, v = torch.randn(ROWS, 3, HEADS, WIDTH, device=device, dtype=torch.bfloat16).unbind(1)
    units = ROWS // 4
    unit_image = torch.arange(IMAGES, device=device).repeat_interleave(units // IMAGES)
    attending = torch.rand(units, device=device) > 0.3
    counts = torch.zeros(IMAGES, dtype=torch.long, device=device).index_add_(0, unit_image, attending.long())
    wide_q, wide_k = qwen_tower.widen(q, k, torch.where(attending.repeat_interleave(4), 0.0, qwen_tower.KEY_BIAS))
    terms = graphs.fused(flowcut.unit_terms)
    row_sums = torch.compile(lambda x: x.float().sum(dim=-1))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; GPU us per call")
    cases = {
        "unit_terms (30% masked, widened q and k)": lambda: terms(
            wide_q, wide_k, v, unit_image, counts, WIDTH**-0.5, attending
        ),
        "for scale: the keys' row sums, compiled (one read of k)": lambda: row_sums(wide_k),
    }
    for name, fn in cases.items():
        times = kernel_times(fn)
        print(f"{name}: {sum(times.values()):.1f}")
        for kernel, us in sorted(times.items(), key=lambda item: -item[1]):
            print(f"    {us:7.1f}  {kernel[:100]}")


if __name__ == "__main__":
    main()
