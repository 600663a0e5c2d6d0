"""Timing helpers: CUDA events on the GPU (no host sync inside the timed region), perf_counter on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def summarize(samples_ms: list[float]) -> dict[str, Any]:
    """Median / min / max (milliseconds) and the repeat count."""
    return {
        "median_ms": statistics.median(samples_ms),
        "min_ms": min(samples_ms),
        "max_ms": max(samples_ms),
        "repeats": len(samples_ms),
    }


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Run `fn` warmup + repeats times; each repeat timed on its own (CUDA events on a GPU)."""
    return summarize(time_samples(fn, repeats, warmup, device))


def time_samples(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """`time_fn`'s samples (milliseconds), for callers that pool several timing passes."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return samples
    torch.cuda.synchronize(device)
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in pairs]


class CallTimer:
    """Forward hooks that time every call of a module (e.g. the decoder stack during generate):
    call 0 is the prefill, the rest are decode steps."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.marks: list[tuple[Any, Any]] = []
        self._pending: Any = None
        self._hooks = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _now(self) -> Any:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _start(self, *_: Any) -> None:
        self._pending = self._now()

    def _stop(self, *_: Any) -> None:
        self.marks.append((self._pending, self._now()))

    def durations_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) for s, e in self.marks]
        return [(e - s) * 1e3 for s, e in self.marks]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
