"""Markdown table and accuracy-vs-tokens plot of `visprune eval` results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visprune.synth import FAMILIES

DENSE = "none"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ordered(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    order = results.get("cell_order") or list(results["cells"])
    return [(name, results["cells"][name]) for name in order if name in results["cells"]]


def relative(cell: dict[str, Any], dense: dict[str, Any] | None) -> float | None:
    """Overall accuracy of `cell` divided by the dense model's."""
    if dense is None or "accuracy" not in cell or not dense["accuracy"]["overall"]:
        return None
    return cell["accuracy"]["overall"] / dense["accuracy"]["overall"]


def markdown(results: dict[str, Any], command: str | None = None) -> str:
    """The full results table (one row per cell) and a method x budget summary of relative accuracy."""
    cfg = results["config"]
    dense = results["cells"].get(DENSE)
    env = results.get("environment", {})
    lines = ["# visprune eval: synthetic suite", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    lines.append(
        f"Model `{Path(cfg['model']).name}`, split `{cfg['split']}`, {results.get('items', '?')} items "
        f"(offset {cfg['offset']}), greedy decoding, max_new_tokens={cfg['max_new_tokens']}. "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + "."
    )
    lines += [
        "",
        "Accuracy in %; *rel.* = overall accuracy / dense overall accuracy. *tokens to LLM*: visual tokens per "
        "image entering the LLM (after encoder-side reduction); *avg/layer*: visual tokens averaged over the "
        "LLM's layers (LLM-side methods drop tokens inside the LLM), both measured from `handle.stats`.",
        "",
    ]
    head = ["cell", "tokens to LLM", "avg/layer", "overall", "rel.", *FAMILIES]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cell in _ordered(results):
        if "skipped" in cell:
            lines.append(f"| {name} | skipped: {cell['skipped']} |" + " |" * (len(head) - 2))
            continue
        acc = cell["accuracy"]
        rel = relative(cell, dense)
        row = [
            f"`{name}`",
            f"{cell['visual_tokens_llm']:.1f}",
            f"{cell['visual_tokens_per_layer']:.1f}",
            _pct(acc["overall"]),
            "n/a" if rel is None else f"{100 * rel:.1f}%",
            *(_pct(acc.get(f)) for f in FAMILIES),
        ]
        lines.append("| " + " | ".join(row) + " |")
    budgets = sorted({c["budget"] for c in results["cells"].values() if c.get("budget") is not None})
    methods = []
    for _, cell in _ordered(results):
        if cell["method"] not in methods and cell["method"] != DENSE:
            methods.append(cell["method"])
    lines += [
        "",
        "Relative accuracy (% of dense) by budget; adaptive methods at their defaults (avg tokens in brackets):",
        "",
    ]
    head2 = ["method", *(str(b) for b in budgets), "default"]
    lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for method in methods:
        row = [f"`{method}`"]
        for b in [*budgets, None]:
            cell = results["cells"].get(method if b is None else f"{method}@{b}")
            if cell is None or "skipped" in cell:
                row.append("")
                continue
            rel = relative(cell, dense)
            text = "n/a" if rel is None else f"{100 * rel:.1f}"
            if b is None:
                text += f" ({cell['visual_tokens_per_layer']:.0f})"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Overall accuracy vs average visual tokens per LLM layer: a line per fixed method, a marker per
    adaptive one, the dense model as a dashed line. Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    series: dict[str, list[tuple[float, float]]] = {}
    adaptive: list[tuple[str, float, float]] = []
    dense = results["cells"].get(DENSE)
    for _, cell in _ordered(results):
        if "skipped" in cell or cell["method"] == DENSE:
            continue
        point = (cell["visual_tokens_per_layer"], 100 * cell["accuracy"]["overall"])
        if cell.get("budget") is None:
            adaptive.append((cell["method"], *point))
        else:
            series.setdefault(cell["method"], []).append(point)
    cmap = plt.get_cmap("tab10")
    for i, (method, points) in enumerate(series.items()):
        points.sort()
        style = "-" if i < 10 else "--"
        ax.plot(*zip(*points, strict=True), style, marker="o", ms=4, lw=1.5, color=cmap(i % 10), label=method)
    markers, colors = "*PXDsv", ("gold", "magenta", "black", "cyan", "lime", "white")
    for j, (method, x, y) in enumerate(adaptive):
        ax.scatter(
            [x], [y], marker=markers[j % 6], s=150, color=colors[j % 6], edgecolor="black", zorder=5, label=method
        )
    if dense is not None:
        ax.axhline(100 * dense["accuracy"]["overall"], color="black", ls="--", lw=1, label="dense (576)")
    ax.set_xlabel("visual tokens per image, averaged over LLM layers")
    ax.set_ylabel("overall accuracy (%)")
    ax.set_title(f"synthetic suite, {results.get('items', '?')} {results['config']['split']} items")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_reports(results: dict[str, Any], out_dir: Path, command: str | None = None) -> dict[str, Path]:
    """results.md and accuracy_vs_tokens.png next to results.json."""
    md = out_dir / "results.md"
    md.write_text(markdown(results, command))
    png = plot(results, out_dir / "accuracy_vs_tokens.png")
    return {"json": out_dir / "results.json", "markdown": md, "plot": png}
