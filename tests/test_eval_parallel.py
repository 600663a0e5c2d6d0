"""Data-parallel `visprune eval`: under several processes (torchrun / accelerate launch) the batches are
dealt out, the results are gathered, and they equal a single process's item by item; resuming works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from visprune.errors import InputError
from visprune.eval import EvalConfig, evaluate, parallel
from visprune.eval.parallel import Processes

ARGS = ["--task", "synth", "--limit", "10", "--batch-size", "3", "--budgets", "8", "--quiet"]


def test_batches_are_dealt_out_whole_and_in_turn():
    two = [Processes(index=i, count=2) for i in range(2)]
    assert [b for b in range(5) if two[0].owns(b)] == [0, 2, 4]
    assert [b for b in range(5) if two[1].owns(b)] == [1, 3]
    single = Processes()
    assert single.is_main and all(single.owns(b) for b in range(5))
    assert single.gather([3, 1]) == [3, 1]


def test_more_processes_than_gpus_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(InputError, match=r"2 evaluation processes .* 1 GPU\(s\) .* --num_processes 1"):
        parallel.current()


def test_two_processes_equal_one_item_by_item_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = EvalConfig(model="tiny-llava", split="test", limit=10, batch_size=3, methods=["random", "knee"], budgets=[8])
    single = evaluate(cfg, one, device="cpu", progress=False, log=lambda _: None)
    # The two-process run resumes a results file that holds the dense and random cells already.
    partial = evaluate(
        EvalConfig(**{**cfg.__dict__, "methods": ["random"]}), two, device="cpu", progress=False, log=lambda _: None
    )
    stamp = partial["cells"]["random@8"]["seconds"]
    run = subprocess.run(
        [  # accelerate's launcher; --multi_gpu starts torch's launcher, whose processes use gloo without a GPU
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "visprune.cli",
            "eval",
            *ARGS,
            "--methods",
            "random",
            "knee",
            "--out",
            str(two),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # the main process alone reports
    assert "resuming: 2 of 3 cells" in run.stdout
    parallel = json.loads((two / "results.json").read_text())
    assert parallel["environment"]["processes"] == 2 and parallel["items"] == 10
    assert parallel["cells"]["random@8"]["seconds"] == stamp  # resumed, not run again
    for name, cell in single["cells"].items():
        other = parallel["cells"][name]
        assert other["predictions"] == cell["predictions"], name
        assert other["accuracy"] == cell["accuracy"], name
        for key in ("visual_tokens_in", "visual_tokens_llm", "visual_tokens_per_layer"):
            assert other[key] == cell[key], (name, key)
