"""Types shared by every reduction method: the per-image result, the layout of an LLM sequence,
and the description a method registers with.

Methods are pure tensor code: nothing in this package imports transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from visprune.errors import UnsupportedModelError
from visprune.methods.budget_rules import BudgetRule
from visprune.methods.checks import check_choice


class Placement(str, Enum):
    """Where a method acts."""

    ENCODER = "encoder"  # on the vision tower's output, before the projector
    LLM = "llm"  # inside the language model, on a decoder layer's input
    BOTH = "encoder+llm"  # an encoder stage (another registered method) followed by an LLM stage


@dataclass
class Reduction:
    """What a method produced for ONE image.

    Attributes:
        features: [K, C] the tokens handed on (merged where the method merges), in output order.
        sources: [K] long; for each output token the index of the original token it stands at,
            or -1 for a token that stands for no single original token (PruMerge's extra summary
            token). Output order is spatial unless a method's option says otherwise.
        assignment: [N] long or None; for each original token the output slot it went into
            (kept or merged into), -1 when it was dropped without a trace. None when the method
            does not track it.
        size: None, except for an adaptive method inside `methods.padded.padded_outputs`: the 0-dim
            device count of the leading rows of `features` and `sources` that are its output; the rest
            is filler, cut off by `methods.padded.trim`.
    """

    features: Tensor
    sources: Tensor
    assignment: Tensor | None = None
    size: Tensor | None = None

    @property
    def count(self) -> int:
        """Number of output tokens K (what reaches the projector / LLM for this image)."""
        return int(self.features.shape[0])

    @property
    def kept(self) -> Tensor:
        """Indices of the original tokens that survive as tokens of their own, ascending."""
        return self.sources[self.sources >= 0].sort().values


def select_tokens(features: Tensor, indices: Tensor) -> list[Reduction]:
    """Keep `indices` [B, K] of `features` [B, N, C] per image, in ascending (spatial) order.

    The common path for fixed-budget selection methods: one sort and one gather for the batch.
    """
    order = indices.sort(dim=1).values
    b, k = order.shape
    gathered = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    slots = torch.arange(k, device=features.device).expand(b, k)
    assignment = torch.full((b, features.shape[1]), -1, dtype=torch.long, device=features.device)
    assignment.scatter_(1, order, slots)
    return [
        Reduction(features=f, sources=s, assignment=a)
        for f, s, a in zip(gathered.unbind(0), order.unbind(0), assignment.unbind(0), strict=True)
    ]


@dataclass
class TokenLayout:
    """Which positions of a padded LLM sequence [B, S] are what, for the in-LLM stages.

    attention_mask: True for real tokens, False for padding.
    visual: True for image tokens.
    query: True for the text tokens after the last image token (the question). Never dropped.
    system: True for text tokens before the first image token (system prompt, chat template).
    text_rows: the most real non-image tokens of any row, when the caller knows it on the host (None: not
        known). Gathers of text or query rows size their output with it instead of reading the masks' counts
        from the device (`llm_attention.rows_from_mask`), which a CUDA graph cannot do.
    """

    attention_mask: Tensor
    visual: Tensor
    query: Tensor
    system: Tensor
    text_rows: int | None = None

    def __post_init__(self) -> None:
        from visprune.methods.checks import check_layout

        check_layout(self)

    @property
    def last_index(self) -> Tensor:
        """[B] position of the last real token of each sequence (padding on either side)."""
        s = self.attention_mask.shape[1]
        pos = torch.arange(s, device=self.attention_mask.device).expand_as(self.attention_mask)
        return torch.where(self.attention_mask, pos, -1).amax(dim=1)

    def subset(self, keep: Tensor) -> TokenLayout:
        """The layout of the sequence after keeping `keep` [B, S'] positions (gathered per row)."""
        take = lambda t: t.gather(1, keep)  # noqa: E731
        return TokenLayout(take(self.attention_mask), take(self.visual), take(self.query), take(self.system))


@dataclass(frozen=True)
class SignalRequest:
    """A signal a method needs from the model, computed by the adapter and passed as a keyword.

    kind:
        "cls_attn"  -> [B, N] CLS-query attention probabilities over the N patch keys at `layers[0]`
                       (softmax over CLS + patches, CLS column dropped), heads combined by `heads`.
        "cls_attn_layers" -> [B, len(layers), N], the same for several layers.
        "mean_received" -> [B, N] the CLS-free score: the attention each patch token RECEIVES at
                       `layers[0]`, averaged over the patch query rows, heads combined by `heads`
                       (`signals.mean_received_attention`: softmax over all keys the block attends
                       to, special tokens' rows and columns excluded). Any tower can provide it.
        "mean_received_layers" -> [B, len(layers), N], the same for several layers.
        "projected" -> [B, N, D] the features as the LLM receives them (the model's projector applied to
                       every row, nothing reduced); computed by the Reducer from the features it is given.
        "keys"      -> [B, N, D] patch keys (CLS dropped) at `layers[0]`; heads="mean" averages the
                       per-head keys (D = C / H), heads="single" keeps the full width (D = C).
        "q", "k"    -> LLM layer queries [B, H, S, d] / keys [B, H_kv, S, d] with RoPE applied.
        "hidden"    -> LLM layer input hidden states [B, S, C].
        "cls_feature" -> [B, C] the CLS token's row of the hidden state(s) the features are taken from
                       (LLaVA's `vision_feature_layer`, concatenated like the features); towers with CLS.
        "flowcut"   -> [B, `keep`] the original indices of the tokens the tower kept while pruning itself
                       progressively by FlowCut's flow (`visprune.methods.flowcut`); the features the
                       adapter then hands the method are those tokens' rows of the feature layer, computed
                       on the pruned sequence. LLaVA-1.5-class CLIP towers (patches) and the Qwen-VL towers
                       (merged tokens, pruned as whole 2x2 merge units; `keep` clamped to an image's tokens).
    layers: encoder layer indices (negative counts from the end: -1 is the last encoder layer, whose
        INPUT is LLaVA's hidden_states[-2]; -2 is the layer that PRODUCES hidden_states[-2]).
    heads: "single" treats the full projection as one head; "mean"/"sum" combine per-head rows.
    rows: for "q", the only query rows the method reads, so the adapter may compute just those
        (other rows are zeros): "all", "last" (last real token), "query" (the question tokens, or the
        last real token when there are none) or "text" (every real non-visual token).
    fallback: the kind to compute instead when the model cannot provide `kind` (a method's
        `signal=None`, "best available": "cls_attn" falls back to "mean_received" on a tower
        without CLS). Adapters call `resolve` with the kinds they provide; the result has the same
        shape either way, and the method receives it under the same keyword.
    keep: for "flowcut", the patches per image the tower keeps.
    optional: a signal the method uses where the model provides it and does without otherwise (VisionZip's
        CLS token on towers that have one): `available_requests` leaves it out on a model that lacks it,
        and the method's keyword keeps its default (None).
    """

    kind: str
    layers: tuple[int, ...] = ()
    heads: str = "mean"
    rows: str = "all"
    fallback: str | None = None
    optional: bool = False
    keep: int | None = None  # "flowcut": the patches per image the tower keeps

    def resolve(self, available: Collection[str]) -> SignalRequest:
        """The request to compute on a model that provides the kinds in `available`: this one, or
        its fallback kind; either way with no fallback left. UnsupportedModelError when neither
        is provided."""
        if self.kind in available:
            return replace(self, fallback=None)
        if self.fallback is not None and self.fallback in available:
            return replace(self, kind=self.fallback, fallback=None)
        if self.optional:
            raise UnsupportedModelError(
                f"optional signal {self.kind!r} is not available; leave it out (`available_requests`)"
            )
        wanted = repr(self.kind) if self.fallback is None else f"{self.kind!r} or {self.fallback!r}"
        raise UnsupportedModelError(f"signal {wanted} is not available on this model; it provides {sorted(available)}")


def available_requests(requests: dict[str, SignalRequest], available: Collection[str]) -> dict[str, SignalRequest]:
    """`requests` less the optional ones that a model providing the kinds in `available` cannot compute
    (neither their kind nor their fallback). The rest are kept as asked: adapters resolve them."""
    return {
        name: req
        for name, req in requests.items()
        if not req.optional or req.kind in available or req.fallback in available
    }


# A method's `signal` option: which per-token score ranks the patches (None: the best available).
SCORE_SIGNALS = ("cls", "mean-received")


def score_request(signal: str | None, layers: tuple[int, ...], heads: str, *, several: bool = False) -> SignalRequest:
    """The request behind a method's `signal` option, for per-token scores at `layers`.

    signal "cls" -> "cls_attn" (CLS-query attention; towers with a CLS token only), "mean-received"
    -> "mean_received" (any tower), None -> "cls_attn" with fallback "mean_received" (the best the
    tower offers). several=True asks for the "_layers" kinds ([B, len(layers), N]).
    """
    check_signal_option(signal)
    suffix = "_layers" if several else ""
    received = "mean_received" + suffix
    if signal == "mean-received":
        return SignalRequest(received, layers, heads)
    return SignalRequest("cls_attn" + suffix, layers, heads, fallback=None if signal == "cls" else received)


def check_signal_option(signal: object) -> None:
    """A method's `signal` option: None or one of SCORE_SIGNALS."""
    if signal is not None:
        check_choice(signal, "signal", SCORE_SIGNALS)


SIGNAL_DOC = """which per-token score ranks the patches: None (default) = the best the
            tower offers: "cls" where it has a CLS token, "mean-received" otherwise; "cls" = the
            CLS query's attention (refused on a tower without CLS); "mean-received" = the attention
            each patch receives, averaged over all patch queries (and heads as the method combines
            them) of the same layer, the CLS-free substitute of VisPruner's and VisionZip's Qwen code."""


def document_signal(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Put the shared description of the `signal` option where the docstring says {SIGNAL}."""
    fn.__doc__ = (fn.__doc__ or "").replace("{SIGNAL}", SIGNAL_DOC)
    return fn


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: the function, what it needs and where it acts."""

    name: str
    fn: Callable[..., Any]
    description: str
    placement: Placement
    adaptive: bool
    defaults: dict[str, Any]
    signals: Callable[[dict[str, Any]], dict[str, SignalRequest]]
    layers: Callable[[dict[str, Any]], tuple[int, ...]] | None = None
    encoder_stage: str | None = None
    param_docs: dict[str, str] = field(default_factory=dict, repr=False)
    check: Callable[..., None] | None = field(default=None, repr=False)
    budget_rule: BudgetRule | None = field(default=None, repr=False)  # None: adaptive (takes no budget)
    # Where the method's published code materialises attention maps ("vision" or "llm"; None: it does not).
    # `visprune bench` times that variant beside visprune's SDPA-compatible path.
    published_attention: str | None = field(default=None, repr=False)
    # An LLM-side method (or a two-stage method's LLM stage) whose image-token count at each stage follows from
    # the counts alone: (the image tokens present per sample [B] long, its options, the stage) -> the image
    # tokens it keeps per sample, the rule its function applies; None for options under which the counts are
    # decided during the prefill (whether it is None depends on the options alone). The decoder pruner then
    # knows each stage's sequence length on the host (no read of the keep mask); it checks the rule against the
    # mask at the end of the prefill.
    visual_kept: Callable[[Tensor, dict[str, Any], int], Tensor | None] | None = field(default=None, repr=False)

    def counts_planned(self, options: dict[str, Any]) -> bool:
        """Whether, with `options`, the counts of this method's LLM-side stages follow from the image tokens alone
        (its `visual_kept` rule applies), so the host can plan them (what the launch-free path needs)."""
        one = torch.ones(1, dtype=torch.long)  # any counts: the answer depends on the options alone
        return self.visual_kept is not None and self.visual_kept(one, options, 0) is not None

    def options(self, **overrides: Any) -> dict[str, Any]:
        """Defaults merged with `overrides`, validated (names, types, ranges, choices): InputError
        says what was wrong. Layer defaults stay `RelativeDepth` values; `bind` resolves them."""
        from visprune.methods.registry import resolve_options

        return resolve_options(self, overrides)

    def bind(self, overrides: dict[str, Any], *, llm_layers: int | None, vision_layers: int | None) -> dict[str, Any]:
        """The options for a model whose LLM has `llm_layers` decoder layers and whose vision tower
        has `vision_layers` encoder layers (None: not known, published values kept).

        Validates as `options`; every layer option left at its `RelativeDepth` default is moved to the
        same relative depth of the model, and an explicit one is kept as given but must fit the
        model (InputError otherwise).
        """
        from visprune.methods.registry import bind_options

        return bind_options(self, overrides, llm_layers=llm_layers, vision_layers=vision_layers)
