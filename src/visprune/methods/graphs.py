"""CUDA-graph replay and fused steps for the sequential selection loops (DivPrune, CDPruner, SCOPE, VisPruner)
and FlowCut's self-pruning CLIP tower.

Their greedy steps depend on one another, so they cannot be batched over the kept tokens: each of the
64-192 steps launches a handful of small kernels, and on a GPU the loop costs the launches, not the
arithmetic (5-60 ms at batch 16 for work worth well under a millisecond). `replayed` captures such a
loop once per input shape as a CUDA graph and replays it as one launch afterwards. The loops qualify
because they never synchronise with the host: every index stays on the device.

The captured graphs are kept in a small least-recently-used cache per process (`CACHE_SIZE` shapes),
like torch.compile's; `clear()` frees them. Off the GPU, or while another capture is running, the loop
simply runs; a loop that cannot be captured (an operation that needs the host) runs step by step with a
warning, once per shape. The graph computes exactly what the loop computes (same kernels, same order).

A graph removes the launches, not the kernels: a step of a few small elementwise passes and reductions
still runs them one after another, each reading and writing its [B, N] or [B, N, N] operand. `fused` marks a
loop's step function; on a GPU it runs compiled by torch.compile, which fuses the step into a few Triton
kernels. The first compilation is specialised to the shapes it sees; a later call with other sizes compiles
once more with those dimensions symbolic, and that version serves every size after (torch.compile's
automatic dynamic shapes). Specialised kernels are much faster: SCOPE's whole selection of 324 of 8 x 1296
tokens took 8.6 ms against 17.4 ms with every dimension symbolic (`scripts/profile_selection.py`, H200).
Compiled kernels may sum in a different order than the plain ones, so on a GPU the scores can differ in the
last bits (a tie between two tokens can go the other way); off the GPU the step runs as written.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import Tensor

CACHE_SIZE = 16
ENABLED = True  # tests switch it off to compare with the plain loop
FUSE = True  # compile the `fused` steps on a GPU (tests and benchmarks switch it off to compare)
FUSE_BACKEND = "inductor"  # torch.compile's backend for them (the CPU tests trace with "aot_eager")
# Compilations kept per step: vispruner's rounds shrink every round and end on small or odd lists, each a
# guard of its own (7 versions over three batch shapes and three budgets on the CPU), past torch's default
# limit of 8 with a few more shapes, where torch.compile would run the step uncompiled without a word.
RECOMPILE_LIMIT = 64

Output = Tensor | tuple[Tensor, ...]
_Entry = tuple[torch.cuda.CUDAGraph, list[Tensor], Output]
UNCAPTURABLE = None  # the cache entry of a loop whose capture failed for those shapes
_cache: OrderedDict[Hashable, _Entry | None] = OrderedDict()


def replayed(
    loop: Callable[..., Output], *inputs: Tensor, reads: tuple[Tensor, ...] = (), **static: Hashable
) -> Output:
    """`loop(*inputs, **static)`, replayed from a CUDA graph when the inputs are on a GPU.

    `loop` must be pure tensor code without host synchronisation whose output (a tensor or a tuple of
    tensors) depends only on the input tensors, the hashable `static` arguments (e.g. the number of steps)
    and `reads`: the persistent tensors it reads besides its inputs (a module's weights). A graph reads
    those at the addresses it was captured with, so their addresses, shapes and dtypes are part of the
    cache key (a module moved to another dtype or device is captured anew). Where autograd would record
    the loop (grad enabled and an input or read requires grad) it runs as written: a replay's output
    has no history. The first call per (loop, shapes, dtypes, device, static, reads, inference mode)
    warms up and captures; later calls copy the inputs into the graph's buffers, replay it and return a
    copy of its output.
    """
    if not _replayable(inputs) or _records_grad(inputs + reads):
        return loop(*inputs, **static)
    key = (
        loop,
        tuple((t.shape, t.dtype, t.device) for t in inputs),
        tuple(sorted((name, _held_weakly(value)) for name, value in static.items())),
        tuple((t.data_ptr(), t.shape, t.dtype) for t in reads),
        torch.is_inference_mode_enabled(),
    )
    if key in _cache:
        _cache.move_to_end(key)
        entry = _cache[key]
    else:
        try:
            entry = _capture(loop, inputs, static)
        except RuntimeError as err:  # an operation that cannot be captured: the loop still gives the result
            entry = UNCAPTURABLE
            warnings.warn(
                f"{loop.__name__} could not be captured as a CUDA graph ({err}); it runs step by step for these "
                "shapes (the same result, slower)",
                stacklevel=3,
            )
        _cache[key] = entry
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    if entry is UNCAPTURABLE:
        return loop(*inputs, **static)
    graph, buffers, output = entry
    for buffer, value in zip(buffers, inputs, strict=True):
        buffer.copy_(value)
    graph.replay()
    return output.clone() if isinstance(output, Tensor) else tuple(t.clone() for t in output)


def _replayable(inputs: tuple[Tensor, ...]) -> bool:
    """Graphs are on, the inputs are on a GPU, and no other capture is running."""
    return ENABLED and inputs[0].is_cuda and not torch.cuda.is_current_stream_capturing()


def _held_weakly(value: Hashable) -> Hashable:
    """A module in a cache key is held by a weak reference: the cache does not keep a model alive, a new
    module that reuses a freed one's id does not match its entry, and the entries of a module that is
    freed are dropped with it (their graphs' memory too)."""
    return weakref.ref(value, _forget) if isinstance(value, torch.nn.Module) else value


def _forget(dead: weakref.ref) -> None:
    """Drop the cache entries whose key holds `dead` (a dead reference equals only itself)."""
    for key in [k for k in _cache if any(value is dead for _, value in k[2])]:
        del _cache[key]


def _records_grad(tensors: tuple[Tensor, ...]) -> bool:
    """Autograd would record a computation on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _capture(loop: Callable[..., Output], inputs: tuple[Tensor, ...], static: dict[str, Any]) -> _Entry:
    buffers = [t.clone() for t in inputs]
    graph, output = capture(lambda: loop(*buffers, **static), inputs[0].device)
    return graph, buffers, output


def capture(
    call: Callable[[], Any],
    device: torch.device,
    pool: Any = None,
    after_warmup: Callable[[], None] | None = None,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, output) of `call` captured on `device` after one warm-up run on a side stream (lazy
    initialisations and compilation happen there, outside the capture). `call` reads its inputs from
    buffers the caller refills before each `graph.replay()`; the output's tensors are overwritten by it.
    pool: a memory pool shared with other graphs (`torch.cuda.graph_pool_handle()`), None for a private one;
    after_warmup: undoes what the warm-up changed outside its output (e.g. a KV cache's write position)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream(device).wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = call()
    return graph, output


def clear() -> None:
    """Free every captured graph and its buffers."""
    _cache.clear()


def row_at(matrix: Tensor, index: Tensor) -> Tensor:
    """[B, N]: row index[b] of each matrix[b] [N, N] (the loops' per-step read, one gather)."""
    return matrix.gather(1, index.view(-1, 1, 1).expand(-1, 1, matrix.shape[2])).squeeze(1)


class fused:
    """Decorator for a loop's step: on CUDA tensors it runs compiled by torch.compile, elsewhere as written.

    The step must be pure tensor code (no host synchronisation) taking tensors and hashable Python values.
    Compiling happens on the first GPU call (seconds; `replayed` does it in its warm-up, outside the
    capture). If this machine cannot compile (no Triton, no compiler), the step runs as written from then
    on, after one warning.
    """

    def __init__(self, step: Callable[..., Any]) -> None:
        functools.update_wrapper(self, step)
        self._step = step
        self._compiled: dict[str, Callable[..., Any]] = {}  # per backend
        self._unfusable = False

    def __call__(self, *args: Any) -> Any:
        if self._unfusable or not _fusable(args):
            return self._step(*args)
        if FUSE_BACKEND not in self._compiled:
            self._compiled[FUSE_BACKEND] = torch.compile(self._step, backend=FUSE_BACKEND, fullgraph=True)
        try:
            with _compile_limits():
                return self._compiled[FUSE_BACKEND](*args)
        except Exception as err:
            if not _is_compile_error(err):
                raise
            if args[0].is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{self.__name__} was compiled during a CUDA graph capture: {err}") from err
            warnings.warn(
                f"{self.__name__} could not be compiled ({type(err).__name__}: {_first_line(err)}); "
                "it runs unfused (the same steps, slower)",
                stacklevel=2,
            )
            self._unfusable = True
            return self._step(*args)


@contextlib.contextmanager
def _compile_limits() -> Iterator[None]:
    """torch.compile's settings for a `fused` call: past RECOMPILE_LIMIT versions it raises instead of silently
    not compiling (some torch versions refuse that together with suppress_errors, which some libraries switch
    on). Set and restored directly: `torch._dynamo.config.patch` costs ~70 us a call, where FlowCut's Qwen-VL
    tower makes ~50 of these calls while its host work barely keeps ahead of the device."""
    config = torch._dynamo.config
    limits = {"recompile_limit": RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True, "suppress_errors": False}
    before = {name: getattr(config, name) for name in limits}
    try:
        for name, value in limits.items():
            setattr(config, name, value)
        yield
    finally:
        for name, value in before.items():
            setattr(config, name, value)


def _fusable(args: tuple[Any, ...]) -> bool:
    """Fusing is on and the step's first argument is on a GPU."""
    return FUSE and args[0].is_cuda


def _is_compile_error(err: Exception) -> bool:
    """torch.compile could not trace or build the step, or needed too many versions of it (imported here:
    loading them costs a second)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
    from torch._inductor.exc import InductorError

    return isinstance(err, (TorchDynamoException, FailOnRecompileLimitHit, InductorError))


def _first_line(err: Exception) -> str:
    """torch.compile's errors run over many lines of hints; their first says what failed."""
    return (str(err).strip().splitlines() or [""])[0]
