"""GPU profile: where the vision part of vtc-cls and fastervlm spends its time on Qwen2.5-VL-7B dimensions
(random weights, 1008 px, batch 8, compile_tower). Needs CUDA; prints torch profiler tables.

    python scripts/profile_qwen_signals.py > profile.txt
"""

import torch
from torch.profiler import ProfilerActivity, profile

import visprune
from visprune.bench.model import build_model, family_for
from visprune.bench.runner import ProbeReducer

model = build_model("qwen2.5-vl-7b", torch.bfloat16, torch.device("cuda"))
family = family_for(model.config)
inputs = family.make_inputs(model, 8, 1008)
for method in ("vtc-cls", "fastervlm"):
    h = visprune.apply(model, method, budget=162, compile_tower=True)
    probe = ProbeReducer(h.encoder, h.encoder_options, None, h.adapter.signal_kinds)
    probe.calls = None
    kw = {"image_grid_thw": inputs["image_grid_thw"]}
    with torch.inference_mode():
        for _ in range(3):
            h.adapter.image_tokens(inputs["pixel_values"], probe, kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            h.adapter.image_tokens(inputs["pixel_values"], probe, kw)
            torch.cuda.synchronize()
    visprune.remove(model)
    print("=====", method)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
