"""`visprune eval`: budget mapping, cell plan, an end-to-end run on the bundled model, and resume."""

from __future__ import annotations

import json

import pytest

from visprune import bundled, cli
from visprune.errors import InputError
from visprune.eval import synth as ev

pytestmark = pytest.mark.skipif(not bundled.available(), reason="bundled model weights missing")


def test_eval_uses_the_shared_budget_mapping() -> None:
    from visprune.budgets import options_for_budget

    assert ev.budget_options("fastervlm", 64, 576, 32) == {"budget": 64}
    assert ev.budget_options("fastv", 144, 576, 32) == {"keep_ratio": 0.25}
    assert ev.budget_options("prumerge+", None, 576, 32) == {}
    for method in ("pdrop", "sparsevlm", "dart", "visionzip"):
        assert ev.budget_options(method, 192, 576, 8) == options_for_budget(method, 192, 576, 8)
    with pytest.raises(InputError):
        ev.budget_options("prumerge", 64, 576, 32)


def test_layers_moved_into_a_shallow_llm() -> None:
    assert ev.budget_options("pdrop", 192, 576, 8)["layers"] == (2, 4, 6)
    assert ev.budget_options("sparsevlm", 192, 576, 8)["layers"] == (1, 2, 4)
    assert ev.budget_options("fastv", None, 576, 8) == {}  # layer 2 fits
    assert ev.budget_options("knee+text", None, 576, 2) == {"text_layer": 1}
    with pytest.raises(InputError):
        ev.budget_options("pdrop", 32, 576, 8)  # the first layer alone averages 72 tokens


def test_plan_has_dense_adaptive_defaults_and_fixed_budgets() -> None:
    cells = ev.plan_cells(["prumerge", "fastv", "pool"], [32, 64])
    assert cells == [("none", None), ("prumerge", None), ("fastv", 32), ("fastv", 64), ("pool", 32), ("pool", 64)]
    every = ev.plan_cells(ev.all_methods(), list(ev.BUDGETS))
    assert len(every) == 1 + 4 + 15 * 4  # dense, the 4 adaptive methods at their defaults, 15 fixed ones


def test_eval_end_to_end_and_resume(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "eval"
    args = ["eval", "--limit", "7", "--methods", "prumerge", "fastv", "--budgets", "64", "--out", str(out), "--quiet"]
    assert cli.main([*args, "--device", "cpu"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["cells"]) == {"none", "prumerge", "fastv@64"}
    dense = data["cells"]["none"]
    assert dense["visual_tokens_llm"] == 576 and sum(dense["count"].values()) == 7
    assert data["cells"]["fastv@64"]["options"] == {"keep_ratio": 64 / 576}
    assert data["cells"]["prumerge"]["visual_tokens_llm"] < 576
    assert 0 < data["cells"]["fastv@64"]["visual_tokens_per_layer"] < 576
    for name in ("results.md", "accuracy_vs_tokens.png"):
        assert (out / name).stat().st_size > 0
    assert "`fastv@64`" in (out / "results.md").read_text()

    def boom(*_a, **_k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(ev.Runner, "__init__", boom)
    assert cli.main([*args, "--device", "cpu"]) == 0  # everything done: the model is not even loaded
    assert "resuming: 3 of 3 cells" in capsys.readouterr().out

    computed = []
    monkeypatch.undo()
    original = ev.Runner.run_cell

    def spy(self, method, budget, tick=None):
        computed.append((method, budget))
        return original(self, method, budget, tick)

    monkeypatch.setattr(ev.Runner, "run_cell", spy)
    more = ["eval", "--limit", "7", "--methods", "prumerge", "fastv", "pool", "--budgets", "64", "--out", str(out)]
    assert cli.main([*more, "--quiet", "--device", "cpu"]) == 0
    assert computed == [("pool", 64)]
    assert set(json.loads((out / "results.json").read_text())["cells"]) == {"none", "prumerge", "fastv@64", "pool@64"}


def test_keep_positions_is_part_of_the_resume_key() -> None:
    plain, kept = ev.EvalConfig(model="m"), ev.EvalConfig(model="m", keep_positions=True)
    assert plain.key() != kept.key() and kept.key()["keep_positions"] is True
