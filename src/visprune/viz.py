"""Pictures of what the methods keep: `visprune viz` and the helpers `visprune demo` draws with.

Each method's panel shows the image as the model sees it (after the processor) on the patch grid:
tokens kept as tokens of their own are outlined and coloured by output slot, tokens merged into a
kept token carry that slot's colour faintly, dropped tokens are dimmed. For methods that prune inside
the LLM the panel colours every token by how many LLM layers process it (`survival_overlay`). Every
figure carries a legend saying so (`add_legend`). A last pair of panels shows
the score that PruMerge and the knee methods rank with by default (the last encoder layer's CLS
attention, or on a tower without CLS the attention each patch receives) as a heat map, and its
sorted curve with PruMerge's IQR fence (Q3 + 1.5 IQR) and the knee.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import visprune
from visprune.errors import InputError
from visprune.methods import Placement, Reduction, get_method
from visprune.methods.base import score_request
from visprune.methods.knee_point import knee_count
from visprune.methods.prumerge import outlier_counts

VIZ_METHODS: tuple[str, ...] = ("prumerge", "prumerge+", "knee", "visionzip", "fastervlm", "pool")
DEFAULT_QUESTION = "What is in the image?"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_view(pixel_values: Tensor, processor: Any) -> np.ndarray:
    """The image as the model sees it: one [3, H, W] (or [crops, 3, H, W], base crop used) processor
    output de-normalised to uint8 [H, W, 3]."""
    pv = pixel_values.detach().float().cpu()
    if pv.dim() == 4:
        pv = pv[0]
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    rgb = (pv * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()


def _slot_colors(n: int) -> np.ndarray:
    """n distinct-ish RGB colours in [0, 1] (golden-ratio hues)."""
    import colorsys

    return np.array([colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0) for i in range(max(n, 1))])


def token_overlay(image: np.ndarray, reduction: Reduction | None, grid: tuple[int, int]) -> np.ndarray:
    """float RGB [H, W, 3] in [0, 1]: `image` with the reduction's tokens marked.

    Kept tokens (tokens of their own) keep full brightness with a white outline; tokens merged into a
    kept one are darkened and tinted with a colour per output slot (one colour per merged group);
    dropped tokens are darkened most."""
    base = image.astype(np.float32) / 255.0
    if reduction is None:
        return base
    h, w = grid
    ph, pw = image.shape[0] // h, image.shape[1] // w
    n = h * w
    sources = reduction.sources.detach().cpu().numpy()
    assignment = reduction.assignment.detach().cpu().numpy() if reduction.assignment is not None else None
    kept = np.zeros(n, dtype=bool)
    kept[sources[(sources >= 0) & (sources < n)]] = True
    slot = np.full(n, -1)
    if assignment is not None and assignment.shape[0] == n:
        slot = assignment
    else:
        slot[sources[sources >= 0]] = np.nonzero(sources >= 0)[0]
    colors = _slot_colors(len(sources))
    merged = (slot >= 0) & ~kept
    tint = np.zeros((n, 3), dtype=np.float32)
    tint[merged] = colors[slot[merged] % len(colors)]
    alpha = np.where(merged, 0.35, 0.0).astype(np.float32)
    shade = np.where(kept, 1.0, np.where(merged, 0.55, 0.2)).astype(np.float32)
    up = lambda a: np.repeat(np.repeat(a.reshape(h, w, *a.shape[1:]), ph, 0), pw, 1)  # noqa: E731
    out = (base[: h * ph, : w * pw] * (1 - up(alpha)[..., None]) + up(tint) * up(alpha)[..., None]) * up(shade)[
        ..., None
    ]
    edge = np.zeros((h * ph, w * pw), dtype=bool)
    edge[::ph, :] = edge[ph - 1 :: ph, :] = True
    edge[:, ::pw] = edge[:, pw - 1 :: pw] = True
    border = up(kept) & edge
    out[border] = 1.0
    canvas = base.copy()
    canvas[: h * ph, : w * pw] = out
    return canvas


SIGNAL_LABELS = {"cls": "CLS attention", "mean-received": "mean-received attention"}


def score_attention(model: Any, pixel_values: Tensor, signal: str | None = None) -> tuple[Tensor, str]:
    """([N], label): the last encoder layer's score over the patches of the first image (base crop),
    full-width single head as PruMerge scores it; `signal` as the methods' option (None: CLS attention
    where the tower has a CLS token, mean-received attention otherwise). The label names the one used."""
    from visprune.models import adapter_for
    from visprune.models.vision import available_signals

    adapter = adapter_for(model)
    request = score_request(signal, (-1,), "single").resolve(available_signals(adapter.vision_tower))
    pv = pixel_values[:1]
    if pv.dim() == 5:
        pv = pv[:, 0]
    with torch.inference_mode():
        out = adapter.encode(pv, {"score": request})
    label = SIGNAL_LABELS["cls" if request.kind == "cls_attn" else "mean-received"]
    return out.signals["score"][0].float().cpu(), label


@dataclass
class AttentionSummary:
    """The score curve (CLS or mean-received attention) and the cuts the methods make on it."""

    scores: Tensor  # [N]
    fence: float  # Q3 + 1.5 IQR
    outliers: int  # tokens above the fence (PruMerge's m, before the m >= 1 guard)
    knee: int  # tokens before the Kneedle knee of the sorted curve
    label: str = SIGNAL_LABELS["cls"]  # which score it is


def summarize_attention(scores: Tensor, label: str = SIGNAL_LABELS["cls"]) -> AttentionSummary:
    """Fence and knee of a score row (CLS or mean-received attention), with visprune's own helpers."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75])).tolist()
    m = int(outlier_counts(scores.unsqueeze(0))[0])
    k = int(knee_count(scores.sort(descending=True).values.unsqueeze(0))[0])
    return AttentionSummary(scores=scores, fence=q3 + 1.5 * (q3 - q1), outliers=m, knee=k, label=label)


