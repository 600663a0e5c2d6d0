"""`visprune demo`: a few synthetic scenes, one question each, answered by the dense model and with
PruMerge, PruMerge+, the two-stage knee+text method and VisionZip, with the visual tokens each kept,
plus one PNG with every method's kept tokens over each image. Runs on a CPU in seconds with the
bundled tiny LLaVA; `model` runs it on any supported checkpoint instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visprune.synth import Item, load_split, score
from visprune.viz import MethodView, _grid_of, _pyplot, add_legend, describe_tokens, draw_tokens, run_methods

# Test-split items, one per question family: reading, counting, colour, position, relation.
DEMO_ITEMS: tuple[int, ...] = (6, 3, 8, 4, 12)
DEMO_METHODS: tuple[str, ...] = ("none", "prumerge", "prumerge+", "knee+text", "visionzip")
LABELS: dict[str, str] = {"none": "dense"}


@dataclass
class DemoResult:
    """Items, each method's views of them, and the PNG written."""

    items: list[Item]
    views: dict[str, list[MethodView]]
    png: Path


def _label(method: str) -> str:
    return LABELS.get(method, method)


def draw(
    items: list[Item], views: dict[str, list[MethodView]], grid: tuple[int, int], out: Path, n_layers: int = 1
) -> Path:
    """Rows = scenes, columns = methods; each panel shows the tokens that method kept (or, for a method
    that prunes inside the LLM, how many of the `n_layers` LLM layers each token reaches); a legend
    says what the marks mean."""
    import numpy as np

    plt = _pyplot()
    methods = list(views)
    fig, axes = plt.subplots(len(items), len(methods), figsize=(2.6 * len(methods), 2.9 * len(items)), dpi=100)
    axes = np.atleast_2d(axes)
    for r, item in enumerate(items):
        image = np.asarray(item.image())
        for c, method in enumerate(methods):
            view = views[method][r]
            mark = "ok" if score(view.answer, item.answer) else "wrong"
            title = f"{_label(method)}: {view.answer} ({mark})\n{describe_tokens(view)} tokens"
            draw_tokens(axes[r, c], image, view, grid, title, n_layers)
        axes[r, 0].text(
            -0.05,
            0.5,
            f"{item.text}\ntrue: {item.answer}",
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
            wrap=True,
        )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.subplots_adjust(left=0.2)
    add_legend(fig, [v for rows in views.values() for v in rows], n_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def run_demo(
    model: str | Path | None = None,
    out: str | Path = "visprune-demo.png",
    items: tuple[int, ...] = DEMO_ITEMS,
    methods: tuple[str, ...] = DEMO_METHODS,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Answer the demo questions with each method, print a table per scene and write the PNG."""
    from visprune import bundled

    source = bundled.resolve(model)
    net, processor = bundled.load(model, device=device)
    split = load_split("test", n=max(items) + 1)
    chosen = [split[i] for i in items]
    echo(f"visprune demo: model {source}, {len(chosen)} synthetic test scenes, {device}")
    views = run_methods(net, processor, [it.image() for it in chosen], [it.text for it in chosen], list(methods))
    width = max(len(_label(m)) for m in methods)
    for r, item in enumerate(chosen):
        echo("")
        echo(f"[{r + 1}] {item.text}  ({item.family}; true answer: {item.answer})")
        for method in methods:
            view = views[method][r]
            mark = "ok   " if score(view.answer, item.answer) else "wrong"
            echo(f"    {_label(method):<{width}}  {mark}  {view.answer:<12}  visual tokens: {describe_tokens(view)}")
    png = draw(chosen, views, _grid_of(net), Path(out), net.config.text_config.num_hidden_layers)
    echo("")
    echo("visual tokens: those entering the LLM (-> those left after knee+text's in-LLM stage); dense = 576.")
    echo(f"wrote {png}")
    return DemoResult(items=chosen, views=views, png=png)
