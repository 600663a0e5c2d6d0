"""Seed-defined splits: balanced over families, subtypes and yes/no, with no stored images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from PIL import Image

from visprune.synth.questions import FAMILIES, SUBTYPES, YES_NO_FAMILIES, Question, make_question
from visprune.synth.render import render
from visprune.synth.scene import Scene, make_scene
from visprune.synth.vocab import format_prompt

ATTEMPTS = 256  # scene seeds tried per item until one admits the item's (family, subtype, answer)
SPLIT_BASES: dict[str, int] = {"train": 0, "val": 2**40, "test": 2**40 + 2**36}
SPLIT_LIMITS: dict[str, int] = {"train": 2**40 // ATTEMPTS, "val": 2**36 // ATTEMPTS, "test": 2**36 // ATTEMPTS}
COUNT_ANSWERS: tuple[str, ...] = ("1", "2", "3", "4")  # counting answers cycle, balanced like yes/no
DEFAULT_SIZES: dict[str, int] = {"train": 10_080, "val": 1008, "test": 1008}


@dataclass(frozen=True)
class Item:
    """One example: the seed of its image (`make_scene(seed)`) and its question."""

    seed: int
    question: Question

    @property
    def text(self) -> str:
        """The question text."""
        return self.question.text

    @property
    def answer(self) -> str:
        """The exact answer."""
        return self.question.answer

    @property
    def family(self) -> str:
        """The question family."""
        return self.question.family

    @property
    def subtype(self) -> str:
        """The question subtype within its family."""
        return self.question.subtype

    def scene(self) -> Scene:
        """The scene description, regenerated from the seed."""
        return make_scene(self.seed)

    def image(self) -> Image.Image:
        """The 336 x 336 RGB image, rendered from the seed."""
        return render(self.scene())

    def prompt(self) -> str:
        """The LLaVA-1.5 chat prompt for this item's question."""
        return format_prompt(self.question.text)


def item_spec(index: int) -> tuple[str, str, str | None]:
    """(family, subtype, forced answer) of item `index`: families cycle, then answers and subtypes.

    Any window of 7 consecutive items has every family once; 168 consecutive items balance every
    (family, subtype) and, in yes/no and counting families, every (subtype, answer) exactly.
    """
    family = FAMILIES[index % len(FAMILIES)]
    k = index // len(FAMILIES)
    subtypes = SUBTYPES[family]
    if family in YES_NO_FAMILIES:
        return family, subtypes[(k // 2) % len(subtypes)], "yes" if k % 2 == 0 else "no"
    if family == "counting":
        return family, subtypes[k % len(subtypes)], COUNT_ANSWERS[(k // len(subtypes)) % len(COUNT_ANSWERS)]
    return family, subtypes[k % len(subtypes)], None


def make_item(split: str, index: int) -> Item:
    """Item `index` of `split`, a pure function of both (seeds base + index * ATTEMPTS + attempt)."""
    if split not in SPLIT_BASES:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_BASES)}")
    if not 0 <= index < SPLIT_LIMITS[split]:
        raise IndexError(f"index {index} out of range for split {split!r}")
    family, subtype, answer = item_spec(index)
    for attempt in range(ATTEMPTS):
        seed = SPLIT_BASES[split] + index * ATTEMPTS + attempt
        rng = np.random.default_rng([seed, FAMILIES.index(family)])
        question = make_question(make_scene(seed), family, rng, subtype, answer)
        if question is not None:
            return Item(seed, question)
    raise RuntimeError(f"no scene admits item {index} of {split!r} ({family}/{subtype}/{answer})")


class Split(Sequence[Item]):
    """A lazy, deterministic sequence of items `offset .. offset + n - 1` of a named split."""

    def __init__(self, name: str, n: int, offset: int = 0) -> None:
        if name not in SPLIT_BASES:
            raise ValueError(f"unknown split {name!r}; expected one of {tuple(SPLIT_BASES)}")
        if n < 0 or offset < 0 or offset + n > SPLIT_LIMITS[name]:
            raise ValueError(f"n={n}, offset={offset} out of range for split {name!r}")
        self.name, self.n, self.offset = name, n, offset

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...
    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(index)
        return make_item(self.name, self.offset + index)

    def __iter__(self) -> Iterator[Item]:
        for i in range(self.n):
            yield self[i]

    def __repr__(self) -> str:
        return f"Split({self.name!r}, n={self.n}, offset={self.offset})"


def load_split(name: str, n: int | None = None, offset: int = 0) -> Split:
    """The split "train", "val" or "test" with n items (default 10080 / 1008 / 1008), from item `offset` on.

    Splits are defined by seeds alone; train, val and test use disjoint seed ranges. Use a multiple of
    168 for n (and offset) to get exact balance over families, subtypes and yes/no.
    """
    if name not in SPLIT_BASES:
        raise ValueError(f"unknown split {name!r}; expected one of {tuple(SPLIT_BASES)}")
    return Split(name, DEFAULT_SIZES[name] if n is None else n, offset)
