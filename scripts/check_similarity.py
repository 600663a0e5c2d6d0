"""GPU check: the diversity methods' selections with `visprune.methods.similarity` (half-precision rows
multiplied on the tensor cores with float32 results, scaled by inverse norms) against the same selections
with every similarity computed in float64, and against the former float32 path (unit rows multiplied in
float32). Qwen2.5-VL-7B shapes at 1008 px batch 8 (1296 tokens per image; features 5120 wide, projected
tokens 3584), bf16, on random features and on clustered ones (40 centres per image plus noise, so that
near-duplicates exist). Prints, per method and budget, the largest similarity error against float64 and
how many of the kept tokens each path shares with the float64 selection, image by image. Needs CUDA.

    python scripts/check_similarity.py > similarity-check.txt
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from visprune.methods import cdpruner, divprune, get_method, graphs, scope, similarity, vispruner

MODULES = (cdpruner, divprune, scope, vispruner)
BUDGETS = (324, 162, 81)


def _in(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cosine similarity of unit rows multiplied in `dtype`, returned in that dtype."""

    def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.to(dtype), dim=-1) @ F.normalize(y.to(dtype), dim=-1).transpose(1, 2)

    return cosine


@contextmanager
def similarity_in(cosine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """Every method computes its similarities with `cosine` (None: the library's), plain loops."""
    saved = [(m, m.__dict__.get("pairwise_cosine"), m.__dict__.get("cosine_similarity")) for m in MODULES]
    if cosine is not None:
        for m, _, _ in saved:
            m.pairwise_cosine = lambda x, c=cosine: c(x, x)
            m.cosine_similarity = cosine
    graphs.ENABLED, graphs.FUSE = cosine is None, cosine is None
    try:
        yield
    finally:
        for m, pair, cross in saved:
            m.pairwise_cosine = pair
            if cross is None:  # the module does not import it: drop what was set above
                m.__dict__.pop("cosine_similarity", None)
            else:
                m.cosine_similarity = cross
        graphs.ENABLED, graphs.FUSE = True, True


def inputs(kind: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    def tokens(width: int) -> torch.Tensor:
        if kind == "random":
            return torch.randn(8, 1296, width, device="cuda", generator=g)
        centres = torch.randn(8, 40, width, device="cuda", generator=g)
        pick = torch.randint(0, 40, (8, 1296), device="cuda", generator=g)
        return centres.gather(1, pick.unsqueeze(-1).expand(-1, -1, width)) + 0.5 * torch.randn(
            8, 1296, width, device="cuda", generator=g
        )

    return {
        "features": tokens(5120).bfloat16(),
        "projected": tokens(3584).bfloat16(),
        "prompt": torch.randn(8, 3584, device="cuda", generator=g),
        "cls_attn": torch.rand(8, 1296, device="cuda", generator=g).softmax(-1),
    }


SIGNALS = {
    "vispruner": ("cls_attn",),
    "scope": ("cls_attn",),
    "divprune": ("projected",),
    "cdpruner": ("projected", "prompt"),
}


def kept(name: str, data: dict[str, torch.Tensor], budget: int) -> list[set[int]]:
    extra = {k: data[k] for k in SIGNALS[name]}
    return [set(r.sources.tolist()) for r in get_method(name).fn(data["features"], budget=budget, **extra)]


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    for kind in ("random", "clustered"):
        data = inputs(kind, g)
        x = data["features"]
        exact = _in(torch.float64)(x, x)
        for label, got in (("library", similarity.pairwise_cosine(x)), ("float32 unit rows", _in(torch.float32)(x, x))):
            print(
                f"{kind}: features similarity, {label}: max |error| vs float64 {(got.double() - exact).abs().max():.2e}"
            )
        del exact
        for name in SIGNALS:
            for budget in BUDGETS:
                with similarity_in(_in(torch.float64)):
                    reference = kept(name, data, budget)
                row = []
                for label, cosine in (("library", None), ("float32 unit rows", _in(torch.float32))):
                    with similarity_in(cosine):
                        shared = [len(a & b) for a, b in zip(kept(name, data, budget), reference, strict=True)]
                    row.append(f"{label} {shared}")
                print(f"{kind} {name} {budget}: shared with float64: " + "; ".join(row), flush=True)


if __name__ == "__main__":
    main()
