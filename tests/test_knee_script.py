"""scripts/knee_operating_point.py: the study behind knee+text's defaults runs and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_knee_study_writes_rows_for_the_settings_it_ran(tmp_path):
    only = [
        ["knee", {"signal": "cosine", "detector": "max-gap"}],
        ["knee+text", {"detector": "kneedle", "text_keep_ratio": 0.5}],
    ]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/knee_operating_point.py"),
            "--limit",
            "3",
            "--device",
            "cpu",
            "--only",
            json.dumps(only),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads((tmp_path / "val.json").read_text())
    assert result["split"] == "val" and result["limit"] == 3 and result["device"] == "cpu"
    assert [[r["method"], r["options"]] for r in result["rows"]] == only
    for row in result["rows"]:
        assert 0 < row["tokens_llm_share"] <= 1 and 0 < row["tokens_per_layer_share"] <= row["tokens_llm_share"]
        assert 0 <= row["accuracy"] <= 1
    table = (tmp_path / "val.md").read_text()
    assert "| knee | cosine | max-gap | - |" in table and "| knee+text | default | kneedle | ratio 0.5 |" in table
