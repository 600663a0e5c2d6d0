"""Seed-defined splits: balance, determinism, disjoint seeds, answers."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from visprune.synth import FAMILIES, SUBTYPES, load_split, make_scene, render
from visprune.synth.splits import ATTEMPTS, SPLIT_BASES, SPLIT_LIMITS

VAL = list(load_split("val", 168))


def test_default_sizes() -> None:
    assert len(load_split("val")) == len(load_split("test")) == 1008
    assert len(load_split("train", 5)) == 5


def test_balanced_families_subtypes_and_answers() -> None:
    assert Counter(item.family for item in VAL) == dict.fromkeys(FAMILIES, 24)
    for family in FAMILIES:
        subtypes = Counter(item.subtype for item in VAL if item.family == family)
        assert subtypes == dict.fromkeys(SUBTYPES[family], 24 // len(SUBTYPES[family]))
    for family in ("existence", "relation"):
        answers = Counter((item.subtype, item.answer) for item in VAL if item.family == family)
        expected = {(sub, a): 24 // (2 * len(SUBTYPES[family])) for sub in SUBTYPES[family] for a in ("yes", "no")}
        assert answers == expected
    counts = Counter(item.answer for item in VAL if item.family == "counting")
    assert counts == {"1": 6, "2": 6, "3": 6, "4": 6}


def test_families_interleave() -> None:
    window = load_split("test", 14, offset=700)
    assert Counter(item.family for item in window) == dict.fromkeys(FAMILIES, 2)


def test_answers_match_oracle(oracle) -> None:
    for item in VAL:
        assert oracle(item.scene(), item.text) == item.answer


def test_iteration_is_deterministic() -> None:
    split = load_split("val", 168)
    assert list(split) == VAL == list(split)
    assert split[-1] == VAL[-1] and split[3:6] == VAL[3:6]
    for item in VAL[:3]:
        assert item.image().tobytes() == render(make_scene(item.seed)).tobytes()


def test_offset_addresses_the_same_items() -> None:
    assert list(load_split("train", 4, offset=10)) == list(load_split("train", 14))[10:]


def test_seed_ranges_disjoint() -> None:
    ranges = {name: (SPLIT_BASES[name], SPLIT_BASES[name] + SPLIT_LIMITS[name] * ATTEMPTS) for name in SPLIT_BASES}
    ordered = sorted(ranges.values())
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(ordered))
    seeds = {name: {item.seed for item in load_split(name, 56)} for name in ("train", "test")}
    seeds["val"] = {item.seed for item in VAL}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"])
    assert not seeds["val"] & seeds["test"]
    for name, found in seeds.items():
        assert all(ranges[name][0] <= s < ranges[name][1] for s in found)


def test_prompt_format() -> None:
    assert VAL[0].prompt() == f"USER: <image>\n{VAL[0].text} Answer with a single word or number. ASSISTANT:"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        load_split("dev", 10)
    with pytest.raises(ValueError):
        load_split("val", -1)
    with pytest.raises(IndexError):
        load_split("val", 3)[3]
