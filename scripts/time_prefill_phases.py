"""GPU time between the phases of one prefill on Qwen2.5-VL-7B (random weights, bf16, batch 8 x 1008 px, budget
81, `compile_tower`), from CUDA events and no profiler: the call's start, the first tower block's launch, the last
tower block's return, the LLM's entry and the call's end. Each event is recorded where the host reaches it, so an
interval also holds the time the device idled because the host had not yet queued the next phase; with the
profiler's kernel sums this separates GPU work from waiting for the host. Medians of 7 calls after 3 warm-ups;
host milliseconds between the same points beside them. Needs CUDA.

    python scripts/time_prefill_phases.py random flowcut
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from typing import Any

import torch

import visprune
from visprune.bench.model import build_model, family_for
from visprune.models import qwen_tower

PHASES = ("start", "tower0", "tower1", "llm0", "end")
events: dict[str, torch.cuda.Event] = {}
host: dict[str, float] = {}


def mark(name: str) -> None:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    events[name] = event
    host[name] = time.perf_counter()


def instrument(model: torch.nn.Module) -> None:
    run_blocks = qwen_tower.run_blocks

    def marked(*args: Any, **kwargs: Any) -> Any:
        if "tower0" not in events:
            mark("tower0")
        out = run_blocks(*args, **kwargs)
        mark("tower1")
        return out

    qwen_tower.run_blocks = marked
    model.model.language_model.register_forward_pre_hook(lambda module, args: mark("llm0"))


def main() -> None:
    model = build_model("qwen2.5-vl-7b", torch.bfloat16, torch.device("cuda"))
    inputs = family_for(model.config).make_inputs(model, 8, 1008)
    instrument(model)
    for method in sys.argv[1:]:
        handle = visprune.apply(model, method, compile_tower=True, budget=81)
        rows = []
        with torch.inference_mode():
            for i in range(10):
                events.clear()
                host.clear()
                mark("start")
                model(**inputs)
                mark("end")
                torch.cuda.synchronize()
                if i >= 3:
                    pairs = list(itertools.pairwise(PHASES))
                    rows.append(
                        [events[a].elapsed_time(events[b]) for a, b in pairs]
                        + [(host[b] - host[a]) * 1e3 for a, b in pairs]
                    )
        m = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(
            f"{method:10s} GPU ms: start>tower {m[0]:.2f}, tower {m[1]:.2f}, tower>LLM {m[2]:.2f}, LLM {m[3]:.2f}, "
            f"total {sum(m[:4]):.2f} | host ms: {m[4]:.2f}, {m[5]:.2f}, {m[6]:.2f}, {m[7]:.2f}",
            flush=True,
        )
        handle.remove()


if __name__ == "__main__":
    main()
