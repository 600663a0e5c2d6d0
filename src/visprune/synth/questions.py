"""Question families with exact short answers, computed from the scene description only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from visprune.synth.scene import COLOR_NAMES, COLOR_WEIGHTS, SHAPE_PLURALS, SHAPE_WEIGHTS, SHAPES, Scene, SceneObject

FAMILIES: tuple[str, ...] = ("existence", "color", "shape", "counting", "position", "relation", "reading")
SUBTYPES: dict[str, tuple[str, ...]] = {
    "existence": ("random", "popular", "adversarial"),
    "color": ("small", "medium", "large"),
    "shape": ("small", "medium", "large"),
    "counting": ("color", "shape"),
    "position": ("small", "medium", "large"),
    "relation": ("left", "right", "above", "below"),
    "reading": ("on", "beside"),
}
YES_NO_FAMILIES: frozenset[str] = frozenset({"existence", "relation"})
RELATION_PHRASES: dict[str, str] = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
RELATION_GAP = 8  # min free pixels between the two bboxes along the relation's axis
POPULAR_TOP_K = 12

TEMPLATES: dict[str, str] = {
    "existence": "Is there {article} {color} {shape} in the image?",
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "counting_color": "How many {color} objects are there?",
    "counting_shape": "How many {plural} are there?",
    "position": "Where is the {color} {shape}?",
    "relation": "Is the {color} {shape} {relation} the {color2} {shape2}?",
    "reading_on": "What is written on the {color} {shape}?",
    "reading_beside": "What is written next to the {color} {shape}?",
}

Pair = tuple[str, str]


@dataclass(frozen=True)
class Question:
    """A question with its exact answer; `objects` are the indices of the scene objects it refers to."""

    text: str
    answer: str
    family: str
    subtype: str
    objects: tuple[int, ...] = ()


def families() -> list[str]:
    """The question families, in a fixed order."""
    return list(FAMILIES)


def _popular_pairs() -> tuple[Pair, ...]:
    """The (color, shape) pairs most frequent in the suite, by the generator's sampling weights."""
    ranked = sorted(
        ((c, s) for c in COLOR_NAMES for s in SHAPES),
        key=lambda p: (-COLOR_WEIGHTS[COLOR_NAMES.index(p[0])] * SHAPE_WEIGHTS[SHAPES.index(p[1])], p),
    )
    return tuple(ranked[:POPULAR_TOP_K])


POPULAR_PAIRS = _popular_pairs()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))] if items else None


def _unique_pairs(scene: Scene) -> list[int]:
    """Indices of objects whose (color, shape) is unique in the scene."""
    counts = Counter((o.color, o.shape) for o in scene.objects)
    return [i for i, o in enumerate(scene.objects) if counts[(o.color, o.shape)] == 1]


def _existence(scene: Scene, rng: np.random.Generator, subtype: str, answer: str | None) -> Question | None:
    answer = answer or _pick(rng, ["yes", "no"])
    present = {(o.color, o.shape) for o in scene.objects}
    if answer == "yes":
        pair = _pick(rng, sorted(present))
    else:
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        if subtype == "popular":
            absent = [p for p in POPULAR_PAIRS if p not in present]
        elif subtype == "adversarial":
            colors, shapes = {c for c, _ in present}, {s for _, s in present}
            binding = [p for p in absent if p[0] in colors and p[1] in shapes]
            absent = binding or [p for p in absent if p[0] in colors or p[1] in shapes]
        pair = _pick(rng, absent)
    if pair is None:
        return None
    color, shape = pair
    text = TEMPLATES["existence"].format(article=_article(color), color=color, shape=shape)
    objects = tuple(i for i, o in enumerate(scene.objects) if (o.color, o.shape) == pair)
    return Question(text, answer, "existence", subtype, objects)


def _color(scene: Scene, rng: np.random.Generator, subtype: str, answer: str | None) -> Question | None:
    counts = Counter(o.shape for o in scene.objects)
    i = _pick(rng, [i for i, o in enumerate(scene.objects) if counts[o.shape] == 1 and o.size == subtype])
    if i is None:
        return None
    obj = scene.objects[i]
    return Question(TEMPLATES["color"].format(shape=obj.shape), obj.color, "color", subtype, (i,))


def _shape(scene: Scene, rng: np.random.Generator, subtype: str, answer: str | None) -> Question | None:
    counts = Counter(o.color for o in scene.objects)
    i = _pick(rng, [i for i, o in enumerate(scene.objects) if counts[o.color] == 1 and o.size == subtype])
    if i is None:
        return None
    obj = scene.objects[i]
    return Question(TEMPLATES["shape"].format(color=obj.color), obj.shape, "shape", subtype, (i,))


