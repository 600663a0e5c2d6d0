"""apply / remove: the one place that touches a model instance.

`apply` wraps the instance's `generate` and `forward` (instance attributes, no class is modified) so
that images are encoded, reduced and spliced with their per-image token counts, and registers forward
pre-hooks on the decoder layers for LLM-side stages. `remove` restores the instance exactly.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from visprune import compat
from visprune.errors import InputError, UnsupportedModelError
from visprune.launch_free import SEQUENCE_BUCKET, LaunchFree, check_static_cache
from visprune.llm_pruning import DecoderPruner
from visprune.methods import MethodSpec, Placement, get_method
from visprune.methods.base import available_requests
from visprune.models import Adapter, adapter_for
from visprune.models.splice import IGNORE_INDEX, Spliced, image_runs, splice
from visprune.reducer import HostWork, Reducer, encoder_budget, split_reducer_signals, sync_device
from visprune.stats import Stats

_ATTR = "_visprune_handle"
DENSE = "none"
# transformers' cached torch.compile of the model's call (generate compiles decoding under a static cache)
_COMPILED_CALL_ATTRS = ("_compiled_call", "_last_compile_config")


@dataclass
class _Session:
    """The last patched prefill, so that a later call may continue from the KV cache it filled.

    The cache holds the SPLICED sequence (reduced image rows, left-padded), not the caller's: a call that
    continues from it is translated from the caller's coordinates (its first `caller_ids.shape[1]`
    tokens are the prompt) to the cache's (`spliced_ids`, then the same later tokens).
    """

    cache: Any
    caller_ids: Tensor  # [B, S_c] the prompt as the caller passed it
    caller_mask: Tensor  # [B, S_c]
    spliced_ids: Tensor  # [B, S'] the prompt as the LLM saw it
    spliced_mask: Tensor  # [B, S']


@dataclass
class _LayerAdditions:
    """Rows an adapter adds to the visual tokens' hidden states after some decoder layers at prefill
    (`Adapter.layer_additions`, e.g. Qwen3-VL's DeepStack features): armed by `_prepare`, applied during
    the language model's next call only, through forward hooks; under an LLM-side stage they follow the
    tokens it kept."""

    pruner: DecoderPruner | None = field(default=None, repr=False)
    rows: dict[int, Tensor] = field(default_factory=dict)  # layer -> [V, D], the V marked tokens in batch order
    visual: Tensor | None = None  # [B, S'] the tokens of the spliced prefill sequence the rows are added to
    armed: bool = False
    live: bool = False

    def arm(self, rows: dict[int, Tensor], visual: Tensor) -> None:
        self.rows, self.visual, self.armed, self.live = rows, visual, bool(rows), False

    def clear(self) -> None:
        self.rows, self.visual, self.armed, self.live = {}, None, False, False

    def model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.live, self.armed = self.armed, False

    def model_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.clear()

    def layer_hook(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        rows = self.rows.get(layer_idx) if self.live else None
        if rows is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        repeat = hidden.shape[0] // self.visual.shape[0]  # generate expanded the batch (beams, return sequences)
        visual = self.visual.repeat_interleave(repeat, dim=0)
        slot = (self.visual.flatten().long().cumsum(0) - 1).view_as(self.visual).repeat_interleave(repeat, dim=0)
        kept = self.pruner.sequence_at(layer_idx) if self.pruner is not None else None
        if kept is not None:
            index, valid = kept
            visual, slot = visual.gather(1, index) & valid, slot.gather(1, index)
        hidden = hidden.clone()
        hidden[visual] = hidden[visual] + rows.to(hidden.device, hidden.dtype)[slot[visual]]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass
class Handle:
    """Returned by `apply`: the active method(s), their options and the last call's `stats`."""

    model: nn.Module = field(repr=False)
    methods: tuple[str, ...]
    options: dict[str, dict[str, Any]]
    stats: Stats = field(repr=False)
    adapter: Adapter = field(repr=False)
    encoder: MethodSpec | None = field(repr=False, default=None)
    encoder_options: dict[str, Any] = field(default_factory=dict, repr=False)
    pruner: DecoderPruner | None = field(repr=False, default=None)
    sync_timings: bool = False
    keep_positions: bool = False
    tower_layer: int | None = None
    compile_tower: bool = False
    launch_free: LaunchFree | None = field(default=None, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)
    _saved: dict[str, Any] = field(default_factory=dict, repr=False)
    _saved_compiled: dict[str, Any] = field(default_factory=dict, repr=False)
    _in_generate: bool = field(default=False, repr=False)
    _session: _Session | None = field(default=None, repr=False)
    _generate_cache: Any = field(default=None, repr=False)  # the cache generate passed to the prefill
    _additions: _LayerAdditions = field(default_factory=_LayerAdditions, repr=False)

    def remove(self) -> None:
        """Undo `apply` (same as visprune.remove(model))."""
        remove(self.model)


def _resolve(
    method: str | MethodSpec | Sequence[str | MethodSpec], options: dict[str, Any], adapter: Adapter
) -> list[tuple[MethodSpec, dict]]:
    """[(spec, options bound to the model's depth)] for the requested method(s); validates every
    option (names, types, ranges, layers that must fit the model) and the placement of compositions."""
    items = [method] if isinstance(method, (str, MethodSpec)) else list(method)
    if not items:
        raise InputError("no method given; pass a method name from visprune.list_methods() or 'none'")
    depth = {"llm_layers": len(adapter.decoder_layers), "vision_layers": adapter.vision_layers}
    if items == [DENSE]:
        if options:
            raise InputError(f"method 'none' takes no options, got {sorted(options)}")
        return []
    specs = [m if isinstance(m, MethodSpec) else get_method(m) for m in items]
    names = [s.name for s in specs]
    if len(names) == 1:
        return [(specs[0], specs[0].bind(options, **depth))]
    unknown = set(options) - set(names)
    if unknown:
        raise InputError(
            f"with several methods, pass options per method as dicts keyed by method name "
            f"(e.g. {names[0]}={{...}}); got {sorted(unknown)}"
        )
    resolved = []
    for spec in specs:
        given = options.get(spec.name, {})
        if not isinstance(given, dict):
            raise InputError(f"options for {spec.name!r} must be a dict, got {type(given).__name__}")
        resolved.append((spec, spec.bind(given, **depth)))
    enc = [s for s, _ in resolved if s.placement in (Placement.ENCODER, Placement.BOTH)]
    llm = [s for s, _ in resolved if s.placement in (Placement.LLM, Placement.BOTH)]
    if len(enc) > 1 or len(llm) > 1:
        raise InputError(
            f"compose at most one encoder-side method and one LLM-side method, e.g. ['visionzip', 'fastv']; got {names}"
        )
    return resolved


def apply(
    model: nn.Module,
    method: str | MethodSpec | Sequence[str | MethodSpec] = "prumerge+",
    *,
    sync_timings: bool = False,
    keep_positions: bool = False,
    tower_layer: int | None = None,
    compile_tower: bool = False,
    launch_free: bool = False,
    **options: Any,
) -> Handle:
    """Patch `model` in place to feed its LLM fewer visual tokens with `method`; returns a Handle.

    method: a name from visprune.list_methods(), 'none' (dense, same code path), or a list composing one
    encoder-side and one LLM-side method, e.g. ['visionzip', 'fastv'] with options per method
    (`visionzip={'budget': 128}`). Single-method options are plain keywords (`budget=64`).
    A MethodSpec (unregistered, e.g. a method of your own) is accepted wherever a name is.
    keep_positions: give every token the position id it has in the dense sequence (kept visual tokens
    keep theirs, text after the image keeps its place) instead of renumbering the shorter sequence, as
    LLM-side stages always do. Off by default, as in the published encoder-side methods; models that
    only saw the dense layout need it (the bundled tiny model does). LlavaForConditionalGeneration only.
    tower_layer: reduce INSIDE the vision tower, at the input of this block: the encoder-side method runs
    as if the tower had `tower_layer` blocks (its layers count from there) and the blocks after the cut
    run on the kept tokens only, so the reduction saves tower time as well as LLM time. Methods whose
    output tokens all stand at a grid cell (selection and merging into kept tokens); Qwen-VL family only.
    compile_tower: run the vision blocks' work around attention (norms, RoPE, MLP) through torch.compile,
    which fuses their elementwise passes (a GPU option: 251 -> 149 ms for Qwen2.5-VL-7B's tower at 1008 px
    batch 8 on an H200, docs/bench/qwen2.5-vl-7b). The first forward of a process compiles (seconds to
    tens of seconds); Qwen-VL family, sdpa/eager.
    launch_free: run `generate` on the launch-free path (visprune/launch_free.py): the reduced prompt padded
    to a multiple of 32 tokens, a static KV cache sized for the prompt + max_new_tokens, and on a GPU the
    vision tower (with the reduction, for methods with a fixed budget), the LLM prefill and every decode step
    replayed as CUDA graphs captured on their first call per shape. Greedy tokens equal the plain path's.
    For batch 1 and other launch-bound cases; encoder-side methods (and 'none') and the LLM-side methods
    with fixed counts (fastv, pdrop, dart, sparsevlm) on the LLaVA-1.5 and LLaVA-NeXT classes; beam search
    and knee+text's text stage are refused. The path reuses its cache across calls; an output with
    `return_dict_in_generate=True` carries a copy of it.
    The model keeps its attention implementation; `generate` and `forward` keep their signatures.
    """
    adapter = adapter_for(model)
    if getattr(model, _ATTR, None) is not None:
        current = getattr(model, _ATTR).methods
        raise InputError(
            f"this model is already patched with {list(current)}; call visprune.remove(model) before applying again"
        )
    resolved = _resolve(method, options, adapter)
    if keep_positions and not adapter.supports_keep_positions:
        raise UnsupportedModelError(
            f"keep_positions is not supported for {type(model).__name__}; it is for LlavaForConditionalGeneration "
            "(models with M-RoPE always keep every token's dense position)"
        )
    stats = Stats()
    encoder = llm = None
    enc_opts: dict[str, Any] = {}
    llm_opts: dict[str, Any] = {}
    for spec, opts in resolved:
        if spec.placement is Placement.ENCODER:
            encoder, enc_opts = spec, opts
        elif spec.placement is Placement.LLM:
            llm, llm_opts = spec, opts
        else:
            encoder, enc_opts = (
                get_method(spec.encoder_stage),
                {k: v for k, v in opts.items() if k in get_method(spec.encoder_stage).defaults},
            )
            llm, llm_opts = spec, opts
    if not isinstance(compile_tower, bool):
        raise InputError(f"compile_tower must be True or False, got {compile_tower!r}")
    if compile_tower:
        if not adapter.supports_compile_tower:
            raise UnsupportedModelError(
                f"compile_tower is not supported for {type(model).__name__}; it is for the Qwen-VL family, whose "
                "vision tower visprune runs itself"
            )
        tower_impl = adapter.vision_tower.config._attn_implementation
        if tower_impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(
                f"compile_tower compiles the vision blocks that run with sdpa or eager attention; this tower uses "
                f"{tower_impl!r}, whose blocks run their own forward: apply without compile_tower"
            )
    adapter.compile_tower = compile_tower
    if not isinstance(launch_free, bool):
        raise InputError(f"launch_free must be True or False, got {launch_free!r}")
    if launch_free:
        _check_launch_free(adapter, model, encoder, llm, llm_opts, sync_timings)
    if tower_layer is not None:
        if not adapter.supports_tower_layer:
            raise UnsupportedModelError(
                f"tower_layer is not supported for {type(model).__name__}; it is for the Qwen-VL family"
            )
        if encoder is None:
            raise InputError("tower_layer needs an encoder-side method to reduce inside the tower")
    if encoder is not None:
        from_tower, own = split_reducer_signals(encoder.signals(enc_opts))
        from_tower = available_requests(from_tower, adapter.signal_kinds)
        if "projected" in own.values() and tower_layer is not None:
            raise UnsupportedModelError(
                f"{encoder.name} selects on the projected tokens, which do not exist inside the vision tower; "
                "apply it without tower_layer"
            )
        adapter.check_encoder_method(from_tower, tower_layer)
        budget = encoder_budget(encoder, enc_opts)
        if budget is not None and adapter.max_visual_tokens is not None and budget > adapter.max_visual_tokens:
            raise InputError(
                f"{encoder.name}: a budget of {budget} tokens exceeds the {adapter.max_visual_tokens} visual tokens an "
                f"image of this model can have; pass at most {adapter.max_visual_tokens}"
            )
    pruner = None
    if llm is not None:
        impl = adapter.attn_implementation
        if impl not in ("sdpa", "eager") and not impl.startswith("flash"):
            raise InputError(f"LLM-side methods support sdpa, eager and flash attention; this model uses {impl!r}")
        n_layers = len(adapter.decoder_layers)
        layers = llm.layers(llm_opts)
        if min(layers) < 1 or max(layers) >= n_layers:
            raise InputError(
                f"{llm.name}: pruning layers {list(layers)} must lie in [1, {n_layers - 1}] "
                f"for this {n_layers}-layer LLM"
            )
        pruner = DecoderPruner(llm, llm_opts, n_layers, impl, compat.cache_keyword(adapter.decoder_layers[0]))

    handle = Handle(
        model=model,
        methods=tuple([DENSE] if not resolved else [s.name for s, _ in resolved]),
        options={s.name: o for s, o in resolved},
        stats=stats,
        adapter=adapter,
        encoder=encoder,
        encoder_options=enc_opts,
        pruner=pruner,
        sync_timings=sync_timings,
        keep_positions=keep_positions,
        tower_layer=tower_layer,
        compile_tower=compile_tower,
        _additions=_LayerAdditions(pruner=pruner),
    )
    if launch_free:
        handle.launch_free = LaunchFree(adapter, capture_images=adapter.launch_free_image_graph, pruner=pruner)
    handle._saved = {name: model.__dict__[name] for name in ("generate", "forward") if name in model.__dict__}
    model.generate = _Patched(model, "generate", model.generate)
    model.forward = _Patched(model, "forward", model.forward)
    if adapter.addition_layers:
        additions, lm = handle._additions, adapter.language_model
        handle._hooks.append(lm.register_forward_pre_hook(additions.model_pre_hook, with_kwargs=True))
        handle._hooks.append(lm.register_forward_hook(additions.model_post_hook, with_kwargs=True))
        for idx in adapter.addition_layers:
            hook = functools.partial(additions.layer_hook, idx)
            handle._hooks.append(adapter.decoder_layers[idx].register_forward_hook(hook, with_kwargs=True))
    if pruner is not None:
        lm = adapter.language_model
        handle._hooks.append(lm.register_forward_pre_hook(pruner.model_pre_hook, with_kwargs=True))
        handle._hooks.append(lm.register_forward_hook(pruner.model_post_hook, with_kwargs=True))
        first = pruner.first_layer
        for idx, layer in enumerate(adapter.decoder_layers):
            if idx >= first:
                hook = functools.partial(pruner.layer_pre_hook, idx)
                handle._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    handle._saved_compiled = {name: model.__dict__[name] for name in _COMPILED_CALL_ATTRS if name in model.__dict__}
    setattr(model, _ATTR, handle)
    if handle._hooks:
        _forget_compiled_code()
    return handle


def _check_launch_free(
    adapter: Adapter,
    model: nn.Module,
    encoder: MethodSpec | None,
    llm: MethodSpec | None,
    llm_opts: dict[str, Any],
    sync_timings: bool,
) -> None:
    """Refuse what the launch-free path cannot run with static shapes."""
    if not adapter.supports_launch_free:
        raise UnsupportedModelError(
            f"launch_free is not supported for {type(model).__name__} yet; it is for LlavaForConditionalGeneration "
            "and LlavaNextForConditionalGeneration (apply without launch_free=True)"
        )
    if llm is not None and not llm.counts_planned(llm_opts):
        raise InputError(
            f"{llm.name} prunes inside the LLM with token counts decided during the prefill (with these options), "
            "which the launch-free path cannot replay from a graph; use an LLM-side method with fixed counts "
            "(fastv, pdrop, dart, sparsevlm, knee+text with a text_keep_ratio and prune_text=False) or an "
            "encoder-side method with launch_free=True, or apply without it"
        )
    check_static_cache(model.config)
    if sync_timings:
        raise InputError(
            "sync_timings synchronises the host between stages, which the launch-free path removes; use one or the "
            "other (time launch-free generate as a whole)"
        )


def _forget_compiled_code() -> None:
    """Drop the code torch.compile has compiled in this process (it recompiles on next use); called where
    visprune adds or removes module hooks (LLM-side stages, DeepStack additions).

    torch.compile does not guard on module hooks (`skip_nnmodule_hook_guards`): code compiled before
    visprune added or removed its hooks would keep running with the old ones. transformers compiles the
    decoding step of `generate` under a static cache on a GPU, so without this a model compiled dense and
    then patched would decode without the LLM-side stages (or keep them after `remove`), silently.
    Encoder-side methods add no hooks (their patched calls are guarded like any attribute), so applying
    them keeps compiled code, e.g. the selection steps `graphs.fused` compiled.
    """
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


class _Patched:
    """The instance's patched `generate` / `forward`: calls visprune's version with the model's handle.

    Holds only the model, the kind and the original bound method, and hooks are partials of bound
    methods, so `copy.deepcopy(model)` gives a copy whose patched calls, hooks and handle are its own
    (deepcopy rebinds bound methods to the copies). The original's signature stays visible:
    transformers' generate inspects forward's parameters to decide what to pass, about ten times per call.
    It is worked out once here (`__signature__`): unwrapping the original's decorators each time took ~50 us
    per inspection on the development machine, host time on the path of every generate.
    """

    def __init__(self, model: nn.Module, kind: str, original: Any):
        functools.update_wrapper(self, original)
        self.__signature__ = inspect.signature(original)
        self.model = model
        self.kind = kind
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = getattr(self.model, _ATTR)
        call = _generate if self.kind == "generate" else _forward
        return call(handle, self.original, *args, **kwargs)


def remove(model: nn.Module) -> None:
    """Restore `model` exactly as it was before `apply` (methods, hooks, attributes)."""
    handle: Handle | None = getattr(model, _ATTR, None)
    if handle is None:
        raise InputError("this model is not patched by visprune (nothing to remove)")
    for h in handle._hooks:
        h.remove()
    for name in ("generate", "forward"):
        if name in handle._saved:
            setattr(model, name, handle._saved[name])
        else:
            model.__dict__.pop(name, None)
    for name in _COMPILED_CALL_ATTRS:
        if name in handle._saved_compiled:
            model.__dict__[name] = handle._saved_compiled[name]
        else:
            model.__dict__.pop(name, None)
    if handle.launch_free is not None:
        handle.launch_free.release()
    delattr(model, _ATTR)
    if handle._hooks:
        _forget_compiled_code()


def _prepare(
    handle: Handle,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    pixel_values: Tensor | None,
    image_kwargs: dict[str, Any],
    labels: Tensor | None,
    pad_to: int = 1,
    checks_after_prefill: bool = False,
) -> Spliced:
    """Encode + reduce + splice (the sequence padded to a multiple of `pad_to`), record stats, arm the
    LLM-side pruner. The method's deferred input checks are read here, or with `checks_after_prefill` (the
    launch-free generate) staged and handed to the launch-free path, which reads them once the prefill is
    launched, so that the host's work up to it overlaps the image path on the device."""
    adapter = handle.adapter
    _check_call(input_ids, attention_mask)
    if pixel_values is not None:
        adapter.check_pixels(pixel_values)
    adapter.check_image_inputs(image_kwargs)
    stats = Stats()
    handle.stats = stats
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # the token ids, the mask and the inputs the positions read are copied to the host now, while the device
    # is idle: nothing after the image path is launched waits for the device (the splice and the position ids
    # are planned on the host; the rows are gathered on the device). The dense positions need nothing the
    # reduction decides: the reducer works them out before the image path's first host read, while the
    # device still encodes the images.
    host_mask, host_ids = attention_mask.cpu(), input_ids.cpu()
    image_kwargs = image_kwargs or {}
    host_kwargs = {k: v.cpu() for k, v in image_kwargs.items() if k in adapter.host_inputs and isinstance(v, Tensor)}
    runs = image_runs(host_ids, host_mask, adapter.image_token_id)
    dense_positions = HostWork(
        lambda: adapter.dense_positions(host_ids, host_mask, {**image_kwargs, **host_kwargs}, handle.keep_positions)
    )
    features: list[Tensor] = []
    extras: dict[str, list[Tensor]] = {}
    reducer = None
    if pixel_values is not None:
        if handle.encoder is not None:
            reducer = Reducer.for_call(
                adapter,
                handle.encoder,
                handle.encoder_options,
                stats,
                input_ids,
                attention_mask,
                sync=handle.sync_timings,
                tower_layer=handle.tower_layer,
                runs=runs,
                host_work=dense_positions,
            )
        sync_device(pixel_values, handle.sync_timings)
        t0 = time.perf_counter()
        tokens = adapter.image_tokens(pixel_values, reducer, image_kwargs)
        sync_device(pixel_values, handle.sync_timings)
        stats.timings["vision"] = time.perf_counter() - t0 - stats.timings.get("reduce", 0.0)
        features, extras = tokens.features, tokens.extras
        stats.visual_tokens_in = tokens.tokens_in
        stats.visual_tokens_out = [f.shape[0] for f in features]
        stats.reductions = tokens.reductions
        _check_placeholders(runs, tokens.tokens_in)
    offsets = adapter.placeholder_offsets(stats.reductions, stats.visual_tokens_in)
    embedded = adapter.embed(input_ids, image_kwargs)
    batch = splice(
        input_ids, host_mask, embedded.embeds, adapter.image_token_id, features, runs, labels, offsets, pad_to
    )
    batch.position_ids = adapter.position_ids(dense_positions.result(), batch)
    if reducer is not None and checks_after_prefill:
        reducer.device_checks.stage()
        handle.launch_free.image_checks = reducer.device_checks
    elif reducer is not None:
        reducer.verify_inputs()  # the method's deferred input checks, read now that the host work is launched
    handle._additions.arm(*adapter.layer_additions(extras, embedded.extras, batch))
    stats.position_map = batch.position_map
    n_layers = len(adapter.decoder_layers)
    stats.tokens_per_layer = [[r] * n_layers for r in batch.real_tokens]
    if handle.pruner is not None:
        handle.pruner.begin(batch.layout, batch.real_tokens, batch.visual_tokens, width_multiple=pad_to)
    return batch


def _pop_image_kwargs(adapter: Adapter, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the per-image inputs the adapter consumes (image_sizes, image_grid_thw, ...) out of a call's
    keyword arguments; the model then runs on the spliced embeddings without them."""
    return {name: kwargs.pop(name, None) for name in adapter.image_inputs}


def _check_call(input_ids: Any, attention_mask: Any) -> None:
    """input_ids [B, S] of integers and an optional attention_mask of the same shape, as processors give."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise InputError(
            f"input_ids must be an integer tensor [batch, sequence] as the processor returns it, got {got}; "
            "call the processor with return_tensors='pt' (and unsqueeze(0) a single prompt)"
        )
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
    ):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise InputError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}; pass the "
            "processor's attention_mask for these input_ids"
        )


