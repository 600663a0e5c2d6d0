"""The benchmark loop: dense, every method x budget, their ideals, decode, memory, graph mode and the
attention-materialising variants, all in one run on one model, for every image size and batch size.

Families (bench/model.py): LLaVA-1.5 (one 336-px image, budgets in tokens) and Qwen2-VL / Qwen2.5-VL
(square images of chosen sizes, budgets usually as shares of each image's visual tokens). The CUDA-graph
batch-1 mode and the attention-materialising variants are LLaVA-only; on Qwen-VL the output JSON says
why they were not measured (`not_measured`).

Qwen2.5-VL-7B on the GPU machine (one H200, bf16): the commands in docs/bench/qwen2.5-vl-7b/README.md
(each fits a 9-minute slot; `timeout` keeps the partial results if one runs long). `--methods none`
adds visprune's dense path and `--tower-layer B` every encoder-side case reducing inside the tower;
on Qwen-VL each run also times the stock tower against visprune's runner (`run["tower"]`).

Partial results (JSON + Markdown) are written after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import transformers
from tqdm import tqdm

import visprune
from visprune.bench.launch_free import LaunchFreeBench, summarise, supported
from visprune.bench.model import Family, build_model, family_for
from visprune.bench.static import ideal_methods
from visprune.bench.timing import CallTimer, summarize, time_fn, time_samples
from visprune.budgets import budget_for_share, options_for_budget
from visprune.bundled import resolve_device
from visprune.errors import InputError
from visprune.methods import MethodSpec, Placement, Reduction, get_method
from visprune.methods.base import available_requests, select_tokens
from visprune.models import adapter_for
from visprune.patch import DENSE
from visprune.reducer import Reducer, split_reducer_signals
from visprune.stats import Stats


@dataclass
class BenchConfig:
    """What to measure. Defaults follow BENCHMARKS.md."""

    config: str = "llava-1.5-7b"
    pretrained: str | None = None
    batches: tuple[int, ...] = (1, 16)
    budgets: tuple[int, ...] = (64, 128, 192)
    budget_shares: tuple[float, ...] = ()  # non-empty: budgets are these shares of each image's tokens
    image_sizes: tuple[int, ...] = ()  # square image sides in pixels; empty: the family's default
    methods: tuple[str, ...] = ()  # empty: every registered method
    repeats: int = 20
    warmup: int = 3
    # Patched cases: the prefill and its ideal are timed in this many alternating passes (each warmup +
    # repeats), pooled, so that a drift of the machine between passes cancels out of the efficiency.
    rounds: int = 1
    new_tokens: int = 64
    decode_runs: int = 2
    dtype: str = "float16"
    device: str = "cuda"
    graph: bool = True
    materialize: bool = True
    seed: int = 0
    tower_layer: int | None = None  # also run every encoder-side case reducing inside the tower there
    compile_tower: bool = False  # every patched case (and the ideal) with apply's compile_tower
    launch_free: bool = False  # generate end to end: plain vs apply's launch_free vs its ideal (bench/launch_free.py)


@dataclass
class Case:
    method: str  # "dense" or a registered name
    budget: int | None
    options: dict[str, Any] = field(default_factory=dict)
    share: float | None = None  # the share of the image's visual tokens the budget was derived from


def budget_list(cfg: BenchConfig, dense: int) -> list[tuple[int, float | None]]:
    """(tokens per image, share or None) for every budget of `cfg` on images of `dense` visual tokens."""
    if cfg.budget_shares:
        return [(budget_for_share(share, dense), share) for share in cfg.budget_shares]
    return [(budget, None) for budget in cfg.budgets]


def cases(cfg: BenchConfig, num_layers: int, dense: int) -> tuple[list[Case], list[dict[str, Any]]]:
    """Every (method, budget) to run, and the skipped ones with the reason."""
    names = cfg.methods or tuple(s.name for s in visprune.list_methods())
    out, skipped = [Case("dense", None)], []
    for name in names:
        if name == DENSE:  # visprune's own dense path (its vision tower runner included)
            out.append(Case(DENSE, None))
            continue
        adaptive = get_method(name).budget_rule is None
        budgets: list[tuple[int | None, float | None]] = [(None, None)] if adaptive else budget_list(cfg, dense)
        for budget, share in budgets:
            try:
                out.append(Case(name, budget, options_for_budget(name, budget, dense, num_layers), share))
            except InputError as err:
                skipped.append({"method": name, "budget": budget, "share": share, "reason": str(err)})
    if cfg.tower_layer is not None:
        for c in list(out):
            if c.method in ("dense", DENSE) or get_method(c.method).placement is Placement.LLM:
                continue
            spec = get_method(c.method)
            if "projected" in split_reducer_signals(spec.signals({**spec.defaults, **c.options}))[1].values():
                reason = "selects on the projected tokens, which do not exist inside the vision tower"
                skipped.append({"method": c.method, "budget": c.budget, "share": c.share, "reason": reason})
                continue
            out.append(Case(c.method, c.budget, {**c.options, "tower_layer": cfg.tower_layer}, c.share))
    if cfg.compile_tower:
        out = [c if c.method == "dense" else replace(c, options={**c.options, "compile_tower": True}) for c in out]
    return out, skipped


def environment(device: torch.device, dtype: str) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "visprune": visprune.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


class ProbeReducer(Reducer):
    """An encoder method's reducer whose reduction is replaced by keeping each image's first token:
    through the adapter contract (`image_tokens`) it times the vision tower plus the signals the method
    requests, and it records what the real reducer receives (while `calls` is a list)."""

    def __init__(
        self,
        spec: MethodSpec,
        options: dict[str, Any],
        tower_layer: int | None = None,
        available: Collection[str] | None = None,
    ):
        super().__init__(spec, options, False, Stats(), tower_layer, available=available)
        self.calls: list[tuple[torch.Tensor, tuple[int, int], dict[str, torch.Tensor], int | None, Any]] | None = []

    def __call__(
        self,
        features: torch.Tensor,
        grid: tuple[int, int],
        signals: dict[str, torch.Tensor],
        budget: int | None = None,
        images: Any = None,
    ) -> list[Reduction]:
        if self.calls is not None:
            self.calls.append((features, grid, signals, budget, images))
        first = torch.zeros(features.shape[0], 1, dtype=torch.long, device=features.device)
        return select_tokens(features, first)


class Bench:
    """One model, one image size, one batch size: measures cases."""

    def __init__(self, model: torch.nn.Module, family: Family, inputs: dict[str, torch.Tensor], cfg: BenchConfig):
        self.model, self.family, self.inputs, self.cfg = model, family, inputs, cfg
        self.adapter = adapter_for(model)
        self.device = inputs["input_ids"].device
        self.batch = inputs["input_ids"].shape[0]
        self.text_tokens = family.text_tokens()
        self.attn = model.config.text_config._attn_implementation or "sdpa"

    def _time(self, fn: Callable[[], Any]) -> dict[str, Any]:
        with torch.inference_mode():
            return time_fn(fn, self.cfg.repeats, self.cfg.warmup, self.device)

    def _prefill(self) -> Any:
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def _decode(self) -> dict[str, Any]:
        """Per-step decode latency over `new_tokens` greedy tokens, and the peak memory of the generate."""
        n = self.cfg.new_tokens
        lm = self.adapter.language_model
        with torch.inference_mode():
            self.model.generate(**self.inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            steps: list[float] = []
            for _ in range(self.cfg.decode_runs):
                timer = CallTimer(lm, self.device)
                try:
                    self.model.generate(**self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                finally:
                    timer.remove()
                steps += timer.durations_ms()[1:]
        out = {"decode": summarize(steps) if steps else None}
        out["decode_tokens_per_s"] = self.batch * 1e3 / statistics.median(steps) if steps else None
        if self.device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def run_case(self, case: Case) -> dict[str, Any]:
        res: dict[str, Any] = {"method": case.method, "budget": case.budget, "options": _jsonable(case.options)}
        if case.share is not None:
            res["share"] = case.share
        if case.method == "dense":
            res["prefill"] = self._time(self._prefill)
            res["visual_tokens"] = float(self.inputs["input_ids"].eq(self.model.config.image_token_id).sum(1)[0])
            res.update(self._decode())
            return res
        handle = visprune.apply(self.model, case.method, **case.options)
        try:
            prefill = self._samples()
            stats = handle.stats
            res["visual_tokens"] = statistics.mean(stats.visual_tokens_out)
            res["tokens_per_layer"] = stats.tokens_per_layer[0]
            res["mean_llm_tokens"] = statistics.mean(stats.tokens_per_layer[0])
            if handle.encoder is not None:
                res.update(self._encoder_parts(handle))
            res.update(self._decode())
            visual_out, tokens = list(stats.visual_tokens_out), [list(t) for t in stats.tokens_per_layer]
        finally:
            visprune.remove(self.model)
        ideal = self._ideal(visual_out, tokens, case.options)
        for _ in range(1, self.cfg.rounds):
            prefill += self._applied_samples(case.method, **case.options)
            ideal += self._ideal(visual_out, tokens, case.options)
        res["prefill"], res["ideal"] = summarize(prefill), summarize(ideal)
        res["efficiency"] = res["ideal"]["median_ms"] / res["prefill"]["median_ms"]
        return res

    def _samples(self) -> list[float]:
        """One timing pass of the patched prefill: warmup + repeats samples (ms)."""
        with torch.inference_mode():
            return time_samples(self._prefill, self.cfg.repeats, self.cfg.warmup, self.device)

    def _applied_samples(self, method: Any, **options: Any) -> list[float]:
        """`_samples` of the model with `method` applied (removed again after)."""
        visprune.apply(self.model, method, **options)
        try:
            return self._samples()
        finally:
            visprune.remove(self.model)

    def _encoder_parts(self, handle: visprune.Handle) -> dict[str, Any]:
        """'vision': the tower plus the method's signals (and the projection of one token per image), via
        the adapter's `image_tokens` with the reduction stubbed out; 'reduce': the method's reducer on
        exactly the features and signals it receives in the patched forward."""
        adapter, spec, opts = handle.adapter, handle.encoder, handle.encoder_options
        probe = ProbeReducer(spec, opts, handle.tower_layer, adapter.signal_kinds)
        reducer = Reducer.for_call(
            adapter,
            spec,
            opts,
            Stats(),
            self.inputs["input_ids"],
            self.inputs.get("attention_mask"),
            tower_layer=handle.tower_layer,
        )
        pixels = self.inputs["pixel_values"]
        image_kwargs = {k: self.inputs[k] for k in adapter.image_inputs if k in self.inputs}
        with torch.inference_mode():
            adapter.image_tokens(pixels, probe, image_kwargs)
        calls, probe.calls = probe.calls or [], None
        parts = {
            "vision": self._time(lambda: adapter.image_tokens(pixels, probe, image_kwargs)),
            "reduce": self._time(lambda: [reducer(f, g, s, budget=b, images=i) for f, g, s, b, i in calls]),
        }
        reducer.verify_inputs()  # the timed calls' deferred input checks (as the patched call reads them)
        return parts

    def _ideal(self, visual_out: list[int], tokens: list[list[int]], options: dict[str, Any]) -> list[float]:
        """One timing pass (samples, ms) of the same pipeline fed the same token counts with first-K
        selection (no scoring work), reducing at the same `tower_layer` and compiled the same way as the
        case with `options`."""
        return self._applied_samples(
            ideal_methods(visual_out, tokens),
            tower_layer=options.get("tower_layer"),
            compile_tower=options.get("compile_tower", False),
        )

    def tower(self) -> dict[str, Any]:
        """The stock vision tower (transformers' forward) against visprune's runner on the same images:
        times, and the largest difference of the projected features relative to their largest value;
        with `compile_tower`, the compiled runner too ('compiled', its difference and speed-up)."""
        tower, adapter = self.adapter.vision_tower, self.adapter
        pixels = self.inputs["pixel_values"]
        image_kwargs = {k: self.inputs[k] for k in adapter.image_inputs if k in self.inputs}
        grid = image_kwargs["image_grid_thw"]

        def runner() -> Any:
            return adapter.image_tokens(pixels, None, image_kwargs)

        def max_rel_diff(ours: torch.Tensor) -> float:
            return float((ours.float() - stock.float()).abs().max() / stock.float().abs().max())

        with torch.inference_mode():
            stock = tower(pixels.to(tower.dtype), grid_thw=grid).pooler_output
            ours = torch.cat(runner().features)
        out = {
            "stock": self._time(lambda: tower(pixels.to(tower.dtype), grid_thw=grid)),
            "visprune": self._time(runner),
            "max_rel_diff": max_rel_diff(ours),
        }
        out["speedup"] = out["stock"]["median_ms"] / out["visprune"]["median_ms"]
        if self.cfg.compile_tower:
            adapter.compile_tower = True
            try:
                with torch.inference_mode():
                    ours = torch.cat(runner().features)
                out["compiled"] = self._time(runner)
            finally:
                adapter.compile_tower = False
            out["compiled_max_rel_diff"] = max_rel_diff(ours)
            out["compiled_speedup"] = out["stock"]["median_ms"] / out["compiled"]["median_ms"]
        return out

    def materialized(self, case: Case) -> dict[str, Any]:
        """The method computed the way its published code does: eager attention with the maps."""
        where = get_method(case.method).published_attention
        res: dict[str, Any] = {"method": case.method, "budget": case.budget, "where": where}
        pixels = self.inputs["pixel_values"]
        tower = self.adapter.vision_tower
        if where == "vision":
            handle = visprune.apply(self.model, case.method, **case.options)
            try:
                requests = available_requests(
                    handle.encoder.signals(handle.encoder_options), handle.adapter.signal_kinds
                )
                res["sdpa_path"] = self._time(lambda: handle.adapter.encode(pixels, requests))
            finally:
                visprune.remove(self.model)
            tower.set_attn_implementation("eager")
            try:
                res["materializing"] = self._time(
                    lambda: tower(pixels, output_attentions=True, output_hidden_states=True)
                )
            finally:
                tower.set_attn_implementation(self.attn)
        else:
            self.model.set_attn_implementation("eager")
            try:
                visprune.apply(self.model, case.method, **case.options)
                try:
                    res["materializing"] = self._time(self._prefill)
                finally:
                    visprune.remove(self.model)
            finally:
                self.model.set_attn_implementation(self.attn)
            visprune.apply(self.model, case.method, **case.options)
            try:
                res["sdpa_path"] = self._time(self._prefill)
            finally:
                visprune.remove(self.model)
        res["ratio"] = res["materializing"]["median_ms"] / res["sdpa_path"]["median_ms"]
        return res

    def graph_mode(self, case_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Batch-1 prefill with launch overhead removed: the vision tower and the LLM at each measured
        token count replayed as CUDA graphs; the reduction itself timed plainly (it syncs the host)."""
        lm = self.adapter.language_model
        hidden = self.model.config.text_config.hidden_size
        pixels = self.inputs["pixel_values"]
        adapter = adapter_for(self.model)
        llm_cache: dict[int, dict[str, Any]] = {}
        out = []
        for r in case_results:
            if "tokens_per_layer" in r and len(set(r["tokens_per_layer"])) > 1:
                out.append({"method": r["method"], "budget": r["budget"], "skipped": "LLM-side stage (host sync)"})
                continue
            seq = round(self.text_tokens + r["visual_tokens"])
            try:
                if seq not in llm_cache:
                    x = torch.randn(self.batch, seq, hidden, device=self.device, dtype=self.model.dtype)
                    llm_cache[seq] = _graph_time(lambda x=x: lm(inputs_embeds=x, use_cache=False), self)
                requests = {}
                if r["method"] != "dense":
                    spec = get_method(r["method"])
                    if spec.placement is not Placement.LLM:
                        enc = get_method(spec.encoder_stage) if spec.encoder_stage else spec
                        own = {k: v for k, v in r["options"].items() if k in enc.defaults}
                        requests = available_requests(enc.signals(enc.options(**own)), adapter.signal_kinds)
                vision = _graph_time(lambda req=requests: adapter.encode(pixels, req), self)
                reduce_ms = r.get("reduce", {}).get("median_ms", 0.0)
                total = vision["median_ms"] + reduce_ms + llm_cache[seq]["median_ms"]
                out.append(
                    {
                        "method": r["method"],
                        "budget": r["budget"],
                        "llm_tokens": seq,
                        "vision_graph_ms": vision["median_ms"],
                        "reduce_ms": reduce_ms,
                        "llm_graph_ms": llm_cache[seq]["median_ms"],
                        "prefill_graph_ms": total,
                    }
                )
            except Exception as err:  # a capture failure is a result to report, not a crash
                out.append({"method": r["method"], "budget": r["budget"], "error": f"{type(err).__name__}: {err}"})
        return out


def _graph_time(fn: Callable[[], Any], bench: Bench) -> dict[str, Any]:
    """Capture `fn` as a CUDA graph and time its replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode():
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return time_fn(graph.replay, bench.cfg.repeats, bench.cfg.warmup, bench.device)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def run_benchmark(
    cfg: BenchConfig, progress: bool = True, on_update: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run every case for every image size and batch size; returns the JSON-ready results. `on_update` is
    called with the partial results after every case (so an interrupted run still leaves its measurements)."""
    device = torch.device(resolve_device(cfg.device))
    dtype = getattr(torch, cfg.dtype)
    for share in cfg.budget_shares:
        budget_for_share(share, 1)  # an out-of-range share fails before the model is built
    model = build_model(cfg.config, dtype, device, pretrained=cfg.pretrained, seed=cfg.seed)
    family = family_for(model.config)
    sizes = family.image_sizes(cfg.image_sizes)
    num_layers = model.config.text_config.num_hidden_layers
    dense = {size: family.dense_tokens(size) for size in sizes}
    plans = {size: cases(cfg, num_layers, dense[size]) for size in sizes}
    results: dict[str, Any] = {
        "environment": environment(device, cfg.dtype),
        "config": asdict(cfg),
        "model": {
            "config": cfg.pretrained or cfg.config,
            "family": family.name,
            "llm_layers": num_layers,
            "image_sizes": list(sizes),
            "dense_visual_tokens": dense[sizes[0]] if len(sizes) == 1 else {str(k): v for k, v in dense.items()},
        },
        "skipped": [
            {**entry, "image_size": size} if len(sizes) > 1 else entry for size in sizes for entry in plans[size][1]
        ],
        "not_measured": _not_measured(cfg, family),
        "runs": [],
    }
    if cfg.launch_free:
        _launch_free_runs(cfg, model, family, sizes, dense, plans, results, progress, on_update)
        return results
    for size in sizes:
        todo = plans[size][0]
        for batch in cfg.batches:
            bench = Bench(model, family, family.make_inputs(model, batch, size, cfg.seed), cfg)
            run: dict[str, Any] = {
                "batch": batch,
                "image_size": size,
                "dense_visual_tokens": dense[size],
                "text_tokens": bench.text_tokens,
                "cases": [],
            }
            results["runs"].append(run)
            if family.tower_compare:  # first: the comparison survives a run cut short by a time limit
                try:
                    run["tower"] = bench.tower()
                except Exception as err:
                    run["tower"] = {"error": f"{type(err).__name__}: {err}"}
                _notify(on_update, results)
            _run_cases(bench, todo, run, f"{size}px batch {batch}", progress, lambda: _notify(on_update, results))
            _run_extras(bench, cfg, todo, run, budget_list(cfg, dense[size]), device)
            _notify(on_update, results)
    return results


def _launch_free_runs(
    cfg: BenchConfig,
    model: torch.nn.Module,
    family: Family,
    sizes: list[int],
    dense: dict[int, int],
    plans: dict[int, tuple[list[Case], list[dict[str, Any]]]],
    results: dict[str, Any],
    progress: bool,
    on_update: Callable[[dict[str, Any]], None] | None,
) -> None:
    """The launch-free mode: every supported case in three modes (plain, launch-free, ideal), per batch."""
    refused = sorted({c.method for cases, _ in plans.values() for c in cases if not supported(c.method)})
    why = "the launch-free path refuses them (LLM-side stages whose counts are decided during the prefill)"
    results["not_measured"] = {"launch_free": f"{', '.join(refused)}: {why}"} if refused else {}
    for size in sizes:
        todo = [c for c in plans[size][0] if supported(c.method)]
        for batch in cfg.batches:
            inputs = family.make_inputs(model, batch, size, cfg.seed)
            bench = LaunchFreeBench(model, inputs, cfg.new_tokens, cfg.rounds)
            run: dict[str, Any] = {
                "batch": batch,
                "image_size": size,
                "dense_visual_tokens": dense[size],
                "text_tokens": family.text_tokens(),
                "launch_free_cases": [],
            }
            results["runs"].append(run)
            for case in tqdm(todo, desc=f"launch-free batch {batch}", disable=not progress):
                try:
                    result = bench.run_case(case.method, case.budget, case.options)  # the options as apply takes them
                    run["launch_free_cases"].append({**result, "options": _jsonable(case.options)})
                except Exception as err:
                    error = f"{type(err).__name__}: {err}"
                    run["launch_free_cases"].append({"method": case.method, "budget": case.budget, "error": error})
                summarise(run["launch_free_cases"])
                _notify(on_update, results)


def _not_measured(cfg: BenchConfig, family: Family) -> dict[str, str]:
    """The requested parts of the benchmark that do not apply to the model's family, with the reason."""
    out = {}
    if cfg.materialize and family.materialize_skip:
        out["materialized"] = family.materialize_skip
    if cfg.graph and 1 in cfg.batches and family.graph_skip:
        out["graph"] = family.graph_skip
    return out


def _notify(on_update: Callable[[dict[str, Any]], None] | None, results: dict[str, Any]) -> None:
    if on_update is not None:
        on_update(results)


def _run_cases(
    bench: Bench, todo: list[Case], run: dict[str, Any], desc: str, progress: bool, saved: Callable[[], None]
) -> None:
    """Every case in order (an error is a result); `saved` after each one."""
    for case in tqdm(todo, desc=desc, disable=not progress):
        try:
            run["cases"].append(bench.run_case(case))
            dense_ms = run["cases"][0]["prefill"]["median_ms"]
            run["cases"][-1]["speedup"] = dense_ms / run["cases"][-1]["prefill"]["median_ms"]
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            failed = {"method": case.method, "budget": case.budget, "error": error}
            run["cases"].append(failed if case.share is None else {**failed, "share": case.share})
        saved()


def _run_extras(
    bench: Bench,
    cfg: BenchConfig,
    todo: list[Case],
    run: dict[str, Any],
    budgets: list[tuple[int, float | None]],
    device: torch.device,
) -> None:
    """The attention-materialising variants (at the middle budget) and the batch-1 CUDA-graph mode, where
    they apply to the model's family (where they do not, results["not_measured"] says why)."""
    family = bench.family
    if cfg.materialize and not family.materialize_skip:
        run["materialized"] = []
        middle = budgets[len(budgets) // 2][0] if budgets else None
        for case in todo:
            if (
                case.method not in ("dense", DENSE)
                and case.budget == middle
                and get_method(case.method).published_attention
            ):
                try:
                    run["materialized"].append(bench.materialized(case))
                except Exception as err:
                    run["materialized"].append({"method": case.method, "error": f"{type(err).__name__}: {err}"})
    if cfg.graph and not family.graph_skip and run["batch"] == 1 and device.type == "cuda":
        run["graph"] = bench.graph_mode([r for r in run["cases"] if "prefill" in r])
