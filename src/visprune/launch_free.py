"""The launch-free generation path (`apply(..., launch_free=True)`): static shapes, a static KV cache and
CUDA graphs, so that `generate` at small batch is not bound by Python launching kernels.

At batch 1 a 7B prefill is a few thousand small kernels; launched one by one from Python, the GPU
waits for the host, and a pruned prefill saves little time. On this path:

- The reduced prompt is left-padded to a multiple of `SEQUENCE_BUCKET` tokens (padding masked out;
  generate numbers positions from the attention mask, so real tokens keep theirs): prompts and adaptive
  methods' token counts that round to the same bucket share one prefill shape.
- generate runs on a `transformers.StaticCache` owned by the path, sized for the prompt plus
  `max_new_tokens` (rounded up to `CACHE_BUCKET`), kept per (batch, length) and reused by later calls.
  An output that carries the cache (`return_dict_in_generate=True`) gets a copy of it, which later calls
  leave as it is.
  Decode steps see the attention mask padded to the cache's length, so every step has the same shapes.
- On a CUDA device, with gradients off, each piece runs as a CUDA graph captured on its first call per
  shape and replayed afterwards: the vision tower plus the reduction plus the projector (one graph; the
  tower alone where the adapter's image path does host work, `Adapter.launch_free_image_graph`); the LLM
  prefill; every decode step. An adaptive method (prumerge, prumerge+, knee, knee+text's first stage) runs in
  the image graph with padded outputs (`methods.padded`): every image's tokens at the width of all its
  patches, the counts on the device, read once after the replay to cut the padding off; one graph serves
  every count.
  transformers' own compilation of decoding is switched off (the steps are already graphs).
  The method's deferred input checks (`methods.checks.DeviceChecks`) are outputs of the image path's graph:
  each replay computes them and the call reads them before the LLM runs, as on the plain path.
- An LLM-side method with a count rule (fastv, pdrop, dart, sparsevlm, and knee+text's text stage with its
  default text_keep_ratio; `MethodSpec.visual_kept`) runs in
  the prefill graph: the host plans each stage's length, which joins the graph's key, the pruner's layout
  is an input of the graph and what the stages leave for decoding (the kept tokens' masks) its outputs
  (`DecoderPruner.graph_inputs` and friends). A stage's shorter sequence is padded to the prompt bucket
  too, so the prompts of one bucket share the prefill and decode graphs. The static cache's layers after a
  stage hold fewer tokens, each layer counting its own on the device; decode steps build their masks from
  those counts. Its stages' finite-value checks are outputs of the prefill graph, read after it.
- Off the GPU, or with gradients on, the same static shapes run as plain PyTorch: the tokens are those
  of the plain path (the CPU tests check that); only the launches are not removed.

A piece whose capture fails (an operation that needs the host while capturing) runs as plain PyTorch
for those shapes, with a warning naming it: the result is the same, only slower.

What the path refuses, with an InputError at `generate`: beam search, several return sequences, a cache
passed in, another `cache_implementation`, `use_cache=False`, assisted decoding. At `apply`: LLM-side
stages whose counts are decided during the prefill (knee+text cut at its knee, text_keep_ratio=None, or with
prune_text), `sync_timings`, models with sliding-window attention,
and models other than LlavaForConditionalGeneration and LlavaNextForConditionalGeneration (on LLaVA-NeXT
only the tower of the image path is a graph: the crops' packing is host work, `Adapter.launch_free_image_graph`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import StaticCache
from transformers.utils import ModelOutput

from visprune import compat
from visprune.errors import InputError, UnsupportedModelError
from visprune.methods.checks import DeviceChecks
from visprune.methods.graphs import capture
from visprune.methods.padded import padded_outputs

if TYPE_CHECKING:
    from visprune.llm_pruning import DecoderPruner

SEQUENCE_BUCKET = 32  # the reduced prompt's length is rounded up to a multiple of this
CACHE_BUCKET = 256  # the static cache's length is rounded up to a multiple of this
MAX_CACHES = 4  # static caches (and the graphs that write them) kept per patched model
MAX_GRAPHS = 128  # graphs per cache; past it new shapes run plainly (a warning says so once)
_UNCAPTURABLE = None


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Graph:
    """One captured piece: the graph, the buffers its inputs are copied into, its output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, buffers: list[Tensor], output: Any):
        self.graph, self.buffers, self.output = graph, buffers, output

    def run(self, inputs: list[Tensor]) -> Any:
        for buffer, value in zip(self.buffers, inputs, strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return map_tensors(self.output, torch.clone)


class _CacheSlot:
    """A static cache and the prefill / decode graphs captured on it (they write its tensors)."""

    def __init__(self, cache: StaticCache):
        self.cache = cache
        self.graphs: dict[Hashable, _Graph | None] = {}


class LaunchFree:
    """The launch-free state of one patched model: its static caches and captured graphs.

    `captures` lists every capture done so far ({"piece", "shapes", "seconds"}: the cost of the first call
    per shape, warm-up included), for benchmarks and for users who want to know what was captured.
    """

    def __init__(self, adapter: Any, capture_images: bool, pruner: DecoderPruner | None = None):
        self.adapter = adapter
        self.capture_images = capture_images  # the whole image path as one graph (else the tower alone)
        self.pruner = pruner  # an LLM-side method's stages, whose host state the prefill / decode graphs carry
        self.image_checks: DeviceChecks | None = None  # this generate's image-path checks, read after the prefill
        self.captures: list[dict[str, Any]] = []
        self.prefill_pending = False
        self._slots: OrderedDict[tuple[int, int], _CacheSlot] = OrderedDict()
        self._images: dict[Hashable, _Graph | None] = {}
        self._pool: Any = None
        self._whole = False  # capturing the whole image path: the tower inside it is not captured on its own
        self._cache_keyword = compat.cache_keyword(adapter.model)
        self._image_tokens = adapter.image_tokens
        self._encode = getattr(adapter, "encode", None)
        adapter.image_tokens = self.image_tokens
        if self._encode is not None:
            adapter.encode = self.encode

    # ----- generate --------------------------------------------------------------------------------

    @staticmethod
    def check_generate(kwargs: dict[str, Any], config: Any) -> None:
        """Refuse what the launch-free path does not support, naming what to do instead."""

        def given(name: str) -> Any:
            return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)

        if (given("num_beams") or 1) > 1:
            raise InputError(
                "beam search is not supported on the launch-free path (its beams reorder the cache every step); "
                "use greedy decoding or sampling, or apply without launch_free=True"
            )
        if (given("num_return_sequences") or 1) > 1:
            raise InputError(
                "num_return_sequences > 1 is not supported on the launch-free path; repeat the prompt in the batch "
                "instead, or apply without launch_free=True"
            )
        if compat.find_cache(kwargs) is not None:
            raise InputError(
                "the launch-free path generates on its own static cache and cannot continue from a cache passed in; "
                "pass the whole conversation without a cache, or apply without launch_free=True"
            )
        if given("cache_implementation") not in (None, "static"):
            raise InputError(
                f"cache_implementation={given('cache_implementation')!r} is not supported on the launch-free path, "
                "which uses a static cache; leave it unset"
            )
        if given("use_cache") is False:
            raise InputError(
                "use_cache=False is not supported on the launch-free path (it decodes from a static cache)"
            )
        if kwargs.get("assistant_model") is not None or given("prompt_lookup_num_tokens") is not None:
            raise InputError("assisted decoding is not supported on the launch-free path; apply without launch_free")

    def prepare_generate(self, model: nn.Module, batch: int, length: int, kwargs: dict[str, Any]) -> None:
        """Rewrite generate's `kwargs` for a prompt of `length` tokens: the static cache, transformers' own
        compilation of decoding off (the steps run as graphs here), and the generation options merged into
        one GenerationConfig (given that way, generate skips rebuilding the model's whole config to look for
        legacy generation settings in it, which took two thirds of a cProfile of one-token generates on the
        H200 machine with transformers 5.17; the options mean what they mean unpatched)."""
        config = copy.copy(kwargs.pop("generation_config", None) or model.generation_config)  # generate deep-copies it
        model_kwargs = config.update(**kwargs)
        config.cache_implementation, config.disable_compile = None, True
        if config.max_new_tokens is None:
            raise InputError("the launch-free path sizes its cache from max_new_tokens; pass max_new_tokens")
        slot = self._slot(model, batch, round_up(length + config.max_new_tokens, CACHE_BUCKET))
        if slot.cache.layers[0].is_initialized:
            torch._foreach_zero_([layer.cumulative_length for layer in slot.cache.layers])
        kwargs.clear()
        kwargs.update(model_kwargs, generation_config=config)
        kwargs[self._cache_keyword] = slot.cache
        self.prefill_pending = True

    def hand_over(self, output: Any) -> None:
        """Give a generate output that carries one of this path's caches a copy of it: the path reuses its
        cache (and the graphs that write it) in later calls, which would change a cache the caller kept."""
        cache = compat.output_cache(output)
        if cache is not None and any(slot.cache is cache for slot in self._slots.values()):
            compat.replace_output_cache(output, copy.deepcopy(cache))

    def _slot(self, model: nn.Module, batch: int, max_len: int) -> _CacheSlot:
        key = (batch, max_len)
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        self._slots[key] = _CacheSlot(StaticCache(config=model.config, max_cache_len=max_len))
        while len(self._slots) > MAX_CACHES:
            self._slots.popitem(last=False)
        return self._slots[key]

    def model_call(self, original: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """A prefill or decode step of generate on one of this path's caches: the attention mask padded to
        the cache's length for decode steps, then a graph replay (or a plain call off the GPU)."""
        cache = compat.find_cache(kwargs)
        slot = next((s for s in self._slots.values() if s.cache is cache), None)
        piece = "prefill" if self.prefill_pending else "decode"
        self.prefill_pending = False
        if slot is None:
            out = original(**kwargs)
            if piece == "prefill":
                self._verify_image_checks()
            return out
        mask = kwargs.get("attention_mask")
        if piece == "decode" and isinstance(mask, Tensor) and mask.dim() == 2:
            width = slot.cache.layers[0].max_cache_len
            kwargs["attention_mask"] = nn.functional.pad(mask, (0, width - mask.shape[1]))
        pruner = self.pruner
        if piece == "decode":
            return self._model_step(original, kwargs, slot, piece)
        if pruner is not None:
            pruner.defer_finish = True  # its counts are read after the graph, not inside it
        try:
            out = self._model_step(original, kwargs, slot, piece)
        finally:
            if pruner is not None:
                pruner.defer_finish = False
        self._verify_image_checks()
        if pruner is not None:
            pruner.finish_prefill()
        return out

    def _verify_image_checks(self) -> None:
        """Raise if the image path's inputs held NaN or inf (read once the prefill is launched, before anything
        is sampled from it)."""
        checks, self.image_checks = self.image_checks, None
        if checks is not None:
            checks.verify()

    def _model_step(self, original: Callable[..., Any], kwargs: dict[str, Any], slot: _CacheSlot, piece: str) -> Any:
        """One model call on `slot`'s cache: replayed from the graph of its shapes (captured on first use), or
        plain. An LLM-side pruner's state tensors are inputs of the graph and what it leaves there outputs."""
        pruner = self.pruner
        names = sorted(k for k, v in kwargs.items() if isinstance(v, Tensor))
        others = {k: v for k, v in kwargs.items() if k not in names}
        own = pruner.graph_inputs(piece) if pruner is not None else []
        inputs = [kwargs[k] for k in names] + own
        key = call_key(piece, kwargs, slot.cache)  # computed off the GPU too, where the CPU tests inspect it
        if pruner is not None:
            key = (key, pruner.graph_key(piece), tuple((tuple(t.shape), t.dtype) for t in own))
        if (
            not _graphable(inputs)
            or not slot.cache.layers[0].is_initialized  # the first call allocates the cache (on its first write)
            or (pruner is not None and not pruner.capturable)
        ):
            return original(**kwargs)
        if key not in slot.graphs and len(slot.graphs) >= MAX_GRAPHS:
            warnings.warn(
                f"visprune launch_free: {MAX_GRAPHS} graphs captured on one cache; further shapes run as plain "
                "PyTorch (prompts of many different lengths?)",
                stacklevel=5,
            )
            slot.graphs[key] = _UNCAPTURABLE

        def call(*tensors: Tensor) -> Any:
            if pruner is not None:
                pruner.bind_graph_inputs(piece, tensors[len(names) :])
            out = original(**dict(zip(names, tensors[: len(names)], strict=True)), **others)
            return out, pruner.graph_outputs(piece) if pruner is not None else None

        entry = self._graph(slot.graphs, key, piece, call, inputs, rewind=slot.cache)
        if entry is None:
            if pruner is not None:
                pruner.bind_graph_inputs(piece, own)  # back to this call's own state (a capture may have failed)
            return original(**kwargs)
        out, results = entry.run(inputs)
        if pruner is not None:
            pruner.adopt_graph_outputs(piece, results)
        return out

    # ----- images --------------------------------------------------------------------------------

    def image_tokens(self, pixel_values: Tensor, reducer: Any, image_kwargs: dict[str, Any]) -> Any:
        """The adapter's image_tokens, replayed whole from a graph when the image path is static."""
        prompts = getattr(reducer, "prompts", None)
        tensors = {k: v for k, v in image_kwargs.items() if isinstance(v, Tensor)}
        inputs = [pixel_values, *tensors.values()] + ([prompts] if isinstance(prompts, Tensor) else [])
        if not self.capture_images or not _graphable(inputs):
            return self._image_tokens(pixel_values, reducer, image_kwargs)
        others = {k: v for k, v in image_kwargs.items() if k not in tensors}
        key = ("images", reducer is None, tuple((t.shape, t.dtype) for t in inputs), repr(sorted(others.items())))
        names = list(tensors)
        checks = reducer.device_checks if reducer is not None else None

        def call(pixels: Tensor, *rest: Tensor) -> Any:
            if isinstance(prompts, Tensor):
                reducer.prompts = rest[-1]
            given = dict(zip(names, rest[: len(names)], strict=True))
            start = len(checks) if checks is not None else 0
            with padded_outputs():  # an adaptive method's counts stay on the device
                tokens = self._image_tokens(pixels, reducer, {**others, **given})
            return tokens, checks.take_since(start) if checks is not None else []

        self._whole = True
        try:
            entry = self._graph(self._images, key, "vision tower + reduction", call, inputs)
        finally:
            self._whole = False
        if entry is None:
            return self._image_tokens(pixel_values, reducer, image_kwargs)
        tokens, recorded = entry.run(inputs)
        if checks is not None:  # the method's deferred input checks, as the replay computed them
            checks.extend(recorded)
        return tokens.trimmed()  # the counts of an adaptive method: one host read

    def encode(self, pixel_values: Tensor, requests: dict[str, Any]) -> Any:
        """The adapter's vision tower (features and signals), replayed from a graph."""
        if self._whole or not _graphable([pixel_values]):
            return self._encode(pixel_values, requests)
        key = ("tower", pixel_values.shape, pixel_values.dtype, repr(sorted(requests.items())))
        entry = self._graph(self._images, key, "vision tower", lambda px: self._encode(px, requests), [pixel_values])
        return self._encode(pixel_values, requests) if entry is None else entry.run([pixel_values])

    # ----- capture -------------------------------------------------------------------------------

    def _graph(
        self,
        graphs: dict[Hashable, _Graph | None],
        key: Hashable,
        piece: str,
        call: Callable[..., Any],
        inputs: list[Tensor],
        rewind: StaticCache | None = None,
    ) -> _Graph | None:
        """The graph of `call` for these inputs, captured on first use (None when it cannot be captured).
        `rewind`: the cache `call` writes; its position is restored after the warm-up and the capture, so
        that the replay writes the same slots."""
        if key in graphs:
            return graphs[key]
        device = inputs[0].device
        buffers = [t.clone() for t in inputs]
        starts = [layer.cumulative_length.clone() for layer in rewind.layers] if rewind is not None else []
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()

        def rewound() -> None:
            if rewind is not None:
                torch._foreach_copy_([layer.cumulative_length for layer in rewind.layers], starts)

        t0 = time.perf_counter()
        try:
            graph, output = capture(lambda: call(*buffers), device, pool=self._pool, after_warmup=rewound)
        except RuntimeError as err:
            graphs[key] = _UNCAPTURABLE
            rewound()
            warnings.warn(
                f"visprune launch_free: the {piece} could not be captured as a CUDA graph for these shapes ({err}); "
                "it runs as plain PyTorch (the same result, without the launch savings)",
                stacklevel=4,
            )
            return None
        rewound()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        self.captures.append({"piece": piece, "shapes": [list(t.shape) for t in inputs], "seconds": seconds})
        graphs[key] = _Graph(graph, buffers, output)
        return graphs[key]

    def release(self) -> None:
        """Drop every graph and cache and give the adapter its own calls back (called by remove)."""
        self._slots.clear()
        self._images.clear()
        self._pool = None
        self.adapter.image_tokens = self._image_tokens
        if self._encode is not None:
            self.adapter.encode = self._encode


def call_key(piece: str, kwargs: dict[str, Any], cache: Any) -> Hashable:
    """What identifies one captured model call: the piece, every tensor argument's name, shape and dtype, and
    the other arguments' values (the cache aside). Decode steps of one generate share it (their masks are
    padded to the cache), so one graph serves them all; anything that changes it captures a new graph."""
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(kwargs.items()) if isinstance(v, Tensor))
    settings = repr(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, Tensor) and v is not cache))
    return piece, tensors, settings


def check_static_cache(config: Any) -> None:
    """Refuse models whose static cache keeps host-side state per step (sliding-window layers count their
    position in a Python int, which a replayed graph would not advance)."""
    cache = StaticCache(config=config, max_cache_len=CACHE_BUCKET)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise UnsupportedModelError(
            "the launch-free path does not support sliding-window attention (its static cache layers track their "
            "position on the host); apply without launch_free=True"
        )


def _graphable(inputs: list[Tensor]) -> bool:
    """CUDA inputs, gradients off, no capture already running (a piece inside another's capture runs plainly
    and becomes part of that graph)."""
    return (
        bool(inputs)
        and inputs[0].is_cuda
        and not torch.is_grad_enabled()
        and not torch.cuda.is_current_stream_capturing()
    )


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`obj` with `fn` applied to every tensor in it (model outputs, dataclasses, lists, tuples, dicts);
    anything else (a cache, ints) is kept as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, ModelOutput):
        return type(obj)(**{k: map_tensors(v, fn) for k, v in obj.items()})
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj
