"""GPU profile of one patched prefill per method (random weights from a bundled config): where the time of
the vision tower, the reduction and the LLM goes. Needs CUDA; prints torch profiler tables.

    python scripts/profile_prefill.py --config llava-1.5-7b --batch 16 --budget 64 --methods flowcut divprune
    python scripts/profile_prefill.py ... --no-fuse     # the selection loops' steps unfused (graphs.FUSE off)
    python scripts/profile_prefill.py ... --trace-dir traces   # also a Chrome trace per method (gzipped),
    python scripts/trace_gaps.py traces/flowcut.json.gz        # ... and where the GPU waits in it
    python scripts/profile_prefill.py --batch 1 --launch-free --methods prumerge fastervlm --trace-dir traces
                                    # generate(max_new_tokens=1) on the launch-free path instead of one forward
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import visprune
from visprune.bench.model import build_model, family_for
from visprune.methods import get_method, graphs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llava-1.5-7b")
    p.add_argument("--methods", nargs="+", default=["flowcut"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="square side in pixels (default: the family's)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--compile-tower", action="store_true")
    p.add_argument("--no-fuse", action="store_true", help="run the selection loops' steps unfused")
    p.add_argument("--rows", type=int, default=25, help="rows per table")
    p.add_argument("--launch-free", action="store_true", help="profile generate's first token on the launch-free path")
    p.add_argument("--trace-dir", type=Path, default=None, help="write <method>.json.gz Chrome traces here")
    args = p.parse_args()
    graphs.FUSE = not args.no_fuse
    model = build_model(args.config, getattr(torch, args.dtype), torch.device("cuda"))
    family = family_for(model.config)
    size = args.image_size or family.image_sizes(())[0]
    inputs = family.make_inputs(model, args.batch, size)
    for method in args.methods:
        extra = {"compile_tower": True} if args.compile_tower else {}
        adaptive = method == "none" or get_method(method).adaptive  # no budget: dense, or counts of its own
        budget = None if adaptive else args.budget
        visprune.apply(
            model, method, **extra, launch_free=args.launch_free, **({} if budget is None else {"budget": budget})
        )
        if args.launch_free:
            call = functools.partial(model.generate, **inputs, max_new_tokens=1, do_sample=False)
        else:
            call = functools.partial(model, **inputs)
        with torch.inference_mode():
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
        visprune.remove(model)
        mode = "launch-free generate, 1 token" if args.launch_free else "prefill"
        print(f"===== {method}, budget {budget}, batch {args.batch}, {size} px, fuse={graphs.FUSE}, {mode}")
        print(f"{mode} without the profiler: median {statistics.median(times):.1f} ms of {len(times)}")
        if args.trace_dir is not None:
            args.trace_dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.trace_dir / f"{method.replace('+', '-')}.json.gz"))
        table = prof.key_averages()
        print(table.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        print(table.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
