"""GPU profile: the reduction of the diversity methods (vispruner, scope, divprune, cdpruner) alone, on Qwen2.5-VL-7B
shapes at 1008 px batch 8 (1296 merged tokens per image, features 5120 wide, projected tokens 3584 wide;
random bf16 inputs). Prints each method's time at 25 / 12.5 / 6.25% of the tokens and a CUDA-kernel table
of one call at 6.25%. Needs CUDA.

    python scripts/profile_selection.py > profile-selection.txt
"""

import torch
from torch.profiler import ProfilerActivity, profile

from visprune.bench.timing import time_fn
from visprune.methods import get_method

g = torch.Generator(device="cuda").manual_seed(0)
features = torch.randn(8, 1296, 5120, device="cuda", dtype=torch.bfloat16, generator=g)
projected = torch.randn(8, 1296, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
score = torch.rand(8, 1296, device="cuda", generator=g).softmax(-1)
prompt = torch.randn(8, 3584, device="cuda", generator=g)
inputs = {
    "vispruner": {"cls_attn": score},
    "scope": {"cls_attn": score},
    "divprune": {"projected": projected},
    "cdpruner": {"projected": projected, "prompt": prompt},
}
for name, extra in inputs.items():
    fn = get_method(name).fn
    for budget in (324, 162, 81):
        r = time_fn(lambda fn=fn, extra=extra, b=budget: fn(features, budget=b, **extra), 10, 2, torch.device("cuda"))
        print(name, budget, f"{r['median_ms']:.2f} [{r['min_ms']:.2f}-{r['max_ms']:.2f}] ms", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(features, budget=81, **extra)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)
