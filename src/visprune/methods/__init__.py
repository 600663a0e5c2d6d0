"""Visual-token reduction methods as pure, batched tensor functions, and their registry.

Importing this package registers every method; see `list_methods()` / `visprune.methods()`.
"""

from visprune.methods.base import MethodSpec, Placement, Reduction, SignalRequest, TokenLayout, select_tokens
from visprune.methods.registry import get_method, list_methods, register, resolve_options
from visprune.methods.signals import cls_attention, mean_received_attention, patch_keys

__all__ = [
    "MethodSpec",
    "Placement",
    "Reduction",
    "SignalRequest",
    "TokenLayout",
    "cls_attention",
    "get_method",
    "list_methods",
    "mean_received_attention",
    "patch_keys",
    "register",
    "resolve_options",
    "select_tokens",
]
from visprune.methods import cdpruner as _cdpruner  # noqa: F401
from visprune.methods import cls_topk as _cls_topk  # noqa: F401
from visprune.methods import dart as _dart  # noqa: F401
from visprune.methods import divprune as _divprune  # noqa: F401
from visprune.methods import fastv as _fastv  # noqa: F401
from visprune.methods import flowcut as _flowcut  # noqa: F401
from visprune.methods import knee as _knee  # noqa: F401
from visprune.methods import pdrop as _pdrop  # noqa: F401
from visprune.methods import prumerge as _prumerge  # noqa: F401
from visprune.methods import scope as _scope  # noqa: F401
from visprune.methods import simple as _simple  # noqa: F401
from visprune.methods import sparsevlm as _sparsevlm  # noqa: F401
from visprune.methods import text_stage as _text_stage  # noqa: F401
from visprune.methods import tome as _tome  # noqa: F401
from visprune.methods import visionzip as _visionzip  # noqa: F401
from visprune.methods import vispruner as _vispruner  # noqa: F401
