"""Time FlowCut's CLIP tower pass against the dense tower on a GPU: LLaVA-1.5-7B's CLIP ViT-L/336 (random
weights, float16), batch B, budget 64; the pass run as written, replayed from its CUDA graph with the flow
terms unfused, and replayed with them compiled (the default). Median of 30 CUDA-event timings after 3 warm-ups.

    python scripts/time_flowcut_tower.py --batch 16
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from transformers import CLIPVisionModel

from visprune import configs
from visprune.bench.timing import time_samples
from visprune.methods import SignalRequest, graphs
from visprune.models import vision


def timed(fn: Callable[[], object], runs: int = 30) -> float:
    """Median ms of `runs` passes, each timed alone from an idle device (one-sample `time_samples` calls, not
    one call's back-to-back samples): a pass's own latency, its host launches included."""
    device = torch.device("cuda")
    time_samples(fn, 0, 3, device)
    return statistics.median(time_samples(fn, 1, 0, device)[0] for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    tower = CLIPVisionModel(configs.load("llava-1.5-7b").vision_config).to("cuda", torch.float16).eval()
    pixels = torch.randn(args.batch, 3, 336, 336, device="cuda", dtype=torch.float16)
    request = {"kept": SignalRequest("flowcut", keep=args.budget)}

    def flowcut() -> vision.VisionOutput:
        return vision.encode(tower, pixels, -2, "default", request)

    with torch.inference_mode():
        times = {"dense tower": timed(lambda: vision.encode(tower, pixels, -2, "default", {}))}
        graphs.ENABLED = False
        times["flowcut, as written"] = timed(flowcut)
        graphs.ENABLED, graphs.FUSE = True, False
        times["flowcut, graph, terms unfused"] = timed(flowcut)
        unfused = flowcut().signals["kept"]
        graphs.clear()
        graphs.FUSE = True
        times["flowcut, graph, terms compiled"] = timed(flowcut)
        same = bool(torch.equal(flowcut().signals["kept"], unfused))
    for name, ms in times.items():
        print(f"batch {args.batch}, {name}: {ms:.2f} ms")
    print(f"compiled and unfused terms keep the same patches: {same}")


if __name__ == "__main__":
    main()