def _check_placeholders(runs: list[list[tuple[int, int]]], tokens_in: list[int]) -> None:
    lengths = [length for sample in runs for _, length in sample]
    if lengths != tokens_in:
        raise InputError(
            f"image placeholder runs of lengths {lengths} do not match the {tokens_in} visual tokens the model "
            "produces per image; build the inputs with the model's own processor"
        )


def _generate(handle: Handle, original: Any, *args: Any, **kwargs: Any) -> Any:
    input_ids = kwargs.pop("input_ids", None)
    if args:
        if input_ids is not None:
            raise InputError("pass input_ids either positionally or by keyword, not both")
        input_ids, args = args[0], args[1:]
    if args:
        raise InputError("pass generate's arguments other than input_ids by keyword")
    if input_ids is None or "inputs_embeds" in kwargs:
        raise InputError("the patched generate needs input_ids from the processor (inputs_embeds is not supported)")
    _check_call(input_ids, kwargs.get("attention_mask"))
    if kwargs.get("prefill_chunk_size") is not None:
        raise InputError(
            "prefill_chunk_size is not supported on a visprune-patched model: the reduced prompt is prefilled in one "
            "pass (LLM-side methods need the whole prompt at their pruning layer); leave it unset"
        )
    config = kwargs.get("generation_config") or handle.model.generation_config
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = compat.generation_attention_mask(
            input_ids,
            kwargs.get("pad_token_id", config.pad_token_id),
            kwargs.get("eos_token_id", config.eos_token_id),
        )
    _caller_lengths(kwargs, config, input_ids.shape[1])
    launch_free = handle.launch_free
    if launch_free is not None:
        launch_free.check_generate(kwargs, config)
    if compat.cache_length(compat.find_cache(kwargs)) > 0:
        return _continue_generate(handle, original, input_ids, attention_mask, kwargs)
    pixel_values = kwargs.pop("pixel_values", None)
    image_kwargs = _pop_image_kwargs(handle.adapter, kwargs)
    pad_to = SEQUENCE_BUCKET if launch_free is not None else 1
    with torch.no_grad():  # generate never needs gradients (unpatched, it runs all of this under no_grad)
        batch = _prepare(
            handle, input_ids, attention_mask, pixel_values, image_kwargs, None, pad_to, launch_free is not None
        )
    handle._session = handle._generate_cache = None
    if launch_free is not None:
        launch_free.prepare_generate(handle.model, *batch.input_ids.shape, kwargs)
    handle._in_generate = True
    try:
        if batch.position_ids is not None:
            kwargs["position_ids"] = batch.position_ids
        out = original(
            input_ids=batch.input_ids, inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **kwargs
        )
    finally:
        handle._in_generate = False
        handle._additions.clear()
        if launch_free is not None:
            launch_free.prefill_pending, launch_free.image_checks = False, None
            handle._generate_cache = None  # the path reuses its cache: no later call continues from it
    if launch_free is not None:
        launch_free.hand_over(out)
    if handle._generate_cache is not None:
        handle._session = _Session(
            cache=handle._generate_cache,
            caller_ids=input_ids,
            caller_mask=attention_mask,
            spliced_ids=batch.input_ids,
            spliced_mask=batch.attention_mask,
        )
        handle._generate_cache = None
    _finish_stats(handle)
    return _restore_sequences(out, input_ids, batch.input_ids.shape[1])


