"""Input validation shared by the methods. Every failure raises InputError saying what was wrong
and what to pass instead; nothing is silently coerced."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from visprune.errors import InputError
from visprune.host_reads import StagedRead

if TYPE_CHECKING:
    from visprune.methods.base import TokenLayout


class DeviceChecks:
    """Input checks recorded on the device instead of read at once (`deferred_device_checks`): finite values,
    and the conditions a method states on its tensor inputs (`check_on_device`). Reading one waits for the
    device, which stalls a caller that still has host work to overlap."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, Tensor]] = []
        self._staged: list[tuple[list[str], StagedRead]] = []

    def add(self, message: str, ok: Tensor) -> None:
        """Record the 0-dim bool `ok`; `verify` raises InputError(`message`) where it is False."""
        self._pending.append((message, ok))

    def extend(self, checks: list[tuple[str, Tensor]]) -> None:
        """Record checks another call recorded (`take_since`), e.g. as a replayed graph recomputed them."""
        self._pending.extend(checks)

    def __len__(self) -> int:
        return len(self._pending)

    def take_since(self, start: int) -> list[tuple[str, Tensor]]:
        """Remove and return the checks recorded after the first `start` (`len(self)` before the calls that
        recorded them): a captured CUDA graph returns them as outputs, re-`add`ed after each replay, since a
        replay recomputes the flags but runs none of the code that records them."""
        taken, self._pending = self._pending[start:], self._pending[:start]
        return taken

    def stage(self) -> None:
        """Start copying the recorded checks to the host without waiting for the device (into pinned memory,
        behind the work that computes them), so that a later `verify` reads them without waiting for what was
        launched in between (the launch-free path stages its image checks and verifies them after the prefill
        is launched)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = StagedRead(torch.stack([flag for _, flag in pending]))
        self._staged.append(([message for message, _ in pending], flags))

    def verify(self) -> None:
        """Read every recorded check (one device read; staged ones from their host copies) and raise
        InputError with the message of the first that failed."""
        self.stage()
        staged, self._staged = self._staged, []
        for messages, flags in staged:
            for message, good in zip(messages, flags.value().tolist(), strict=True):
                if not good:
                    raise InputError(message)


_DEFERRED: ContextVar[DeviceChecks | None] = ContextVar("visprune_deferred_device_checks", default=None)


@contextmanager
def deferred_device_checks(checks: DeviceChecks) -> Iterator[DeviceChecks]:
    """Within the block, `check_tensor` and `check_on_device` record their checks in `checks` instead of
    reading the device; the caller must `checks.verify()` before it uses what the checked inputs produced."""
    token = _DEFERRED.set(checks)
    try:
        yield checks
    finally:
        _DEFERRED.reset(token)


def check_on_device(ok: Tensor, message: str) -> None:
    """Raise InputError(`message`) unless the 0-dim bool `ok` holds: read at once, or recorded for a later
    `verify` inside `deferred_device_checks` (also while a CUDA graph is captured, where an immediate read
    is impossible and the check is skipped outside that block)."""
    deferred = _DEFERRED.get()
    if deferred is not None:
        deferred.add(message, ok)
    elif not _capturing(ok) and not bool(ok):
        raise InputError(message)


def _not_finite(name: str) -> str:
    return f"{name} contains NaN or inf values; check the model's dtype/overflow upstream"


def check_features(features: Any) -> tuple[int, int, int]:
    """Visual features must be a floating tensor [B, N, C] with B, N, C >= 1. Returns (B, N, C)."""
    if not isinstance(features, Tensor):
        raise InputError(f"features must be a torch.Tensor of shape [B, N, C], got {type(features).__name__}")
    if features.dim() != 3:
        raise InputError(
            f"features must have shape [B, N, C] (batch, tokens, channels), got shape {tuple(features.shape)}; "
            "add a batch dimension with features.unsqueeze(0) for a single image"
        )
    if not features.is_floating_point():
        raise InputError(f"features must be floating point (fp32/fp16/bf16), got {features.dtype}")
    b, n, c = features.shape
    if min(b, n, c) < 1:
        raise InputError(f"features has an empty dimension: shape {tuple(features.shape)}")
    return b, n, c


def check_grid(grid: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """The (height, width) token grid; inferred as square when None. Must satisfy h * w == N."""
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(f"cannot infer a square grid for N={n} tokens; pass grid=(height, width)")
        return side, side
    if len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise InputError(f"grid must be a pair of positive ints (height, width), got {grid!r}")
    h, w = grid
    if h * w != n:
        raise InputError(f"grid {h}x{w} = {h * w} tokens does not match N={n} features")
    return h, w


def check_budget(budget: Any, n: int, name: str = "budget") -> int:
    """A token budget must be an int in [1, N]."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise InputError(f"{name} must be an int number of tokens, got {budget!r}")
    if not 1 <= budget <= n:
        raise InputError(f"{name}={budget} is out of range: it must be between 1 and N={n}")
    return budget


def check_budgeted_features(features: Any, grid: tuple[int, int] | None, budget: Any) -> tuple[int, int, int]:
    """(B, N, K) of a fixed-budget method's call: features [B, N, C], the grid validated when given, and the
    budget K in [1, N]."""
    b, n, _ = check_features(features)
    if grid is not None:
        check_grid(grid, n)
    return b, n, check_budget(budget, n)


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """An int (not bool) >= minimum, e.g. a token budget before N is known."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise InputError(f"{name}={value} is out of range: {name} must be an int >= {minimum}")
    return value


def check_flag(value: Any, name: str) -> bool:
    """True or False (not 0 / 1 or a string)."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}")
    return value


def check_ratio(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A fraction in (0, 1] ([0, 1] with allow_zero)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number in (0, 1], got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        bounds = "[0, 1]" if allow_zero else "(0, 1]"
        raise InputError(f"{name}={value} is out of range: it must be in {bounds}")
    return float(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """One of a fixed set of strings."""
    if value not in choices:
        raise InputError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    return value


def check_tensor(t: Any, name: str, shape: tuple[int | None, ...], *, finite: bool = True) -> Tensor:
    """`t` must be a tensor of the given shape (None matches any size) and, for floats, finite.

    The finite-value check reads the tensor on the host. Inside `deferred_device_checks` it is recorded on the
    device for a later `verify` instead, also while a CUDA graph is captured (the launch-free path returns the
    recorded flags from its graphs); an immediate check is skipped while one is captured."""
    if not isinstance(t, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    expect = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape, strict=True)):
        raise InputError(f"{name} must have shape {expect}, got {tuple(t.shape)}")
    if finite and t.is_floating_point():
        check_on_device(torch.isfinite(t).all(), _not_finite(name))
    return t


def check_layout(layout: TokenLayout) -> None:
    """All layout masks must be bool tensors of one shape [B, S]."""
    masks = {n: getattr(layout, n) for n in ("attention_mask", "visual", "query", "system")}
    ref = layout.attention_mask
    for n, m in masks.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.dim() != 2:
            raise InputError(f"TokenLayout.{n} must be a bool tensor [B, S]")
        if m.shape != ref.shape:
            raise InputError(f"TokenLayout.{n} has shape {tuple(m.shape)}, expected {tuple(ref.shape)}")
    rows = layout.text_rows
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise InputError(f"TokenLayout.text_rows must be None or an int >= 0, got {rows!r}")


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph capture is running on `t`'s device (no host reads are allowed then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
