"""GPU check: the launch-free path (CUDA graphs, static cache, bucketed prompts) gives the plain path's
greedy answers on the trained bundled model, item by item, for dense and several encoder-side methods.
Needs CUDA (off the GPU the same equality is a unit test: tests/models/test_launch_free.py).

    python scripts/launch_free_equality.py --dtype float16 --items 168
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import visprune
from visprune import bundled
from visprune.eval.synth import budget_options
from visprune.synth import load_split

CASES = [
    ("none", None),
    ("fastervlm", 32),
    ("visionzip", 32),
    ("tome", 32),
    ("prumerge+", None),
    ("knee", None),
    ("divprune", 32),
    ("cdpruner", 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--items", type=int, default=168, help="first items of the test split")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model, processor = bundled.load(device="cuda", dtype=dtype)
    vision = model.config.vision_config
    n_visual = (vision.image_size // vision.patch_size) ** 2
    n_layers = model.config.text_config.num_hidden_layers
    inputs = []
    for item in load_split("test", args.items):
        x = dict(processor(images=[item.image()], text=[item.prompt()], return_tensors="pt").to("cuda"))
        x["pixel_values"] = x["pixel_values"].to(dtype)
        inputs.append(x)
    for method, budget in CASES:
        options = {} if method == "none" else budget_options(method, budget, n_visual, n_layers)
        answers = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for launch_free in (False, True):
                handle = visprune.apply(model, method, keep_positions=True, launch_free=launch_free, **options)
                try:
                    with torch.inference_mode():
                        answers[launch_free] = [
                            model.generate(**x, max_new_tokens=args.new_tokens, do_sample=False)[
                                0, x["input_ids"].shape[1] :
                            ]
                            for x in inputs
                        ]
                    pieces = sorted({c["piece"] for c in handle.launch_free.captures}) if launch_free else []
                finally:
                    visprune.remove(model)
        same = sum(torch.equal(a, b) for a, b in zip(answers[False], answers[True], strict=True))
        result = {"items": len(inputs), "identical_answers": same, "captured": pieces}
        result["warnings"] = sorted({str(w.message)[:200] for w in caught})
        print(method, budget, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
