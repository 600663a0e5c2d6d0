"""Normalised exact-match scoring and the prompt/tokenizer helpers."""

from __future__ import annotations

import pytest

from visprune.synth import format_prompt, normalize_answer, score, tokenize


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        (" RED! ", "red"),
        ("three", "3"),
        ("3", "three"),
        ("Twelve", "12"),
        ("top left", "top-left"),
        ("Top-Left.", "top-left"),
        ("the circle", "circle"),
        ("centre", "center"),
        ("A", "a"),
        ("cat", "CAT"),
    ],
)
def test_score_matches(prediction: str, answer: str) -> None:
    assert score(prediction, answer)


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [("no", "yes"), ("4", "3"), ("top", "top-left"), ("red circle", "red"), ("", "a"), ("13", "3")],
)
def test_score_rejects(prediction: str, answer: str) -> None:
    assert not score(prediction, answer)


def test_normalize_answer() -> None:
    assert normalize_answer("  The Bottom-Right! ") == "bottom right"
    assert normalize_answer("a") == "a"


def test_format_prompt_and_tokenize() -> None:
    prompt = format_prompt("Where is the red circle?")
    assert prompt == "USER: <image>\nWhere is the red circle? Answer with a single word or number. ASSISTANT:"
    tokens = tokenize(prompt)
    assert tokens[:4] == ["user", ":", "<image>", "where"]
    assert tokenize("Is the 12 top-left?") == ["is", "the", "12", "top-left", "?"]
