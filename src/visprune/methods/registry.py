"""The method registry: names -> MethodSpec, with defaults read from each function's signature and
option documentation read from its docstring's "Options:" section (one source of truth)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import Tensor

from visprune.errors import InputError, UnknownMethodError, closest
from visprune.methods.base import MethodSpec, Placement, SignalRequest
from visprune.methods.budget_rules import BudgetRule
from visprune.methods.depth import RelativeDepth, check_fits

_REGISTRY: dict[str, MethodSpec] = {}

# Keyword arguments that carry tensors or structure, never user options.
RESERVED = frozenset(
    {
        "features",
        "grid",
        "cls_attn",
        "cls_attn_layers",
        "keys",
        "cls_feature",
        "kept",
        "q",
        "k",
        "hidden",
        "layout",
        "stage",
    }
)


def _no_signals(_: dict[str, Any]) -> dict[str, SignalRequest]:
    return {}


def parse_option_docs(doc: str | None) -> dict[str, str]:
    """Read `name: text` entries (with indented continuation lines) from a docstring's Options: block."""
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Options:")
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    current = None
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: (.*)$", line)
        if m:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def register(
    name: str,
    *,
    description: str,
    placement: Placement,
    adaptive: bool,
    signals: Callable[[dict[str, Any]], dict[str, SignalRequest]] = _no_signals,
    layers: Callable[[dict[str, Any]], tuple[int, ...]] | None = None,
    encoder_stage: str | None = None,
    check: Callable[..., None],
    budget_rule: BudgetRule | None = None,
    published_attention: str | None = None,
    visual_kept: Callable[[Tensor, dict[str, Any], int], Tensor | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers a method function under `name`.

    The function's keyword-only parameters with defaults (minus RESERVED tensor arguments) are the
    method's options; an encoder_stage's options are merged in for two-stage methods.
    check: the method's option validator, called with the method's own options as keywords; it
    raises InputError for a wrong type, range or choice. It is the same function the method calls
    on its arguments, so the registry (at `apply`) and a direct call share one set of rules; checks
    that need the data (e.g. budget <= N) stay in the method.
    budget_rule: how a visual-token budget maps onto the options (`visprune.methods.budget_rules`);
    required for a fixed-budget method, None for an adaptive one.
    published_attention: where the method's published code materialises attention maps ("vision" or
    "llm"), for the benchmark's comparison; None when it does not.
    visual_kept: for a method with LLM-side stages that keeps a number of image tokens decided by the counts
    alone, that rule ((present [B] long, options, stage) -> kept [B] long, or None for options under which the
    function decides them from the data; the function must use the same), so that the decoder pruner plans the
    shorter sequence on the host (`MethodSpec.visual_kept`).
    """
    if published_attention not in (None, "vision", "llm"):
        raise RuntimeError(f"method {name!r}: published_attention must be None, 'vision' or 'llm'")
    if visual_kept is not None and placement is Placement.ENCODER:
        raise RuntimeError(f"method {name!r}: visual_kept is for methods with LLM-side stages")
    if adaptive == (budget_rule is not None):
        need = "takes no budget_rule (it is adaptive)" if adaptive else "needs a budget_rule (it keeps a fixed count)"
        raise RuntimeError(f"method {name!r} {need}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} is registered twice")
        params = inspect.signature(fn).parameters.values()
        defaults = {
            p.name: p.default
            for p in params
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in RESERVED
        }
        if set(inspect.signature(check).parameters) != set(defaults):
            raise RuntimeError(f"method {name!r}: its check must take exactly its options {sorted(defaults)}")
        docs = parse_option_docs(fn.__doc__)
        missing = sorted(set(defaults) - set(docs))
        if missing:
            raise RuntimeError(f"method {name!r}: options {missing} are not documented under 'Options:'")
        if encoder_stage is not None:
            first = get_method(encoder_stage)
            clash = set(first.defaults) & set(defaults)
            if clash:
                raise RuntimeError(f"method {name!r}: options {sorted(clash)} clash with {encoder_stage!r}")
            defaults = {**first.defaults, **defaults}
            docs = {**first.param_docs, **docs}
        _REGISTRY[name] = MethodSpec(
            name=name,
            fn=fn,
            description=description,
            placement=placement,
            adaptive=adaptive,
            defaults=defaults,
            signals=signals,
            layers=layers,
            encoder_stage=encoder_stage,
            param_docs=docs,
            check=check,
            budget_rule=budget_rule,
            published_attention=published_attention,
            visual_kept=visual_kept,
        )
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`; an unknown name raises with the closest names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}.{closest(name, _REGISTRY)} Known methods: {', '.join(_REGISTRY)}"
        ) from None


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())


def resolve_options(spec: MethodSpec, overrides: dict[str, Any]) -> dict[str, Any]:
    """The spec's defaults updated with `overrides`, validated by the method's own check (and its
    encoder stage's); an option the method does not take, or a bad value, raises InputError."""
    unknown = [k for k in overrides if k not in spec.defaults]
    if unknown:
        hints = "".join(closest(k, spec.defaults) for k in unknown)
        valid = ", ".join(spec.defaults) or "none"
        raise InputError(
            f"method {spec.name!r} does not take option(s) {', '.join(map(repr, unknown))}.{hints} "
            f"Its options are: {valid}."
        )
    options = {**spec.defaults, **overrides}
    try:
        for part, names in _checked_parts(spec):
            if part.check is not None:
                part.check(**{k: options[k] for k in names})
    except InputError as err:
        raise InputError(f"method {spec.name!r}: {err}") from None
    return options


def _checked_parts(spec: MethodSpec) -> list[tuple[MethodSpec, list[str]]]:
    """(spec, its own option names) for the spec and, for a two-stage method, its encoder stage."""
    if spec.encoder_stage is None:
        return [(spec, list(spec.defaults))]
    first = get_method(spec.encoder_stage)
    return [(first, list(first.defaults)), (spec, [k for k in spec.defaults if k not in first.defaults])]


def bind_options(
    spec: MethodSpec, overrides: dict[str, Any], *, llm_layers: int | None, vision_layers: int | None
) -> dict[str, Any]:
    """`resolve_options`, then every `RelativeDepth` layer option resolved for the model's depths:
    a default moves to the same relative depth, an explicit value must fit (see MethodSpec.bind)."""
    for depth, what in ((llm_layers, "llm_layers"), (vision_layers, "vision_layers")):
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise InputError(f"{what} must be a positive int or None, got {depth!r}")
    options = resolve_options(spec, overrides)
    for name, default in spec.defaults.items():
        if not isinstance(default, RelativeDepth):
            continue
        depth = llm_layers if default.stack == "llm" else vision_layers
        value = options[name]
        try:
            if isinstance(value, RelativeDepth):
                options[name] = value.resolve(depth)
            elif depth is not None:
                check_fits(name, default, value, depth)
        except InputError as err:
            raise InputError(f"method {spec.name!r}: {err}") from None
    return options
