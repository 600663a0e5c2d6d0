"""Word-level vocabulary, tokenizer and the fixed LLaVA-1.5 chat prompt."""

from __future__ import annotations

import re

from visprune.synth.questions import RELATION_PHRASES, TEMPLATES
from visprune.synth.scene import COLOR_NAMES, MAX_OBJECTS, POSITION_NAMES, SHAPE_PLURALS, SHAPES, TEXTS

IMAGE_TOKEN = "<image>"
ANSWER_INSTRUCTION = "Answer with a single word or number."  # follows every question in the prompt
PROMPT_TEMPLATE = "USER: <image>\n{question} " + ANSWER_INSTRUCTION + " ASSISTANT:"
_TOKEN = re.compile(r"<image>|[a-z0-9]+(?:-[a-z0-9]+)*|[^\sa-z0-9]")
_FIELD = re.compile(r"\{[a-z0-9_]+\}")


def format_prompt(question: str) -> str:
    """The LLaVA-1.5 style prompt for one question (one image placeholder)."""
    return PROMPT_TEMPLATE.format(question=question)


def tokenize(text: str) -> list[str]:
    """Lowercase word-level tokens: `<image>`, words (hyphenated kept whole, e.g. top-left), punctuation."""
    return _TOKEN.findall(text.lower())


def vocabulary() -> list[str]:
    """Every token that can appear in a prompt, question or answer of the suite, sorted."""
    pieces = [_FIELD.sub(" ", template) for template in TEMPLATES.values()]
    pieces.append(PROMPT_TEMPLATE.replace("{question}", " "))
    pieces += ["a", "an", "yes", "no", *COLOR_NAMES, *SHAPES, *SHAPE_PLURALS.values(), *POSITION_NAMES]
    pieces += [*RELATION_PHRASES.values(), *TEXTS, *(str(n) for n in range(MAX_OBJECTS + 1))]
    return sorted({token for piece in pieces for token in tokenize(piece)})
