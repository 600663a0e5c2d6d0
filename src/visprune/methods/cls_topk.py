"""Fixed-budget selection by CLS attention: FasterVLM and VTC-CLS.

Both keep the top-`budget` patch tokens ranked by the attention the vision tower's CLS query pays to
them, in spatial (ascending index) order, and drop the rest. They differ only in the score:
FasterVLM reads one layer, VTC-CLS sums several. On a tower without a CLS token (or with
signal="mean-received") the score is the attention each patch receives, averaged over the patch
queries (`signals.mean_received_attention`), at the same layer(s).

Ties in the score are broken towards the lower token index (a stable descending sort), so the
selection is the same on every device.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from visprune.errors import InputError
from visprune.methods.base import (
    Placement,
    Reduction,
    check_signal_option,
    document_signal,
    score_request,
    select_tokens,
)
from visprune.methods.budget_rules import TOKENS
from visprune.methods.checks import (
    check_budgeted_features,
    check_count,
    check_tensor,
)
from visprune.methods.depth import RelativeDepth, published
from visprune.methods.registry import register

# VTC-CLS ensembles the encoder layers start_layer..-2; -5 on CLIP ViT-L/14's 24 layers.
START_LAYER = RelativeDepth(-5, reference=24, stack="vision", lowest=0, highest=-2)


def check_signal(t: object, name: str, shape: tuple[int | None, ...], features: Tensor) -> Tensor:
    """A signal tensor of `shape`, finite, on the features' device."""
    t = check_tensor(t, name, shape)
    if not t.is_floating_point():
        raise InputError(f"{name} must be a floating point tensor, got {t.dtype}")
    if t.device != features.device:
        raise InputError(f"{name} is on {t.device} but features are on {features.device}; move them to one device")
    return t


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest entries of each row of `scores` [B, N] (float32 ranking).

    Ties go to the lower index (stable descending sort), which makes the result device-independent.
    """
    return scores.float().sort(dim=1, descending=True, stable=True).indices[:, :k]


def check_fastervlm(*, budget: Any, signal: Any) -> None:
    """FasterVLM's options (the budget <= N check needs the features)."""
    check_count(budget, "budget")
    check_signal_option(signal)


def check_vtc_cls(*, budget: Any, start_layer: Any, signal: Any) -> None:
    """VTC-CLS's options: a budget >= 1 and a negative start layer <= -2 (or the default)."""
    check_count(budget, "budget")
    check_signal_option(signal)
    if isinstance(start_layer, RelativeDepth):
        return
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or start_layer > -2:
        raise InputError(f"start_layer must be a negative int <= -2 (e.g. -5 for layers -5..-2), got {start_layer!r}")


@register(
    "fastervlm",
    description="FasterVLM: keep the top-K patch tokens by head-averaged CLS attention of layer -2 (fixed K).",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {"cls_attn": score_request(o["signal"], (-2,), "mean")},
    check=check_fastervlm,
    budget_rule=TOKENS,
    published_attention="vision",
)
@document_signal
def fastervlm(
    features: Tensor,
    *,
    cls_attn: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
    signal: str | None = None,
) -> list[Reduction]:
    """FasterVLM (Zhang et al., arXiv 2412.01818): top-`budget` tokens by [CLS] attention.

    features [B, N, C]; cls_attn [B, N], the score chosen by `signal` at encoder layer -2 (the
    layer whose output LLaVA uses): with "cls" the head-averaged CLS->patch attention probabilities,
    CLS column dropped; on a tower without CLS ("mean-received") the head-averaged attention each
    patch receives, averaged over the patch queries. Keeps exactly `budget`
    tokens per image, in spatial order; `assignment` marks the dropped ones with -1. The grid is not
    needed and only validated when given. Same order as the official code (Theia-4869/FasterVLM), which
    sorts torch.topk's indices before gathering; ties at the budget boundary go to the lower index here,
    where torch.topk leaves their order unspecified. The official code also ranks with the first image's
    attention for the whole batch (it indexes [0]); here every image is ranked by its own.

    Options:
        budget: number of tokens kept per image (default 64), 1 <= budget <= N.
        signal: {SIGNAL}
    """
    check_fastervlm(budget=budget, signal=signal)
    b, n, k = check_budgeted_features(features, grid, budget)
    scores = check_signal(cls_attn, "cls_attn", (b, n), features)
    return select_tokens(features, top_indices(scores, k))


@register(
    "vtc-cls",
    description="VTC-CLS: keep the top-K patch tokens by CLS attention summed over encoder layers start_layer..-2.",
    placement=Placement.ENCODER,
    adaptive=False,
    signals=lambda o: {
        "cls_attn_layers": score_request(
            o["signal"], tuple(range(published(o["start_layer"]), -1)), "mean", several=True
        )
    },
    check=check_vtc_cls,
    budget_rule=TOKENS,
    published_attention="vision",
)
@document_signal
def vtc_cls(
    features: Tensor,
    *,
    cls_attn_layers: Tensor,
    grid: tuple[int, int] | None = None,
    budget: int = 64,
    start_layer: int | RelativeDepth = START_LAYER,
    signal: str | None = None,
) -> list[Reduction]:
    """VTC-CLS (Wang et al., arXiv 2412.05819): top-`budget` tokens by a multi-layer [CLS] score.

    features [B, N, C]; cls_attn_layers [B, L, N], per layer the score chosen by `signal` for the
    encoder layers start_layer, ..., -2 (L = -1 - start_layer rows): head-averaged CLS->patch
    attention rows ("cls"), or on a tower without CLS ("mean-received") the head-averaged attention
    each patch receives from the patch queries of that layer. The score of a token is the sum
    of its rows (the paper's layer ensemble); the top-`budget` tokens are kept in spatial order, ties
    to the lower index. The official code takes the first ensembled layer as a command-line argument
    (attentions[start_layer:-1], i.e. up to layer -2) and publishes no default; visprune's default
    -5 ensembles the last four layers before the output layer (19..22 of CLIP ViT-L/14's 24), a
    choice to be tuned rather than a published value. On a tower of another depth L the default
    moves to the same relative depth (-round(5 L / 24), at most -2: -10 for 48 layers, -2 for 3).

    Options:
        budget: number of tokens kept per image (default 64), 1 <= budget <= N.
        start_layer: first encoder layer of the ensemble as a negative index; must be <= -2 (-2
            alone equals fastervlm). Default: -5 (layers -5..-2) for a 24-layer tower, moved to the
            same relative depth of the model's tower when applied; an explicit value is used as
            given and must fit the tower.
        signal: {SIGNAL} Summed over the same layers.
    """
    check_vtc_cls(budget=budget, start_layer=start_layer, signal=signal)
    b, n, k = check_budgeted_features(features, grid, budget)
    layers = -1 - published(start_layer)
    scores = check_signal(cls_attn_layers, "cls_attn_layers", (b, layers, n), features)
    return select_tokens(features, top_indices(scores.float().sum(dim=1), k))
