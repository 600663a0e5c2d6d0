"""Synthetic visual-QA suite: seeded 336x336 scenes, questions with exact answers, seed-defined splits."""

from visprune.synth.questions import FAMILIES, SUBTYPES, Question, families, make_question, make_questions
from visprune.synth.render import render, render_background
from visprune.synth.scene import Background, Scene, SceneObject, make_scene
from visprune.synth.scoring import normalize_answer, score
from visprune.synth.splits import Item, Split, load_split, make_item
from visprune.synth.vocab import format_prompt, tokenize, vocabulary

__all__ = [
    "FAMILIES",
    "SUBTYPES",
    "Background",
    "Item",
    "Question",
    "Scene",
    "SceneObject",
    "Split",
    "families",
    "format_prompt",
    "load_split",
    "make_item",
    "make_question",
    "make_questions",
    "make_scene",
    "normalize_answer",
    "render",
    "render_background",
    "score",
    "tokenize",
    "vocabulary",
]
