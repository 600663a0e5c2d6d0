"""Exceptions raised by visprune. All derive from ValueError/TypeError so callers can catch either."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VisPruneError(Exception):
    """Base class for every error visprune raises on purpose."""


class InputError(VisPruneError, ValueError):
    """A tensor, shape, budget or option given to visprune is not valid; the message says how to fix it."""


class UnknownMethodError(VisPruneError, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(VisPruneError, TypeError):
    """A model (class or vision tower) that visprune cannot patch."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the candidates closest to `name`, or '' when none is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(m) for m in matches)}?" if matches else ""