def _caller_lengths(kwargs: dict[str, Any], config: Any, caller_len: int) -> None:
    """Make max_length / min_length count the CALLER's prompt, as unpatched generate does, by turning
    them into max_new_tokens / min_new_tokens (the spliced prompt the LLM sees has another length)."""
    for total, new, floor in (("max_length", "max_new_tokens", 1), ("min_length", "min_new_tokens", 0)):
        if kwargs.get(new, getattr(config, new, None)) is not None:
            continue
        given = kwargs.get(total, getattr(config, total, None))
        if given is None:
            continue
        if given - caller_len < floor:
            if floor:
                raise InputError(
                    f"max_length={given} leaves no room for new tokens after the {caller_len}-token prompt; "
                    "increase it or pass max_new_tokens"
                )
            continue
        kwargs[new] = given - caller_len
        kwargs[total] = None


def _restore_sequences(out: Any, input_ids: Tensor, spliced_len: int) -> Any:
    """Sequences as unpatched generate returns them: the caller's ids (repeated for beams / several
    return sequences) followed by the new tokens."""
    sequences = out if isinstance(out, Tensor) else out.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    restored = torch.cat([prompt, sequences[:, spliced_len:]], dim=1)
    if isinstance(out, Tensor):
        return restored
    out.sequences = restored
    return out