def draw_attention(
    ax_map: Any, ax_curve: Any, image: np.ndarray, summary: AttentionSummary, grid: tuple[int, int]
) -> None:
    """Heat map of the score over the image, and the sorted curve with the fence and the knee."""
    h, w = grid
    ax_map.imshow(image)
    from matplotlib.colors import LogNorm

    heat = summary.scores.reshape(h, w).numpy().clip(min=1e-12)
    norm = LogNorm(vmin=max(float(heat.min()), float(heat.max()) * 1e-3), vmax=float(heat.max()))
    extent = (0, image.shape[1], image.shape[0], 0)
    ax_map.imshow(heat, cmap="inferno", norm=norm, alpha=0.65, extent=extent, interpolation="nearest")
    ax_map.set_title(f"{summary.label}, last layer (log scale)", fontsize=9)
    ax_map.axis("off")
    curve = summary.scores.sort(descending=True).values.numpy()
    ax_curve.plot(np.arange(1, len(curve) + 1), curve, color="black", lw=1.2)
    ax_curve.axhline(summary.fence, color="tab:red", ls="--", lw=1, label=f"IQR fence: {summary.outliers} above")
    ax_curve.axvline(summary.knee, color="tab:blue", ls=":", lw=1.5, label=f"knee: top {summary.knee}")
    ax_curve.set_xscale("log")
    ax_curve.set_xlabel("rank", fontsize=8)
    ax_curve.set_ylabel("attention", fontsize=8)
    ax_curve.set_title(f"sorted {summary.label}", fontsize=9)
    ax_curve.legend(fontsize=7)
    ax_curve.tick_params(labelsize=7)


