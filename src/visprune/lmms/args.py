"""lmms-eval's `--model_args` for visprune's model: parse the values, split the model's own settings from the
method's options, and check both before any weights load (so a typo fails in a second, not after loading
a 7B checkpoint). Method names and option values are checked by the method registry itself, so the errors
are exactly those of `visprune.apply`.

lmms-eval splits `key=value,key=value` at commas outside brackets and braces and already turns `true` /
`false` and numbers into bools, ints and floats; the rest arrives as strings, parsed here: `None` -> None,
`[a,b]` -> a tuple (option tuples such as pdrop's `layers=[2,4,6]`, or a method list `method=[visionzip,fastv]`),
`{...}` -> a dict (per-method options of a composition: `visionzip={"budget":128}`).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

import visprune
from visprune.errors import InputError, closest

DENSE = "none"
BUNDLED = "tiny-llava"

# The model's own settings (everything else is a method option); the README's table documents each.
SETTINGS: dict[str, str] = {
    "pretrained": "checkpoint folder or hub id (default: the bundled tiny-llava)",
    "method": "method name, 'none' (dense through visprune's path), or [encoder,llm] to compose two",
    "tokens": "visual tokens per image through the method's registered budget rule (as `visprune eval`)",
    "keep_positions": "visprune.apply's keep_positions",
    "tower_layer": "visprune.apply's tower_layer (Qwen-VL)",
    "compile_tower": "visprune.apply's compile_tower (Qwen-VL)",
    "device": "auto (default), cpu, cuda or cuda:N; one GPU per process under accelerate launch",
    "dtype": "auto (the checkpoint's; default on GPUs), float32 (default on the CPU), float16 or bfloat16",
    "attn_implementation": "transformers' attn_implementation (default: the model's, usually sdpa)",
    "batch_size": "prompts per generate call (lmms-eval's --batch_size)",
    "max_batch_size": "lmms-eval's --max_batch_size (only for --batch_size auto, which is not supported)",
    "record": "a JSON file the main process writes: method, options, tokens and prefill time per task",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class Settings:
    """What `--model_args` asked for: the model's settings and the method with its options (unbound)."""

    pretrained: str = BUNDLED
    method: str | tuple[str, ...] = DENSE
    options: dict[str, Any] = field(default_factory=dict)
    tokens: int | None = None
    keep_positions: bool = False
    tower_layer: int | None = None
    compile_tower: bool = False
    device: str = "auto"
    dtype: str | None = None
    attn_implementation: str | None = None
    batch_size: int = 1
    record: str | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        """The method names (one, or the composed ones)."""
        return (self.method,) if isinstance(self.method, str) else self.method

    def apply_kwargs(self) -> dict[str, Any]:
        """The keywords of `visprune.apply` besides the method and its options."""
        return {
            "keep_positions": self.keep_positions,
            "tower_layer": self.tower_layer,
            "compile_tower": self.compile_tower,
        }


def parse_value(value: Any) -> Any:
    """One model_args value: strings become None, tuples and dicts where they are written as such."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("None", "null"):
        return None
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return tuple(parse_value(_scalar(part)) for part in _split(inner)) if inner else ()
    if text.startswith("{") and text.endswith("}"):
        return _parse_dict(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _scalar(text: str) -> Any:
    """A list element: a bool, int or float where it reads as one, else the text (a name)."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split(text: str) -> list[str]:
    """`text` split at commas outside brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _parse_dict(text: str) -> dict[str, Any]:
    """A dict written as JSON or as a Python literal; lists inside become tuples (option tuples)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            example = '{"budget": 128}'
            raise InputError(f"cannot read {text!r} as a dict of options; write it as JSON, e.g. {example}") from err
    if not isinstance(data, dict):
        raise InputError(f"expected a dict of options, got {text!r}")
    return {str(k): _tuples(v) for k, v in data.items()}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"model_args {name}={value!r}: expected an integer >= {minimum}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"model_args {name}={value!r}: expected true or false")
    return value


