"""Analytic FLOPs, memory and roofline estimates for LLaVA-style models with reduced visual tokens.

What is counted (2 FLOPs per multiply-add; matmuls and the patch-embedding convolution only):

* Vision tower (CLIP ViT), per crop of N = (image_size / patch_size)^2 + 1 tokens (patches + CLS):
  patch-embedding conv 2·P·(C·p²)·D; per encoder layer q/k/v/o projections 4·2·N·D², full bidirectional
  attention scores 2·N²·D plus weighted sum 2·N²·D, and the MLP 2·2·N·D·I. Only the layers up to
  ``vision_feature_layer`` are counted: LLaVA reads ``hidden_states[-2]``, so the last of 24 layers is
  skipped (pass ``count_unused_vision_layers=True`` to count what HF actually runs: every layer).
* Projector (2-layer GELU MLP): 2·T·(D_in·D_t + D_t²) for T projected tokens (by default every patch of
  every crop, as ``get_image_features`` projects before any reduction happens).
* LLM, per decoder layer l with S_l tokens (a list, so in-LLM pruning stages are expressed): q and o
  projections 2·S·D·(H·d) each, k and v 2·S·D·(H_kv·d) each (GQA), attention scores and weighted sum
  2·2·H·d·pairs, where a causal prefill of S tokens has pairs = S(S+1)/2 query-key pairs
  (``causal=False`` gives S², which is what ``torch.utils.flop_counter.FlopCounterMode`` counts),
  SwiGLU MLP 3·2·S·D·I. Final norm (elementwise) + lm_head 2·D·V for the last token only by default,
  as ``generate`` does (``lm_head_all_tokens=True`` for every token).
* Decode: ``new_tokens`` = n as in ``max_new_tokens``: the first comes out of the prefill's lm_head, the
  other n-1 each need one decode forward. Step i (0-based) feeds one token that attends to S_l + i + 1
  keys at layer l (its cache plus itself); each step also runs the lm_head.

Not counted: elementwise work (norms, softmax, activations, RoPE, residual adds, biases), below 1% of
the totals for LLaVA shapes. Everything scales linearly with ``batch``.

Memory: weights = parameter count · dtype bytes (every vision layer, since all are loaded). KV cache per
layer = 2 (keys, values) · batch · H_kv · d · tokens · bytes, after prefill (S_l tokens) and at the end
of generation (S_l + n - 1). Activation peak: the largest set of tensors alive inside one block with
fused attention (scores never materialised): for an LLM layer max(attention stage S·(2D + (2H + 2H_kv)·d),
MLP stage S·(2D + 3I)) per sequence, the same for a vision layer over all crops, or the logits
(batch · tokens · V), whichever is largest.

Roofline: time >= max(FLOPs / peak, bytes / bandwidth) per phase. Bytes moved: encode = vision +
projector weights; prefill = LLM weights incl. lm_head + KV cache written; each decode step = LLM
weights incl. lm_head + KV cache read + the new token's KV written (activations are ignored). The decode
bound is the sum of the per-step bounds.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from visprune.errors import InputError, closest

DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "int8": 1,
    "int4": 0.5,
}


@dataclass(frozen=True)
class GPU:
    """Peak dense compute (TFLOP/s) and memory bandwidth (GB/s) of an accelerator."""

    name: str
    peak_tflops: float
    bandwidth_gbs: float
    note: str = ""


GPU_PRESETS: dict[str, GPU] = {
    "h100-sxm": GPU("h100-sxm", 989.0, 3350.0, "NVIDIA H100 SXM datasheet: dense FP16/BF16 tensor core, HBM3"),
    "h200": GPU("h200", 989.0, 4800.0, "NVIDIA H200 SXM datasheet: dense FP16/BF16 tensor core, HBM3e"),
}


@dataclass(frozen=True)
class VisionDims:
    """Shapes of a CLIP-style vision tower and how many of its layers LLaVA uses."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    channels: int
    layers_used: int

    @property
    def patches(self) -> int:
        """Patch tokens per crop, (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """Tokens through the encoder per crop: patches + CLS."""
        return self.patches + 1


@dataclass(frozen=True)
class TextDims:
    """Shapes of a Llama-style decoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass(frozen=True)
