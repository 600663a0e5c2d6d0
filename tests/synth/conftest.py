"""An independent answer oracle: parses question text and answers from the scene description alone."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from visprune.synth import Scene

CELL_NAMES = [
    ["top-left", "top", "top-right"],
    ["left", "center", "right"],
    ["bottom-left", "bottom", "bottom-right"],
]


def _centre(obj) -> tuple[float, float]:
    x0, y0, x1, y1 = obj.bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def _singular(word: str) -> str:
    return word[:-2] if word.endswith("sses") else word[:-1]


def _the_one(scene: Scene, color: str | None = None, shape: str | None = None):
    """The single object matching the description; fails the test if there is not exactly one."""
    matches = [o for o in scene.objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]
    assert len(matches) == 1, f"ambiguous or missing referent color={color} shape={shape}: {len(matches)} matches"
    return matches[0]


def answer_question(scene: Scene, text: str) -> str:
    """Recompute the answer of a suite question from the scene description."""
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", text):
        present = any(o.color == m[1] and o.shape == m[2] for o in scene.objects)
        return "yes" if present else "no"
    if m := re.fullmatch(r"What color is the (\w+)\?", text):
        return _the_one(scene, shape=m[1]).color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", text):
        return _the_one(scene, color=m[1]).shape
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        return str(sum(o.color == m[1] for o in scene.objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", text):
        return str(sum(o.shape == _singular(m[1]) for o in scene.objects))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", text):
        x, y = _centre(_the_one(scene, m[1], m[2]))
        return CELL_NAMES[int(y // 112)][int(x // 112)]
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", text):
        (ax, ay), (bx, by) = _centre(_the_one(scene, m[1], m[2])), _centre(_the_one(scene, m[4], m[5]))
        holds = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[m[3]]
        return "yes" if holds else "no"
    if m := re.fullmatch(r"What is written (on|next to) the (\w+) (\w+)\?", text):
        obj = _the_one(scene, m[2], m[3])
        assert obj.text_where == ("on" if m[1] == "on" else "beside")
        return obj.text
    raise AssertionError(f"unrecognised question: {text!r}")


@pytest.fixture(scope="session")
def oracle() -> Callable[[Scene, str], str]:
    """The independent answer function."""
    return answer_question