def _session_for(handle: Handle, cache: Any, caller_mask: Tensor) -> _Session:
    """The session whose cache the caller continues from; anything else is refused."""
    session = handle._session
    if session is None or session.cache is not cache:
        raise InputError(
            "this KV cache was not filled by the last patched call of this model. On a visprune-patched model the "
            "cache holds the reduced sequence, so a call can only continue from the cache of the latest patched "
            "prefill (generate or forward); start from the full prompt without a cache instead"
        )
    if handle.keep_positions:
        raise InputError(
            "continuing from a cache is not supported with keep_positions=True; pass the full conversation "
            "without a cache"
        )
    s_c = session.caller_ids.shape[1]
    if caller_mask.shape[0] != session.caller_mask.shape[0] or caller_mask.shape[1] < s_c:
        raise InputError(
            f"the attention_mask has shape {tuple(caller_mask.shape)}, but the cached prompt is "
            f"{tuple(session.caller_mask.shape)}: cover the prompt and every token since"
        )
    if not torch.equal(caller_mask[:, :s_c].bool(), session.caller_mask.bool()):
        raise InputError("the attention_mask does not start with the cached prompt's mask; pass the same prompt mask")
    return session


def _spliced_mask(session: _Session, caller_mask: Tensor) -> Tensor:
    """The caller's mask over prompt + later tokens, moved onto the cached (spliced) sequence."""
    later = caller_mask[:, session.caller_ids.shape[1] :].to(session.spliced_mask)
    return torch.cat([session.spliced_mask, later], dim=1)


