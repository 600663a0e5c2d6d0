"""Benchmark results as Markdown tables and a plot of prefill time against visual tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visprune.bench import launch_free


def _ms(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    return f"{t['median_ms']:.2f} [{t['min_ms']:.2f}-{t['max_ms']:.2f}]"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _method(r: dict[str, Any]) -> str:
    """The method cell: the name ('dense' = the unpatched model, 'none' = visprune's dense path), with the
    vision block it reduces at when it reduces inside the tower."""
    layer = (r.get("options") or {}).get("tower_layer")
    return r["method"] if layer is None else f"{r['method']} @ block {layer}"


def _budget(r: dict[str, Any]) -> str:
    """The budget cell: '-' for dense, 'adaptive', tokens, or tokens (share %) when given as a share."""
    if r["method"] in ("dense", "none"):
        return "-"
    if r["budget"] is None:
        return "adaptive"
    return f"{r['budget']} ({100 * r['share']:g}%)" if r.get("share") is not None else str(r["budget"])


def _run_title(run: dict[str, Any]) -> str:
    size = run.get("image_size")
    image = f", {size}x{size} px images ({run['dense_visual_tokens']} visual tokens each)" if size else ""
    return f"batch {run['batch']}{image}"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# visprune bench: {results['model']['config']}",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
    ]
    cfg = results["config"]
    rounds = cfg.get("rounds", 1)
    if not cfg.get("launch_free"):  # the launch-free tables state their own timing
        pooled = _pooled("patched prefill and ideal", "alternating passes of that", rounds, cfg["repeats"])
        lines.append(
            f"Timing: median [min-max] of {cfg['repeats']} repeats after {cfg['warmup']} warm-ups{pooled} "
            "(CUDA events). prefill = patched forward from pixels to the first token's logits (TTFT "
            "without sampling); ideal = the same pipeline fed the same token counts with first-K selection; "
            "efficiency = ideal / prefill; speed-up = dense / prefill; decode tok/s = batch / median decoder "
            f"step over {cfg.get('decode_runs', 1)} generations of {cfg['new_tokens']} new tokens."
        )
    lines.append("")
    for run in results["runs"]:
        if "launch_free_cases" in run:
            lines += _launch_free_table(run, rounds)
            continue
        lines += [
            f"## {_run_title(run)} ({run['text_tokens']} text tokens per sample)",
            "",
            "| method | budget | visual tokens | mean LLM tokens | vision ms | reduce ms | prefill ms | ideal ms "
            "| efficiency | speed-up | decode tok/s | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in run["cases"]:
            if "error" in r:
                lines.append(f"| {_method(r)} | {_budget(r)} | error: {r['error']} |||||||||")
                continue
            lines.append(
                f"| {_method(r)} | {_budget(r)} "
                f"| {r['visual_tokens']:.1f} | {_num(r.get('mean_llm_tokens'), '{:.1f}')} "
                f"| {_ms(r.get('vision'))} | {_ms(r.get('reduce'))} | {_ms(r['prefill'])} | {_ms(r.get('ideal'))} "
                f"| {_num(r.get('efficiency'), '{:.3f}')} | {_num(r.get('speedup'))} "
                f"| {_num(r.get('decode_tokens_per_s'), '{:.1f}')} | {_num(r.get('peak_memory_gib'))} |"
            )
        tower = run.get("tower")
        if tower:
            lines += ["", "Vision tower alone, dense (transformers' forward against visprune's runner):", ""]
            if "error" in tower:
                lines.append(f"error: {tower['error']}")
            else:
                lines += [
                    "| tower | ms | speed-up | max relative difference |",
                    "|---|---|---|---|",
                    f"| stock | {_ms(tower['stock'])} | 1.00 | - |",
                    f"| visprune | {_ms(tower['visprune'])} | {tower['speedup']:.2f} | {tower['max_rel_diff']:.2e} |",
                ]
                if "compiled" in tower:
                    lines.append(
                        f"| visprune, compile_tower | {_ms(tower['compiled'])} | {tower['compiled_speedup']:.2f} "
                        f"| {tower['compiled_max_rel_diff']:.2e} |"
                    )
        if run.get("materialized"):
            lines += [
                "",
                "Attention-materialising variants (eager attention returning the maps, as the published code "
                "does) against visprune's SDPA-compatible path:",
                "",
                "| method | budget | where | visprune path ms | materialising ms | ratio |",
                "|---|---|---|---|---|---|",
            ]
            for m in run["materialized"]:
                if "error" in m:
                    lines.append(f"| {m['method']} | - | error: {m['error']} ||||")
                    continue
                lines.append(
                    f"| {m['method']} | {m['budget']} | {m['where']} | {_ms(m['sdpa_path'])} "
                    f"| {_ms(m['materializing'])} | {m['ratio']:.2f} |"
                )
        if run.get("graph"):
            lines += [
                "",
                "Launch overhead removed (CUDA graphs for the vision tower and the LLM prefill at the measured "
                "token count; the reduction timed plainly):",
                "",
                "| method | budget | LLM tokens | vision ms | reduce ms | LLM ms | prefill ms |",
                "|---|---|---|---|---|---|---|",
            ]
            for g in run["graph"]:
                if "prefill_graph_ms" not in g:
                    lines.append(f"| {g['method']} | {g['budget']} | {g.get('skipped') or g.get('error')} |||||")
                    continue
                lines.append(
                    f"| {g['method']} | {g['budget']} | {g['llm_tokens']} | {g['vision_graph_ms']:.2f} "
                    f"| {g['reduce_ms']:.2f} | {g['llm_graph_ms']:.2f} | {g['prefill_graph_ms']:.2f} |"
                )
        lines.append("")
    if results.get("not_measured"):
        lines += ["Not measured:", ""] + [f"- {part}: {why}" for part, why in results["not_measured"].items()] + [""]
    if results.get("skipped"):
        lines += ["Skipped:", ""]
        for s in results["skipped"]:
            where = f" ({s['image_size']} px images)" if "image_size" in s else ""
            lines.append(f"- {s['method']} @ {s['budget']}{where}: {s['reason']}")
    return "\n".join(lines) + "\n"


def _pooled(timed: str, passes: str, rounds: int, repeats: int) -> str:
    """What a timing line adds for `--rounds`: which timings were pooled over how many passes."""
    if rounds <= 1:
        return ""
    return f" ({timed}: {rounds} {passes}, pooled: {rounds * repeats} samples each)"


def _launch_free_table(run: dict[str, Any], rounds: int = 1) -> list[str]:
    """The launch-free mode's table: TTFT / end to end / decode per mode, speed-ups, efficiency, capture cost."""
    pooled = _pooled(
        "launch-free and ideal TTFT of patched cases", "alternating passes", rounds, launch_free.TTFT_REPEATS
    )
    lines = [
        f"## Launch-free generate, {_run_title(run)} ({run['text_tokens']} text tokens per sample)",
        "",
        f"Timing: median [min-max] wall time (device synchronised) of {launch_free.TTFT_REPEATS} repeats for TTFT "
        f"and {launch_free.E2E_REPEATS} for e2e, after warm-up{pooled}. TTFT = wall time of "
        "generate(max_new_tokens=1); e2e = generate with the new tokens; decode tok/s = "
        "batch x (new tokens - 1) / (e2e - TTFT); ideal = the launch-free path with the same token counts and "
        "first-K selection; efficiency = ideal TTFT / launch-free TTFT; capture = the first call's wall time "
        "(graphs captured, cache allocated).",
        "",
        "| method | budget | visual tokens | plain TTFT ms | launch-free TTFT ms | ideal TTFT ms | efficiency "
        "| x plain dense | x launch-free dense | plain e2e ms | launch-free e2e ms | plain decode tok/s "
        "| launch-free decode tok/s | capture s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run["launch_free_cases"]:
        if "error" in r:
            lines.append(f"| {_method(r)} | {_budget(r)} | error: {r['error']} ||||||||||||")
            continue
        plain, free, ideal = r["plain"], r["launch_free"], r.get("ideal")
        lines.append(
            f"| {_method(r)} | {_budget(r)} | {free.get('visual_tokens', '-')} | {_ms(plain['ttft'])} "
            f"| {_ms(free['ttft'])} | {_ms(ideal['ttft']) if ideal else '-'} | {_num(r.get('efficiency'), '{:.3f}')} "
            f"| {_num(r.get('ttft_speedup_vs_plain_dense'))} | {_num(r.get('ttft_speedup_vs_launch_free_dense'))} "
            f"| {_ms(plain['e2e'])} | {_ms(free['e2e'])} | {plain['decode_tokens_per_s']:.1f} "
            f"| {free['decode_tokens_per_s']:.1f} | {free['first_call_s']:.2f} |"
        )
    return [*lines, ""]


def plot(results: dict[str, Any], path: Path) -> None:
    """Prefill time vs visual tokens, one panel per batch size, with the dense point and ideal curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        if "launch_free_cases" in run:
            _plot_launch_free(ax, run, results)
            continue
        ok = [r for r in run["cases"] if "prefill" in r]
        ideal = sorted((r["visual_tokens"], r["ideal"]["median_ms"]) for r in ok if "ideal" in r)
        if ideal:
            ax.plot(*zip(*ideal, strict=True), color="0.6", ls="--", label="ideal (same tokens, no selection)")
        for method in dict.fromkeys(r["method"] for r in ok):
            pts = sorted((r["visual_tokens"], r["prefill"]["median_ms"]) for r in ok if r["method"] == method)
            marker = "*" if method == "dense" else "o"
            ax.plot(*zip(*pts, strict=True), marker=marker, ms=9 if method == "dense" else 5, label=method)
        ax.set_xlabel("visual tokens to the LLM (per image)")
        ax.set_ylabel("prefill (TTFT) ms, median")
        ax.set_title(f"{results['model']['config']}, {_run_title(run)}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_launch_free(ax: Any, run: dict[str, Any], results: dict[str, Any]) -> None:
    """TTFT vs visual tokens, plain and launch-free, with the launch-free ideal."""
    ok = [r for r in run["launch_free_cases"] if "error" not in r]
    for mode, style in (("plain", "o"), ("launch_free", "s")):
        pts = sorted((r["launch_free"]["visual_tokens"], r[mode]["ttft"]["median_ms"]) for r in ok)
        ax.plot(*zip(*pts, strict=True), style, ms=4, label=mode.replace("_", "-"))
    ideal = sorted((r["launch_free"]["visual_tokens"], r["ideal"]["ttft"]["median_ms"]) for r in ok if "ideal" in r)
    if ideal:
        ax.plot(*zip(*ideal, strict=True), color="0.6", ls="--", label="ideal (launch-free, no selection)")
    ax.set_xlabel("visual tokens to the LLM (per image)")
    ax.set_ylabel("TTFT ms (generate, 1 new token), median")
    ax.set_title(f"{results['model']['config']}, launch-free, {_run_title(run)}", fontsize=9)
    ax.grid(alpha=0.3)
