"""scripts/compare_results.py: the item-by-item check behind the multi-process evaluation's equality claim."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {
    "config": {"model": "tiny-llava", "split": "test", "limit": 2, "offset": 0, "max_new_tokens": 4},
    "items": 2,
    "cells": {
        "none": {"predictions": ["yes", "red"], "correct": {"existence": 1}, "visual_tokens_in": 576.0},
        "fastervlm@64": {"predictions": ["yes", "blue"], "correct": {"existence": 1}, "visual_tokens_llm": 64.0},
        "pdrop@64": {"skipped": "pdrop cannot average 64 tokens"},
    },
}


def _compare(tmp_path: Path, second: dict) -> subprocess.CompletedProcess:
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, results in zip(paths, (RESULTS, second), strict=True):
        path.write_text(json.dumps(results))
    script = str(ROOT / "scripts/compare_results.py")
    return subprocess.run([sys.executable, script, *map(str, paths)], capture_output=True, text=True)


def test_equal_runs_pass(tmp_path):
    done = _compare(tmp_path, copy.deepcopy(RESULTS))
    assert done.returncode == 0 and "3 cells, 2 items, 4 predictions; 0 cells differ" in done.stdout


def test_a_different_prediction_or_a_missing_cell_fails_and_is_named(tmp_path):
    second = copy.deepcopy(RESULTS)
    second["cells"]["fastervlm@64"]["predictions"][1] = "red"
    del second["cells"]["none"]
    done = _compare(tmp_path, second)
    assert done.returncode == 1
    assert "fastervlm@64: predictions differ" in done.stdout and "none: only in the first run" in done.stdout


def test_different_items_fail(tmp_path):
    second = copy.deepcopy(RESULTS)
    second["config"]["offset"] = 2
    done = _compare(tmp_path, second)
    assert done.returncode == 1 and "different items" in done.stdout
