"""The command line: `visprune methods` prints every registered method."""

import subprocess
import sys

import visprune
from visprune.cli import main


def test_methods_table_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for spec in visprune.methods():
        assert spec.name in out
    assert "adaptive" in out and "fixed" in out


def test_methods_verbose_shows_option_docs(capsys):
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "--budget=64" in out


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "visprune.cli", "methods"], capture_output=True, text=True)
    assert res.returncode == 0 and "prumerge" in res.stdout
