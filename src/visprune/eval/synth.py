"""Accuracy of every method on the synthetic suite, relative to the dense model, with the visual tokens
each one actually fed to the LLM.

A *cell* is one (method, budget) pair: "none" (dense), each adaptive method at its defaults
("default"), each fixed method at every budget. `budget_options` maps a budget B (visual tokens per
image) onto a method's options:

- fastervlm, vtc-cls, tome, random, pool, dart, visionzip: `budget=B` (visionzip splits it 54:10 into
  dominant and contextual tokens);
- fastv: `keep_ratio=B/N` (B tokens kept from LLM layer `layer` on);
- pdrop, sparsevlm: the average number of image tokens over all LLM layers is B (pdrop keeps
  lambda^s after stage s; sparsevlm scales its published (300, 200, 110) schedule); budgets their stages
  cannot reach are skipped with the reason.
The rules and the moving of 32-layer layer choices to shallower LLMs are in `visprune.budgets`.

Results are stored per cell in a JSON file that is rewritten after every cell; a later run with the
same model, split, items and generation settings skips the cells already there (resumable).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import visprune
from visprune.budgets import options_for_budget
from visprune.errors import InputError
from visprune.eval import parallel
from visprune.eval.parallel import Processes
from visprune.synth import FAMILIES, load_split, score

BUDGETS: tuple[int, ...] = (32, 64, 128, 192)
DENSE = "none"
DEFAULT = "default"


def all_methods() -> list[str]:
    """Every registered method name, in registry order."""
    return [spec.name for spec in visprune.list_methods()]


def budget_options(method: str, budget: int | None, n_visual: int, n_layers: int) -> dict[str, Any]:
    """The options that run `method` at `budget` visual tokens (None: its defaults) on this model;
    the rules live in visprune.budgets (shared with `visprune bench`)."""
    return options_for_budget(method, budget, n_visual, n_layers)


def cell_name(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method}@{budget}"


def plan_cells(methods: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    """(method, budget) cells: dense first, adaptive methods at their defaults, fixed ones at each budget."""
    cells: list[tuple[str, int | None]] = [(DENSE, None)]
    for method in methods:
        if method == DENSE:
            continue
        spec = visprune.get_method(method)
        if spec.adaptive:
            cells.append((method, None))
        else:
            cells.extend((method, b) for b in budgets)
    return cells


@dataclass
class EvalConfig:
    """What to evaluate; `key()` identifies results that can be resumed."""

    model: str
    split: str = "test"
    limit: int | None = None
    offset: int = 0
    batch_size: int = 32
    max_new_tokens: int = 4
    methods: list[str] = field(default_factory=all_methods)
    budgets: list[int] = field(default_factory=lambda: list(BUDGETS))
    keep_positions: bool = False  # visprune.apply(..., keep_positions=...) for every cell

    def key(self) -> dict[str, Any]:
        key = {
            "model": self.model,
            "split": self.split,
            "limit": self.limit,
            "offset": self.offset,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.keep_positions:
            key["keep_positions"] = True
        return key


def _summary(correct: dict[str, int], count: dict[str, int]) -> dict[str, float]:
    acc = {f: correct[f] / count[f] for f in FAMILIES if count.get(f)}
    acc["overall"] = sum(correct.values()) / max(1, sum(count.values()))
    return acc


class Runner:
    """Loads the model once, renders the items once, and evaluates cells into a results dict.

    Under several processes (`processes`) each evaluates its own batches and every cell gathers the
    per-item records of all of them, so every process returns the whole cell."""

    def __init__(self, cfg: EvalConfig, device: str | None = None, processes: Processes | None = None) -> None:
        from visprune import bundled

        self.cfg = cfg
        self.processes = processes or Processes()
        if self.processes.device is not None and device in (None, "cuda"):
            device = self.processes.device  # under accelerate: this process's own GPU (or its CPU)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = bundled.load(cfg.model, device=self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.items = list(load_split(cfg.split, n=cfg.limit, offset=cfg.offset))
        self._batches: list[dict[str, torch.Tensor]] | None = None
        text_cfg = self.model.config.text_config
        self.n_layers = text_cfg.num_hidden_layers
        vision = self.model.config.vision_config
        self.n_visual = (vision.image_size // vision.patch_size) ** 2

    def batches(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """(first item index, processor outputs on the device) of this process's batches (computed once)."""
        if self._batches is None:
            self._batches = []
            size = self.cfg.batch_size
            for number, start in enumerate(range(0, len(self.items), size)):
                if not self.processes.owns(number):
                    continue
                chunk = self.items[start : start + size]
                inputs = self.processor(
                    images=[it.image() for it in chunk],
                    text=[it.prompt() for it in chunk],
                    return_tensors="pt",
                    padding=True,
                )
                inputs = inputs.to(self.device)
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
                self._batches.append((start, dict(inputs)))
        return self._batches

    @torch.inference_mode()
    def run_cell(
        self,
        method: str,
        budget: int | None,
        tick: Callable[[], None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Evaluate one cell: accuracy per family, token counts, predictions, seconds. `extra`: method options
        on top of the budget's (a study of one method's settings)."""
        try:
            options = {} if method == DENSE else budget_options(method, budget, self.n_visual, self.n_layers)
            options = {**options, **(extra or {})}
        except InputError as err:
            if tick is not None:
                for _ in self.batches():
                    tick()
            return {"method": method, "budget": budget, "skipped": str(err)}
        handle = visprune.apply(self.model, method, keep_positions=self.cfg.keep_positions, **options)
        records: list[tuple[int, str, int, int, float]] = []  # item, answer, tokens in, to the LLM, per layer
        t0 = time.perf_counter()
        try:
            for start, inputs in self.batches():
                out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
                answers = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                stats = handle.stats
                per_layer = stats.visual_tokens_per_layer()
                rows = zip(stats.visual_tokens_in, stats.visual_tokens_out, per_layer, strict=True)
                for i, (answer, (t_in, t_out, layer)) in enumerate(zip(answers, rows, strict=True)):
                    records.append((start + i, answer.strip(), t_in, t_out, layer))
                if tick is not None:
                    tick()
        finally:
            visprune.remove(self.model)
        records = sorted(self.processes.gather(records))
        correct = dict.fromkeys(FAMILIES, 0)
        count = dict.fromkeys(FAMILIES, 0)
        for index, answer, *_ in records:
            item = self.items[index]
            correct[item.family] += int(score(answer, item.answer))
            count[item.family] += 1
        predictions = [answer for _, answer, *_ in records]
        tokens_in = [r[2] for r in records]
        tokens_out = [r[3] for r in records]
        per_layer = [r[4] for r in records]
        n = max(1, len(tokens_out))
        return {
            "method": method,
            "budget": budget,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "accuracy": _summary(correct, count),
            "correct": correct,
            "count": count,
            "visual_tokens_in": sum(tokens_in) / n,
            "visual_tokens_llm": sum(tokens_out) / n,
            "visual_tokens_per_layer": sum(per_layer) / max(1, len(per_layer)),
            "seconds": round(time.perf_counter() - t0, 2),
            "predictions": predictions,
        }


def environment(device: str) -> dict[str, Any]:
    import transformers

    env = {
        "visprune": visprune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def load_results(path: Path, cfg: EvalConfig) -> dict[str, Any]:
    """Results already in `path` for the same model / split / items / settings, else a fresh dict."""
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("config") == cfg.key():
            return data
    return {"config": cfg.key(), "cells": {}}


def evaluate(
    cfg: EvalConfig, out_dir: Path, device: str | None = None, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every pending cell of `cfg`, saving results.json after each one; returns the results.

    Under `accelerate launch --num_processes N` the items' batches are dealt out to the N processes (one
    model each); every cell gathers them, and the main process alone writes and reports. The results
    equal a single process's item by item."""
    processes = parallel.current()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results = load_results(path, cfg)
    processes.wait()  # every process has read the results before the main one writes them
    cells = plan_cells(cfg.methods, cfg.budgets)
    pending = [(m, b) for m, b in cells if cell_name(m, b) not in results["cells"]]
    skipped = len(cells) - len(pending)
    if skipped and processes.is_main:
        log(f"resuming: {skipped} of {len(cells)} cells already in {path}")
    if pending:
        runner = Runner(cfg, device=device, processes=processes)
        results["environment"] = environment(runner.device)
        if processes.count > 1:
            results["environment"]["processes"] = processes.count
        results["items"] = len(runner.items)
        bar = _progress_bar(len(pending) * len(runner.batches()), progress and processes.is_main)
        try:
            for method, budget in pending:
                bar.set_description(cell_name(method, budget))
                results["cells"][cell_name(method, budget)] = runner.run_cell(method, budget, tick=bar.update)
                if processes.is_main:
                    path.write_text(json.dumps(results, indent=1))
        finally:
            bar.close()
    results["cell_order"] = [cell_name(m, b) for m, b in cells]
    if processes.is_main:
        path.write_text(json.dumps(results, indent=1))
    processes.wait()
    return results


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="batch", dynamic_ncols=True)
