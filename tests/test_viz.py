"""`visprune viz` and its helpers: token overlays, the CLS-attention fence and knee, the PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visprune import bundled, cli
from visprune.methods import Reduction
from visprune.methods.knee_point import knee_count
from visprune.methods.prumerge import outlier_counts
from visprune.synth import load_split
from visprune.viz import summarize_attention, token_overlay


def test_overlay_marks_kept_merged_and_dropped() -> None:
    image = np.full((28, 28, 3), 200, dtype=np.uint8)  # a 2 x 2 grid of 14 px patches
    red = Reduction(features=torch.zeros(1, 4), sources=torch.tensor([0]), assignment=torch.tensor([0, 0, -1, -1]))
    out = token_overlay(image, red, (2, 2))
    assert out.shape == (28, 28, 3)
    assert out[0, 0].tolist() == [1.0, 1.0, 1.0]  # kept token: white outline
    assert out[20, 20].max() < 0.3  # dropped: dimmed
    merged, kept_inside = out[7, 20], out[7, 7]
    assert not np.allclose(merged, 200 / 255) and not np.allclose(kept_inside, merged)


def test_attention_summary_uses_the_methods_cuts() -> None:
    scores = torch.cat([torch.tensor([0.2, 0.15, 0.1]), torch.full((61,), 0.55 / 61)])
    summary = summarize_attention(scores)
    assert summary.outliers == int(outlier_counts(scores.unsqueeze(0))[0]) == 3
    assert summary.knee == int(knee_count(scores.sort(descending=True).values.unsqueeze(0))[0])
    assert (scores > summary.fence).sum() == summary.outliers


@pytest.mark.skipif(not bundled.available(), reason="bundled model weights missing")
def test_viz_cli_writes_png(tmp_path) -> None:
    image = tmp_path / "scene.png"
    load_split("test", 7)[6].image().save(image)
    out = tmp_path / "viz.png"
    args = ["viz", "--image", str(image), "--out", str(out), "--methods", "prumerge", "knee+text", "fastv"]
    assert cli.main(args) == 0
    assert out.stat().st_size > 10_000


@pytest.mark.skipif(not bundled.available(), reason="bundled model weights missing")
def test_viz_missing_image_is_an_error(tmp_path, capsys) -> None:
    assert cli.main(["viz", "--image", str(tmp_path / "nope.png"), "--out", str(tmp_path / "v.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_score_attention_uses_the_best_signal_of_the_tower(tower) -> None:
    from tests.models import tiny
    from visprune.methods import SignalRequest
    from visprune.models import vision
    from visprune.viz import score_attention

    model = tiny.tiny_llava() if tower == "clip" else tiny.tiny_llava_siglip()
    pixels = tiny.varied_pixels(model, 2)
    scores, label = score_attention(model, pixels)
    kind = "cls_attn" if tower == "clip" else "mean_received"
    assert label == ("CLS attention" if tower == "clip" else "mean-received attention")
    strategy = model.config.vision_feature_select_strategy
    with torch.no_grad():
        ref = vision.encode(
            model.model.vision_tower, pixels[:1], -2, strategy, {"s": SignalRequest(kind, (-1,), "single")}
        )
    torch.testing.assert_close(scores, ref.signals["s"][0])
    assert summarize_attention(scores, label).label == label
    received, label = score_attention(model, pixels, "mean-received")
    assert label == "mean-received attention" and received.shape == (64,)
