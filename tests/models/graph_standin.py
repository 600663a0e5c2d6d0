"""A CPU stand-in for the CUDA graphs of the launch-free path (visprune/launch_free.py), so that the CPU tests
exercise its capture and replay bookkeeping. It is as strict as a real graph where a real graph fails:

- capturing runs the call once (the warm-up: a real capture runs nothing, so the caller undoes what it
  changed), and a host read in it (`.item()`, `int(t)`, `bool(t)`, nonzero, ...) fails the capture with a
  RuntimeError, as on a GPU; `visprune.methods.checks` sees a capture running, as it would there;
- a replay runs the call again and writes its result into the tensors the capture returned, as a replay
  overwrites them. It may read only tensors it made itself, the graph's input buffers and persistent state
  (the model's weights and buffers, the static cache): a real replay reads any other tensor (a mask left in
  Python state by an earlier call, say) at the address it had at capture, stale or freed, and so does not see
  the current call's value. The stand-in raises an AssertionError naming it.

What it cannot see: copies from the host inside a capture (everything is on the CPU here; on a GPU a copy of
pageable host memory fails the capture, which the path then runs plainly with a warning: random's subset,
drawn by a CPU generator, does), and numeric differences of the GPU's kernels.

`install(monkeypatch, model)` switches the launch-free path of `model` onto the stand-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import visprune.launch_free as lf
from visprune.methods import checks

_aten = torch.ops.aten
HOST_READS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default}
CACHE_TENSORS = ("keys", "values", "cumulative_length")
FRESH = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}  # a tensor built from Python values


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(obj: Any) -> list[Tensor]:
    found: list[Tensor] = []
    lf.map_tensors(obj, lambda t: found.append(t) or t)
    return found


class _Watch(TorchDispatchMode):
    """Fails host reads; with `inputs` given, also reads of tensors that are not inputs, made by the call, or
    persistent (0-dim tensors aside: Python numbers reach some operations wrapped as such)."""

    def __init__(self, persistent: set[int], inputs: list[Tensor] | None):
        super().__init__()
        self.allowed = None if inputs is None else persistent | {_storage(t) for t in inputs}
        self.made: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise RuntimeError(f"{func} reads the device on the host, which a CUDA graph capture does not allow")
        if self.allowed is not None and func not in FRESH:
            for t in tree_flatten((args, kwargs))[0]:
                if not isinstance(t, Tensor) or t.dim() == 0 or t.numel() == 0:
                    continue
                if _storage(t) not in self.made and _storage(t) not in self.allowed:
                    raise AssertionError(
                        f"a replayed graph reads a tensor {tuple(t.shape)} {t.dtype} ({func}) that is neither one "
                        "of its inputs nor made inside it nor persistent: a real replay reads it where it was at "
                        "capture"
                    )
        out = func(*args, **kwargs)
        self.made.update(_storage(t) for t in tree_flatten(out)[0] if isinstance(t, Tensor))
        return out


class ReplayOnCPU:
    """The stand-in for one captured graph."""

    running = False  # a captured call is running: pieces called inside it run plainly, as inside a capture

    def __init__(self, call: Any, persistent: Callable[[], set[int]]):
        self.call = call
        self.persistent = persistent
        self.inputs: list[Tensor] | None = None  # the graph's buffers, linked by `install`
        self.output = self._run(None)

    def _run(self, inputs: list[Tensor] | None) -> Any:
        ReplayOnCPU.running = True
        try:
            with _Watch(self.persistent(), inputs):
                return self.call()
        finally:
            ReplayOnCPU.running = False

    def replay(self) -> None:
        assert self.inputs is not None, "the stand-in graph was not linked to its buffers"
        for kept, new in zip(_tensors(self.output), _tensors(self._run(self.inputs)), strict=True):
            kept.copy_(new)


def install(monkeypatch: Any, model: torch.nn.Module) -> None:
    """Capture and replay `model`'s launch-free pieces with the stand-in (undone with the monkeypatch)."""
    weights = {_storage(t) for t in [*model.parameters(), *model.buffers()]}
    paths: list[lf.LaunchFree] = []

    def persistent() -> set[int]:
        """The model's weights and every static cache's tensors (allocated on their first write)."""
        caches = [slot.cache for path in paths for slot in path._slots.values()]
        state = [getattr(layer, name, None) for c in caches for layer in c.layers for name in CACHE_TENSORS]
        return weights | {_storage(t) for t in state if isinstance(t, Tensor)}

    def fake_capture(call, device, pool=None, after_warmup=None):
        graph = ReplayOnCPU(call, persistent)
        if after_warmup is not None:
            after_warmup()
        return graph, graph.output

    path_init, graph_init = lf.LaunchFree.__init__, lf._Graph.__init__

    def registered_init(self, *args, **kwargs):
        path_init(self, *args, **kwargs)
        paths.append(self)

    def linked_init(self, graph, buffers, output):
        graph_init(self, graph, buffers, output)
        graph.inputs = buffers

    def graphable(inputs):
        return bool(inputs) and not torch.is_grad_enabled() and not ReplayOnCPU.running

    monkeypatch.setattr(lf, "capture", fake_capture)
    monkeypatch.setattr(lf.LaunchFree, "__init__", registered_init)
    monkeypatch.setattr(lf._Graph, "__init__", linked_init)
    monkeypatch.setattr(lf, "_graphable", graphable)
    monkeypatch.setattr(checks, "_capturing", lambda t: ReplayOnCPU.running)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
