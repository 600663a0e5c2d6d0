"""visprune: adaptive visual-token pruning and merging for multimodal LLMs.

`visprune.list_methods()` lists the registered methods; `visprune.apply(model, name, **options)`
patches a model; `visprune.bundled.load()` returns the bundled tiny LLaVA. The subpackage
`visprune.methods` holds the methods themselves.
"""

from visprune import bundled
from visprune.errors import InputError, UnknownMethodError, UnsupportedModelError, VisPruneError
from visprune.methods import MethodSpec, Reduction, TokenLayout, get_method, list_methods
from visprune.patch import Handle, Stats, apply, remove

__version__ = "0.1.0"

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
    "bundled",
    "get_method",
    "list_methods",
    "remove",
]
