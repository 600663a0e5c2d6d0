"""The stage-3 grounding loss is -log of the attention mass the chosen head really puts on the asked
objects' patches, and the labels behind it (patch owners, question object masks) match the scene."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaModel

from visprune.synth import make_questions, make_scene
from visprune.train.data import GRID, PATCH, make_example, object_bits, patch_labels, patch_owners
from visprune.train.tiny import LayerInputs, grounding_loss

N_IMAGE, START = 12, 3  # image rows and where they start in the sequence


def test_grounding_loss_is_the_heads_attention_mass_on_the_objects() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    model = LlamaModel(config).eval()
    batch, suffix = 2, 6
    x = torch.randn(batch, START + N_IMAGE + suffix, 32)
    owner = torch.tensor([[0, 1, 1, 0, 2, 2, 2, 0, 0, 3, 0, 0], [1, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 0]])
    refers = torch.zeros(batch, suffix, dtype=torch.long)
    refers[0, 2] = object_bits((1,))  # object 1 -> owner 2
    refers[0, 5] = object_bits((0, 2))  # objects 0 and 2 -> owners 1 and 3
    refers[1, 3] = object_bits((1,))
    refers[1, 4] = object_bits((5,))  # an object with no patch: left out
    recorder = LayerInputs([model.layers[1]])
    with torch.no_grad():
        out = model(inputs_embeds=x, output_attentions=True)
        loss = grounding_loss(recorder, refers, owner, START, head=3)
    recorder.remove()
    attention = out.attentions[1][:, 3]  # [B, S, S] of head 3 in layer 1
    expected = []
    for b, s, owners in ((0, 2, {2}), (0, 5, {1, 3}), (1, 3, {2})):
        row = START + N_IMAGE + s - 1
        mask = torch.tensor([int(o) in owners for o in owner[b]])
        expected.append(-torch.log(attention[b, row, START : START + N_IMAGE][mask].sum() + 1e-6))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)


def test_patch_owners_cover_each_object_and_its_text() -> None:
    for seed in range(30):
        scene = make_scene(seed)
        owners = patch_owners(scene).reshape(GRID, GRID)
        labels = patch_labels(scene).reshape(GRID, GRID, -1)
        assert ((owners > 0) == ((labels[..., 0] > 0) | (labels[..., 4] > 0))).all()
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.text_bbox or obj.bbox
            cy, cx = int((y0 + y1) / 2 // PATCH), int((x0 + x1) / 2 // PATCH)
            if obj.side >= 2 * PATCH or obj.text:
                assert owners[cy, cx] == k + 1, (seed, k)


def test_question_object_masks() -> None:
    seed = 7
    example = make_example(seed)
    questions = make_questions(make_scene(seed), np.random.default_rng([seed, 1]))
    for i, q in enumerate(questions[: len(example["q_obj"])]):
        assert example["q_obj"][i] == sum(1 << k for k in q.objects)
        if q.family == "existence" and q.answer == "no":
            assert example["q_obj"][i] == 0
