"""graphs.replayed: the sequential selection loops replayed from CUDA graphs compute exactly what the
loops compute, for new inputs of a captured shape too (the graph's buffers are refilled every call)."""

from __future__ import annotations

import warnings

import pytest
import torch

from visprune.methods import graphs
from visprune.methods.cdpruner import cdpruner, conditional_selection
from visprune.methods.divprune import divprune, max_min_selection
from visprune.methods.scope import saliency_coverage_selection, scope
from visprune.methods.vispruner import important_and_diverse, vispruner

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(seed: int, b: int = 3, n: int = 40, c: int = 16, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(b, n, c, generator=g).to(device),
        "prompt": torch.randn(b, c, generator=g).to(device),
        "scores": torch.rand(b, n, generator=g).to(device),
    }


LOOPS = {
    "divprune": (max_min_selection, lambda t: (t["x"],), {"k": 9}),
    "cdpruner": (conditional_selection, lambda t: (t["x"], t["prompt"]), {"k": 9}),
    "scope": (saliency_coverage_selection, lambda t: (t["x"], t["scores"]), {"k": 9}),
    "vispruner": (important_and_diverse, lambda t: (t["x"], t["scores"]), {"k": 9, "important": 4}),
}


def test_off_the_gpu_the_loop_runs_and_nothing_is_cached():
    graphs.clear()
    for loop, args, static in LOOPS.values():
        t = _inputs(0)
        assert torch.equal(graphs.replayed(loop, *args(t), **static), loop(*args(t), **static))
    assert not graphs._cache


