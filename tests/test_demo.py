"""`visprune demo` runs end to end on the CPU with the bundled model and writes its PNG."""

from __future__ import annotations

import pytest

from visprune import bundled, cli
from visprune.demo import DEMO_ITEMS, DEMO_METHODS

pytestmark = pytest.mark.skipif(not bundled.available(), reason="bundled model weights missing")


def test_demo_cli(tmp_path, capsys) -> None:
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    assert text.count("true answer:") == len(DEMO_ITEMS)
    for label in ("dense", *DEMO_METHODS[1:]):
        assert text.count(f"    {label} ") == len(DEMO_ITEMS)
    assert f"wrote {png}" in text


def test_demo_other_methods(tmp_path, capsys) -> None:
    png = tmp_path / "d.png"
    assert cli.main(["demo", "--out", str(png), "--methods", "pool"]) == 0
    text = capsys.readouterr().out
    assert text.count("    dense ") == len(DEMO_ITEMS) and text.count("    pool ") == len(DEMO_ITEMS)
    assert png.stat().st_size > 0


def test_demo_unknown_method_is_an_error(tmp_path, capsys) -> None:
    assert cli.main(["demo", "--out", str(tmp_path / "x.png"), "--methods", "prumerge++"]) == 2
    assert "prumerge" in capsys.readouterr().err
