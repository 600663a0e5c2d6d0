"""`visprune bench` end to end on tiny LLaVA and Qwen2.5-VL configs on the CPU: the timing numbers are
not checked (they are measured on the GPU machine), the bookkeeping is: cases, token counts, ideal,
outputs, budgets as shares of each image's tokens."""

import json

import pytest
import torch

from tests.models.tiny import tiny_llava_config
from tests.models.tiny_qwen import END, IMAGE, START, VIDEO, tiny_qwen2_5_vl, tiny_qwen3_vl
from visprune import configs
from visprune.bench import BenchConfig
from visprune.bench.model import build_model, family_for
from visprune.bench.runner import _not_measured
from visprune.bench.static import ideal_methods, stages_from_tokens
from visprune.budgets import budget_for_share, options_for_budget, options_for_share
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


def test_the_ideal_of_a_batch_has_a_count_rule_the_launch_free_path_accepts():
    """The first-K stand-in of an LLM-side case at batch 3 plans its counts on the host (apply's launch-free
    check asks the rule with one sample's counts), and its rule gives each sample its measured count."""
    stages = stages_from_tokens([[100, 100, 60], [90, 90, 70], [80, 80, 80]], [20, 20, 20])
    ideal = ideal_methods([80, 70, 60], [[100, 100, 60], [90, 90, 70], [80, 80, 80]])[-1]
    assert stages == [(2, [40, 50, 60])] and ideal.counts_planned({})
    assert ideal.visual_kept(torch.tensor([80, 70, 60]), {}, 0).tolist() == [40, 50, 60]


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


QWEN_ARGS = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--repeats",
    "2",
    "--warmup",
    "0",
    "--new-tokens",
    "3",
    "--decode-runs",
    "1",
    "--batch",
    "2",
    "--image-size",
    "56",
    "112",
    "--budget-shares",
    "0.5",
    "0.25",
    "--methods",
    "none",
    "fastervlm",
    "divprune",
    "cdpruner",
    "fastv",
    "--tower-layer",
    "3",
    "--name",
    "qwen",
    "--quiet",
]


@pytest.fixture(scope="module")
def qwen_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-qwen")
    tiny_qwen2_5_vl().config.save_pretrained(folder / "cfg")
    assert main(["bench", "--config", str(folder / "cfg"), *QWEN_ARGS, "--out", str(folder / "out")]) == 0
    return json.loads((folder / "out" / "qwen.json").read_text())


def test_qwen_runs_every_size_and_batch_with_shares(qwen_results):
    assert qwen_results["model"]["family"] == "qwen-vl"
    assert qwen_results["model"]["dense_visual_tokens"] == {"56": 4, "112": 16}
    assert [(r["image_size"], r["batch"]) for r in qwen_results["runs"]] == [(56, 2), (112, 2)]
    assert "not measured on Qwen-VL" in qwen_results["not_measured"]["materialized"]
    assert "graph" not in qwen_results["not_measured"]  # batch 1 was not asked for
    skipped = [(s["method"], s["share"], s["image_size"]) for s in qwen_results["skipped"]]
    assert skipped == [
        (m, share, size) for size in (56, 112) for m in ("divprune", "cdpruner") for share in (0.5, 0.25)
    ]
    assert all("projected tokens" in s["reason"] for s in qwen_results["skipped"])
    for run in qwen_results["runs"]:
        dense = run["dense_visual_tokens"]
        assert run["text_tokens"] == 35 + 16 + 2
        names = [(c["method"], c.get("share"), c["options"].get("tower_layer")) for c in run["cases"]]
        assert names == [
            ("dense", None, None),
            ("none", None, None),
            ("fastervlm", 0.5, None),
            ("fastervlm", 0.25, None),
            ("divprune", 0.5, None),  # selects on projected tokens: not inside the tower (skipped below)
            ("divprune", 0.25, None),
            ("cdpruner", 0.5, None),  # projected tokens and the prompt: not inside the tower either
            ("cdpruner", 0.25, None),
            ("fastv", 0.5, None),
            ("fastv", 0.25, None),
            ("fastervlm", 0.5, 3),  # reducing inside the tower, at block 3
            ("fastervlm", 0.25, 3),
        ]
        assert all("error" not in c for c in run["cases"]), run["cases"]
        assert run["cases"][0]["visual_tokens"] == run["cases"][1]["visual_tokens"] == dense
        tower = run["tower"]
        assert tower["stock"]["median_ms"] > 0 and tower["visprune"]["median_ms"] > 0
        assert tower["max_rel_diff"] < 1e-5  # visprune's runner gives the stock tower's features
        for c in run["cases"][2:]:
            assert c["budget"] == round(c["share"] * dense)
            assert c["ideal"]["median_ms"] > 0 and c["efficiency"] > 0 and c["speedup"] > 0
            assert c["decode_tokens_per_s"] > 0
            if c["method"] in ("divprune", "cdpruner"):  # the reducer replayed with its projector and prompts
                assert c["reduce"]["median_ms"] > 0 and c["vision"]["median_ms"] > 0
            if c["method"] in ("fastervlm", "divprune", "cdpruner"):
                assert c["visual_tokens"] == c["budget"] and c["options"]["budget"] == c["budget"]
                assert c["tokens_per_layer"] == [c["budget"] + run["text_tokens"]] * 4
                assert c["vision"]["repeats"] == 2 and c["reduce"]["repeats"] == 2
            else:
                assert c["options"]["keep_ratio"] == c["share"]
                assert c["visual_tokens"] == dense
                assert c["tokens_per_layer"][-1] == c["budget"] + run["text_tokens"]
        assert "materialized" not in run and "graph" not in run