def layer_reach(
    stats: visprune.Stats, sample: int, reduction: Reduction | None, n_tokens: int, n_layers: int
) -> np.ndarray | None:
    """[n_tokens] int: for each grid token of `sample`'s (single) image, how many LLM layers process it,
    from the stats of a call with an LLM-side stage (None without one): all n_layers when it survives
    every stage, L when the stage at decoder layer L drops it, 0 when the encoder stage dropped it. A
    token merged into a kept one counts as that token."""
    if not stats.llm_visual_kept or stats.llm_visual is None:
        return None
    visual = stats.llm_visual[sample]
    count = int(visual.sum())
    reach = np.full(count, n_layers)
    for layer, kept in reversed(stats.llm_visual_kept):
        reach[~kept[sample][visual].cpu().numpy()] = layer
    if reduction is None:
        return reach if count == n_tokens else None
    assignment = reduction.assignment.cpu().numpy() if reduction.assignment is not None else None
    if assignment is None or assignment.shape[0] != n_tokens or reduction.count != count:
        return None
    return np.where(assignment >= 0, reach[assignment.clip(min=0)], 0)


def survival_overlay(image: np.ndarray, reach: np.ndarray, grid: tuple[int, int], n_layers: int) -> np.ndarray:
    """float RGB [H, W, 3]: `image` tinted per grid token by the share of LLM layers that process it
    (REACH_CMAP, from few to all), tokens that never reach the LLM darkened."""
    from matplotlib import colormaps

    h, w = grid
    base = image.astype(np.float32) / 255.0
    ph, pw = image.shape[0] // h, image.shape[1] // w
    colors = colormaps[REACH_CMAP](reach / max(n_layers, 1))[:, :3].astype(np.float32)
    shade = np.where(reach > 0, 1.0, 0.2).astype(np.float32)
    alpha = np.where(reach > 0, 0.5, 0.0).astype(np.float32)
    up = lambda a: np.repeat(np.repeat(a.reshape(h, w, *a.shape[1:]), ph, 0), pw, 1)  # noqa: E731
    out = base.copy()
    region = base[: h * ph, : w * pw]
    out[: h * ph, : w * pw] = (region * (1 - up(alpha)[..., None]) + up(colors) * up(alpha)[..., None]) * up(shade)[
        ..., None
    ]
    return out


REACH_CMAP = "viridis"


def draw_tokens(
    ax: Any, image: np.ndarray, view: MethodView | None, grid: tuple[int, int], title: str, n_layers: int = 1
) -> None:
    """One method's panel: its survival overlay when it prunes inside the LLM, else its token overlay."""
    if view is not None and view.reach is not None:
        ax.imshow(survival_overlay(image, view.reach, grid, n_layers))
    else:
        ax.imshow(token_overlay(image, view.reduction if view is not None else None, grid))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def add_legend(fig: Any, views: list[MethodView], n_layers: int) -> None:
    """A figure legend for the token panels: what outlines, tints and darkening mean, and, when a panel
    shows an LLM-side method, a colour bar for the number of LLM layers a token reaches."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor="white", edgecolor="black", label="kept token (its own token, outlined)"),
        Patch(facecolor=(0.55, 0.35, 0.55), label="merged into the kept token of its colour"),
        Patch(facecolor=(0.1, 0.1, 0.1), label="dropped (never reaches the LLM)"),
    ]
    fig.legend(handles=handles, loc="lower left", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.0, 0.0))
    if any(v.reach is not None for v in views):
        bar = fig.add_axes((0.68, 0.035, 0.28, 0.012))
        mappable = ScalarMappable(norm=Normalize(0, n_layers), cmap=colormaps[REACH_CMAP])
        cb = fig.colorbar(mappable, cax=bar, orientation="horizontal")
        cb.ax.set_title("LLM layers a token reaches (methods pruning inside the LLM)", fontsize=7)
        cb.ax.tick_params(labelsize=7)


def _grid_of(model: Any) -> tuple[int, int]:
    cfg = model.config.vision_config
    side = cfg.image_size // cfg.patch_size
    return side, side


@dataclass
class MethodView:
    """One method's result on one image."""

    method: str
    answer: str
    reduction: Reduction | None  # encoder-side reduction of the (base crop of the) image; None for LLM-side
    tokens_llm: int  # visual tokens entering the LLM
    tokens_last: int  # visual tokens at the LLM's last layer
    # With an LLM-side stage: per grid token, how many LLM layers process it (0: it never reaches the
    # LLM); None without one.
    reach: np.ndarray | None = None


