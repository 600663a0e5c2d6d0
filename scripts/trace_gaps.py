"""Where a profiled call leaves the GPU idle: reads the Chrome traces that `scripts/profile_prefill.py
--trace-dir` writes (torch profiler, `.json` or `.json.gz`) and prints, per trace, the GPU's busy and
idle time, the longest idle stretches with the host operations that ran during them, the host reads that
waited for the device, and idle time per 10 ms of the call; with two traces, also the kernels whose total
time differs most between them.

    python scripts/trace_gaps.py traces/fastervlm.json.gz
    python scripts/trace_gaps.py traces/flowcut.json.gz --against traces/random.json.gz

Times come from the profiled run, which slows the host a great deal (host work can look 10-20x longer
than it is): use it to see where the GPU waits and for what, and time the call unprofiled for the sizes.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation")
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaEventSynchronize")


@dataclass(frozen=True)
class Gap:
    """An idle stretch of the GPU: start (us since the first GPU event), length (us), the next GPU event."""

    start: float
    length: float
    next_event: str


def load_events(path: Path) -> list[dict[str, Any]]:
    """The complete ('X') events of a Chrome trace."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def gpu_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])


def idle_gaps(gpu: list[dict[str, Any]]) -> tuple[float, float, list[Gap]]:
    """(span, busy time, idle gaps) of the GPU events, in us; overlapping events count once."""
    if not gpu:
        return 0.0, 0.0, []
    t0, end, busy, gaps = gpu[0]["ts"], gpu[0]["ts"], 0.0, []
    for e in gpu:
        if e["ts"] > end:
            gaps.append(Gap(end - t0, e["ts"] - end, e["name"]))
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])
    return end - t0, busy, gaps


def host_ops_during(events: list[dict[str, Any]], t0: float, gap: Gap, top: int = 4) -> list[tuple[str, float]]:
    """The host operations that overlap `gap` the longest (name, overlap in us), outermost ones included."""
    lo, hi = t0 + gap.start, t0 + gap.start + gap.length
    overlap = []
    for e in events:
        if e.get("cat") in HOST_CATEGORIES and e["ts"] < hi and e["ts"] + e["dur"] > lo:
            overlap.append((e["name"], min(hi, e["ts"] + e["dur"]) - max(lo, e["ts"])))
    return sorted(overlap, key=lambda x: -x[1])[:top]


def host_waits(events: list[dict[str, Any]], t0: float, min_us: float = 50.0) -> list[tuple[float, str, float, str]]:
    """(start us, runtime call, duration us, the three innermost host ops around it, innermost first) for
    every runtime call that blocked the host for at least `min_us` (a synchronisation or a copy to the host)."""
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    out = []
    for e in events:
        if e.get("cat") == "cuda_runtime" and e["name"] in WAITS and e["dur"] >= min_us:
            around = [o for o in ops if o["ts"] <= e["ts"] and o["ts"] + o["dur"] >= e["ts"] + e["dur"]]
            inner = " < ".join(o["name"] for o in sorted(around, key=lambda o: o["dur"])[:3]) or "-"
            out.append((e["ts"] - t0, e["name"], e["dur"], inner))
    return sorted(out)


def idle_per_window(gaps: list[Gap], window_us: float = 10_000.0) -> dict[int, float]:
    """Idle time (us) per window of the call, keyed by the window's start in ms (a gap counts where it starts)."""
    out: Counter[int] = Counter()
    for g in gaps:
        out[int(g.start // window_us * window_us / 1000)] += g.length
    return dict(sorted(out.items()))


def kernel_totals(gpu: list[dict[str, Any]]) -> tuple[Counter[str], Counter[str]]:
    """(total us, calls) per GPU event name."""
    time, calls = Counter(), Counter()
    for e in gpu:
        time[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    return time, calls


def report(path: Path, gaps_shown: int) -> list[str]:
    events = load_events(path)
    gpu = gpu_events(events)
    span, busy, gaps = idle_gaps(gpu)
    lines = [f"== {path}: span {span / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms"]
    if not gpu:
        return lines
    t0 = gpu[0]["ts"]
    lines.append("longest idle stretches (at ms: length; the host operations during it):")
    for g in sorted(gaps, key=lambda g: -g.length)[:gaps_shown]:
        ops = "; ".join(f"{name[:40]} {us / 1e3:.2f}" for name, us in host_ops_during(events, t0, g))
        lines.append(f"  {g.start / 1e3:8.1f}: {g.length / 1e3:6.2f} ms before {g.next_event[:40]} | {ops}")
    lines.append("host reads that waited for the device (at ms: call, ms, inside):")
    lines += [
        f"  {ts / 1e3:8.1f}: {name} {us / 1e3:.2f} ms in {inner}" for ts, name, us, inner in host_waits(events, t0)
    ]
    windows = idle_per_window(gaps)
    lines.append(
        "idle per 10 ms of the call: " + " ".join(f"{ms}:{us / 1e3:.1f}" for ms, us in windows.items() if us >= 300)
    )
    return lines


def compare(path: Path, against: Path, rows: int) -> list[str]:
    time_a, calls_a = kernel_totals(gpu_events(load_events(path)))
    time_b, calls_b = kernel_totals(gpu_events(load_events(against)))
    names = sorted(set(time_a) | set(time_b), key=lambda n: -abs(time_a[n] - time_b[n]))[:rows]
    lines = [f"kernels whose time differs most, {path.name} vs {against.name} (ms, calls):"]
    for n in names:
        lines.append(
            f"  {(time_a[n] - time_b[n]) / 1e3:+8.2f}  {time_a[n] / 1e3:7.2f} ({calls_a[n]}) vs "
            f"{time_b[n] / 1e3:7.2f} ({calls_b[n]})  {n[:90]}"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--against", type=Path, default=None, help="a second trace to compare kernel times with")
    p.add_argument("--gaps", type=int, default=10, help="idle stretches shown per trace")
    p.add_argument("--rows", type=int, default=15, help="kernels shown in the comparison")
    args = p.parse_args()
    for path in args.traces:
        print("\n".join(report(path, args.gaps)))
        if args.against is not None:
            print("\n".join(compare(path, args.against, args.rows)))


if __name__ == "__main__":
    main()
