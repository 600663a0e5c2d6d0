"""`visprune bench` end to end on a tiny config on the CPU: the timing numbers are not checked (they
are measured on the GPU machine), the bookkeeping is: cases, token counts, ideal, outputs."""

import json

import pytest
import torch

from tests.models.tiny import tiny_llava_config
from visprune.bench.model import build_model
from visprune.bench.static import stages_from_tokens
from visprune.budgets import options_for_budget
from visprune.cli import main
from visprune.errors import InputError


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    tiny_llava_config("sdpa").save_pretrained(folder / "cfg")
    args = [
        "bench",
        "--config",
        str(folder / "cfg"),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--new-tokens",
        "3",
        "--decode-runs",
        "1",
        "--batch",
        "2",
        "--budgets",
        "8",
        "16",
        "--methods",
        "fastervlm",
        "prumerge",
        "fastv",
        "knee+text",
        "--out",
        str(folder / "out"),
        "--name",
        "tiny",
        "--quiet",
    ]
    assert main(args) == 0
    return folder / "out"


def test_outputs_are_written(results):
    data = json.loads((results / "tiny.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert (results / "tiny.png").stat().st_size > 1000
    assert "| fastervlm | 8 |" in (results / "tiny.md").read_text()
    run = data["runs"][0]
    assert run["batch"] == 2
    names = [(c["method"], c["budget"]) for c in run["cases"]]
    assert names == [
        ("dense", None),
        ("fastervlm", 8),
        ("fastervlm", 16),
        ("prumerge", None),
        ("fastv", 8),
        ("fastv", 16),
        ("knee+text", None),
    ]
    assert all("error" not in c for c in run["cases"]), run["cases"]


def test_token_counts_and_ideal(results):
    run = json.loads((results / "tiny.json").read_text())["runs"][0]
    cases = {(c["method"], c["budget"]): c for c in run["cases"]}
    assert cases[("dense", None)]["visual_tokens"] == 64
    assert cases[("fastervlm", 8)]["visual_tokens"] == 8
    assert cases[("fastervlm", 8)]["tokens_per_layer"] == [8 + 51] * 4
    fastv = cases[("fastv", 8)]
    assert fastv["tokens_per_layer"][:2] == [64 + 51] * 2 and fastv["tokens_per_layer"][2:] == [8 + 51] * 2
    for c in run["cases"][1:]:
        assert c["ideal"]["median_ms"] > 0 and c["efficiency"] > 0 and c["speedup"] > 0
        assert c["decode_tokens_per_s"] > 0
    assert cases[("fastervlm", 8)]["reduce"]["repeats"] == 2
    assert {m["method"] for m in run["materialized"]} == {"fastervlm", "fastv"}


def test_random_weights_come_from_the_seed_not_the_global_rng(tmp_path):
    tiny_llava_config("sdpa").save_pretrained(tmp_path)
    cpu = torch.device("cpu")
    first = build_model(str(tmp_path), torch.float32, cpu, seed=0).state_dict()
    torch.rand(1000)
    again = build_model(str(tmp_path), torch.float32, cpu, seed=0).state_dict()
    other = build_model(str(tmp_path), torch.float32, cpu, seed=1).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert not all(torch.equal(v, other[k]) for k, v in first.items())


def test_stages_from_tokens():
    assert stages_from_tokens([[100, 100, 60, 60, 40]], [20]) == [(2, [40]), (4, [20])]
    assert stages_from_tokens([[50, 50]], [10]) == []


def test_budget_mapping():
    assert options_for_budget("fastervlm", 128) == {"budget": 128}
    assert options_for_budget("fastv", 144) == {"keep_ratio": 0.25}
    assert options_for_budget("prumerge", None) == {}
    pdrop = options_for_budget("pdrop", 192)
    assert pdrop["layers"] == (8, 16, 24)
    low = options_for_budget("pdrop", 64)
    assert low["layers"] == (2, 6, 16) and list(low["keep_ratios"]) == sorted(low["keep_ratios"], reverse=True)
    counts = options_for_budget("sparsevlm", 192)["keep_counts"]
    assert counts[0] > counts[1] > counts[2]
    with pytest.raises(InputError, match="adaptive"):
        options_for_budget("prumerge", 64)
    with pytest.raises(InputError, match="between 1"):
        options_for_budget("fastervlm", 0)
    with pytest.raises(InputError, match="cannot average"):
        options_for_budget("sparsevlm", 20)


def test_layer_defaults_move_to_the_same_relative_depth():
    from visprune.budgets import scale_layers

    assert scale_layers((8, 16, 24), 32) == (8, 16, 24)
    assert scale_layers((8, 16, 24), 8) == (2, 4, 6)
    assert scale_layers((2, 6, 15), 8) == (1, 2, 4)
    assert scale_layers((2, 6, 16), 4) == (1, 2, 3)
    assert options_for_budget("pdrop", 192, 576, 8)["layers"] == (2, 4, 6)
    with pytest.raises(InputError, match="cannot average"):
        options_for_budget("pdrop", 32, 576, 8)  # the first layer alone runs 576 / 8 = 72 tokens on average
