"""The command line: `visprune methods` prints every registered method; ordinary mistakes are one-line
errors with exit code 2, not tracebacks."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visprune
from tests.models.tiny import tiny_llava_config
from visprune.cli import main


def test_methods_table_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for spec in visprune.list_methods():
        assert spec.name in out
    assert "adaptive" in out and "fixed" in out


def test_methods_verbose_shows_apply_keywords(capsys):
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "visprune.apply(model, name, option=value)" in out.splitlines()[0]
    assert "    budget=64  " in out and "--" not in out


def test_methods_is_the_subpackage_and_list_methods_the_function():
    assert inspect.ismodule(visprune.methods) and visprune.methods.__name__ == "visprune.methods"
    assert [s.name for s in visprune.list_methods()] == [s.name for s in visprune.methods.list_methods()]
    assert "list_methods" in visprune.__all__ and "methods" not in visprune.__all__


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "visprune.cli", "methods"], capture_output=True, text=True)
    assert res.returncode == 0 and "prumerge" in res.stdout


def test_license_is_the_apache_license_pyproject_declares():
    root = Path(__file__).resolve().parents[1]
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()
    text = (root / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) >= 200


def _one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visprune") and "error" in lines[0], err
    for word in words:
        assert word in lines[0], err


def _bench_config(tmp_path: Path) -> str:
    tiny_llava_config("sdpa").save_pretrained(tmp_path / "cfg")
    return str(tmp_path / "cfg")


def _not_an_image(tmp_path: Path) -> str:
    (tmp_path / "notes.png").write_text("not a picture")
    return str(tmp_path / "notes.png")


def _folder_without_config(tmp_path: Path) -> str:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    return str(tmp_path / "ckpt")


CASES = {
    "bench-without-gpu": (
        lambda t: ["bench", "--config", _bench_config(t), "--device", "cuda", "--out", str(t / "b")],
        ("CUDA", "--device cpu"),
        True,
    ),
    "demo-without-gpu": (lambda t: ["demo", "--device", "cuda", "--out", str(t / "d.png")], ("CUDA",), True),
    "unknown-device": (lambda t: ["demo", "--device", "gpu0", "--out", str(t / "d.png")], ("gpu0",), False),
    "demo-model-missing": (
        lambda t: ["demo", "--model", str(t / "no-such-folder"), "--out", str(t / "d.png")],
        ("does not exist",),
        False,
    ),
    "demo-model-without-config": (
        lambda t: ["demo", "--model", _folder_without_config(t), "--out", str(t / "d.png")],
        ("config.json",),
        False,
    ),
    "bench-model-without-config": (
        lambda t: ["bench", "--model", _folder_without_config(t), "--device", "cpu", "--out", str(t / "b")],
        ("config.json",),
        False,
    ),
    "viz-not-an-image": (
        lambda t: ["viz", "--image", _not_an_image(t), "--out", str(t / "v.png")],
        ("not an image",),
        False,
    ),
    "viz-folder": (lambda t: ["viz", "--image", str(t), "--out", str(t / "v.png")], ("not a file",), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ordinary_mistakes_are_one_line_errors(case, tmp_path, capsys):
    argv, words, needs_no_gpu = CASES[case]
    if needs_no_gpu and torch.cuda.is_available():
        pytest.skip("checks the error on a machine without a GPU")
    assert main(argv(tmp_path)) == 2
    _one_line_error(capsys.readouterr().err, *words)
    assert not (tmp_path / "b").exists() and not (tmp_path / "d.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--batch-size", "0"],
        ["eval", "--limit", "0"],
        ["eval", "--max-new-tokens", "-1"],
        ["bench", "--batch", "0", "16"],
        ["bench", "--repeats", "many"],
        ["bench", "--budget-shares", "0", "0.5"],
        ["bench", "--budget-shares", "1.5"],
        ["bench", "--budgets", "64", "--budget-shares", "0.25"],
        ["bench", "--image-size", "0"],
    ],
)
def test_bad_numbers_are_one_line_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_line_error(capsys.readouterr().err, f"argument {next(a for a in argv[1:] if a.startswith('--'))}")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("internal bug")

    monkeypatch.setattr("visprune.list_methods", broken)
    with pytest.raises(RuntimeError, match="internal bug"):
        main(["methods"])
