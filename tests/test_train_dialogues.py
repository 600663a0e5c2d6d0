"""Instruction-tuning conversations: what the training loop feeds the LM after the image is exactly the
chat template's multi-turn conversation, with loss on the answers alone."""

from __future__ import annotations

import numpy as np
import torch

from visprune.synth import make_questions, make_scene
from visprune.train.build import BOS, IMAGE, build_processor, token_ids
from visprune.train.data import PAD_ID, make_batch, object_bits, question_suffix
from visprune.train.tiny import _dialogues

SEEDS = [11, 12, 13]


def _turns(ids: list[int], user: int, eos: int) -> list[list[int]]:
    """Split the token stream after the image into turns (each ending with eos), dropping "USER:"."""
    turns, current = [], []
    for t in ids:
        current.append(t)
        if t == eos:
            turns.append(current)
            current = []
    assert current == [], "the conversation must end with an answer's eos"
    return [turn[2:] if turn[0] == user else turn for turn in turns]


def test_dialogues_are_the_chat_template_conversation() -> None:
    batch = make_batch(SEEDS)
    gen = torch.Generator().manual_seed(0)
    ids, targets, refers = _dialogues(batch, turns=6, gen=gen)
    vocab = token_ids()
    processor = build_processor()
    for row, seed in enumerate(SEEDS):
        questions = make_questions(make_scene(seed), np.random.default_rng([seed, 1]))
        real = ids[row] != PAD_ID
        assert not real[int(real.sum()) :].any(), "padding only at the end"
        stream = ids[row, real].tolist()
        turns = _turns(stream, vocab["user"], vocab["</s>"])
        assert len(turns) == min(6, len(questions))
        asked = []
        for turn in turns:
            match = [q for q in questions if question_suffix(q.text, q.answer) == turn]
            assert len(match) == 1, turn
            asked.append(match[0])
        assert len({q.text for q in asked}) == len(asked), "no question asked twice"
        chat = []
        for i, q in enumerate(asked):
            content = [{"type": "image"}] if i == 0 else []
            content.append({"type": "text", "text": f"{q.text} Answer with a single word or number."})
            chat += [{"role": "user", "content": content}, {"role": "assistant", "content": q.answer}]
        expected = processor.tokenizer(processor.apply_chat_template(chat)).input_ids
        assert expected[:3] == [vocab[BOS], vocab["user"], vocab[":"]] and expected[3] == vocab[IMAGE]
        assert stream == expected[4:]
        answer_ids = [i for q in asked for i in (vocab[q.answer.lower()], vocab["</s>"])]
        assert ids[row][targets[row]].tolist() == answer_ids
        assert refers[row][targets[row]].tolist() == [b for q in asked for b in (object_bits(q.objects), 0)]
        assert int((refers[row] != 0).sum()) == sum(bool(q.objects) for q in asked), "only at answer tokens"


def test_dialogues_first_turn_varies_over_question_types() -> None:
    batch = make_batch([21] * 64)
    ids, _, _ = _dialogues(batch, turns=4, gen=torch.Generator().manual_seed(1))
    first_words = {tuple(row[:4].tolist()) for row in ids}
    assert len(first_words) >= 5, "every question type must reach the first turn (the evaluated layout)"