def test_qwen_inputs_are_shaped_like_the_processors():
    model = tiny_qwen2_5_vl()
    family = family_for(model.config)
    inputs = family.make_inputs(model, 2, 448)
    assert inputs["pixel_values"].shape == (2 * 32 * 32, 3 * 2 * 14 * 14)
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]] * 2
    ids = inputs["input_ids"]
    assert ids.shape == (2, 35 + 1 + 256 + 1 + 16)
    assert ids[:, 35].eq(START).all() and ids[:, 36 + 256].eq(END).all()
    assert ids.eq(IMAGE).sum(1).tolist() == [256, 256]
    assert torch.equal(inputs["mm_token_type_ids"], ids.eq(IMAGE).long())
    assert not torch.isin(ids[:, :35], torch.tensor([IMAGE, VIDEO, START, END])).any()


def test_bundled_qwen_config_has_the_released_dimensions():
    cfg = configs.load("qwen2.5-vl-7b")
    vis, text = cfg.vision_config, cfg.text_config
    assert (vis.depth, vis.hidden_size, vis.intermediate_size, vis.num_heads, vis.out_hidden_size) == (
        32,
        1280,
        3420,
        16,
        3584,
    )
    assert list(vis.fullatt_block_indexes) == [7, 15, 23, 31] and vis.window_size == 112
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (
        3584,
        28,
        4,
        152064,
    )
    assert list(text.rope_parameters["mrope_section"]) == [16, 24, 24]
    family = family_for(cfg)
    assert [family.dense_tokens(s) for s in (448, 1008)] == [256, 1296]
    with pytest.raises(InputError, match="multiples of 28"):
        family.image_sizes((450,))
    with pytest.raises(InputError, match="exactly 336"):
        family_for(configs.load("llava-1.5-7b")).image_sizes((448,))


def test_bundled_qwen3_config_has_the_released_dimensions():
    cfg = configs.load("qwen3-vl-8b")
    vis, text = cfg.vision_config, cfg.text_config
    assert (vis.depth, vis.hidden_size, vis.intermediate_size, vis.num_heads, vis.patch_size) == (
        27,
        1152,
        4304,
        16,
        16,
    )
    assert list(vis.deepstack_visual_indexes) == [8, 16, 24] and vis.out_hidden_size == 4096
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.head_dim) == (4096, 36, 8, 128)
    assert list(text.rope_parameters["mrope_section"]) == [24, 20, 20]
    family = family_for(cfg)
    assert family.image_sizes(()) == (448, 1024)  # the default sizes on its 32-px merged-token grid
    assert [family.dense_tokens(s) for s in (448, 1024)] == [196, 1024]


