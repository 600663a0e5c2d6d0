"""Visual-token reduction methods as pure, batched tensor functions, and their registry.

Importing this package registers every method; see `list_methods()` / `visprune.methods()`.
"""

from visprune.methods.base import MethodSpec, Placement, Reduction, SignalRequest, TokenLayout, select_tokens
from visprune.methods.registry import get_method, list_methods, register, resolve_options
from visprune.methods.signals import cls_attention, patch_keys

__all__ = [
    "MethodSpec",
    "Placement",
    "Reduction",
    "SignalRequest",
    "TokenLayout",
    "cls_attention",
    "get_method",
    "list_methods",
    "patch_keys",
    "register",
    "resolve_options",
    "select_tokens",
]