def test_a_loop_that_cannot_be_captured_runs_with_one_warning(monkeypatch):
    """Where capture fails (an operation that needs the host), the loop runs step by step: the same result,
    one warning for those shapes, no second attempt."""
    graphs.clear()
    attempts = []

    def refuse(loop, inputs, static):
        attempts.append(loop)
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    monkeypatch.setattr(graphs, "_replayable", lambda inputs: True)
    monkeypatch.setattr(graphs, "_capture", refuse)
    t = _inputs(0)
    with pytest.warns(UserWarning, match="max_min_selection could not be captured.*same result"):
        first = graphs.replayed(max_min_selection, t["x"], k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = graphs.replayed(max_min_selection, t["x"], k=5)
    assert torch.equal(first, max_min_selection(t["x"], k=5)) and torch.equal(second, first)
    assert len(attempts) == 1
    graphs.clear()


@CUDA
@pytest.mark.parametrize("name", sorted(LOOPS))
def test_replays_equal_the_loop_for_new_inputs_and_shapes(name):
    loop, args, static = LOOPS[name]
    graphs.clear()
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            for seed, n in ((1, 40), (2, 40), (3, 40), (4, 57), (5, 40)):
                t = _inputs(seed, n=n, device="cuda")
                got = graphs.replayed(loop, *args(t), **static)
                assert torch.equal(got, loop(*args(t), **static)), (name, seed, n)
    assert len(graphs._cache) == 4  # two shapes x two autograd modes, each captured once


@CUDA
def test_the_cache_is_bounded(monkeypatch):
    graphs.clear()
    monkeypatch.setattr(graphs, "CACHE_SIZE", 2)
    for n in (20, 21, 22, 23):
        t = _inputs(0, n=n, device="cuda")
        assert torch.equal(graphs.replayed(max_min_selection, t["x"], k=5), max_min_selection(t["x"], k=5))
    assert len(graphs._cache) == 2
    graphs.clear()
    assert not graphs._cache


@CUDA
def test_methods_give_the_same_tokens_with_and_without_graphs(monkeypatch):
    t = _inputs(7, b=4, n=64, c=24, device="cuda")
    calls = {
        "divprune": lambda: divprune(t["x"], projected=t["x"], budget=10),
        "cdpruner": lambda: cdpruner(t["x"], projected=t["x"], prompt=t["prompt"], budget=10),
        "scope": lambda: scope(t["x"], cls_attn=t["scores"], budget=10),
        "vispruner": lambda: vispruner(t["x"], cls_attn=t["scores"], budget=10),
    }
    for name, call in calls.items():
        with torch.inference_mode():
            graphed = [call(), call()]  # capture, then replay
            monkeypatch.setattr(graphs, "ENABLED", False)
            plain = call()
            monkeypatch.setattr(graphs, "ENABLED", True)
        for replay in graphed:
            for r, p in zip(replay, plain, strict=True):
                assert torch.equal(r.sources, p.sources), name
                assert torch.equal(r.features, p.features), name


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_fused_steps_trace_as_one_graph_and_compute_the_same(name, monkeypatch):
    """Every loop's step compiles whole (fullgraph, also after a change of shapes: a graph break would make the
    GPU fall back to the unfused step) and gives the unfused result; traced here with aot_eager, which needs no
    compiler."""
    loop, args, static = LOOPS[name]
    monkeypatch.setattr(graphs, "FUSE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    for seed, n in ((1, 40), (2, 57)):
        t = _inputs(seed, n=n)
        monkeypatch.setattr(graphs, "_fusable", lambda args: True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a step that fails to compile warns and runs unfused
            fused = loop(*args(t), **static)
        monkeypatch.setattr(graphs, "_fusable", lambda args: False)
        assert torch.equal(fused, loop(*args(t), **static)), (name, seed, n)
    torch._dynamo.reset()


def test_a_step_that_cannot_compile_runs_unfused_after_one_warning(monkeypatch):
    """A graph break (here explicit) stops fullgraph compilation: the step runs as written, with one warning."""

    @graphs.fused
    def step(x):
        torch._dynamo.graph_break()
        return x + 1

    monkeypatch.setattr(graphs, "_fusable", lambda args: True)
    monkeypatch.setattr(graphs, "FUSE_BACKEND", "aot_eager")
    x = torch.zeros(3)
    with pytest.warns(UserWarning, match="step could not be compiled.*runs unfused"):
        assert torch.equal(step(x), x + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(step(x), x + 1)


def test_a_step_past_its_compilation_limit_runs_unfused_after_one_warning(monkeypatch):
    """A step whose shapes keep changing compiles up to RECOMPILE_LIMIT versions; past it the step runs as
    written with a warning instead of torch.compile silently falling back. Also where dynamo's
    suppress_errors is on (some libraries set it process-wide; dynamo refuses it with the limit's error)."""

    @graphs.fused
    def step(x, n):
        return x * n

    monkeypatch.setattr(graphs, "_fusable", lambda args: True)
    monkeypatch.setattr(graphs, "FUSE_BACKEND", "aot_eager")
    monkeypatch.setattr(graphs, "RECOMPILE_LIMIT", 2)
    torch._dynamo.reset()
    x = torch.ones(3)
    with torch._dynamo.config.patch(suppress_errors=True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(step(x, 2), x * 2) and torch.equal(step(x, 3), x * 3)  # static, then n symbolic
        with pytest.warns(UserWarning, match="step could not be compiled.*runs unfused"):
            assert torch.equal(step(torch.ones(2, 2), 4), torch.full((2, 2), 4.0))  # a new rank: a third version
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(step(x, 5), x * 5)
        # the caller's settings are back after every call, the failed one included
        assert torch._dynamo.config.suppress_errors and not torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.reset()


def test_steps_keep_compiling_across_many_shapes(monkeypatch):
    """A selection over several batch sizes, token counts and budgets stays compiled: no step reaches the
    limit (torch's default of 8 is too few for vispruner's shrinking rounds)."""
    monkeypatch.setattr(graphs, "_fusable", lambda args: True)
    monkeypatch.setattr(graphs, "FUSE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b, n in ((2, 60), (3, 60), (2, 47), (1, 33)):
            x, s = torch.randn(b, n, 8, generator=g), torch.rand(b, n, generator=g)
            for k in (15, 8, 3):
                monkeypatch.setattr(graphs, "_fusable", lambda args: True)
                fused = important_and_diverse(x, s, k=k, important=k // 2)
                monkeypatch.setattr(graphs, "_fusable", lambda args: False)
                assert torch.equal(fused, important_and_diverse(x, s, k=k, important=k // 2)), (b, n, k)
    torch._dynamo.reset()


def test_an_entry_keyed_by_a_module_is_dropped_when_the_module_is_freed(monkeypatch):
    """A module among the static arguments is held weakly: the cache keeps no model alive, and a freed
    module's graphs are dropped with it."""
    import gc
    import weakref

    class Graph:
        def replay(self):
            pass

    def capture(loop, inputs, static):
        return Graph(), [t.clone() for t in inputs], loop(*inputs, **static)

    def scaled(x, *, module):
        return module(x)

    graphs.clear()
    monkeypatch.setattr(graphs, "_replayable", lambda inputs: True)
    monkeypatch.setattr(graphs, "_capture", capture)
    kept, dropped = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    with torch.no_grad():
        graphs.replayed(scaled, x, module=kept)
        graphs.replayed(scaled, x, module=dropped)
    assert len(graphs._cache) == 2
    alive = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert alive() is None and len(graphs._cache) == 1
    graphs.clear()
