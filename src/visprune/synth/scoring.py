"""Normalised exact-match scoring of short answers."""

from __future__ import annotations

import re

_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    " seventeen eighteen nineteen twenty"
)
NUMBER_WORDS: dict[str, str] = {word: str(i) for i, word in enumerate(_NUMBERS.split(" "))}
SYNONYMS: dict[str, str] = {"centre": "center", "middle": "center", "colour": "color", "grey": "gray"}
ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, number words to digits, drop articles (unless that leaves nothing)."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    words = [NUMBER_WORDS.get(w, SYNONYMS.get(w, w)) for w in words]
    kept = [w for w in words if w not in ARTICLES]
    return " ".join(kept or words)


def score(prediction: str, answer: str) -> bool:
    """True when prediction and answer are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)