def run_methods(
    model: Any, processor: Any, images: list[Any], questions: list[str], methods: list[str], max_new_tokens: int = 4
) -> dict[str, list[MethodView]]:
    """Run `generate` with each method ('none' = dense) on the batch; per method a MethodView per image.

    Methods run at their defaults, except that LLM layers assumed for a 32-layer LLM are scaled to the
    model's depth when they do not fit (see `visprune.eval.synth.budget_options`)."""
    from visprune.synth import format_prompt

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = processor(images=images, text=[format_prompt(q) for q in questions], return_tensors="pt", padding=True)
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    from visprune.eval.synth import budget_options

    n_layers = model.config.text_config.num_hidden_layers
    n_visual = _grid_of(model)[0] * _grid_of(model)[1]
    views: dict[str, list[MethodView]] = {}
    for method in methods:
        options = {} if method == "none" else budget_options(method, None, n_visual, n_layers)
        handle = visprune.apply(model, method, **options)
        try:
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        finally:
            visprune.remove(model)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        stats = handle.stats
        encoder_side = method != "none" and get_method(method).placement is not Placement.LLM
        rows = []
        for i, answer in enumerate(answers):
            text = stats.tokens_per_layer[i][0] - stats.visual_tokens_out[i]
            reduction = stats.reductions[i][0] if encoder_side else None
            rows.append(
                MethodView(
                    method=method,
                    answer=answer.strip(),
                    reduction=reduction,
                    tokens_llm=stats.visual_tokens_out[i],
                    tokens_last=stats.tokens_per_layer[i][-1] - text,
                    reach=layer_reach(stats, i, reduction, n_visual, n_layers),
                )
            )
        views[method] = rows
    return views


def describe_tokens(view: MethodView) -> str:
    """'64' or '37 -> 12' (visual tokens entering the LLM -> left at its last layer)."""
    if view.tokens_last != view.tokens_llm:
        return f"{view.tokens_llm} -> {view.tokens_last}"
    return str(view.tokens_llm)


def open_image(path: str | Path) -> Any:
    """The image file at `path` as an RGB PIL image; a missing file or one PIL cannot decode raises
    InputError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist; pass an image file (PNG, JPEG, ...)")
    if not path.is_file():
        raise InputError(f"image {path} is not a file; pass an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except UnidentifiedImageError as err:
        raise InputError(f"{path} is not an image PIL can read; pass an image file (PNG, JPEG, ...)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read the image {path}: {err}; pass an intact image file") from err


def run_viz(
    image: str | Path,
    model: str | Path | None = None,
    methods: list[str] | None = None,
    question: str = DEFAULT_QUESTION,
    out: str | Path = "visprune-viz.png",
    device: str = "cpu",
) -> Path:
    """Draw each method's kept / merged tokens on `image` side by side, plus the score panels."""
    from visprune import bundled

    methods = list(methods or VIZ_METHODS)
    for m in methods:
        get_method(m)
    path = Path(image)
    picture = open_image(path)
    net, processor = bundled.load(model, device=device)
    views = run_methods(net, processor, [picture], [question], methods)
    pixel_values = processor(images=[picture], text=["<image>"], return_tensors="pt")["pixel_values"]
    seen = model_view(pixel_values[0], processor)
    grid = _grid_of(net)
    summary = summarize_attention(*score_attention(net, pixel_values.to(device, next(net.parameters()).dtype)))

    plt = _pyplot()
    panels = len(methods) + 2
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig, grid_axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.5 * rows), dpi=110, squeeze=False)
    axes = list(grid_axes.flat)
    for ax in axes[panels:]:
        ax.axis("off")
    n_layers = net.config.text_config.num_hidden_layers
    for ax, method in zip(axes, methods, strict=False):
        view = views[method][0]
        title = f"{method}: {describe_tokens(view)} tokens\nanswer: {view.answer}"
        draw_tokens(ax, seen, view, grid, title, n_layers)
    draw_attention(axes[panels - 2], axes[panels - 1], seen, summary, grid)
    fig.suptitle(f"{path.name} - question: {question}", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    add_legend(fig, [views[m][0] for m in methods], n_layers)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target)
    plt.close(fig)
    return target