def _continue_generate(
    handle: Handle, original: Any, input_ids: Tensor, attention_mask: Tensor, kwargs: dict[str, Any]
) -> Any:
    """generate from the cache of the last patched call: the caller's ids start with the cached prompt
    (plus what was generated), then new text; the prompt part is swapped for the spliced one."""
    session = _session_for(handle, compat.find_cache(kwargs), attention_mask)
    s_c = session.caller_ids.shape[1]
    if not torch.equal(input_ids[:, :s_c], session.caller_ids):
        raise InputError(
            "input_ids do not start with the prompt whose cache is passed; continue with the returned sequences"
        )
    later = input_ids[:, s_c:]
    if kwargs.pop("pixel_values", None) is not None:
        raise InputError(
            "new images cannot be added to a cached conversation on a patched model; generate from the full "
            "conversation without the cache"
        )
    _pop_image_kwargs(handle.adapter, kwargs)
    ids = torch.cat([session.spliced_ids, later], dim=1)
    handle._in_generate = True
    try:
        out = original(input_ids=ids, attention_mask=_spliced_mask(session, attention_mask), **kwargs)
    finally:
        handle._in_generate = False
    return _restore_sequences(out, input_ids, ids.shape[1])


def _finish_stats(handle: Handle) -> None:
    pruner = handle.pruner
    if pruner is not None and pruner.state.tokens_per_layer:
        handle.stats.tokens_per_layer = pruner.state.tokens_per_layer
        layout = pruner.state.prefill_layout
        handle.stats.llm_visual = layout.visual & layout.attention_mask
        handle.stats.llm_visual_kept = list(pruner.state.visual_kept)


