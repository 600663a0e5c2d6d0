"""The `visprune` command line. Each subcommand is a small function here; the work lives in the
library modules it calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import visprune


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: what was wrong and where the help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _share(text: str) -> float:
    """An argparse type: a share of an image's visual tokens, 0 < share <= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _format_default(value: object) -> str:
    return "None" if value is None else repr(value) if isinstance(value, str) else str(value)


def cmd_methods(args: argparse.Namespace) -> int:
    """Print the method table: name, where it acts, adaptive or fixed, description, options."""
    specs = visprune.list_methods()
    if args.verbose:
        print("Options are keyword arguments of visprune.apply(model, name, option=value); defaults shown.")
        print()
        for spec in specs:
            print(f"{spec.name}  [{spec.placement.value}, {'adaptive' if spec.adaptive else 'fixed'}]")
            print(f"    {spec.description}")
            for name, default in spec.defaults.items():
                print(f"    {name}={_format_default(default)}  {spec.param_docs.get(name, '')}")
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as err:
        raise visprune.InputError(f"--tokens-per-layer must be comma-separated integers, got {text!r}") from err


def cmd_flops(args: argparse.Namespace) -> int:
    """Print analytic FLOPs / memory / roofline for a config next to the dense (unreduced) run."""
    import json

    from visprune import flops

    per_layer = _int_list(args.tokens_per_layer) if args.tokens_per_layer else None
    common = {
        "text_tokens": args.text_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "dtype": args.dtype,
        "images": args.images,
        "causal": not args.no_causal,
        "lm_head_all_tokens": args.lm_head_all_tokens,
        "count_unused_vision_layers": args.all_vision_layers,
        "gpu": args.gpu,
        "peak_tflops": args.peak_tflops,
        "bandwidth_gbs": args.bandwidth_gbs,
    }
    est = flops.estimate(args.config, args.visual_tokens, llm_tokens_per_layer=per_layer, **common)
    dense = flops.estimate(args.config, None, **common)
    if args.json:
        out, ref = est.to_dict(), dense.to_dict()
        ratio = {k: (v / ref["flops"][k] if ref["flops"][k] else 1.0) for k, v in out["flops"].items()}
        print(json.dumps({"estimate": out, "dense": ref, "ratio_vs_dense": ratio}, indent=2))
    else:
        print(flops.format_comparison(est, dense))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the speed benchmark and write JSON, Markdown and a plot to --out."""
    import json
    from pathlib import Path

    from visprune.bench import BenchConfig, run_benchmark
    from visprune.bench.report import markdown, plot

    device = _device(args.device)
    cfg = BenchConfig(
        config=args.config,
        pretrained=args.model,
        batches=tuple(args.batch),
        budgets=tuple(args.budgets or BenchConfig.budgets),
        budget_shares=tuple(args.budget_shares or ()),
        image_sizes=tuple(args.image_size or ()),
        methods=tuple(args.methods or ()),
        repeats=args.repeats,
        warmup=args.warmup,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        decode_runs=args.decode_runs,
        dtype=args.dtype,
        device=device,
        graph=not args.no_graph,
        materialize=not args.no_materialize,
        tower_layer=args.tower_layer,
        compile_tower=args.compile_tower,
        launch_free=args.launch_free,
    )
    out = Path(args.out)
    stem = args.name or f"bench-{Path(cfg.pretrained or cfg.config).name}"

    def save(results: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        (out / f"{stem}.md").write_text(markdown(results))

    results = run_benchmark(cfg, progress=not args.quiet, on_update=save)
    save(results)
    plot(results, out / f"{stem}.png")
    print(markdown(results))
    return 0


def _methods_arg(names: list[str] | None) -> list[str] | None:
    """Validate method names (comma- or space-separated); None stays None."""
    if names is None:
        return None
    out = [n for chunk in names for n in chunk.split(",") if n]
    for name in out:
        if name != "none":
            visprune.get_method(name)
    return out


def _device(name: str | None) -> str:
    """The device to run on ('auto': CUDA when available); one this machine lacks raises InputError."""
    from visprune import bundled

    return bundled.resolve_device(name)


def cmd_demo(args: argparse.Namespace) -> int:
    """Answer a few synthetic questions with the dense model and with several methods; write a PNG."""
    from visprune.demo import DEMO_METHODS, run_demo

    methods = _methods_arg(args.methods) or list(DEMO_METHODS)
    if "none" not in methods:
        methods.insert(0, "none")
    device = _device(args.device)
    run_demo(model=args.model, out=args.out, methods=tuple(methods), device=device)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy of every method x budget on the synthetic suite (resumable); JSON, Markdown and a plot."""
    import shlex
    from pathlib import Path

    from visprune import bundled
    from visprune.eval import EvalConfig, evaluate, parallel, write_reports
    from visprune.eval.synth import all_methods

    if args.task != "synth":
        raise visprune.InputError(f"unknown task {args.task!r}; available: synth")
    model = bundled.resolve(args.model)
    cfg = EvalConfig(
        model=bundled.BUNDLED_NAME if args.model in (None, bundled.BUNDLED_NAME) else model,
        split=args.split,
        limit=args.limit,
        offset=args.offset,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        methods=_methods_arg(args.methods) or all_methods(),
        budgets=list(args.budgets),
        keep_positions=args.keep_positions,
    )
    out = Path(args.out)
    results = evaluate(cfg, out, device=_device(args.device), progress=not args.quiet)
    if not parallel.current().is_main:  # under `accelerate launch` the main process writes and reports
        return 0
    command = "visprune " + " ".join(shlex.quote(a) for a in args.argv)
    paths = write_reports(results, out, command=command)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_lmms_task(args: argparse.Namespace) -> int:
    """Write the synthetic suite as a local lmms-eval task: the rendered items and the task's YAML."""
    import shlex
    from pathlib import Path

    from visprune.lmms.synth_task import TASK, write_task

    paths = write_task(Path(args.out), split=args.split, limit=args.limit, offset=args.offset)
    print(f"wrote {paths['data']} and {paths['yaml']}; run it with")
    print(
        "  lmms-eval --model visprune --model_args pretrained=tiny-llava,method=prumerge+,device=cpu "
        f"--include_path {shlex.quote(args.out)} --tasks {TASK} --batch_size 32"
    )
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    """Each method's kept / merged tokens on one image, and the CLS-attention curve with fence and knee."""
    from visprune.viz import DEFAULT_QUESTION, VIZ_METHODS, run_viz

    methods = _methods_arg(args.methods) or list(VIZ_METHODS)
    path = run_viz(
        args.image,
        model=args.model,
        methods=methods,
        question=args.question or DEFAULT_QUESTION,
        out=args.out,
        device=_device(args.device),
    )
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="visprune", description=(visprune.__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=f"visprune {visprune.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the reduction methods, their placement and options")
    p.add_argument("-v", "--verbose", action="store_true", help="one block per method with every option's doc")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("flops", help="analytic FLOPs / memory / roofline of a model config, reduced vs dense")
    p.add_argument("--config", default="llava-1.5-7b", help="bundled name (llava-1.5-7b, llava-1.5-13b) or config path")
    p.add_argument("--visual-tokens", type=int, default=None, help="visual tokens per sequence (default: dense)")
    p.add_argument("--text-tokens", type=int, default=50, help="text tokens per sequence in the prompt")
    p.add_argument("--new-tokens", type=int, default=0, help="tokens generated (max_new_tokens)")
    p.add_argument("--batch", type=int, default=1, help="sequences per call")
    p.add_argument("--images", type=int, default=1, help="images per sequence")
    p.add_argument("--tokens-per-layer", default=None, help="comma-separated tokens (visual+text) at each LLM layer")
    p.add_argument("--dtype", default="float16", help="weight / activation / cache dtype")
    p.add_argument("--gpu", default=None, help="roofline preset: h100-sxm or h200")
    p.add_argument("--peak-tflops", type=float, default=None, help="roofline peak compute (overrides --gpu)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="roofline memory bandwidth (overrides --gpu)")
    p.add_argument("--no-causal", action="store_true", help="count full S^2 attention instead of S(S+1)/2")
    p.add_argument("--lm-head-all-tokens", action="store_true", help="run the lm_head on every prefill token")
    p.add_argument(
        "--all-vision-layers", action="store_true", help="count vision layers after vision_feature_layer (HF runs them)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_flops)
    p = sub.add_parser("bench", help="measure prefill / decode speed of every method vs dense and ideal (GPU)")
    p.add_argument("--config", default="llava-1.5-7b", help="bundled architecture name or a config path")
    p.add_argument("--model", default=None, help="benchmark a local checkpoint folder instead of a config")
    p.add_argument("--batch", type=_at_least(1), nargs="+", default=[1, 16])
    budgets = p.add_mutually_exclusive_group()
    budgets.add_argument(
        "--budgets", type=_at_least(1), nargs="+", default=None, help="visual tokens per image (default 64 128 192)"
    )
    budgets.add_argument(
        "--budget-shares",
        type=_share,
        nargs="+",
        default=None,
        help="budgets as shares of each image's visual tokens, e.g. 0.25 0.125 0.0625 (Qwen-VL)",
    )
    p.add_argument(
        "--image-size",
        type=_at_least(1),
        nargs="+",
        default=None,
        help="square image sides in pixels (Qwen-VL: multiples of 28, default 448 1008; LLaVA: its own size)",
    )
    p.add_argument(
        "--methods", nargs="+", default=None, help="default: every registered method ('none': visprune's dense path)"
    )
    p.add_argument(
        "--tower-layer",
        type=_at_least(1),
        default=None,
        help="also run every encoder-side method reducing inside the vision tower at this block (Qwen-VL)",
    )
    p.add_argument(
        "--compile-tower",
        action="store_true",
        help="run every patched case with apply(..., compile_tower=True) and time the compiled tower (Qwen-VL)",
    )
    p.add_argument(
        "--launch-free",
        action="store_true",
        help="time generate end to end (TTFT, 64 new tokens, decode tok/s): plain vs apply(..., launch_free=True) "
        "vs its ideal, for dense and every encoder-side method (GPU; LLaVA)",
    )
    p.add_argument("--repeats", type=_at_least(1), default=20)
    p.add_argument("--warmup", type=_at_least(0), default=3)
    p.add_argument(
        "--rounds",
        type=_at_least(1),
        default=1,
        help="time each patched prefill and its ideal (with --launch-free: the launch-free TTFT and its ideal's) "
        "in this many alternating passes, pooled (a drift of the machine between passes then cancels out of the "
        "efficiency)",
    )
    p.add_argument("--new-tokens", type=_at_least(1), default=64)
    p.add_argument("--decode-runs", type=_at_least(0), default=2, help="generations whose decode steps are timed")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-graph", action="store_true", help="skip the batch-1 CUDA-graph mode")
    p.add_argument("--no-materialize", action="store_true", help="skip the attention-materialising variants")
    p.add_argument(
        "--out", default="bench-results", help="folder for the JSON, Markdown and PNG (default: ./bench-results)"
    )
    p.add_argument("--name", default=None, help="file stem (default bench-<config>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("demo", help="the bundled tiny LLaVA answers synthetic questions, dense and pruned (CPU)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the bundled tiny-llava)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods to compare (default: prumerge, prumerge+, knee+text, visionzip; dense always runs)",
    )
    p.add_argument("--out", default="visprune-demo.png", help="PNG with each method's kept tokens")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="accuracy of every method x budget on the synthetic suite, relative to dense")
    p.add_argument("--task", default="synth", help="benchmark (synth: the synthetic VQA suite)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the bundled tiny-llava)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method (dense always runs)")
    p.add_argument(
        "--budgets", type=_at_least(1), nargs="+", default=[32, 64, 128, 192], help="budgets for fixed methods"
    )
    p.add_argument("--split", default="test", choices=["val", "test", "train"])
    p.add_argument("--limit", type=_at_least(1), default=None, help="first N items of the split (default: all 1008)")
    p.add_argument("--offset", type=_at_least(0), default=0, help="first item index")
    p.add_argument("--batch-size", type=_at_least(1), default=32)
    p.add_argument("--max-new-tokens", type=_at_least(1), default=4)
    p.add_argument(
        "--keep-positions", action="store_true", help="encoder-side methods keep dense position ids (apply option)"
    )
    p.add_argument("--out", default="eval-results", help="folder for results.json / results.md / the plot")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "lmms-task", help="write the synthetic suite as a local lmms-eval task (visprune_synth; needs visprune[lmms])"
    )
    p.add_argument("--out", default="visprune-lmms-task", help="folder for visprune_synth.parquet and its YAML")
    p.add_argument("--split", default="test", choices=["val", "test", "train"])
    p.add_argument("--limit", type=_at_least(1), default=None, help="first N items of the split (default: all 1008)")
    p.add_argument("--offset", type=_at_least(0), default=0, help="first item index")
    p.set_defaults(func=cmd_lmms_task)
    p = sub.add_parser("viz", help="draw each method's kept / merged tokens and the CLS-attention cuts on an image")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the bundled tiny-llava)")
    p.add_argument(
        "--methods", nargs="+", default=None, help="default: prumerge prumerge+ knee visionzip fastervlm pool"
    )
    p.add_argument("--question", default=None, help="prompt question (matters for LLM-side methods)")
    p.add_argument("--out", default="visprune-viz.png", help="output PNG")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.set_defaults(func=cmd_viz)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `visprune` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except visprune.VisPruneError as err:
        print(f"visprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
