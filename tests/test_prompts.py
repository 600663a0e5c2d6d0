"""The "prompt" signal: each image's instruction vector from the prompt it is called with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visprune.models.splice import image_runs
from visprune.prompts import prompt_vectors

IMG = 9


def _expected(embedding, ids):
    return F.normalize(embedding(torch.tensor(ids)).float(), dim=-1).mean(0)


def test_each_image_gets_the_text_after_it():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(12, 6)
    # sample 0: text, image, question, pad; sample 1: text, image, text, image (at the end), pad
    input_ids = torch.tensor([[1, IMG, IMG, 2, 3, 0], [4, IMG, 5, 6, IMG, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    runs = image_runs(input_ids, mask, IMG)
    got = prompt_vectors(input_ids, mask, runs, IMG, embedding)
    assert got.shape == (3, 6)
    with torch.no_grad():
        torch.testing.assert_close(got[0], _expected(embedding, [2, 3]))  # padding left out
        torch.testing.assert_close(got[1], _expected(embedding, [5, 6]))  # the next image's placeholder left out
        torch.testing.assert_close(got[2], _expected(embedding, [4, 5, 6]))  # at the end: the sample's other text


def test_a_prompt_of_placeholders_only_gives_zero():
    embedding = torch.nn.Embedding(12, 4)
    input_ids = torch.tensor([[IMG, IMG]])
    mask = torch.ones_like(input_ids)
    got = prompt_vectors(input_ids, mask, image_runs(input_ids, mask, IMG), IMG, embedding)
    assert torch.equal(got, torch.zeros(1, 4))