def _counting(scene: Scene, rng: np.random.Generator, subtype: str, answer: str | None) -> Question | None:
    key: Callable[[SceneObject], str] = (lambda o: o.color) if subtype == "color" else (lambda o: o.shape)
    counts = Counter(key(o) for o in scene.objects)
    if answer is not None:
        counts = Counter({v: n for v, n in counts.items() if str(n) == answer})
    value_count = _pick(rng, sorted(set(counts.values())))
    if value_count is None:
        return None
    value = _pick(rng, sorted(v for v, n in counts.items() if n == value_count))
    if subtype == "color":
        text = TEMPLATES["counting_color"].format(color=value)
    else:
        text = TEMPLATES["counting_shape"].format(plural=SHAPE_PLURALS[value])
    objects = tuple(i for i, o in enumerate(scene.objects) if key(o) == value)
    return Question(text, str(value_count), "counting", subtype, objects)


def _position(scene: Scene, rng: np.random.Generator, subtype: str, answer: str | None) -> Question | None:
    i = _pick(rng, [i for i in _unique_pairs(scene) if scene.objects[i].size == subtype])
    if i is None:
        return None
    obj = scene.objects[i]
    text = TEMPLATES["position"].format(color=obj.color, shape=obj.shape)
    return Question(text, obj.position, "position", subtype, (i,))


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool | None:
    """Whether `a` is <relation> `b` with a clear gap; None when it is a near-tie (neither clearly)."""
    axis = 0 if relation in ("left", "right") else 1
    a_first = a.bbox[axis + 2] + RELATION_GAP <= b.bbox[axis]
    b_first = b.bbox[axis + 2] + RELATION_GAP <= a.bbox[axis]
    if not (a_first or b_first):
        return None
    return a_first if relation in ("left", "above") else b_first


def _relation(scene: Scene, rng: np.random.Generator, subtype: str, answer: str | None) -> Question | None:
    unique = _unique_pairs(scene)
    candidates = []
    for i in unique:
        for j in unique:
            holds = relation_holds(scene.objects[i], scene.objects[j], subtype) if i != j else None
            if holds is not None and (answer is None or answer == ("yes" if holds else "no")):
                candidates.append((i, j, "yes" if holds else "no"))
    picked = _pick(rng, candidates)
    if picked is None:
        return None
    i, j, result = picked
    a, b = scene.objects[i], scene.objects[j]
    text = TEMPLATES["relation"].format(
        color=a.color, shape=a.shape, relation=RELATION_PHRASES[subtype], color2=b.color, shape2=b.shape
    )
    return Question(text, result, "relation", subtype, (i, j))


def _reading(scene: Scene, rng: np.random.Generator, subtype: str, answer: str | None) -> Question | None:
    i = _pick(rng, [i for i in _unique_pairs(scene) if scene.objects[i].text_where == subtype])
    if i is None:
        return None
    obj = scene.objects[i]
    text = TEMPLATES[f"reading_{subtype}"].format(color=obj.color, shape=obj.shape)
    return Question(text, str(obj.text), "reading", subtype, (i,))


_MAKERS = {
    "existence": _existence,
    "color": _color,
    "shape": _shape,
    "counting": _counting,
    "position": _position,
    "relation": _relation,
    "reading": _reading,
}


def make_question(
    scene: Scene,
    family: str,
    rng: np.random.Generator,
    subtype: str | None = None,
    answer: str | None = None,
) -> Question | None:
    """One question of `family` (random subtype unless given; optionally forcing the answer), or None if the
    scene admits none. Only uniquely identified objects are referred to; relations skip near-ties."""
    if family not in _MAKERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    subtype = subtype or _pick(rng, list(SUBTYPES[family]))
    if subtype not in SUBTYPES[family]:
        raise ValueError(f"unknown subtype {subtype!r} for {family!r}; expected one of {SUBTYPES[family]}")
    question = _MAKERS[family](scene, rng, subtype, answer)
    if question is not None and answer is not None and question.answer != answer:
        return None
    return question


def make_questions(scene: Scene, rng: np.random.Generator | int) -> list[Question]:
    """Every question the scene admits: one per (family, subtype), random yes/no for yes/no families."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(int(rng))
    questions = []
    for family in FAMILIES:
        for subtype in SUBTYPES[family]:
            question = make_question(scene, family, rng, subtype)
            if question is not None:
                questions.append(question)
    return questions