def test_qwen3_bench_runs_with_the_tower_comparison(tmp_path, monkeypatch):
    """Qwen3-VL with --compile-tower: every patched case and its ideal run compiled, and the compiled
    tower is timed beside the plain runner (traced with aot_eager: no C compiler needed)."""
    from visprune.models import qwen_tower

    monkeypatch.setattr(qwen_tower, "COMPILE_BACKEND", "aot_eager")
    tiny_qwen3_vl().config.save_pretrained(tmp_path / "cfg")
    args = ["bench", "--config", str(tmp_path / "cfg"), "--device", "cpu", "--dtype", "float32", "--batch", "1"]
    args += ["--image-size", "56", "--budget-shares", "0.5", "--methods", "random", "--tower-layer", "2"]
    args += ["--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--decode-runs", "0", "--quiet"]
    assert main([*args, "--compile-tower", "--out", str(tmp_path / "out"), "--name", "q3"]) == 0
    run = json.loads((tmp_path / "out" / "q3.json").read_text())["runs"][0]
    assert [c.get("error") for c in run["cases"]] == [None, None, None]
    assert [c["options"].get("compile_tower") for c in run["cases"]] == [None, True, True]
    tower = run["tower"]
    assert tower["max_rel_diff"] < 1e-5 and tower["compiled_max_rel_diff"] < 1e-5
    assert tower["compiled"]["median_ms"] > 0
    assert "| visprune, compile_tower |" in (tmp_path / "out" / "q3.md").read_text()


def test_budget_shares():
    assert budget_for_share(0.0625, 1296) == 81 and budget_for_share(0.01, 16) == 1
    assert options_for_share("fastv", 0.25, 1296, 28) == {"keep_ratio": 0.25}
    assert options_for_share("visionzip", 0.125, 256, 28) == options_for_budget("visionzip", 32, 256, 28)
    assert options_for_share("prumerge+", None, 256, 28) == options_for_budget("prumerge+", None, 256, 28)
    with pytest.raises(InputError, match="share"):
        budget_for_share(1.5, 256)


def test_parts_a_family_cannot_measure_are_named():
    qwen = family_for(configs.load("qwen2.5-vl-7b"))
    both = _not_measured(BenchConfig(config="qwen2.5-vl-7b", batches=(1, 8)), qwen)
    assert set(both) == {"graph", "materialized"} and "CUDA graph" in both["graph"]
    assert _not_measured(BenchConfig(batches=(1, 8), graph=False, materialize=False), qwen) == {}
    assert _not_measured(BenchConfig(batches=(1, 16)), family_for(configs.load("llava-1.5-7b"))) == {}


def test_launch_free_mode_runs_the_three_modes(tmp_path):
    """`--launch-free`: dense, encoder-side and LLM-side cases in plain / launch-free / ideal modes, the ideal
    fed the launch-free path's token counts (per decoder layer too), a two-stage method (knee+text) and flowcut,
    which prunes inside the tower, too."""
    tiny_llava_config("sdpa").save_pretrained(tmp_path / "cfg")
    args = ["bench", "--config", str(tmp_path / "cfg"), "--device", "cpu", "--dtype", "float32", "--launch-free"]
    args += ["--new-tokens", "3", "--batch", "1", "--budgets", "24", "--methods", "fastervlm", "prumerge", "fastv"]
    args += ["knee+text", "sparsevlm", "flowcut"]  # sparsevlm: options with tuples, as apply takes them
    assert main([*args, "--out", str(tmp_path / "out"), "--name", "lf", "--quiet"]) == 0
    res = json.loads((tmp_path / "out" / "lf.json").read_text())
    cases = res["runs"][0]["launch_free_cases"]
    assert [(c["method"], c["budget"]) for c in cases] == [
        ("dense", None),
        ("fastervlm", 24),
        ("prumerge", None),
        ("fastv", 24),
        ("knee+text", None),
        ("sparsevlm", 24),
        ("flowcut", 24),
    ]
    assert all("error" not in c for c in cases)
    for c in cases[1:]:
        assert c["launch_free"]["visual_tokens_per_image"] == c["ideal"]["visual_tokens_per_image"]
        assert c["plain"]["visual_tokens_per_image"] == c["launch_free"]["visual_tokens_per_image"]
        assert c["launch_free"]["tokens_per_layer"] == c["ideal"]["tokens_per_layer"] == c["plain"]["tokens_per_layer"]
        assert c["efficiency"] == pytest.approx(c["ideal"]["ttft"]["median_ms"] / c["launch_free"]["ttft"]["median_ms"])
    assert cases[1]["launch_free"]["visual_tokens"] == 24
    fastv_layers = cases[3]["launch_free"]["tokens_per_layer"][0]
    assert fastv_layers[-1] < fastv_layers[0]  # the LLM-side stage pruned, in the ideal too
    knee_layers = cases[4]["launch_free"]["tokens_per_layer"][0]
    assert knee_layers[-1] < knee_layers[0]
    assert res["not_measured"] == {}
    markdown = (tmp_path / "out" / "lf.md").read_text()
    assert "## Launch-free generate, batch 1" in markdown and "| fastervlm | 24 | 24" in markdown
    assert (tmp_path / "out" / "lf.png").stat().st_size > 0


