"""The `visprune` command line. Each subcommand is a small function here; the work lives in the
library modules it calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import visprune


def _format_default(value: object) -> str:
    return "None" if value is None else repr(value) if isinstance(value, str) else str(value)


def cmd_methods(args: argparse.Namespace) -> int:
    """Print the method table: name, where it acts, adaptive or fixed, description, options."""
    specs = visprune.methods()
    if args.verbose:
        for spec in specs:
            print(f"{spec.name}  [{spec.placement.value}, {'adaptive' if spec.adaptive else 'fixed'}]")
            print(f"    {spec.description}")
            for name, default in spec.defaults.items():
                print(f"    --{name}={_format_default(default)}  {spec.param_docs.get(name, '')}")
            print()
        return 0
    rows = [("method", "acts on", "count", "description", "options (defaults)")]
    for spec in specs:
        opts = ", ".join(f"{k}={_format_default(v)}" for k, v in spec.defaults.items())
        rows.append((spec.name, spec.placement.value, "adaptive" if spec.adaptive else "fixed", spec.description, opts))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="visprune", description=visprune.__doc__)
    parser.add_argument("--version", action="version", version=f"visprune {visprune.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the reduction methods, their placement and options")
    p.add_argument("-v", "--verbose", action="store_true", help="one block per method with every option's doc")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `visprune` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except visprune.VisPruneError as err:
        print(f"visprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
