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


@pytest.mark.skipif(not bundled.available(), reason="bundled model weights missing")
def test_llm_side_panels_show_how_far_each_token_reaches() -> None:
    """fastv drops half the visual tokens at LLM layer 2: the panel's reach is every layer for the kept
    half and 2 for the rest; knee+text's tokens the knee dropped reach 0 layers; an encoder-only method
    has no reach (its token overlay is drawn)."""
    from visprune.viz import run_methods

    net, processor = bundled.load(None, device="cpu")
    item = load_split("test", 7)[6]
    views = run_methods(net, processor, [item.image()], [item.text], ["fastv", "knee+text", "fastervlm"])
    layers = net.config.text_config.num_hidden_layers
    fastv = views["fastv"][0]
    assert sorted(set(fastv.reach.tolist())) == [2, layers]
    assert int((fastv.reach == layers).sum()) == fastv.tokens_last == 576 // 2
    knee = views["knee+text"][0]
    assert int((knee.reach > 0).sum()) == knee.tokens_llm and int((knee.reach == layers).sum()) == knee.tokens_last
    assert views["fastervlm"][0].reach is None


def test_survival_overlay_darkens_tokens_that_never_reach_the_llm() -> None:
    from visprune.viz import survival_overlay

    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    out = survival_overlay(image, np.array([0, 2, 4, 4]), (2, 2), 4)
    assert out[0, 0].max() < 0.2 < out[0, 2].max()  # token 0 (top left) dark, token 1 lit
    assert not np.allclose(out[0, 2], out[2, 2])  # reached 2 of 4 layers vs all 4: different colours
    np.testing.assert_allclose(out[2, 0], out[2, 2])  # both reach all layers
