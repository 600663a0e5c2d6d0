"""What a run fed the LLM, per lmms-eval task: images, visual tokens per image (dense, reaching the LLM,
averaged over the LLM's layers) and prefill time, summed on every process and merged on the main one.

lmms-eval 0.7 reports numbers a model logs with `lmms_eval.models.model_utils.gen_metrics.log_metrics`
in the "Throughput Summary" table printed under the results and in the results JSON ("throughput"), as
`avg_<key>`; `metrics()` logs one entry per task with `<task>/<name>` keys (e.g. `pope/visual_tokens_llm`,
shown as `avg_pope/visual_tokens_llm`), so each key appears once and its value is exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from visprune.lmms.generation import BatchResult


@dataclass
class Tally:
    """Sums over the prompts of one task (padding requests of other ranks excluded)."""

    items: int = 0
    images: int = 0
    batches: int = 0
    visual_tokens_in: int = 0
    visual_tokens_llm: int = 0
    visual_tokens_layers: float = 0.0
    prefill_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    seconds: float = 0.0

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict[str, float]:
        """Per-image and per-item averages: the numbers a results table shows beside accuracy."""
        images, items, batches = max(1, self.images), max(1, self.items), max(1, self.batches)
        return {
            "items": self.items,
            "images": self.images,
            "visual_tokens_in": self.visual_tokens_in / images,
            "visual_tokens_llm": self.visual_tokens_llm / images,
            "visual_tokens_llm_layer_avg": self.visual_tokens_layers / images,
            "prefill_tokens": self.prefill_tokens / items,
            "prefill_ms_per_batch": 1000 * self.prefill_seconds / batches,
            "prefill_ms_per_item": 1000 * self.prefill_seconds / items,
        }


def tally(result: BatchResult, keep: list[bool]) -> Tally:
    """The sums of one batch over the prompts marked in `keep` (its time is shared out by prompt count)."""
    kept = [a for a, k in zip(result.answers, keep, strict=True) if k]
    share = len(kept) / max(1, len(result.answers))
    return Tally(
        items=len(kept),
        images=sum(a.images for a in kept),
        batches=1 if kept else 0,
        visual_tokens_in=sum(a.visual_tokens_in for a in kept),
        visual_tokens_llm=sum(a.visual_tokens_llm for a in kept),
        visual_tokens_layers=sum(a.visual_tokens_layers for a in kept),
        prefill_tokens=sum(a.prefill_tokens for a in kept),
        new_tokens=sum(a.new_tokens for a in kept),
        prefill_seconds=result.prefill_seconds * share,
        seconds=result.seconds * share,
    )


def merge(parts: Iterable[dict[str, dict[str, Any]]]) -> dict[str, Tally]:
    """Per task, the sum of every process's tallies (as dicts: what crosses processes)."""
    out: dict[str, Tally] = {}
    for part in parts:
        for task, values in part.items():
            out.setdefault(task, Tally()).add(Tally(**values))
    return out


def to_dicts(tallies: dict[str, Tally]) -> dict[str, dict[str, Any]]:
    return {task: asdict(t) for task, t in tallies.items()}


def metrics(task: str, t: Tally) -> dict[str, Any]:
    """lmms-eval's log_metrics arguments for one task: generation time and tokens, and visprune's numbers
    under `<task>/<name>` keys."""
    extra: dict[str, Any] = {f"{task}/{k}": v for k, v in t.summary().items()}
    extra["total_requests"] = t.items
    return {
        "total_elapsed_time": t.seconds,
        "total_gen_tokens": t.new_tokens,
        "avg_speed": t.new_tokens / t.seconds if t.seconds > 0 else 0.0,
        "additional_metrics": extra,
    }


def record(method: Any, options: dict[str, Any], apply_kwargs: dict[str, Any], tallies: dict[str, Tally]) -> dict:
    """The run's record: the method, its options as visprune.apply bound them, and per task the summary."""
    return {
        "method": method if isinstance(method, str) else list(method),
        "options": _plain(options),
        "apply": _plain(apply_kwargs),
        "tasks": {task: t.summary() for task, t in sorted(tallies.items())},
    }


def _plain(value: Any) -> Any:
    """JSON-friendly: tuples as lists, nested dicts converted."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
