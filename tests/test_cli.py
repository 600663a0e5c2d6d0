"""The command line: `visprune methods` prints every registered method."""

import inspect
import subprocess
import sys
from pathlib import Path

import visprune
from visprune.cli import main


def test_methods_table_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for spec in visprune.list_methods():
        assert spec.name in out
    assert "adaptive" in out and "fixed" in out


def test_methods_verbose_shows_option_docs(capsys):
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "--budget=64" in out


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "visprune.cli", "methods"], capture_output=True, text=True)
    assert res.returncode == 0 and "prumerge" in res.stdout


def test_methods_is_the_subpackage_and_list_methods_the_function():
    assert inspect.ismodule(visprune.methods) and visprune.methods.__name__ == "visprune.methods"
    assert [s.name for s in visprune.list_methods()] == [s.name for s in visprune.methods.list_methods()]
    assert "list_methods" in visprune.__all__ and "methods" not in visprune.__all__


def test_license_is_the_apache_license_pyproject_declares():
    root = Path(__file__).resolve().parents[1]
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()
    text = (root / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) >= 200
