"""Scene generator: determinism and layout invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from visprune.synth import make_scene
from visprune.synth.scene import CANVAS, COLORS, MAX_OBJECTS, MIN_OBJECTS, SHAPES, SIZE_RANGES, TEXTS

SEEDS = range(300)
SCENES = [make_scene(s) for s in SEEDS]


@given(st.integers(min_value=0, max_value=2**48))
def test_same_seed_same_scene(seed: int) -> None:
    assert make_scene(seed) == make_scene(seed)


def test_generator_and_seed_agree() -> None:
    a, b = make_scene(7), make_scene(np.random.default_rng(7))
    assert a.seed == 7 and b.seed is None
    assert (a.background, a.objects) == (b.background, b.objects)


def test_different_seeds_differ() -> None:
    assert len({scene.objects for scene in SCENES}) == len(SCENES)


@pytest.mark.parametrize("scene", SCENES[:100])
def test_layout_invariants(scene) -> None:
    assert MIN_OBJECTS <= len(scene.objects) <= MAX_OBJECTS
    units = []
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        assert obj.shape in SHAPES and obj.color in COLORS
        lo, hi = SIZE_RANGES[obj.size]
        assert x1 - x0 == y1 - y0 and lo <= x1 - x0 <= hi and x1 - x0 >= 12
        assert min(x0, y0) >= 0 and max(x1, y1) <= CANVAS
        for centre in ((x0 + x1) / 2, (y0 + y1) / 2):
            assert min(abs(centre - 112), abs(centre - 224)) >= 8, "centre too close to a 3x3 cell border"
        unit = obj.bbox
        if obj.text is not None:
            tx0, ty0, tx1, ty1 = obj.text_bbox
            assert obj.text in TEXTS and 1 <= len(obj.text) <= 3
            assert ty1 - ty0 >= 12, "glyphs must be at least 12 px high"
            assert min(tx0, ty0) >= 0 and max(tx1, ty1) <= CANVAS
            if obj.text_where == "on":
                assert x0 <= tx0 and y0 <= ty0 and tx1 <= x1 and ty1 <= y1
            else:
                assert obj.text_where == "beside"
                unit = (min(x0, tx0), min(y0, ty0), max(x1, tx1), max(y1, ty1))
        units.append(unit)
    for a, b in itertools.combinations(units, 2):
        apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert apart, "objects (with their text) must not overlap"
    texts = [o.text for o in scene.objects if o.text]
    assert len(texts) == len(set(texts))


def test_suite_has_variety() -> None:
    objects = [o for scene in SCENES for o in scene.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.size for o in objects} == set(SIZE_RANGES)
    assert {o.text_where for o in objects} == {None, "on", "beside"}
    backgrounds = [s.background for s in SCENES]
    assert {b.kind for b in backgrounds} == {"plain", "gradient"}
    assert {b.texture for b in backgrounds} == {"none", "grain", "blotch"}
    assert {b.tone for b in backgrounds} == {"light", "dark"}
    assert sum(o.size == "small" for o in objects) > 0.25 * len(objects)
