"""The operating point of knee+text (Yu, Chen & Xu, arXiv 2409.01162) on the synthetic suite.

The paper keeps about 22% of the visual tokens on average (over the LLM's layers) at accuracy close to
the dense model's. This runs knee and knee+text with each first-stage score (CLS attention,
`signal="cls"`; CLS-patch cosine similarity, `signal="cosine"`), each knee detector, and each
text-stage cut rule (its knee, a ratio of 0.5 or 0.25), on validation items by default (no test item is
looked at), and writes, per setting, the accuracy relative to dense, the visual tokens entering the
LLM and the visual tokens averaged over the LLM's layers (as shares of the 576 dense tokens):

    python scripts/knee_operating_point.py --limit 336 --out docs/results/knee-operating-point

Defaults are chosen from this table; the chosen settings are then measured once on the test split
(`--split test --only '[["knee+text", {...}], ...]'`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from visprune import bundled
from visprune.eval.synth import EvalConfig, Runner
from visprune.methods import get_method

STAGE1 = [
    {"signal": signal, "detector": detector}
    for signal in ("cls", "cosine")
    for detector in ("kneedle", "max-gap", "max-curvature")
]
TEXT_RULES = [{"text_keep_ratio": None}, {"text_keep_ratio": 0.5}, {"text_keep_ratio": 0.25}]


def settings() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("knee", s) for s in STAGE1]
    out += [("knee+text", {**s, **rule}) for s in STAGE1 for rule in TEXT_RULES]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--limit", type=int, default=336)
    parser.add_argument("--out", default="knee-operating-point")
    parser.add_argument("--only", default=None, help="JSON list of [method, options] to run instead of the grid")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    runner = Runner(EvalConfig(model=bundled.BUNDLED_NAME, split=args.split, limit=args.limit), device=args.device)
    grid = [tuple(x) for x in json.loads(args.only)] if args.only else settings()
    t0 = time.perf_counter()
    dense = runner.run_cell("none", None)
    rows = []
    for method, options in grid:
        cell = runner.run_cell(method, None, extra=options)
        n = runner.n_visual
        rows.append(
            {
                "method": method,
                "options": options,
                "accuracy": cell["accuracy"]["overall"],
                "relative": cell["accuracy"]["overall"] / dense["accuracy"]["overall"],
                "tokens_llm_share": cell["visual_tokens_llm"] / n,
                "tokens_per_layer_share": cell["visual_tokens_per_layer"] / n,
                "families": cell["accuracy"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "split": args.split,
        "limit": args.limit,
        "dense_accuracy": dense["accuracy"]["overall"],
        "seconds": round(time.perf_counter() - t0, 1),
        "device": str(runner.device),
        "rows": rows,
    }
    (out / f"{args.split}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"knee / knee+text on {args.limit} {args.split} items (dense accuracy {100 * result['dense_accuracy']:.1f}%)",
        "",
        "| method | signal | detector | text cut | accuracy | vs dense | tokens into LLM | tokens per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = {**get_method(r["method"]).defaults, **r["options"]}  # what ran: the options given over the defaults
        cut = (
            "-"
            if r["method"] == "knee"
            else ("knee" if o.get("text_keep_ratio") is None else f"ratio {o['text_keep_ratio']}")
        )
        lines.append(
            f"| {r['method']} | {o['signal'] or 'default'} | {o['detector']} | {cut} "
            f"| {100 * r['accuracy']:.1f}% | {100 * r['relative']:.1f}% | {100 * r['tokens_llm_share']:.1f}% "
            f"| {100 * r['tokens_per_layer_share']:.1f}% |"
        )
    (out / f"{args.split}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
