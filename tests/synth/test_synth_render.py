"""Rendering: format, byte-for-byte determinism, visible objects and legible text."""

from __future__ import annotations

import numpy as np
import pytest

from visprune.synth import make_scene, render, render_background
from visprune.synth.glyphs import _scaled_bitmap_mask, text_extent
from visprune.synth.scene import FONT_SIZES, TEXTS

SCENES = [make_scene(s) for s in range(40)]


def test_image_format() -> None:
    image = render(SCENES[0])
    assert image.size == (336, 336) and image.mode == "RGB"


def test_same_scene_same_pixels() -> None:
    for seed in (0, 1, 123456789):
        assert render(make_scene(seed)).tobytes() == render(make_scene(seed)).tobytes()


def test_different_scenes_differ() -> None:
    assert render(SCENES[0]).tobytes() != render(SCENES[1]).tobytes()


@pytest.mark.parametrize("scene", SCENES)
def test_objects_and_text_visible(scene) -> None:
    image = np.asarray(render(scene), dtype=int)
    background = np.asarray(render_background(scene), dtype=int)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        if obj.text_where != "on":
            assert np.abs(image[cy, cx] - background[cy, cx]).sum() > 90, f"{obj.color} {obj.shape} not visible"
            assert np.abs(image[cy, cx] - np.array(obj.rgb)).sum() == 0
        if obj.text:
            tx0, ty0, tx1, ty1 = obj.text_bbox
            patch = image[ty0:ty1, tx0:tx1]
            under = np.array(obj.rgb) if obj.text_where == "on" else background[ty0:ty1, tx0:tx1]
            assert np.abs(patch - under).sum(axis=-1).max() > 200, f"text {obj.text!r} not legible"
            ink = np.abs(patch - np.array(obj.text_rgb)).sum(axis=-1) < 60
            assert ink[:, : max(1, ink.shape[1] // 2)].any() and ink[:, ink.shape[1] // 2 :].any()


def test_small_objects_fit_one_or_two_patches() -> None:
    small = [o for scene in SCENES for o in scene.objects if o.size == "small"]
    assert small and all(12 <= o.side <= 24 for o in small)


def test_every_text_legible_at_patch_resolution() -> None:
    assert min(text_extent(text, FONT_SIZES[0])[1] for text in TEXTS) >= 12


def test_bitmap_font_fallback_is_large_enough() -> None:
    mask = _scaled_bitmap_mask("CAT", FONT_SIZES[0])
    assert mask.mode == "L" and mask.height >= 12 and mask.getbbox() is not None
