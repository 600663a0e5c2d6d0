"""Questions: answers checked by an independent oracle, unambiguity, coverage, determinism, vocabulary."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from visprune.synth import (
    FAMILIES,
    SUBTYPES,
    families,
    format_prompt,
    make_question,
    make_questions,
    make_scene,
    tokenize,
    vocabulary,
)
from visprune.synth.questions import POPULAR_PAIRS

SCENES = [make_scene(s) for s in range(1000, 1300)]
QUESTIONS = [(scene, q) for i, scene in enumerate(SCENES) for q in make_questions(scene, i)]


def test_families_listed() -> None:
    assert (
        families()
        == list(FAMILIES)
        == [
            "existence",
            "color",
            "shape",
            "counting",
            "position",
            "relation",
            "reading",
        ]
    )


def test_answers_match_oracle(oracle) -> None:
    for scene, question in QUESTIONS:
        assert oracle(scene, question.text) == question.answer, question


@given(st.integers(min_value=0, max_value=2**40))
def test_answers_match_oracle_any_seed(oracle, seed: int) -> None:
    scene = make_scene(seed)
    for question in make_questions(scene, np.random.default_rng(seed)):
        assert oracle(scene, question.text) == question.answer, question


def test_every_family_and_subtype_occurs() -> None:
    seen = Counter((q.family, q.subtype) for _, q in QUESTIONS)
    assert set(seen) == {(f, s) for f in FAMILIES for s in SUBTYPES[f]}


def test_question_objects_are_the_referents() -> None:
    for scene, q in QUESTIONS:
        referents = [scene.objects[i] for i in q.objects]
        if q.family in {"color", "shape", "position", "reading"}:
            assert len(referents) == 1
        if q.family in {"color", "shape", "position"}:
            assert referents[0].size == q.subtype
        if q.family == "counting":
            assert str(len(referents)) == q.answer
        if q.family == "existence":
            assert (len(referents) > 0) == (q.answer == "yes")


def test_relations_have_no_near_ties() -> None:
    for scene, q in QUESTIONS:
        if q.family == "relation":
            a, b = (scene.objects[i] for i in q.objects)
            axis = 0 if q.subtype in {"left", "right"} else 1
            gap = max(b.bbox[axis] - a.bbox[axis + 2], a.bbox[axis] - b.bbox[axis + 2])
            assert gap >= 8


def test_existence_negatives() -> None:
    negatives = [(s, q) for s, q in QUESTIONS if q.family == "existence" and q.answer == "no"]
    assert {q.subtype for _, q in negatives} == set(SUBTYPES["existence"])
    for scene, q in negatives:
        color, shape = q.text.split()[3:5]
        present = {(o.color, o.shape) for o in scene.objects}
        assert (color, shape) not in present
        if q.subtype == "popular":
            assert (color, shape) in POPULAR_PAIRS
        if q.subtype == "adversarial":
            assert any(color == c or shape == s for c, s in present)
    frequency = Counter((o.color, o.shape) for scene in SCENES for o in scene.objects)
    popular = np.mean([frequency[p] for p in POPULAR_PAIRS])
    assert popular > 1.5 * np.mean(list(frequency.values()))


def test_forced_answers() -> None:
    rng = np.random.default_rng(0)
    for scene in SCENES[:60]:
        for family, answers in (("existence", ["yes", "no"]), ("relation", ["yes", "no"]), ("counting", ["1", "2"])):
            for answer in answers:
                q = make_question(scene, family, rng, answer=answer)
                assert q is None or q.answer == answer


def test_questions_deterministic() -> None:
    for seed in range(20):
        scene = make_scene(seed)
        assert make_questions(scene, seed) == make_questions(make_scene(seed), np.random.default_rng(seed))


def test_vocabulary_covers_everything() -> None:
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    used = set()
    for _, q in QUESTIONS:
        used.update(tokenize(format_prompt(q.text)), tokenize(q.answer))
    assert used <= set(vocab), used - set(vocab)
    assert {"<image>", "top-left", "how", "?", "yes", "no"} <= set(vocab)
    assert len(vocab) < 400