def test_rounds_alternate_the_prefill_and_its_ideal_and_pool_their_samples(tmp_path, monkeypatch):
    """--rounds R: a patched case and its ideal are timed in R alternating passes (case, ideal, case, ...),
    each of warmup + repeats, and their samples pooled."""
    import visprune
    from visprune.bench import runner

    tiny_llava_config("sdpa").save_pretrained(tmp_path / "cfg")
    applied = []
    real_apply = visprune.apply

    def recording_apply(model, method, **options):
        applied.append(method if isinstance(method, str) else "ideal")
        return real_apply(model, method, **options)

    monkeypatch.setattr(runner.visprune, "apply", recording_apply)
    args = ["bench", "--config", str(tmp_path / "cfg"), "--device", "cpu", "--dtype", "float32"]
    args += ["--repeats", "2", "--warmup", "0", "--rounds", "3", "--decode-runs", "0", "--new-tokens", "2"]
    args += ["--batch", "1", "--budgets", "8", "--methods", "fastervlm", "--no-materialize", "--no-graph"]
    assert main([*args, "--out", str(tmp_path / "out"), "--name", "r", "--quiet"]) == 0
    case = json.loads((tmp_path / "out" / "r.json").read_text())["runs"][0]["cases"][1]
    assert applied == ["fastervlm", "ideal"] * 3
    assert case["prefill"]["repeats"] == 6 and case["ideal"]["repeats"] == 6
    assert case["efficiency"] == pytest.approx(case["ideal"]["median_ms"] / case["prefill"]["median_ms"])
    assert "3 alternating passes of that, pooled: 6 samples each" in (tmp_path / "out" / "r.md").read_text()


def test_launch_free_rounds_alternate_its_ttft_and_the_ideals(tmp_path, monkeypatch):
    """--launch-free --rounds R: after the plain mode, the launch-free path and its ideal alternate R times
    (a new apply each), their TTFT samples pooled; the end to end time comes from the first pass."""
    import visprune
    from visprune.bench import launch_free

    tiny_llava_config("sdpa").save_pretrained(tmp_path / "cfg")
    applied = []
    real_apply = visprune.apply

    def recording_apply(model, method, launch_free=False, **options):
        name = method if isinstance(method, str) else "ideal"
        applied.append(f"{name}{'/free' if launch_free else ''}")
        return real_apply(model, method, launch_free=launch_free, **options)

    monkeypatch.setattr(launch_free.visprune, "apply", recording_apply)
    monkeypatch.setattr(launch_free, "TTFT_REPEATS", 2)
    args = ["bench", "--config", str(tmp_path / "cfg"), "--device", "cpu", "--dtype", "float32", "--launch-free"]
    args += ["--rounds", "3", "--new-tokens", "2", "--batch", "1", "--budgets", "8", "--methods", "fastervlm"]
    assert main([*args, "--out", str(tmp_path / "out"), "--name", "lfr", "--quiet"]) == 0
    dense, case = json.loads((tmp_path / "out" / "lfr.json").read_text())["runs"][0]["launch_free_cases"]
    assert applied == ["none/free", "fastervlm"] + ["fastervlm/free", "ideal/free"] * 3
    assert case["launch_free"]["ttft"]["repeats"] == 6 and case["ideal"]["ttft"]["repeats"] == 6
    assert case["plain"]["ttft"]["repeats"] == 2 and dense["launch_free"]["ttft"]["repeats"] == 2
    assert case["launch_free"]["e2e"]["repeats"] == launch_free.E2E_REPEATS
    assert case["efficiency"] == pytest.approx(
        case["ideal"]["ttft"]["median_ms"] / case["launch_free"]["ttft"]["median_ms"]
    )
    assert "3 alternating passes, pooled: 6 samples each" in (tmp_path / "out" / "lfr.md").read_text()
