"""Where the host's time goes in one FlowCut prefill on Qwen2.5-VL-7B (random weights, bf16, batch 8 x 1008 px,
budget 81, `compile_tower`), without a profiler: the library's pieces are wrapped with `time.perf_counter`, the
collector's passes are timed through `gc.callbacks`, and at every tower-block launch `stream.query()` tells
whether the device had run out of work (True: nothing queued, the GPU idles until the host catches up).

FlowCut's tower is launched block by block, and the host reads each pruning point's kept units two blocks
later, so the device never has more than about two blocks queued; host work that outlasts them idles it.
Arguments, run in order: a method name (`random`, `flowcut`), `rope` (transformers' `get_rope_index` on the
host copies alone, 10 calls) or `freeze` (`gc.freeze()`: later collections skip every object alive now).
Prints per method the host milliseconds per call of each piece (the sum over 5 calls after 3 warm-ups, divided
by 5) and the launches that found the device idle. Needs CUDA.

    python scripts/time_flowcut_host.py rope random flowcut freeze flowcut
"""

from __future__ import annotations

import collections
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import visprune
from visprune import reducer
from visprune.bench.model import build_model, family_for
from visprune.methods import flowcut
from visprune.models import qwen2_vl, qwen_tower

host_ms: dict[str, float] = collections.defaultdict(float)
calls: dict[str, int] = collections.defaultdict(int)
device_dry: list[bool] = []
_gc_started = [0.0]


def timed(name: str, fn: Callable[..., Any], check_dry: bool = False) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if check_dry:
            device_dry.append(torch.cuda.current_stream().query())
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            host_ms[name] += (time.perf_counter() - start) * 1e3
            calls[name] += 1

    return wrapper


def on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        name = f"gc generation {info['generation']}"
        host_ms[name] += (time.perf_counter() - _gc_started[0]) * 1e3
        calls[name] += 1


def instrument() -> None:
    qwen_tower.run_blocks = timed("run_blocks", qwen_tower.run_blocks, check_dry=True)
    qwen2_vl._unit_terms = timed("unit_terms (fused)", qwen2_vl._unit_terms)
    qwen2_vl._pruning_point = timed("pruning_point (fused)", qwen2_vl._pruning_point)
    flowcut.accumulate = timed("accumulate", flowcut.accumulate)
    flowcut.keep_top = timed("keep_top", flowcut.keep_top)
    qwen2_vl.StagedRead.value = timed("read: waiting for the device", qwen2_vl.StagedRead.value)
    qwen2_vl.StagedRead.__init__ = timed("read: staging", qwen2_vl.StagedRead.__init__)
    qwen_tower.TowerState.mask = timed("TowerState.mask", qwen_tower.TowerState.mask)
    qwen2_vl._UnitView.of = classmethod(timed("_UnitView.of", qwen2_vl._UnitView.of.__func__))
    reducer.Reducer.before_host_read = timed("dense positions (before_host_read)", reducer.Reducer.before_host_read)
    qwen2_vl.Qwen2VLAdapter._flowcut = timed("_flowcut, all of it", qwen2_vl.Qwen2VLAdapter._flowcut)
    gc.callbacks.append(on_gc)


def main() -> None:
    device = torch.device("cuda")
    model = build_model("qwen2.5-vl-7b", torch.bfloat16, device)
    inputs = family_for(model.config).make_inputs(model, 8, 1008)
    instrument()
    for arg in sys.argv[1:]:
        if arg == "freeze":
            gc.collect()
            gc.freeze()
            print("== gc.freeze()", flush=True)
        elif arg == "rope":
            host = {k: v.cpu() for k, v in inputs.items() if k != "pixel_values"}
            took = []
            for _ in range(10):
                start = time.perf_counter()
                model.model.get_rope_index(
                    host["input_ids"],
                    image_grid_thw=host["image_grid_thw"],
                    attention_mask=host["attention_mask"],
                    mm_token_type_ids=host["mm_token_type_ids"],
                )
                took.append(round((time.perf_counter() - start) * 1e3, 2))
            print("== get_rope_index alone, ms per call:", took, flush=True)
        else:
            run(model, inputs, arg)


def run(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], method: str, warmup: int = 3, timed_calls: int = 5
) -> None:
    handle = visprune.apply(model, method, compile_tower=True, budget=81)
    with torch.inference_mode():
        for i in range(warmup + timed_calls):
            if i == warmup:
                host_ms.clear()
                calls.clear()
                device_dry.clear()
            start = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            host_ms["the call (to the synchronised end)"] += (time.perf_counter() - start) * 1e3
            calls["the call (to the synchronised end)"] += 1
    print(f"== {method}: host ms per call (times called per call)")
    for name in sorted(host_ms, key=lambda n: -host_ms[n]):
        print(f"  {name:40s} {host_ms[name] / timed_calls:8.2f}  ({calls[name] / timed_calls:g})")
    per_call = len(device_dry) // timed_calls
    dry = [[j for j in range(per_call) if device_dry[c * per_call + j]] for c in range(timed_calls)]
    print(f"  tower-block launches that found the device idle, per call: {dry}", flush=True)
    handle.remove()


if __name__ == "__main__":
    main()
