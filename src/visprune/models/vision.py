"""Run a CLIP-style vision tower layer by layer and compute only the signals a method asks for.

Running the layers ourselves (instead of `tower(..., output_hidden_states=True)`) lets us stop at the
last layer anyone needs: LLaVA reads hidden_states[-2], so the final layer is never run, and the
CLS-attention rows are computed from one layer's q/k projections (no attention map materialised,
so the tower keeps SDPA / FlashAttention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visprune.errors import UnsupportedModelError
from visprune.methods.base import SignalRequest
from visprune.methods.signals import cls_attention, patch_keys


@dataclass
class VisionOutput:
    """Selected encoder features and the requested signals for a batch of images (or crops)."""

    features: Tensor  # [n, N, C] the features the projector would receive (CLS dropped per strategy)
    signals: dict[str, Tensor]


def _parts(tower: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.ModuleList]:
    """(embeddings, pre-norm or None, encoder layers) of a CLIP-like tower (CLIPVisionModel and kin)."""
    body = getattr(tower, "vision_model", tower)
    embeddings = getattr(body, "embeddings", None)
    encoder = getattr(body, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if embeddings is None or layers is None:
        raise UnsupportedModelError(
            f"vision tower {type(tower).__name__} is not a CLIP-style encoder (embeddings + encoder.layers)"
        )
    return embeddings, getattr(body, "pre_layrnorm", None), layers


def has_cls_token(tower: nn.Module) -> bool:
    """Whether the tower prepends a class token (CLIP does; SigLIP does not)."""
    return hasattr(_parts(tower)[0], "class_embedding")


def num_encoder_layers(tower: nn.Module) -> int:
    return len(_parts(tower)[2])


def _layer_qk(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, int]:
    """CLS query [n, C] and keys [n, T, C] of `layer` for its input `hidden`, plus its head count."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    return attn.q_proj(x[:, 0]), attn.k_proj(x), attn.num_heads


def encode(
    tower: nn.Module,
    pixel_values: Tensor,
    feature_layers: int | list[int],
    select_strategy: str,
    requests: dict[str, SignalRequest],
) -> VisionOutput:
    """Vision features as LLaVA selects them, plus `requests` computed at their layers.

    feature_layers: LLaVA's `vision_feature_layer` (index into hidden_states: -2 is the output of the
    second-to-last layer); a list concatenates several along channels as LLaVA does.
    Signal layers index encoder LAYERS (SignalRequest docs): their input hidden state is used.
    """
    embeddings, pre_norm, layers = _parts(tower)
    n_layers = len(layers)
    feats = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    feat_idx = [f % (n_layers + 1) for f in feats]  # hidden_states index: 0 = embeddings
    signal_layers = {r.layers[i] % n_layers for r in requests.values() for i in range(len(r.layers))}
    if any(r.kind.startswith("cls") for r in requests.values()) and not has_cls_token(tower):
        raise UnsupportedModelError(
            f"this method needs the CLS token's attention, but the vision tower {type(tower).__name__} has no CLS "
            "token; choose a method that needs no CLS signal (e.g. 'pool', 'random', 'tome', 'fastv')"
        )
    last_needed = max([*feat_idx, *signal_layers])

    hidden = embeddings(pixel_values.to(dtype=next(tower.parameters()).dtype))
    if pre_norm is not None:
        hidden = pre_norm(hidden)
    states: dict[int, Tensor] = {}
    qk: dict[int, tuple[Tensor, Tensor, int]] = {}
    for i in range(last_needed + 1):
        if i in feat_idx:
            states[i] = hidden
        if i in signal_layers:
            qk[i] = _layer_qk(layers[i], hidden)
        if i < last_needed:
            out = layers[i](hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out

    selected = [states[i] for i in feat_idx]
    if select_strategy == "default":
        selected = [s[:, 1:] for s in selected]
    elif select_strategy != "full":
        raise UnsupportedModelError(f"unknown vision_feature_select_strategy {select_strategy!r}")
    features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    signals: dict[str, Tensor] = {}
    for name, req in requests.items():
        idx = [layer % n_layers for layer in req.layers]
        if req.kind in ("cls_attn", "cls_attn_layers"):
            rows = [cls_attention(qk[i][0], qk[i][1], qk[i][2], req.heads) for i in idx]
            signals[name] = rows[0] if req.kind == "cls_attn" else torch.stack(rows, dim=1)
        elif req.kind == "keys":
            _, keys, heads = qk[idx[0]]
            signals[name] = patch_keys(keys, heads, req.heads, has_cls=has_cls_token(tower))
        else:
            raise UnsupportedModelError(f"signal {req.kind!r} is not an encoder signal")
    return VisionOutput(features=features, signals=signals)
