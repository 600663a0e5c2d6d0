"""visprune: adaptive visual-token pruning and merging for multimodal LLMs."""

from visprune.errors import InputError, UnknownMethodError, UnsupportedModelError, VisPruneError
from visprune.methods import MethodSpec, Reduction, TokenLayout, get_method, list_methods
from visprune.patch import Handle, Stats, apply, remove

__version__ = "0.1.0"


def methods() -> list[MethodSpec]:
    """Every registered method with its description, placement, adaptivity and default options."""
    return list_methods()


__all__ = [
    "Handle",
    "InputError",
    "MethodSpec",
    "Reduction",
    "Stats",
    "TokenLayout",
    "UnknownMethodError",
    "UnsupportedModelError",
    "VisPruneError",
    "__version__",
    "apply",
    "get_method",
    "methods",
    "remove",
]
