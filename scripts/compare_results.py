"""Item-by-item comparison of two `visprune eval` results.json files: the same items, and in every cell the
same predictions, correct counts and visual-token counts (e.g. one process against several under
`accelerate launch`). Exits 1 if anything differs.

    python scripts/compare_results.py one/results.json two/results.json
"""

from __future__ import annotations

import json
import sys

FIELDS = ("predictions", "correct", "visual_tokens_in", "visual_tokens_llm", "visual_tokens_per_layer")


def main(first: str, second: str) -> int:
    with open(first) as f1, open(second) as f2:
        a, b = json.load(f1), json.load(f2)
    if (a["config"], a["items"]) != (b["config"], b["items"]):
        print(
            f"the two runs evaluated different items: {a['config']} ({a['items']}) against {b['config']} ({b['items']})"
        )
        return 1
    differing = []
    for name in sorted(set(a["cells"]) | set(b["cells"])):
        one, two = a["cells"].get(name), b["cells"].get(name)
        if one is None or two is None:
            differing.append(f"{name}: only in {'the second' if one is None else 'the first'} run")
            continue
        fields = [k for k in FIELDS if one.get(k) != two.get(k)]
        if fields:
            differing.append(f"{name}: {', '.join(fields)} differ")
    predictions = sum(len(c.get("predictions", [])) for c in a["cells"].values())
    print(f"{len(a['cells'])} cells, {a['items']} items, {predictions} predictions; {len(differing)} cells differ")
    for line in differing:
        print("  " + line)
    return 1 if differing else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