def _forward(handle: Handle, original: Any, *args: Any, **kwargs: Any) -> Any:
    if handle._in_generate:
        if handle._generate_cache is None:
            handle._generate_cache = compat.find_cache(kwargs)
        if handle.launch_free is not None and not args:
            return handle.launch_free.model_call(original, kwargs)
        return original(*args, **kwargs)
    input_ids = kwargs.pop("input_ids", None)
    if args:
        if input_ids is not None or len(args) > 1:
            raise InputError("the patched forward takes input_ids positionally or by keyword, the rest by keyword")
        input_ids = args[0]
    cache = compat.find_cache(kwargs)
    if compat.cache_length(cache) > 0:
        return _continue_forward(handle, original, input_ids, cache, kwargs)
    if input_ids is None or "inputs_embeds" in kwargs:
        # Embeddings the caller built: nothing to reduce, the model runs as it is.
        if handle.pruner is not None:
            handle.pruner.state.phase = "off"
        handle._session = None
        return original(**kwargs)
    pixel_values = kwargs.pop("pixel_values", None)
    attention_mask = kwargs.pop("attention_mask", None)
    image_kwargs = _pop_image_kwargs(handle.adapter, kwargs)
    labels = kwargs.pop("labels", None)
    if kwargs.get("position_ids") is not None:
        raise InputError("the patched forward builds its own position_ids; do not pass them")
    batch = _prepare(handle, input_ids, attention_mask, pixel_values, image_kwargs, labels)
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids
    try:
        out = original(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **kwargs)
    finally:
        handle._additions.clear()
    handle._session = _Session(
        cache=compat.output_cache(out) or cache,
        caller_ids=input_ids,
        caller_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        spliced_ids=batch.input_ids,
        spliced_mask=batch.attention_mask,
    )
    _finish_stats(handle)
    final = handle.pruner.final_index if handle.pruner is not None else None
    seq_labels = batch.labels
    position_map = batch.position_map
    if final is not None:
        index, valid = final
        if seq_labels is not None:
            seq_labels = torch.where(valid, seq_labels.gather(1, index), IGNORE_INDEX)
        width = batch.attention_mask.shape[1]
        inverse = batch.attention_mask.new_full((index.shape[0], width + 1), -1)
        slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
        inverse.scatter_(1, torch.where(valid, index, width), torch.where(valid, slots, -1))
        position_map = torch.where(position_map >= 0, inverse.gather(1, position_map.clamp(min=0)), -1)
    handle.stats.position_map = position_map
    if seq_labels is not None:
        vocab = handle.model.config.text_config.vocab_size
        out.loss = handle.model.loss_function(logits=out.logits, labels=seq_labels, vocab_size=vocab)
    return out


