"""Run a CLIP-style vision tower layer by layer and compute only the signals a method asks for.

Running the layers ourselves (instead of `tower(..., output_hidden_states=True)`) lets us stop at the
last layer anyone needs: LLaVA reads hidden_states[-2], so the final layer is never run, and the
CLS-attention rows and the CLS-free mean-received scores are computed from one layer's q/k
projections (no attention map materialised, so the tower keeps SDPA / FlashAttention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visprune.errors import InputError, UnsupportedModelError
from visprune.methods import graphs
from visprune.methods.base import SignalRequest
from visprune.methods.flowcut import accumulate, flow_terms, prune_counts, prune_layers, top_mask
from visprune.methods.signals import cls_attention, cls_cosine, mean_received_attention, patch_keys

CLS_KINDS = frozenset({"cls_attn", "cls_attn_layers", "cls_cosine", "cls_feature", "flowcut"})
CLS_FREE_KINDS = frozenset({"mean_received", "mean_received_layers", "keys"})


@dataclass
class VisionOutput:
    """Selected encoder features and the requested signals for a batch of images (or crops)."""

    features: Tensor  # [n, N, C] the features the projector would receive (CLS dropped per strategy)
    signals: dict[str, Tensor]
    patches: int | None = None  # the patches per image before the tower pruned itself ("flowcut"); None: N


def _parts(tower: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.ModuleList]:
    """(embeddings, pre-norm or None, encoder layers) of a CLIP-like tower (CLIPVisionModel, and
    SiglipVisionModel, which has no pre-norm; a final `post_layernorm` is never applied: LLaVA reads
    hidden states, which are taken before it)."""
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


def available_signals(tower: nn.Module) -> frozenset[str]:
    """The encoder signal kinds `encode` computes for this tower (SignalRequest.resolve's argument)."""
    return CLS_FREE_KINDS | CLS_KINDS if has_cls_token(tower) else CLS_FREE_KINDS


def num_encoder_layers(tower: nn.Module) -> int:
    return len(_parts(tower)[2])


class _LayerQK:
    """One layer's normalised input and the projections computed from it on first use."""

    def __init__(self, layer: nn.Module, hidden: Tensor):
        self.attn = layer.self_attn
        self.hidden = hidden
        self.x = layer.layer_norm1(hidden)
        self.heads: int = self.attn.num_heads
        self._keys: Tensor | None = None

    @property
    def keys(self) -> Tensor:
        """[n, T, C] the keys of every token."""
        if self._keys is None:
            self._keys = self.attn.k_proj(self.x)
        return self._keys

    def cls_query(self) -> Tensor:
        """[n, C] the CLS token's query."""
        return self.attn.q_proj(self.x[:, 0])

    def queries(self) -> Tensor:
        """[n, T, C] the queries of every token."""
        return self.attn.q_proj(self.x)


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
    "cls_feature" reads the CLS row of the feature layer(s), whatever the select strategy.
    Each request is first resolved for the tower (`SignalRequest.resolve` with `available_signals`):
    a CLS request with a fallback becomes "mean_received" on a tower without CLS.
    """
    embeddings, pre_norm, layers = _parts(tower)
    n_layers = len(layers)
    cls = has_cls_token(tower)
    requests = resolve_requests(tower, requests)
    flow = [name for name, req in requests.items() if req.kind == "flowcut"]
    if flow:
        if len(requests) > 1:
            raise UnsupportedModelError("flowcut prunes the tower itself; it cannot be combined with other signals")
        keep = requests[flow[0]].keep
        return _encode_flowcut(tower, pixel_values, feature_layers, select_strategy, flow[0], keep)
    feats = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    feat_idx = [f % (n_layers + 1) for f in feats]  # hidden_states index: 0 = embeddings
    signal_layers = {r.layers[i] % n_layers for r in requests.values() for i in range(len(r.layers))}
    last_needed = max([*feat_idx, *signal_layers])

    hidden = embeddings(pixel_values.to(dtype=next(tower.parameters()).dtype))
    if pre_norm is not None:
        hidden = pre_norm(hidden)
    states: dict[int, Tensor] = {}
    qk: dict[int, _LayerQK] = {}
    for i in range(last_needed + 1):
        if i in feat_idx:
            states[i] = hidden
        if i in signal_layers:
            qk[i] = _LayerQK(layers[i], hidden)
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
        if req.kind == "cls_feature":
            cls_rows = [states[i][:, 0] for i in feat_idx]
            signals[name] = cls_rows[0] if len(cls_rows) == 1 else torch.cat(cls_rows, dim=-1)
        elif req.kind == "cls_cosine":
            signals[name] = cls_cosine(qk[idx[0]].hidden)
        elif req.kind in CLS_KINDS:
            rows = [cls_attention(qk[i].cls_query(), qk[i].keys, qk[i].heads, req.heads) for i in idx]
            signals[name] = rows[0] if req.kind == "cls_attn" else torch.stack(rows, dim=1)
        elif req.kind in ("mean_received", "mean_received_layers"):
            rows = [
                mean_received_attention(qk[i].queries(), qk[i].keys, qk[i].heads, req.heads, skip=int(cls)) for i in idx
            ]
            signals[name] = rows[0] if req.kind == "mean_received" else torch.stack(rows, dim=1)
        elif req.kind == "keys":
            signals[name] = patch_keys(qk[idx[0]].keys, qk[idx[0]].heads, req.heads, has_cls=cls)
        else:
            raise UnsupportedModelError(f"signal {req.kind!r} is not an encoder signal")
    return VisionOutput(features=features, signals=signals)


def _encode_flowcut(
    tower: nn.Module, pixel_values: Tensor, feature_layers: int | list[int], select_strategy: str, name: str, keep: int
) -> VisionOutput:
    """The tower pruning itself progressively by FlowCut's flow (`visprune.methods.flowcut`): the feature
    layer's rows of the `keep` surviving patches per image, and their original indices under `name`
    (`_flowcut_tower`). The pass needs nothing from the host, so on a GPU it is replayed from a CUDA graph
    captured once per batch shape (`graphs.replayed`, keyed by the tower's weights): its ~60 small
    operations per layer would otherwise leave the GPU waiting for the host (docs/bench)."""
    embeddings, _, layers = _parts(tower)
    if not isinstance(feature_layers, int) or select_strategy != "default":
        raise UnsupportedModelError(
            "flowcut needs one vision feature layer with the CLS token dropped (vision_feature_select_strategy="
            f"'default'); this model uses layer(s) {feature_layers!r} with {select_strategy!r}"
        )
    feature = feature_layers % (len(layers) + 1)
    if not prune_layers(feature):
        raise UnsupportedModelError(
            f"flowcut prunes after vision layers before the feature layer; layer {feature} leaves none"
        )
    dense = embeddings.num_patches
    if keep > dense:
        raise InputError(f"flowcut: budget={keep} exceeds the N={dense} patches per image; pass at most {dense}")
    pixels = pixel_values.to(dtype=next(tower.parameters()).dtype)
    if tower.training:  # dropout draws anew every pass, which a replay would not
        features, kept = _flowcut_tower(pixels, tower=tower, feature=feature, keep=keep)
    else:
        weights = (*tower.parameters(), *tower.buffers())
        features, kept = graphs.replayed(_flowcut_tower, pixels, reads=weights, tower=tower, feature=feature, keep=keep)
    return VisionOutput(features=features, signals={name: kept}, patches=dense)


# On a GPU, FlowCut's terms compiled into a few kernels (one compilation: every layer has the same shapes).
# Inside the tower's graph that saved 0.4 ms of small kernels per batch-16 pass (docs/bench/tower-flowcut-b16.txt).
_flow_terms = graphs.fused(flow_terms)


def _flowcut_tower(pixels: Tensor, *, tower: nn.Module, feature: int, keep: int) -> tuple[Tensor, Tensor]:
    """(the feature layer's rows [B, keep, C] of the patches FlowCut keeps, their original indices [B, keep]
    ascending): the tower's layers up to the feature layer run here (`_layer_forward`), so FlowCut's scores
    reuse each layer's own q, k and v.

    A cut marks the kept patches (`flowcut.top_mask`) and masks the others out of every later attention;
    their rows stay in place, so the layers keep their width and no count is read back on the host (the
    rows, not their attention, are the dropped patches' only cost: each image still attends over exactly
    its kept patches, as if the others were gone). The last cut keeps exactly `keep` per image, which the
    host knows: the rows are gathered there, and the layer after it runs on them alone."""
    embeddings, pre_norm, layers = _parts(tower)
    hidden = embeddings(pixels)
    if pre_norm is not None:
        hidden = pre_norm(hidden)
    plan = prune_layers(feature)
    last = max(plan)  # the cut to exactly `keep` (r = 0)
    valid = torch.ones(hidden.shape[0], hidden.shape[1] - 1, dtype=torch.bool, device=hidden.device)
    flow: Tensor | None = None
    mask: Tensor | None = None
    for i in range(last + 1):
        hidden, q, k, v = _layer_forward(layers[i], hidden, mask)
        score, attention = _flow_terms(q[:, :, :1], k, v, valid, layers[i].self_attn.scale)
        flow = accumulate(flow, score)
        if i in plan:
            valid = top_mask(flow, valid, prune_counts(attention, valid, keep, plan[i]))
            mask = _padding_mask(valid, hidden.dtype) if plan[i] else None
    kept = (~valid).to(torch.int8).sort(dim=1, stable=True).indices[:, :keep]  # ascending: sorted stably
    patches = hidden[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    hidden = torch.cat([hidden[:, :1], patches], dim=1)
    for i in range(last + 1, feature):
        hidden = _layer_forward(layers[i], hidden, None)[0]
    return hidden[:, 1:], kept


def _layer_forward(layer: nn.Module, hidden: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One CLIP encoder layer as transformers computes it, its attention through SDPA with the additive
    `mask` (or none): (the layer's output, and its q, k, v [B, H, T, d], for FlowCut's scores)."""
    attn = layer.self_attn
    b, t, c = hidden.shape
    x = layer.layer_norm1(hidden)
    q, k, v = (p(x).view(b, t, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scale)
    hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(b, t, c))
    return hidden + layer.mlp(layer.layer_norm2(hidden)), q, k, v


def _padding_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive attention mask [B, 1, 1, 1 + K] that hides each image's rows that are not `valid` (CLS
    first)."""
    keys = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
    b, t = keys.shape
    # rows allocated to a multiple of 8 entries: SDPA's memory-efficient kernel takes a mask whose row
    # stride is 16-byte aligned, and falls back to a slower kernel otherwise
    mask = torch.zeros(b, 1, 1, -(-t // 8) * 8, dtype=dtype, device=valid.device)[..., :t]
    return mask.masked_fill_(~keys[:, None, None, :], torch.finfo(dtype).min)


def resolve_requests(tower: nn.Module, requests: dict[str, SignalRequest]) -> dict[str, SignalRequest]:
    """Every request resolved for this tower (its fallback kind where it lacks the requested one); a CLS
    signal asked for explicitly on a tower without CLS raises UnsupportedModelError saying what to use."""
    available = available_signals(tower)
    resolved = {}
    for name, req in requests.items():
        if req.kind in CLS_KINDS and req.kind not in available and req.fallback not in available:
            raise missing_cls(req.kind, type(tower).__name__)
        resolved[name] = req.resolve(available)
    return resolved


def missing_cls(kind: str, tower_name: str) -> UnsupportedModelError:
    """The error for a CLS signal `kind` asked for explicitly on a tower without CLS: which option to change."""
    if kind == "cls_feature":
        return UnsupportedModelError(
            f"cls_token=True needs the CLS token, but the vision tower {tower_name} has none; leave cls_token "
            "unset (it keeps the CLS token where the tower has one) or pass cls_token=False"
        )
    if kind == "flowcut":
        return UnsupportedModelError(
            f"flowcut prunes a CLIP tower by its CLS token's attention, but the vision tower {tower_name} has no CLS "
            "token; on LLaVA it is for LLaVA-1.5-class models (the Qwen-VL family runs its CLS-free variant). Use "
            "vispruner, divprune or scope instead"
        )
    option = "cosine" if kind == "cls_cosine" else "cls"
    return UnsupportedModelError(
        f"signal={option!r} needs the CLS token, but the vision tower {tower_name} has no CLS token; pass "
        "signal='mean-received' (or leave signal unset: it resolves to 'mean-received' here)"
    )
