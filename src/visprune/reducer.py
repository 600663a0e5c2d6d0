"""Reducer: an encoder-side method bound to its options, as adapters call it on each image group, and the
signals it computes itself (the projected tokens, the prompt vectors)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from visprune.errors import UnsupportedModelError
from visprune.methods import MethodSpec, Reduction, SignalRequest
from visprune.methods.base import available_requests
from visprune.methods.checks import DeviceChecks, deferred_device_checks
from visprune.methods.padded import padding
from visprune.prompts import prompts_for
from visprune.stats import Stats


class Reducer:
    """An encoder-side method bound to its options: features [n, N, C] -> one Reduction per image.

    `budget` is the method's token budget per image (None for adaptive methods); adapters that split an
    image into crops call the reducer with a per-crop `budget` override. `tower_layer`: the vision block
    at whose input the adapter reduces (None: after the tower). The Reducer computes the signals of the
    REDUCER_KINDS itself: "projected" with `project` (the adapter's projector), "prompt" from `prompts`
    [images, D] (`prompts.prompt_vectors`), for which adapters pass the image index of each row
    (`images`). `available`: the signal kinds the adapter computes (`Adapter.signal_kinds`); the method's
    optional requests outside them are left out (None keeps every request). `host_work`: the call's host
    work that needs nothing from the device (`HostWork`); the reducer runs it before the method, and an
    adapter that reads the device before it calls the reducer runs it first (`before_host_read`), so that
    it overlaps the device's encoding instead of waiting for it. A fixed-count method's input checks
    are recorded, not read (`methods.checks.deferred_device_checks`): the caller reads them with
    `verify_inputs` once its own host work is done and before it uses the reductions. An adaptive method
    reads its counts on the host anyway, so its checks run at once.
    """

    def __init__(
        self,
        spec: MethodSpec,
        options: dict[str, Any],
        sync: bool,
        stats: Stats,
        tower_layer: int | None = None,
        project: Callable[[Tensor], Tensor] | None = None,
        prompts: Tensor | None = None,
        available: Collection[str] | None = None,
        host_work: HostWork | None = None,
    ):
        self.spec = spec
        self.host_work = host_work
        self.device_checks = DeviceChecks()
        self.tower_layer = tower_layer
        self.options = options
        self.requests, self._own = split_reducer_signals(spec.signals(options))
        if available is not None:
            self.requests = available_requests(self.requests, available)
        self.project = project
        self.prompts = prompts
        self.sync = sync
        self.stats = stats

    @classmethod
    def for_call(
        cls,
        adapter: Any,
        spec: MethodSpec,
        options: dict[str, Any],
        stats: Stats,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        sync: bool = False,
        tower_layer: int | None = None,
        runs: list[list[tuple[int, int]]] | None = None,
        host_work: HostWork | None = None,
    ) -> Reducer:
        """The reducer of one model call: the adapter's projector and signal kinds, and, for a method that
        reads the "prompt" signal, the prompt vectors of the call's `input_ids` (`runs`: its placeholder runs
        when the caller has already read them on the host)."""
        reducer = cls(
            spec,
            options,
            sync,
            stats,
            tower_layer,
            adapter.project,
            available=adapter.signal_kinds,
            host_work=host_work,
        )
        if reducer.needs_prompts:
            reducer.prompts = prompts_for(adapter, input_ids, attention_mask, runs)
        return reducer

    @property
    def needs_prompts(self) -> bool:
        """Whether the method reads the "prompt" signal (the caller then passes `prompts`)."""
        return "prompt" in self._own.values()

    @property
    def budget(self) -> int | None:
        return encoder_budget(self.spec, self.options)

    def before_host_read(self) -> None:
        """Run the call's pending host work (once): adapters call this before they read a device result
        on the host (a count, a layout), since that read waits for the device."""
        if self.host_work is not None:
            self.host_work.run()

    def verify_inputs(self) -> None:
        """Raise the InputError of a method input that failed a deferred check (NaN or inf, or a condition the
        method states on its data: `methods.checks.check_on_device`)."""
        self.device_checks.verify()

    def _options_for(self, budget: int | None) -> dict[str, Any]:
        """The options for a per-crop `budget` override, by the method's own budget rule."""
        if budget is None or budget == self.budget or self.spec.budget_rule is None:
            return self.options
        return self.spec.budget_rule.apply(budget, self.options)

    def __call__(
        self,
        features: Tensor,
        grid: tuple[int, int],
        signals: dict[str, Tensor],
        budget: int | None = None,
        images: Sequence[int] | None = None,
    ) -> list[Reduction]:
        self.before_host_read()  # methods may read counts or check values on the host
        sync_device(features, self.sync)
        t0 = time.perf_counter()
        if self._own:
            signals = {**signals, **self._reducer_signals(features, images)}
        # an adaptive method reads its counts on the host, and its checks with them, unless it pads (methods.padded)
        deferred = deferred_device_checks(self.device_checks) if not self.spec.adaptive or padding() else nullcontext()
        with deferred:
            out = self.spec.fn(features, grid=grid, **signals, **self._options_for(budget))
        sync_device(features, self.sync)
        self.stats.timings["reduce"] = self.stats.timings.get("reduce", 0.0) + time.perf_counter() - t0
        return out

    def _reducer_signals(self, features: Tensor, images: Sequence[int] | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, kind in self._own.items():
            if kind == "projected":
                if self.project is None:
                    raise UnsupportedModelError(
                        f"{self.spec.name} needs the projected features, which this model lacks"
                    )
                out[name] = self.project(features)
            else:
                if self.prompts is None or images is None:
                    raise UnsupportedModelError(
                        f"{self.spec.name} needs the prompt of each image, which this call does not give "
                        "(visprune passes it from the model's input_ids in forward and generate)"
                    )
                out[name] = _rows(self.prompts, images).to(features.device)
        return out


class HostWork:
    """Host work of one model call that reads no device result (the dense M-RoPE positions from host copies
    of the prompt), run at most once: the first host read of the image path waits for the device, so work
    run before it overlaps the device's encoding, and work run after it leaves the device idle."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn: Callable[[], Any] | None = fn
        self._value: Any = None

    def run(self) -> None:
        """Do the work now unless it is done."""
        if self._fn is not None:
            self._value = self._fn()
            self._fn = None  # only once it succeeded: a failed attempt raises again, never yields None

    def result(self) -> Any:
        """The work's result (done now if it is not yet)."""
        self.run()
        return self._value


REDUCER_KINDS = ("projected", "prompt")  # signal kinds the Reducer computes, not the adapter


def split_reducer_signals(requests: dict[str, SignalRequest]) -> tuple[dict[str, SignalRequest], dict[str, str]]:
    """(the requests an adapter computes from its tower, {name: kind} of those the Reducer computes itself:
    the REDUCER_KINDS)."""
    own = {name: req.kind for name, req in requests.items() if req.kind in REDUCER_KINDS}
    return {name: req for name, req in requests.items() if name not in own}, own


def encoder_budget(spec: MethodSpec, options: dict[str, Any]) -> int | None:
    """Tokens per image a fixed-count encoder-side method keeps with these options (None: adaptive)."""
    return None if spec.budget_rule is None else spec.budget_rule.of(options)


def sync_device(t: Tensor, enabled: bool) -> None:
    """Synchronise `t`'s CUDA device when `enabled` (timings that measure device time)."""
    if enabled and t.is_cuda:
        torch.cuda.synchronize(t.device)


def _rows(table: Tensor, images: Sequence[int]) -> Tensor:
    """table[images]: a slice for a contiguous range (no index tensor copied from the host, so the rows can be
    read inside a CUDA graph capture), a gather otherwise."""
    if isinstance(images, range) and images.step == 1:
        return table[images.start : images.stop]
    return table[torch.as_tensor(list(images), device=table.device)]
