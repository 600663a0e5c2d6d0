"""`visprune bench --launch-free`: generate end to end in three modes per case, on one model.

- plain: `generate` as transformers runs it (the unpatched model for dense, `apply(method)` otherwise);
- launch-free: `apply(method, launch_free=True)` (dense: `apply("none", launch_free=True)`);
- ideal: the launch-free path fed the same per-image token counts (and, for an LLM-side method, the same
  tokens per decoder layer) with first-K selection (no scoring), so `efficiency = ideal TTFT / launch-free
  TTFT` is the share of the pruned generate that is not the method's own work.

TTFT = wall time of `generate(max_new_tokens=1)` from the call to the returned tokens (pixels in, first
token out: tower, reduction, splice, prefill, sampling); e2e = wall time of `generate` with `new_tokens`
new tokens (min_new_tokens forces all of them); decode tokens/s = batch * (new_tokens - 1) / (e2e - TTFT).
Each mode is warmed up first: the launch-free path by one whole generate, which captures its graphs (that
call's time, and each capture's, are reported as the capture cost); the plain path by a one-token generate.
With `rounds` R > 1 the launch-free TTFT and its ideal's are measured in R alternating passes (a new apply
each, so each captures again) and pooled; the first pass also times end to end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import visprune
from visprune.bench.static import ideal_methods
from visprune.bench.timing import summarize
from visprune.methods import Placement, get_method

TTFT_REPEATS = 20
E2E_REPEATS = 2


def wall_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> dict[str, Any]:
    """Median / min / max wall time of `fn` in ms (the device synchronised before and after each call)."""
    return summarize(wall_samples(fn, repeats, device))


def wall_samples(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """`wall_ms`'s samples (ms), for callers that pool several passes."""
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def supported(method: str) -> bool:
    """Methods the launch-free path runs: dense, every encoder-side method, and the LLM-side methods with a
    count rule."""
    if method == "dense":
        return True
    spec = get_method(method)
    return spec.placement is Placement.ENCODER or spec.counts_planned(spec.defaults)


class LaunchFreeBench:
    """One model and one batch of inputs: the three modes of each case."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, rounds: int = 1):
        self.model, self.inputs, self.new_tokens = model, inputs, new_tokens
        self.rounds = rounds  # passes of the launch-free TTFT and its ideal's, alternated and pooled
        self.device = inputs["input_ids"].device
        self.batch = inputs["input_ids"].shape[0]

    def _generate(self, n: int) -> Any:
        with torch.inference_mode():
            return self.model.generate(**self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def _mode(self, e2e: bool = True, warm_e2e: bool = True) -> dict[str, Any]:
        """Warm-up (timed: the first call, capture included; a whole generate where `warm_e2e`), TTFT and,
        optionally, end to end."""
        t0 = time.perf_counter()
        self._generate(self.new_tokens if e2e and warm_e2e else 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out: dict[str, Any] = {"first_call_s": time.perf_counter() - t0}
        self._generate(1)
        out["ttft_samples"] = wall_samples(lambda: self._generate(1), TTFT_REPEATS, self.device)
        out["ttft"] = summarize(out["ttft_samples"])
        if e2e:
            out["e2e"] = wall_ms(lambda: self._generate(self.new_tokens), E2E_REPEATS, self.device)
            decode_ms = out["e2e"]["median_ms"] - out["ttft"]["median_ms"]
            out["decode_tokens_per_s"] = self.batch * (self.new_tokens - 1) * 1e3 / decode_ms
        return out

    def _patched(self, method: Any, launch_free: bool, e2e: bool = True, **options: Any) -> dict[str, Any]:
        handle = visprune.apply(self.model, method, launch_free=launch_free, **options)
        try:
            out = self._mode(e2e, warm_e2e=launch_free)
            out["visual_tokens"] = statistics.mean(handle.stats.visual_tokens_out or [0])
            out["visual_tokens_per_image"] = list(handle.stats.visual_tokens_out)
            out["tokens_per_layer"] = [list(t) for t in handle.stats.tokens_per_layer]
            if handle.launch_free is not None:
                out["captures"] = list(handle.launch_free.captures)
            return out
        finally:
            visprune.remove(self.model)

    def run_case(self, method: str, budget: int | None, options: dict[str, Any]) -> dict[str, Any]:
        res: dict[str, Any] = {"method": method, "budget": budget}
        if method == "dense":
            res["plain"] = self._mode(warm_e2e=False)
            res["launch_free"] = self._patched("none", True)
        else:
            res["plain"] = self._patched(method, False, **options)
            free = res["launch_free"] = self._patched(method, True, **options)
            ideal_method = ideal_methods(free["visual_tokens_per_image"], free["tokens_per_layer"])
            ideal = res["ideal"] = self._patched(ideal_method, True, e2e=False)
            for _ in range(1, self.rounds):  # alternate the two, so that a drift of the machine cancels
                free["ttft_samples"] += self._patched(method, True, e2e=False, **options)["ttft_samples"]
                ideal["ttft_samples"] += self._patched(ideal_method, True, e2e=False)["ttft_samples"]
            free["ttft"], ideal["ttft"] = summarize(free["ttft_samples"]), summarize(ideal["ttft_samples"])
            res["efficiency"] = ideal["ttft"]["median_ms"] / free["ttft"]["median_ms"]
        for mode in ("plain", "launch_free", "ideal"):
            res.get(mode, {}).pop("ttft_samples", None)  # pooled into "ttft"
        return res


def summarise(cases: list[dict[str, Any]]) -> None:
    """Speed-ups against the dense case's two modes (in place)."""
    dense = next((c for c in cases if c["method"] == "dense" and "error" not in c), None)
    if dense is None:
        return
    plain_dense = dense["plain"]["ttft"]["median_ms"]
    free_dense = dense["launch_free"]["ttft"]["median_ms"]
    for c in cases:
        if "error" in c:
            continue
        free = c["launch_free"]["ttft"]["median_ms"]
        c["ttft_speedup_vs_launch_free_dense"] = free_dense / free
        c["ttft_speedup_vs_plain_dense"] = plain_dense / free
        c["plain_ttft_speedup_vs_plain_dense"] = plain_dense / c["plain"]["ttft"]["median_ms"]
