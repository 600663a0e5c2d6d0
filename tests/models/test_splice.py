"""splice: the reduced image rows put in place of each placeholder run, against a per-token reference (caller
padding dropped, several runs per sample, a sample without images, labels, placeholder offsets, bucketing)."""

from __future__ import annotations

import pytest
import torch

from visprune.errors import InputError
from visprune.models.splice import IGNORE_INDEX, image_runs, splice

IMG = 9


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(
        [
            [0, 0, 5, IMG, IMG, IMG, 6, 7, 8, 4, 3, 2],  # left padding (masked), one run of 3
            [5, IMG, IMG, 6, IMG, IMG, IMG, IMG, 7, 8, 4, 3],  # two runs
            [0, 0, 0, 5, 6, 7, 8, 4, 3, 2, 1, 6],  # no image
        ]
    )
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :3] = 0
    embeds = torch.randn(3, 12, 4, generator=g)
    labels = torch.randint(0, 50, (3, 12), generator=g)
    features = [torch.randn(2, 4, generator=g), torch.randn(1, 4, generator=g), torch.randn(3, 4, generator=g)]
    offsets = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([0, 1, 3])]
    return ids, mask, embeds, labels, features, offsets


def _reference(ids, mask, embeds, labels, features, offsets, pad_to):
    """Per sample, token by token: (embedding, id, label, source position, text position or None)."""
    feats, offs = iter(features), iter(offsets)
    rows = []
    for i in range(ids.shape[0]):
        seq, s = [], 0
        while s < ids.shape[1]:
            if not mask[i, s]:
                s += 1
            elif ids[i, s] == IMG:
                start = s
                while s < ids.shape[1] and ids[i, s] == IMG and mask[i, s]:
                    s += 1
                for row, off in zip(next(feats), next(offs), strict=True):
                    seq.append((row, IMG, IGNORE_INDEX, start + int(off), None))
            else:
                seq.append((embeds[i, s], int(ids[i, s]), int(labels[i, s]), s, s))
                s += 1
        rows.append(seq)
    width = -(-max(len(r) for r in rows) // pad_to) * pad_to
    return rows, width


@pytest.mark.parametrize("pad_to", [1, 8])
def test_splice_equals_the_per_token_reference(pad_to):
    ids, mask, embeds, labels, features, offsets = _batch()
    runs = image_runs(ids, mask, IMG)
    assert runs == [[(3, 3)], [(1, 2), (4, 4)], []]
    out = splice(ids, mask, embeds, IMG, features, runs, labels, offsets, pad_to)
    rows, width = _reference(ids, mask, embeds, labels, features, offsets, pad_to)
    assert out.inputs_embeds.shape == (3, width, 4) and width % pad_to == 0
    assert out.real_tokens == [len(r) for r in rows]
    for i, seq in enumerate(rows):
        off = width - len(seq)
        assert out.attention_mask[i].tolist() == [0] * off + [1] * len(seq)
        assert out.inputs_embeds[i, :off].abs().sum() == 0
        assert out.input_ids[i].tolist() == [0] * off + [t[1] for t in seq]
        assert out.labels[i].tolist() == [IGNORE_INDEX] * off + [t[2] for t in seq]
        assert out.source_index[i].tolist() == [0] * off + [t[3] for t in seq]
        assert out.layout.visual[i].tolist() == [False] * off + [t[1] == IMG for t in seq]
        torch.testing.assert_close(out.inputs_embeds[i, off:], torch.stack([t[0] for t in seq]), rtol=0, atol=0)
        expected_map = [-1] * ids.shape[1]
        for pos, t in enumerate(seq):
            if t[4] is not None:
                expected_map[t[4]] = off + pos
        assert out.position_map[i].tolist() == expected_map


def test_splice_without_labels_offsets_or_mask():
    ids, _, embeds, _, features, _ = _batch()
    ids = ids[1:2]
    out = splice(ids, None, embeds[1:2], IMG, features[:2], image_runs(ids, torch.ones_like(ids), IMG))
    assert out.labels is None and out.source_index is None
    assert out.real_tokens == [12 - 6 + 3] and out.attention_mask.tolist() == [[1] * 9]


def test_splice_refuses_features_that_do_not_match_the_runs():
    ids, mask, embeds, _, features, _ = _batch()
    with pytest.raises(InputError, match="3 image placeholder runs but 2 images"):
        splice(ids, mask, embeds, IMG, features[:2], image_runs(ids, mask, IMG))
