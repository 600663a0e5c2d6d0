"""The lmms-eval plugin end to end, offline: the entry point in a real lmms-eval installation, the local
synthetic task written by `visprune lmms-task`, and the bundled model through lmms-eval for `none` and two
methods, whose accuracy (and every answer, and the visual tokens) equal `visprune eval` on the same items;
`lmms-eval --model visprune` on the command line, and under lmms-eval's own accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import visprune
from visprune.eval import EvalConfig, evaluate
from visprune.synth import FAMILIES, load_split, score

ITEMS, BATCH = 14, 7  # two items per family, two batches
# (lmms-eval model_args, the `visprune eval` cell with the same options)
RUNS = [("method=none", "none"), ("method=prumerge+", "prumerge+"), ("method=divprune,tokens=64", "divprune@64")]
TASK = "visprune_synth"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("task")
    run = subprocess.run(
        [sys.executable, "-m", "visprune.cli", "lmms-task", "--out", str(out), "--limit", str(ITEMS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """`visprune eval` on the same items, batches and methods."""
    cfg = EvalConfig(model="tiny-llava", limit=ITEMS, batch_size=BATCH, methods=["prumerge+", "divprune"], budgets=[64])
    return evaluate(cfg, tmp_path_factory.mktemp("eval"), device="cpu", progress=False, log=lambda _: None)


def _evaluate(lmms_eval, task_dir: Path, model_args: str) -> dict:
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(task_dir), include_defaults=False, model_name="visprune")
    return evaluator.simple_evaluate(
        model="visprune",
        model_args=f"pretrained=tiny-llava,device=cpu,{model_args}",
        tasks=[TASK],
        batch_size=BATCH,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )


def test_the_entry_point_registers_the_model(lmms_eval):
    from lmms_eval.models import get_model, list_available_models

    assert [ep.value for ep in entry_points(group="lmms_eval.models") if ep.name == "visprune"] == [
        "visprune.lmms:manifest"
    ]
    assert "visprune" in list_available_models()
    cls = get_model("visprune")
    assert cls.__module__ == "visprune.lmms.model" and cls.is_simple


def test_bad_model_args_raise_the_librarys_errors(lmms_eval):
    from lmms_eval.models import get_model

    cls = get_model("visprune")
    with pytest.raises(visprune.UnknownMethodError) as info:
        cls.create_from_arg_string("method=prumerge++", {"device": "cpu"})
    with pytest.raises(visprune.UnknownMethodError) as same:
        visprune.get_method("prumerge++")
    assert str(info.value) == str(same.value)
    with pytest.raises(visprune.InputError, match="method 'fastervlm': budget=0 is out of range"):
        cls.create_from_arg_string("method=fastervlm,budget=0")
    with pytest.raises(visprune.InputError, match=r"unknown model_args key\(s\) 'bugdet'.*pretrained"):
        cls.create_from_arg_string("method=fastervlm,bugdet=64")
    with pytest.raises(visprune.InputError, match="does not exist"):
        cls.create_from_arg_string("pretrained=/no/such/folder,method=none")


@pytest.mark.parametrize(("model_args", "cell"), RUNS)
def test_accuracy_equals_visprune_eval(lmms_eval, task_dir, reference, model_args, cell):
    results = _evaluate(lmms_eval, task_dir, model_args)
    expected = reference["cells"][cell]
    scores = results["results"][TASK]
    assert scores["accuracy,none"] == expected["accuracy"]["overall"]
    for family in FAMILIES:
        assert scores[f"{family},none"] == expected["accuracy"][family], family
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    answers = [_text(s["filtered_resps"]).strip() for s in samples]
    assert answers == expected["predictions"]
    throughput = results["throughput"]
    assert throughput[f"avg_{TASK}/items"] == ITEMS
    assert throughput[f"avg_{TASK}/visual_tokens_llm"] == pytest.approx(expected["visual_tokens_llm"])
    assert throughput[f"avg_{TASK}/visual_tokens_llm_layer_avg"] == pytest.approx(expected["visual_tokens_per_layer"])
    assert throughput[f"avg_{TASK}/visual_tokens_in"] == 576
    assert throughput[f"avg_{TASK}/prefill_ms_per_batch"] > 0


def _text(resps: str | list) -> str:
    return resps if isinstance(resps, str) else resps[0]


def _cli(task_dir: Path, out: Path, model_args: str, launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        *launcher,
        "--model",
        "visprune",
        "--model_args",
        f"pretrained=tiny-llava,device=cpu,{model_args},record={out / 'visprune.json'}",
        "--include_path",
        str(task_dir),
        "--tasks",
        TASK,
        "--batch_size",
        str(BATCH),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _saved(out: Path) -> dict:
    (path,) = out.glob("*/*_results.json")
    return json.loads(path.read_text())


def test_the_lmms_eval_command_line(lmms_eval, task_dir, reference, tmp_path):
    lmms_cli = Path(sys.executable).with_name("lmms-eval")
    run = _cli(task_dir, tmp_path, "method=prumerge+", [str(lmms_cli)])
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "Throughput Summary" in run.stdout and f"avg_{TASK}/visual_tokens_llm" in run.stdout
    saved = _saved(tmp_path)
    expected = reference["cells"]["prumerge+"]
    assert saved["results"][TASK]["accuracy,none"] == expected["accuracy"]["overall"]
    assert "method=prumerge+" in saved["config"]["model_args"]
    record = json.loads((tmp_path / "visprune.json").read_text())
    assert record["method"] == ["prumerge+"] and record["options"]["prumerge+"]["fence"] == "per-image"
    assert record["tasks"][TASK]["visual_tokens_llm"] == pytest.approx(expected["visual_tokens_llm"])


def test_under_accelerate_launch_with_two_processes(lmms_eval, task_dir, reference, tmp_path):
    """lmms-eval's own launch (`accelerate launch --multi_gpu` runs torch's launcher; with no GPU the processes
    run on the CPU). 13 items: rank 1 gets 6 and one padding request, which the tallies leave out."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval"]
    run = _cli(task_dir, tmp_path, "method=divprune,tokens=64", [*launch, "--limit", "13"])
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "Running on rank 1" in run.stdout + run.stderr
    saved = _saved(tmp_path)
    predictions = reference["cells"]["divprune@64"]["predictions"][:13]
    expected = sum(score(p, item.answer) for p, item in zip(predictions, load_split("test", n=13), strict=True)) / 13
    assert saved["results"][TASK]["accuracy,none"] == expected
    assert saved["throughput"][f"avg_{TASK}/items"] == 13  # both processes' tallies, no padding
    assert saved["throughput"][f"avg_{TASK}/visual_tokens_llm"] == 64
    record = json.loads((tmp_path / "visprune.json").read_text())
    assert record["tasks"][TASK]["items"] == 13
