"""Does the synthetic suite rank methods as real models do? Spearman's rank correlation between the
suite's retention at 64 tokens and the published LLaVA-1.5-7B retention at 64 tokens.

    python scripts/rank_correlation.py docs/results/synth-tiny-llava/results.json \
        --out docs/results/rank-correlation.md

Retention = accuracy / dense accuracy. A method whose 64-token cell cannot run on the suite's 8-layer LM
(pdrop and sparsevlm average tokens over layers, and the layers before their first stage already
average more than 64) is compared at its smallest measured budget, marked in the table: it saw more
tokens than 64, so its suite value is an upper bound of its 64-token retention.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUDGET = 64


@dataclass(frozen=True)
class Published:
    """One method's published average retention (%) at 64 tokens on LLaVA-1.5-7B, and where it is printed."""

    method: str
    retention: float
    source: str


FLOWCUT = "FlowCut (arXiv 2505.19536), Table 1, 12 benchmarks"
DART = "DART (arXiv 2502.11494), Table 1, 10 benchmarks"
# The main set: one table (FlowCut's) wherever it has the method; DART is not in it, so DART's own table.
MAIN = (
    Published("visionzip", 94.4, FLOWCUT),
    Published("dart", 93.7, DART),
    Published("pdrop", 86.1, FLOWCUT),
    Published("sparsevlm", 84.6, FLOWCUT),
    Published("fastv", 77.5, FLOWCUT),
    Published("tome", 71.4, FLOWCUT),
)
# The same with DART's table for the methods it has (its PDrop setting keeps less: 78.1 against 86.1).
ALTERNATE = (
    Published("visionzip", 94.4, FLOWCUT),
    Published("dart", 93.7, DART),
    Published("pdrop", 78.1, DART),
    Published("sparsevlm", 84.6, DART),
    Published("fastv", 77.3, DART),
    Published("tome", 71.4, FLOWCUT),
)


def average_ranks(values: list[float]) -> np.ndarray:
    """Ranks 1..n of `values` in descending order, tied values sharing the mean of their ranks."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(-x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (Pearson's r of their average ranks)."""
    if len(a) != len(b) or len(a) < 3:
        raise ValueError("spearman needs two lists of the same length, at least 3 values each")
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


def suite_retention(results: dict, method: str) -> tuple[float, int]:
    """(retention in % at 64 tokens, or at the smallest budget the method could run at; that budget)."""
    dense = results["cells"]["none"]["accuracy"]["overall"]
    measured = sorted(
        cell["budget"]
        for cell in results["cells"].values()
        if cell.get("method") == method and cell.get("budget") is not None and "accuracy" in cell
    )
    usable = [b for b in measured if b >= BUDGET]
    if not usable:
        raise ValueError(f"{method} has no cell at {BUDGET} tokens or more in the results")
    budget = usable[0]
    cell = results["cells"][f"{method}@{budget}"]
    return 100 * cell["accuracy"]["overall"] / dense, budget


def table(results: dict, published: tuple[Published, ...]) -> tuple[list[str], float]:
    """Markdown rows for one set of published figures, and its correlation."""
    rows, ours, theirs = [], [], []
    for p in published:
        value, budget = suite_retention(results, p.method)
        ours.append(value)
        theirs.append(p.retention)
        note = "" if budget == BUDGET else f" (at {budget} tokens: an upper bound)"
        rows.append(f"| {p.method} | {p.retention:.1f} | {p.source} | {value:.1f}{note} |")
    return rows, spearman(ours, theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.json of `visprune eval --task synth`")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: print it)")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    lines = [
        f"Suite: {args.results} ({results['config']['split']} split, {results['items']} items); "
        f"retention at {BUDGET} tokens, % of dense.",
        "",
    ]
    for name, published in (("Main set", MAIN), ("Alternate set", ALTERNATE)):
        rows, rho = table(results, published)
        lines += [
            f"### {name}: Spearman rho = {rho:.3f}",
            "",
            "| method | published | source | suite |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    text = "\n".join(lines)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