class ModelDims:
    """Per-component shapes of a LLaVA-style model; `vision` is None for a text-only config."""

    name: str
    text: TextDims
    vision: VisionDims | None = None
    projector_in: int = 0
    projector_bias: bool = True
    crops_per_image: int = 1
    projected_tokens_per_image: int = 0
    dense_tokens_per_image: int = 0


@dataclass
class Memory:
    """Bytes: weights per component, KV cache (per layer after prefill, totals), activation peak."""

    weights: dict[str, float]
    kv_cache_per_layer: list[float]
    kv_cache_prefill: float
    kv_cache_final: float
    activation_peak: float

    @property
    def total_peak(self) -> float:
        """Weights + KV cache at the end of generation + activation peak."""
        return self.weights["total"] + self.kv_cache_final + self.activation_peak


@dataclass
class Phase:
    """Roofline lower bound of one phase."""

    flops: int
    bytes: float
    time_ms: float
    bound: str


@dataclass
class Roofline:
    """Time lower bounds per phase (encode, prefill, decode) on one accelerator."""

    gpu: GPU
    phases: dict[str, Phase]

    @property
    def total_ms(self) -> float:
        """Sum of the phase bounds."""
        return sum(p.time_ms for p in self.phases.values())


@dataclass
class FlopsEstimate:
    """Result of `estimate`: FLOPs per component (ints), memory, optional roofline.

    `vision`, `projector`, `llm_prefill` (decoder layers), `lm_head` (prefill's lm_head) and `decode`
    (decoder layers + lm_head over every decode step) sum to `total`; `prefill` is all but `decode`.
    """

    model: str
    batch: int
    dtype: str
    images: int
    visual_tokens: int
    dense_visual_tokens: int
    text_tokens: int
    new_tokens: int
    decode_steps: int
    tokens_per_layer: list[int]
    vision: int
    projector: int
    llm_prefill: int
    lm_head: int
    decode: int
    llm_prefill_per_layer: list[int]
    breakdown: dict[str, int]
    memory: Memory
    roofline: Roofline | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill(self) -> int:
        """Everything up to the first new token: vision + projector + LLM prefill + lm_head."""
        return self.vision + self.projector + self.llm_prefill + self.lm_head

    @property
    def total(self) -> int:
        """Prefill + decode."""
        return self.prefill + self.decode

    def components(self) -> dict[str, int]:
        """The five components in order."""
        return {
            "vision": self.vision,
            "projector": self.projector,
            "llm_prefill": self.llm_prefill,
            "lm_head": self.lm_head,
            "decode": self.decode,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every field plus `prefill`, `total` and memory / roofline totals."""
        out = asdict(self)
        out["flops"] = {**self.components(), "prefill": self.prefill, "total": self.total}
        out["memory"]["total_peak"] = self.memory.total_peak
        if self.roofline is not None:
            out["roofline"]["total_ms"] = self.roofline.total_ms
        return out


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def load_config(config: Any) -> Any:
    """A transformers config from a config object, a bundled name, a JSON file or a model folder."""
    if not isinstance(config, (str, os.PathLike)):
        return config
    from visprune import configs

    text = str(config)
    if text in configs.available():
        return configs.load(text)
    path = os.path.join(text, "config.json") if os.path.isdir(text) else text
    if not os.path.isfile(path):
        names = configs.available()
        raise InputError(
            f"config {text!r} is neither a bundled name ({', '.join(names)}) nor a JSON file or a folder with "
            f"config.json.{closest(text, names)}"
        )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    from transformers import AutoConfig

    model_type = data.pop("model_type", None)
    if model_type is None:
        raise InputError(f"{path} has no 'model_type'; expected a transformers config such as llava-hf's")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (KeyError, ValueError) as err:
        raise InputError(f"{path}: cannot build a transformers config of type {model_type!r}: {err}") from err


def text_dims(cfg: Any) -> TextDims:
    """`TextDims` of a Llama-style text config."""
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    return TextDims(
        hidden=hidden,
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=_get(cfg, "num_key_value_heads", default=heads),
        head_dim=_get(cfg, "head_dim", default=hidden // heads),
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
    )


def _layers_used(feature_layer: int | list[int], layers: int) -> int:
    indices = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    return max(i if i >= 0 else layers + 1 + i for i in indices)


def vision_dims(cfg: Any, feature_layer: int | list[int] = -2) -> VisionDims:
    """`VisionDims` of a CLIP-style vision config; `feature_layer` indexes ``hidden_states`` as LLaVA does."""
    layers = cfg.num_hidden_layers
    return VisionDims(
        hidden=cfg.hidden_size,
        layers=layers,
        heads=cfg.num_attention_heads,
        intermediate=cfg.intermediate_size,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        channels=_get(cfg, "num_channels", default=3),
        layers_used=_layers_used(feature_layer, layers),
    )


def _anyres_counts(cfg: Any, v: VisionDims, image_size: tuple[int, int]) -> tuple[int, int]:
    """(crops, LLM tokens) of one LLaVA-NeXT image of `image_size` (h, w), as the HF processor counts them."""
    from transformers.image_processing_utils import select_best_resolution

    h, w = image_size
    best_h, best_w = select_best_resolution((h, w), [list(p) for p in cfg.image_grid_pinpoints])
    scale_h, scale_w = best_h // v.image_size, best_w // v.image_size
    side = v.image_size // v.patch_size
    cur_h, cur_w = side * scale_h, side * scale_w
    if w / h > cur_w / cur_h:
        cur_h -= (cur_h - int(round(h * (cur_w / w), 7))) // 2 * 2
    else:
        cur_w -= (cur_w - int(round(w * (cur_h / h), 7))) // 2 * 2
    extra = 1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0
    return 1 + scale_h * scale_w, cur_h * cur_w + cur_h + side * side + extra


def model_dims(config: Any, image_size: tuple[int, int] | None = None) -> ModelDims:
    """Per-component shapes of `config` (LlavaConfig, LlavaNextConfig, a text-only config, or a bundled name).

    For LLaVA-NeXT, `image_size` (h, w) picks the anyres grid (default 672x672: base + 2x2 tiles).
    """
    cfg = load_config(config)
    name = str(config) if isinstance(config, (str, os.PathLike)) else type(cfg).__name__
    text_cfg = getattr(cfg, "text_config", None)
    vision_cfg = getattr(cfg, "vision_config", None)
    if vision_cfg is None:
        return ModelDims(name=name, text=text_dims(text_cfg if text_cfg is not None else cfg))
    if getattr(vision_cfg, "model_type", "clip_vision_model") not in ("clip_vision_model", "siglip_vision_model"):
        raise InputError(f"vision tower {vision_cfg.model_type!r} is not supported; expected a CLIP/SigLIP ViT")
    feature_layer = _get(cfg, "vision_feature_layer", default=-2)
    v = vision_dims(vision_cfg, feature_layer)
    t = text_dims(text_cfg)
    full = getattr(cfg, "vision_feature_select_strategy", "default") == "full"
    per_crop = v.patches + (1 if full else 0)
    n_layers = 1 if isinstance(feature_layer, int) else len(feature_layer)
    crops, dense = 1, per_crop
    if getattr(cfg, "image_grid_pinpoints", None):
        crops, dense = _anyres_counts(cfg, v, image_size or (672, 672))
    return ModelDims(
        name=name,
        text=t,
        vision=v,
        projector_in=v.hidden * n_layers,
        projector_bias=bool(getattr(cfg, "multimodal_projector_bias", True)),
        crops_per_image=crops,
        projected_tokens_per_image=crops * per_crop,
        dense_tokens_per_image=dense,
    )


def vision_layer_flops(v: VisionDims, tokens: int | None = None) -> dict[str, int]:
    """FLOPs of one vision encoder layer on one crop: projections, attention (full), MLP."""
    n = v.tokens if tokens is None else tokens
    d = v.hidden
    return {"proj": 4 * 2 * n * d * d, "attn": 2 * 2 * n * n * d, "mlp": 2 * 2 * n * d * v.intermediate}


def vision_flops(v: VisionDims, crops: int = 1, layers: int | None = None) -> dict[str, int]:
    """FLOPs of the vision tower over `crops` crops and `layers` encoder layers (default: the used ones)."""
    n_layers = v.layers_used if layers is None else layers
    layer = vision_layer_flops(v)
    out = {"patch_embed": crops * 2 * v.patches * v.channels * v.patch_size**2 * v.hidden}
    out.update({f"layers_{k}": crops * n_layers * f for k, f in layer.items()})
    return out


def projector_flops(dims: ModelDims, tokens: int) -> int:
    """FLOPs of the 2-layer projector on `tokens` feature rows."""
    return 2 * tokens * (dims.projector_in * dims.text.hidden + dims.text.hidden**2)


def attention_pairs(tokens: int, causal: bool = True) -> int:
    """Query-key pairs of a prefill of `tokens`: S(S+1)/2 with a causal mask, S² without."""
    return tokens * (tokens + 1) // 2 if causal else tokens * tokens


def llm_layer_flops(t: TextDims, queries: int, pairs: int) -> dict[str, int]:
    """FLOPs of one decoder layer for `queries` new tokens and `pairs` query-key pairs."""
    qo = t.heads * t.head_dim
    kv = t.kv_heads * t.head_dim
    return {
        "proj": 2 * queries * t.hidden * (2 * qo + 2 * kv),
        "attn": 2 * 2 * pairs * qo,
        "mlp": 3 * 2 * queries * t.hidden * t.intermediate,
    }


def lm_head_flops(t: TextDims, tokens: int = 1) -> int:
    """FLOPs of the lm_head on `tokens` rows."""
    return 2 * tokens * t.hidden * t.vocab


def vision_params(v: VisionDims) -> int:
    """Parameters of a CLIP vision tower (every layer, as loaded)."""
    d, i = v.hidden, v.intermediate
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d
    embed = v.channels * v.patch_size**2 * d + d + v.tokens * d
    return embed + 2 * d + v.layers * layer + 2 * d


def text_params(t: TextDims) -> dict[str, int]:
    """Parameters of a Llama-style LLM: embedding, decoder layers (all), final norm, lm_head."""
    qo, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    attn = 2 * t.hidden * qo + 2 * t.hidden * kv + ((qo + 2 * kv + t.hidden) if t.attention_bias else 0)
    mlp = 3 * t.hidden * t.intermediate + ((2 * t.intermediate + t.hidden) if t.mlp_bias else 0)
    return {
        "embed": t.vocab * t.hidden,
        "layers": t.layers * (attn + mlp + 2 * t.hidden),
        "norm": t.hidden,
        "lm_head": 0 if t.tie_embeddings else t.vocab * t.hidden,
    }


def projector_params(dims: ModelDims) -> int:
    """Parameters of the 2-layer projector."""
    bias = 2 * dims.text.hidden if dims.projector_bias else 0
    return dims.projector_in * dims.text.hidden + dims.text.hidden**2 + bias


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


def _resolve_gpu(gpu: str | GPU | None, peak_tflops: float | None, bandwidth_gbs: float | None) -> GPU | None:
    if isinstance(gpu, str):
        if gpu not in GPU_PRESETS:
            raise InputError(
                f"unknown gpu preset {gpu!r}; presets: {', '.join(GPU_PRESETS)}.{closest(gpu, GPU_PRESETS)}"
            )
        gpu = GPU_PRESETS[gpu]
    if peak_tflops is None and bandwidth_gbs is None:
        return gpu
    if gpu is None and (peak_tflops is None or bandwidth_gbs is None):
        raise InputError("give both peak_tflops and bandwidth_gbs, or a gpu preset")
    peak = peak_tflops if peak_tflops is not None else gpu.peak_tflops
    bw = bandwidth_gbs if bandwidth_gbs is not None else gpu.bandwidth_gbs
    if peak <= 0 or bw <= 0:
        raise InputError(f"peak_tflops and bandwidth_gbs must be > 0, got {peak} and {bw}")
    return GPU(gpu.name if gpu else "custom", float(peak), float(bw), "user-given")


def _tokens_per_layer(
    dims: ModelDims,
    visual_tokens: int | list[int] | None,
    text_tokens: int,
    llm_tokens_per_layer: list[int] | None,
    dense: int,
) -> tuple[list[int], int]:
    n_layers = dims.text.layers
    if llm_tokens_per_layer is not None:
        if visual_tokens is not None and not isinstance(visual_tokens, int):
            raise InputError("give per-layer counts either as visual_tokens (a list) or llm_tokens_per_layer, not both")
        counts = list(llm_tokens_per_layer)
        if len(counts) != n_layers:
            raise InputError(
                f"tokens per layer has {len(counts)} entries but the LLM has {n_layers} decoder layers; "
                f"give one count (visual + text tokens) per layer"
            )
        for i, c in enumerate(counts):
            _check_int(f"tokens per layer [{i}]", c, 1)
            if dims.vision is not None and c > dense + text_tokens:
                raise InputError(
                    f"tokens per layer [{i}] = {c} exceeds the dense visual count {dense} + {text_tokens} text tokens"
                )
        return counts, max(counts[0] - text_tokens, 0)
    if visual_tokens is None:
        visual = [dense] * n_layers
    elif isinstance(visual_tokens, int):
        visual = [visual_tokens] * n_layers
    else:
        visual = list(visual_tokens)
        if len(visual) != n_layers:
            raise InputError(f"visual_tokens has {len(visual)} per-layer entries but the LLM has {n_layers} layers")
    for i, c in enumerate(visual):
        _check_int("visual tokens" if len(set(visual)) == 1 else f"visual tokens [layer {i}]", c)
        if c > dense:
            raise InputError(
                f"visual tokens {c} exceed the dense count {dense} of {dims.name} "
                f"({dims.dense_tokens_per_image} per image x {dense // max(dims.dense_tokens_per_image, 1)} image(s))"
            )
    counts = [v + text_tokens for v in visual]
    if min(counts) < 1:
        raise InputError("the LLM needs at least one token per layer (visual + text tokens is 0)")
    return counts, visual[0]


def estimate(
    config: Any,
    visual_tokens: int | list[int] | None = None,
    text_tokens: int = 0,
    new_tokens: int = 0,
    batch: int = 1,
    dtype: str = "float16",
    *,
    llm_tokens_per_layer: list[int] | None = None,
    images: int = 1,
    image_size: tuple[int, int] | None = None,
    projector_tokens: int | None = None,
    causal: bool = True,
    lm_head_all_tokens: bool = False,
    count_unused_vision_layers: bool = False,
    gpu: str | GPU | None = None,
    peak_tflops: float | None = None,
    bandwidth_gbs: float | None = None,
) -> FlopsEstimate:
    """Analytic FLOPs / memory / roofline of one `generate` call on `batch` sequences.

    `visual_tokens` is the visual tokens each sequence gives the LLM (None: the dense count, images x
    per-image count), or a list with one count per decoder layer. `llm_tokens_per_layer` gives the total
    (visual + text) tokens at each decoder layer directly. `projector_tokens` defaults to every patch
    (projection happens before reduction); `gpu` is a preset name ("h100-sxm", "h200") or a `GPU`, and
    `peak_tflops` / `bandwidth_gbs` override it. See the module docstring for what is counted.
    """
    dims = model_dims(config, image_size)
    t, v = dims.text, dims.vision
    _check_int("text tokens", text_tokens)
    _check_int("new tokens", new_tokens)
    _check_int("batch", batch, 1)
    _check_int("images", images, 0 if v is None else 1)
    if dtype not in DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_BYTES)}.{closest(dtype, DTYPE_BYTES)}")
    nbytes = DTYPE_BYTES[dtype]
    hw = _resolve_gpu(gpu, peak_tflops, bandwidth_gbs)
    if v is None:
        images = 0
    dense = images * dims.dense_tokens_per_image
    counts, visual0 = _tokens_per_layer(dims, visual_tokens, text_tokens, llm_tokens_per_layer, dense)

    breakdown: dict[str, int] = {}
    vision = projector = 0
    if v is not None:
        crops = batch * images * dims.crops_per_image
        layers = v.layers if count_unused_vision_layers else v.layers_used
        for k, f in vision_flops(v, crops, layers).items():
            breakdown[f"vision_{k}"] = f
        vision = sum(breakdown.values())
        proj_tokens = images * dims.projected_tokens_per_image if projector_tokens is None else projector_tokens
        _check_int("projector tokens", proj_tokens)
        projector = batch * projector_flops(dims, proj_tokens)
        breakdown["projector"] = projector

    per_layer: list[int] = []
    for key in ("proj", "attn", "mlp"):
        breakdown[f"llm_{key}"] = 0
    for s in counts:
        layer = llm_layer_flops(t, s, attention_pairs(s, causal))
        for key, f in layer.items():
            breakdown[f"llm_{key}"] += batch * f
        per_layer.append(batch * sum(layer.values()))
    llm_prefill = sum(per_layer)
    lm_head = batch * lm_head_flops(t, counts[-1] if lm_head_all_tokens else 1)
    breakdown["lm_head"] = lm_head

    steps = max(new_tokens - 1, 0)
    step_flops: list[int] = []
    per_token_fixed = sum(llm_layer_flops(t, 1, 0).values()) * t.layers + lm_head_flops(t)
    attn_per_key = llm_layer_flops(t, 0, 1)["attn"]
    sum_counts = sum(counts)
    for i in range(steps):
        keys = sum_counts + t.layers * (i + 1)
        step_flops.append(batch * (per_token_fixed + attn_per_key * keys))
    decode = sum(step_flops)

    kv_token = 2 * t.kv_heads * t.head_dim * nbytes * batch
    kv_layers = [kv_token * s for s in counts]
    kv_prefill = sum(kv_layers)
    kv_final = kv_prefill + kv_token * t.layers * steps

    tp = text_params(t)
    weights = {"vision": 0.0, "projector": 0.0}
    if v is not None:
        weights = {"vision": vision_params(v) * nbytes, "projector": projector_params(dims) * nbytes}
    weights["llm"] = sum(tp.values()) * nbytes
    weights["total"] = sum(weights.values())

    s_max = max(counts)
    qkvo = (2 * t.heads + 2 * t.kv_heads) * t.head_dim
    act = batch * s_max * max(2 * t.hidden + qkvo, 2 * t.hidden + 3 * t.intermediate)
    if v is not None:
        crops = batch * images * dims.crops_per_image
        act = max(act, crops * v.tokens * max(6 * v.hidden, 2 * v.hidden + 3 * v.intermediate))
    act = max(act, batch * (counts[-1] if lm_head_all_tokens else 1) * t.vocab)
    memory = Memory(weights, kv_layers, kv_prefill, kv_final, act * nbytes)

    roofline = None
    if hw is not None:
        peak, bw = hw.peak_tflops * 1e12, hw.bandwidth_gbs * 1e9

        def phase(flops: int, moved: float) -> Phase:
            c, m = flops / peak, moved / bw
            return Phase(flops, moved, 1e3 * max(c, m), "compute" if c >= m else "memory")

        llm_weights = weights["llm"] - tp["embed"] * nbytes + (tp["embed"] * nbytes if t.tie_embeddings else 0)
        phases = {
            "encode": phase(vision + projector, weights["vision"] + weights["projector"]),
            "prefill": phase(llm_prefill + lm_head, llm_weights + kv_prefill),
        }
        dec_bytes = dec_ms = 0.0
        for i, f in enumerate(step_flops):
            moved = llm_weights + kv_prefill + kv_token * t.layers * (i + 1)
            dec_bytes += moved
            dec_ms += 1e3 * max(f / peak, moved / bw)
        dec_bound = "compute" if decode / peak >= dec_bytes / bw and steps else "memory"
        phases["decode"] = Phase(decode, dec_bytes, dec_ms, dec_bound)
        roofline = Roofline(hw, phases)

    return FlopsEstimate(
        model=dims.name,
        batch=batch,
        dtype=dtype,
        images=images,
        visual_tokens=visual0,
        dense_visual_tokens=dense,
        text_tokens=text_tokens,
        new_tokens=new_tokens,
        decode_steps=steps,
        tokens_per_layer=counts,
        vision=vision,
        projector=projector,
        llm_prefill=llm_prefill,
        lm_head=lm_head,
        decode=decode,
        llm_prefill_per_layer=per_layer,
        breakdown=breakdown,
        memory=memory,
        roofline=roofline,
        options={
            "causal": causal,
            "lm_head_all_tokens": lm_head_all_tokens,
            "count_unused_vision_layers": count_unused_vision_layers,
            "projector_tokens": projector_tokens,
        },
    )


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_comparison(est: FlopsEstimate, dense: FlopsEstimate) -> str:
    """A readable table of `est` next to its dense counterpart: FLOPs, shares, memory, roofline."""
    lines = [
        f"model {est.model}  batch {est.batch}  dtype {est.dtype}  images {est.images}  text tokens "
        f"{est.text_tokens}  new tokens {est.new_tokens} ({est.decode_steps} decode steps)",
        f"visual tokens to the LLM: {est.visual_tokens} (dense {est.dense_visual_tokens}); tokens at LLM layers: "
        + _summarise(est.tokens_per_layer),
        "",
        f"{'component':<12}{'GFLOPs':>12}{'share':>8}{'dense GFLOPs':>15}{'share':>8}{'ratio':>8}",
    ]
    rows = [*est.components().items(), ("prefill", est.prefill), ("total", est.total)]
    dense_c = {**dense.components(), "prefill": dense.prefill, "total": dense.total}
    for name, f in rows:
        d = dense_c[name]
        lines.append(
            f"{name:<12}{f / 1e9:>12.1f}{_pct(f, est.total):>8}{d / 1e9:>15.1f}{_pct(d, dense.total):>8}"
            f"{(f / d if d else 1.0):>8.3f}"
        )
    m, dm = est.memory, dense.memory
    lines += ["", f"{'memory':<22}{'this':>12}{'dense':>12}"]
    mem_rows = [
        ("weights", m.weights["total"], dm.weights["total"]),
        ("kv cache after prefill", m.kv_cache_prefill, dm.kv_cache_prefill),
        ("kv cache at the end", m.kv_cache_final, dm.kv_cache_final),
        ("activation peak", m.activation_peak, dm.activation_peak),
        ("total peak", m.total_peak, dm.total_peak),
    ]
    lines += [f"{n:<22}{_fmt_bytes(a):>12}{_fmt_bytes(b):>12}" for n, a, b in mem_rows]
    if est.roofline is not None and dense.roofline is not None:
        g = est.roofline.gpu
        lines += [
            "",
            f"roofline lower bound on {g.name} ({g.peak_tflops:g} TFLOP/s, {g.bandwidth_gbs:g} GB/s)",
            f"{'phase':<10}{'ms':>10}{'bound':>9}{'dense ms':>11}{'ratio':>8}",
        ]
        for name, p in est.roofline.phases.items():
            dp = dense.roofline.phases[name]
            ratio = p.time_ms / dp.time_ms if dp.time_ms else 1.0
            lines.append(f"{name:<10}{p.time_ms:>10.3f}{p.bound:>9}{dp.time_ms:>11.3f}{ratio:>8.3f}")
        tot, dtot = est.roofline.total_ms, dense.roofline.total_ms
        lines.append(f"{'total':<10}{tot:>10.3f}{'':>9}{dtot:>11.3f}{(tot / dtot if dtot else 1.0):>8.3f}")
    return "\n".join(lines)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _summarise(counts: list[int]) -> str:
    runs: list[str] = []
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{counts[start]} (layers {span})")
            start = i
    return ", ".join(runs)