def _continue_forward(handle: Handle, original: Any, input_ids: Tensor | None, cache: Any, kwargs: dict) -> Any:
    """A decode step (or several tokens) on the cache of the last patched prefill, as in a hand-written
    generation loop: the caller's attention_mask (prompt + every token since) is moved onto the cache's
    spliced sequence; positions continue from the cache, as the unpatched model's do."""
    if input_ids is None or "inputs_embeds" in kwargs:
        raise InputError("a patched forward that continues from a cache takes the new tokens as input_ids")
    if kwargs.pop("pixel_values", None) is not None:
        raise InputError(
            "new images cannot be added to a cached sequence on a patched model; run a new prefill without the cache"
        )
    if kwargs.get("position_ids") is not None:
        raise InputError("the patched forward builds its own position_ids; do not pass them")
    _pop_image_kwargs(handle.adapter, kwargs)
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = _assumed_mask(handle, input_ids, cache)
    session = _session_for(handle, cache, mask)
    spliced = _spliced_mask(session, mask)
    expected = compat.cache_length(cache) + input_ids.shape[1]
    if spliced.shape[1] != expected:
        raise InputError(
            f"the attention_mask covers {spliced.shape[1] - session.spliced_mask.shape[1]} tokens after the prompt, "
            f"but the cache holds {expected - input_ids.shape[1] - session.spliced_mask.shape[1]} and "
            f"{input_ids.shape[1]} are new; extend the mask by one column per token fed"
        )
    return original(input_ids=input_ids, attention_mask=spliced, **kwargs)


def _assumed_mask(handle: Handle, input_ids: Tensor, cache: Any) -> Tensor:
    """With no attention_mask, every token is real (as unpatched): prompt mask + ones for the rest."""
    session = handle._session
    if session is None:
        return torch.ones_like(input_ids)
    later = compat.cache_length(cache) - session.spliced_mask.shape[1] + input_ids.shape[1]
    return torch.cat([session.caller_mask, session.caller_mask.new_ones(input_ids.shape[0], later)], dim=1)