def parse(model_args: dict[str, Any]) -> Settings:
    """Settings from lmms-eval's model_args (and its --batch_size / --device / --max_batch_size), checked:
    unknown keys, method names, option names and values raise InputError / UnknownMethodError."""
    raw = {k: parse_value(v) for k, v in model_args.items()}
    settings = Settings()
    method = raw.pop("method", DENSE)
    if isinstance(method, str):
        settings.method = method
    elif isinstance(method, tuple) and method and all(isinstance(m, str) for m in method):
        settings.method = method if len(method) > 1 else method[0]
    else:
        raise InputError(f"model_args method={method!r}: expected a method name or a list [encoder,llm]")
    for name in settings.methods:
        if name != DENSE:
            visprune.get_method(name)  # UnknownMethodError with the close names
    if raw.pop("max_batch_size", None) is not None:
        raise InputError("--max_batch_size is for --batch_size auto, which visprune's model does not support")
    if "pretrained" in raw:
        settings.pretrained = str(raw.pop("pretrained") or BUNDLED)
    if "batch_size" in raw:
        batch = raw.pop("batch_size")
        if isinstance(batch, str) and batch.startswith("auto"):
            raise InputError(f"--batch_size {batch} is not supported by visprune's model; give a number of prompts")
        if isinstance(batch, str) and batch.isdigit():
            batch = int(batch)
        settings.batch_size = _int("batch_size", batch, 1)
    if "tokens" in raw and raw["tokens"] is not None:
        settings.tokens = _int("tokens", raw["tokens"], 1)
    raw.pop("tokens", None)
    for name in ("keep_positions", "compile_tower"):
        if name in raw:
            setattr(settings, name, _bool(name, raw.pop(name)))
    if raw.get("tower_layer") is not None:
        settings.tower_layer = _int("tower_layer", raw["tower_layer"], 0)
    raw.pop("tower_layer", None)
    settings.device = str(raw.pop("device", None) or "auto")
    dtype = raw.pop("dtype", None)
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"model_args dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    settings.dtype = dtype
    for name in ("attn_implementation", "record"):
        value = raw.pop(name, None)
        setattr(settings, name, None if value is None else str(value))
    settings.options = raw
    check_options(settings)
    return settings


def check_options(settings: Settings) -> None:
    """The remaining keys must be options of the method (or, for a composition, one dict per method name);
    their values are checked by the registry as `visprune.apply` checks them."""
    names = settings.methods
    options = settings.options
    if len(names) > 1:
        if settings.tokens is not None:
            raise InputError(
                "tokens= budgets a single method; with several methods give each its own options, "
                f'e.g. {names[0]}={{"budget": 64}}'
            )
        accepted = set(names)
        _refuse_unknown(options, accepted, f"options of the composition {list(names)} (one dict per method)")
        for name in names:
            given = options.get(name, {})
            if not isinstance(given, dict):
                raise InputError(f"model_args {name}={given!r}: options for {name!r} must be a dict, e.g. {{...}}")
            visprune.get_method(name).bind(given, llm_layers=None, vision_layers=None)
        return
    (name,) = names
    if name == DENSE:
        _refuse_unknown(options, set(), "method 'none' takes no options")
        if settings.tokens is not None:
            raise InputError("tokens= budgets a method; method 'none' is the dense model and takes no budget")
        return
    spec = visprune.get_method(name)
    _refuse_unknown(options, set(spec.defaults), f"options of {name!r}: {', '.join(spec.defaults) or 'none'}")
    if settings.tokens is not None and spec.budget_rule is None:
        raise InputError(
            f"tokens={settings.tokens}: {name} is adaptive (it chooses each image's count) and takes no token budget"
        )
    spec.bind(options, llm_layers=None, vision_layers=None)


def _refuse_unknown(options: dict[str, Any], accepted: set[str], what: str) -> None:
    unknown = [k for k in options if k not in accepted]
    if unknown:
        hints = "".join(closest(k, [*SETTINGS, *accepted]) for k in unknown)
        raise InputError(
            f"unknown model_args key(s) {', '.join(map(repr, unknown))}.{hints} visprune's model takes "
            f"{', '.join(SETTINGS)}, and the method's options ({what})"
        )


def resolve(settings: Settings, model: Any) -> tuple[str | tuple[str, ...], dict[str, Any]]:
    """(method, options) for `visprune.apply` on the loaded `model`: the given options, plus with `tokens=B`
    those of the method's registered budget rule (`visprune.budgets.options_for_budget`) against the
    most visual tokens one image of this model can have (576 on LLaVA-1.5) and its LLM depth."""
    if settings.tokens is None:
        return settings.method, dict(settings.options)
    from visprune.budgets import options_for_budget
    from visprune.models import adapter_for

    (name,) = settings.methods
    adapter = adapter_for(model)
    dense = adapter.max_visual_tokens
    if dense is None:
        raise InputError(
            f"tokens= budgets against a fixed number of visual tokens per image, and {type(model).__name__} takes "
            "images of any size; give the method's own options instead (e.g. budget=128 for fastervlm)"
        )
    budgeted = options_for_budget(name, settings.tokens, dense, len(adapter.decoder_layers))
    clash = sorted(set(budgeted) & set(settings.options))
    if clash:
        raise InputError(
            f"tokens={settings.tokens} sets {', '.join(clash)} for {name}; give either tokens= or {', '.join(clash)}="
        )
    return name, {**budgeted, **settings.options}
