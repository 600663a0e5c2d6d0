"""scripts/rank_correlation.py: Spearman's rho with ties, and the suite value it takes for each method."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rank_correlation.py"
spec = importlib.util.spec_from_file_location("rank_correlation", SCRIPT)
rank_correlation = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = rank_correlation  # dataclasses look their module up there
spec.loader.exec_module(rank_correlation)


def test_spearman_known_values_and_ties():
    assert rank_correlation.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swap among 6: 1 - 6 * 2 / (6 * 35)
    assert rank_correlation.spearman([6, 5, 4, 3, 2, 1], [6, 5, 3, 4, 2, 1]) == pytest.approx(1 - 12 / 210)
    assert list(rank_correlation.average_ranks([3.0, 1.0, 3.0, 2.0])) == [1.5, 4.0, 1.5, 3.0]
    with pytest.raises(ValueError):
        rank_correlation.spearman([1, 2], [1, 2])


def _cell(method, budget, acc):
    return {"method": method, "budget": budget, "accuracy": {"overall": acc}}


def test_suite_retention_takes_64_or_the_smallest_larger_budget():
    results = {
        "cells": {
            "none": _cell("none", None, 0.8),
            "a@32": _cell("a", 32, 0.2),
            "a@64": _cell("a", 64, 0.4),
            "b@64": {"method": "b", "budget": 64, "skipped": "cannot average 64"},
            "b@192": _cell("b", 192, 0.6),
            "b@128": _cell("b", 128, 0.5),
        }
    }
    assert rank_correlation.suite_retention(results, "a") == (pytest.approx(50.0), 64)
    assert rank_correlation.suite_retention(results, "b") == (pytest.approx(62.5), 128)
    with pytest.raises(ValueError, match="no cell"):
        rank_correlation.suite_retention(results, "c")
