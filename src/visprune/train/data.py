"""Training examples for the tiny LLaVA, generated on the fly from the synthetic suite.

One example is one scene (rendered image) with everything the three training stages need:

- dense patch labels for the vision tower (colour, shape, size of the object under each 14 x 14
  patch, whether the patch holds an object's centre, the text drawn there, the colour / shape
  of the object that text belongs to, and the character whose ink centre lies in the patch),
- global labels for the CLS token (which colour-shape pairs are present, per-colour and per-shape
  counts, which texts are present, the object count, the background tone),
- a caption (projector alignment) and the suite's questions with their answers (instruction tuning),
  as token ids of the part of the sequence that follows the image.

Scenes come from `visprune.synth.make_scene(seed)` with seeds below 2**40, disjoint from the
validation and test splits. Labels are computed from the scene description, never from pixels.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import IterableDataset, get_worker_info

from visprune.synth import make_questions, make_scene, render, tokenize
from visprune.synth.glyphs import text_extent
from visprune.synth.render import _draw_shape
from visprune.synth.scene import CANVAS, COLOR_NAMES, MAX_OBJECTS, PATCH, SHAPES, SIZE_CLASSES, TEXTS, Scene
from visprune.synth.vocab import PROMPT_TEMPLATE
from visprune.train.build import BOS, CAPTION_QUESTION, EOS, PAD, token_ids

CHARS = string.ascii_uppercase + string.digits
GRID = CANVAS // PATCH
N_PATCHES = GRID * GRID
TRAIN_SEED_LIMIT = 2**40  # validation and test scenes use seeds >= 2**40
MIN_COVER = 12  # pixels of a 14 x 14 patch an object or text must cover to label it
SUFFIX_LEN = 24  # question + instruction + answer + eos
CAPTION_LEN = 52
MAX_QUESTIONS = 20

# Dense (per patch) label fields and their class counts; 0 is "none" in every field.
PATCH_FIELDS: dict[str, int] = {
    "color": len(COLOR_NAMES) + 1,
    "shape": len(SHAPES) + 1,
    "size": len(SIZE_CLASSES) + 1,
    "centre": 2,
    "text": len(TEXTS) + 1,
    "text_color": len(COLOR_NAMES) + 1,
    "text_shape": len(SHAPES) + 1,
    "char": len(CHARS) + 1,
}
N_PAIRS = len(COLOR_NAMES) * len(SHAPES)
COUNT_CLASSES = MAX_OBJECTS + 1
# Global (per image) label layout: name -> (offset, width) in the label vector.
GLOBAL_LAYOUT: dict[str, tuple[int, int]] = {}
_off = 0
for _name, _width in (
    ("pairs", N_PAIRS),
    ("color_counts", len(COLOR_NAMES)),
    ("shape_counts", len(SHAPES)),
    ("texts", len(TEXTS)),
    ("objects", 1),
    ("tone", 1),
):
    GLOBAL_LAYOUT[_name] = (_off, _width)
    _off += _width
GLOBAL_WIDTH = _off

_PREFIX, _TAIL = PROMPT_TEMPLATE.split("{question}")
_IDS = token_ids()


def ids_of(text: str) -> list[int]:
    """Token ids of `text` (no bos), as the bundled tokenizer gives them."""
    return [_IDS[t] for t in tokenize(text)]


PREFIX_IDS: list[int] = [_IDS[BOS], *ids_of(_PREFIX.replace("<image>", ""))]  # bos, user, :
TAIL_IDS: list[int] = ids_of(_TAIL)  # answer with a single word or number . assistant :
USER_IDS: list[int] = ids_of("USER:")  # opens every turn after the first
CAPTION_PROMPT_IDS: list[int] = ids_of(CAPTION_QUESTION) + ids_of("ASSISTANT:")
EOS_ID, PAD_ID = _IDS[EOS], _IDS[PAD]


def object_map(scene: Scene) -> np.ndarray:
    """[336, 336] uint8: 1 + the index of the object drawn at each pixel (later objects on top), 0 elsewhere."""
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    for k, obj in enumerate(scene.objects):
        _draw_shape(draw, replace(obj, rgb=k + 1))
    return np.asarray(canvas)


def _box_cover(box: tuple[int, int, int, int]) -> np.ndarray:
    """[GRID, GRID] pixels of each patch inside `box` (x0, y0, x1, y1; x1/y1 exclusive)."""
    lo = np.arange(GRID) * PATCH
    ox = np.clip(np.minimum(box[2], lo + PATCH) - np.maximum(box[0], lo), 0, None)
    oy = np.clip(np.minimum(box[3], lo + PATCH) - np.maximum(box[1], lo), 0, None)
    return oy[:, None] * ox[None, :]


def char_centres(text: str, box: tuple[int, int, int, int], size: int) -> list[tuple[float, float]]:
    """(x, y) pixel centre of each character's ink in a text drawn at `box` (the ink box of the text)."""
    width = box[2] - box[0]
    y = (box[1] + box[3]) / 2
    centres = []
    for i in range(len(text)):
        left = width - text_extent(text[i:], size)[0]
        right = text_extent(text[: i + 1], size)[0]
        centres.append((box[0] + (left + right) / 2, y))
    return centres


class PatchCover(NamedTuple):
    """Which object each patch shows: `best` [GRID, GRID] the object covering it most, `has` whether that
    covers at least MIN_COVER pixels, `texts` (object index, [GRID, GRID] patches its text takes)."""

    best: np.ndarray
    has: np.ndarray
    texts: list[tuple[int, np.ndarray]]


def patch_cover(scene: Scene) -> PatchCover:
    """The scene's object and text coverage per patch (later texts take the patches they share)."""
    ids = object_map(scene).reshape(GRID, PATCH, GRID, PATCH)
    cover = np.stack([(ids == k + 1).sum(axis=(1, 3)) for k in range(len(scene.objects))])  # [K, G, G]
    text_cover = np.zeros((GRID, GRID), dtype=np.int64)
    texts = []
    for k, obj in enumerate(scene.objects):
        if obj.text and obj.text_bbox:
            c = _box_cover(obj.text_bbox)
            take = (c >= MIN_COVER) & (c > text_cover)
            text_cover = np.where(take, c, text_cover)
            texts.append((k, take))
    return PatchCover(cover.argmax(axis=0), cover.max(axis=0) >= MIN_COVER, texts)


def patch_labels(scene: Scene, cover: PatchCover | None = None) -> np.ndarray:
    """[576, len(PATCH_FIELDS)] uint8 dense labels (raster order), see PATCH_FIELDS."""
    out = np.zeros((GRID, GRID, len(PATCH_FIELDS)), dtype=np.uint8)
    objects = scene.objects
    if objects:
        best, has, texts = cover or patch_cover(scene)
        color = np.array([COLOR_NAMES.index(o.color) + 1 for o in objects])
        shape = np.array([SHAPES.index(o.shape) + 1 for o in objects])
        size = np.array([SIZE_CLASSES.index(o.size) + 1 for o in objects])
        out[..., 0] = np.where(has, color[best], 0)
        out[..., 1] = np.where(has, shape[best], 0)
        out[..., 2] = np.where(has, size[best], 0)
        for obj in objects:
            cx, cy = obj.centre
            out[min(int(cy // PATCH), GRID - 1), min(int(cx // PATCH), GRID - 1), 3] = 1
        for k, take in texts:
            obj = objects[k]
            out[..., 4] = np.where(take, TEXTS.index(obj.text) + 1, out[..., 4])
            out[..., 5] = np.where(take, color[k], out[..., 5])
            out[..., 6] = np.where(take, shape[k], out[..., 6])
            for (x, y), char in zip(char_centres(obj.text, obj.text_bbox, obj.text_size), obj.text, strict=True):
                out[min(int(y // PATCH), GRID - 1), min(int(x // PATCH), GRID - 1), 7] = CHARS.index(char) + 1
    return out.reshape(N_PATCHES, len(PATCH_FIELDS))


def patch_owners(scene: Scene, cover: PatchCover | None = None) -> np.ndarray:
    """[576] uint8: 1 + the index of the object each patch shows (its shape, or the text it carries), 0 for
    background. Instruction tuning uses it to ground answers in the patches of the objects asked about."""
    out = np.zeros((GRID, GRID), dtype=np.uint8)
    if scene.objects:
        best, has, texts = cover or patch_cover(scene)
        out = np.where(has, best + 1, 0).astype(np.uint8)
        for k, take in texts:
            out[take] = k + 1
    return out.reshape(N_PATCHES)


def object_bits(objects: tuple[int, ...]) -> int:
    """The object indices a question refers to as a bit mask (bit k: object k)."""
    return sum(1 << k for k in set(objects))


def global_labels(scene: Scene) -> np.ndarray:
    """[GLOBAL_WIDTH] uint8 image-level labels, see GLOBAL_LAYOUT."""
    out = np.zeros(GLOBAL_WIDTH, dtype=np.uint8)
    for obj in scene.objects:
        ci, si = COLOR_NAMES.index(obj.color), SHAPES.index(obj.shape)
        out[GLOBAL_LAYOUT["pairs"][0] + ci * len(SHAPES) + si] = 1
        out[GLOBAL_LAYOUT["color_counts"][0] + ci] += 1
        out[GLOBAL_LAYOUT["shape_counts"][0] + si] += 1
        if obj.text:
            out[GLOBAL_LAYOUT["texts"][0] + TEXTS.index(obj.text)] = 1
    out[GLOBAL_LAYOUT["objects"][0]] = len(scene.objects)
    out[GLOBAL_LAYOUT["tone"][0]] = int(scene.background.tone == "dark")
    return out


def caption(scene: Scene) -> str:
    """The objects in reading order (3 x 3 cell, then top to bottom, left to right) with their text."""
    order = sorted(scene.objects, key=lambda o: (o.cell, o.centre[1], o.centre[0]))
    parts = [" ".join([o.color, o.shape, o.position, *([o.text] if o.text else [])]) + " ." for o in order]
    return " ".join(parts)


def _padded(ids: list[int], length: int) -> list[int]:
    if len(ids) > length:
        raise ValueError(f"sequence of {len(ids)} tokens exceeds {length}")
    return ids + [PAD_ID] * (length - len(ids))


def question_suffix(question: str, answer: str | None = None) -> list[int]:
    """Token ids after the image: question, instruction, then (when given) the answer and eos."""
    ids = ids_of(question) + TAIL_IDS
    return ids + ids_of(answer) + [EOS_ID] if answer is not None else ids


def make_example(seed: int) -> dict[str, np.ndarray]:
    """Everything the training stages need for the scene `make_scene(seed)`.

    q_ids [MAX_QUESTIONS, SUFFIX_LEN] / q_len: the suite's questions for this scene (one per family and
    subtype it admits, yes/no answers random), each the suffix with answer and eos, right-padded;
    the targets are the last two real tokens (answer, eos); q_obj [MAX_QUESTIONS]: the objects each
    question refers to (`object_bits`), with owner [576] (`patch_owners`) the patches to ground it in.
    cap_ids [CAPTION_LEN] / cap_len: the caption prompt's suffix with the caption and eos; targets are the
    tokens after the prompt.
    """
    scene = make_scene(seed)
    image = np.asarray(render(scene), dtype=np.uint8)
    questions = make_questions(scene, np.random.default_rng([seed, 1]))[:MAX_QUESTIONS]
    q_ids = np.full((MAX_QUESTIONS, SUFFIX_LEN), PAD_ID, dtype=np.int16)
    q_len = np.zeros(MAX_QUESTIONS, dtype=np.int16)
    q_obj = np.zeros(MAX_QUESTIONS, dtype=np.uint8)
    for i, q in enumerate(questions):
        ids = question_suffix(q.text, q.answer)
        q_ids[i] = _padded(ids, SUFFIX_LEN)
        q_len[i] = len(ids)
        q_obj[i] = object_bits(q.objects)
    cap = CAPTION_PROMPT_IDS + ids_of(caption(scene)) + [EOS_ID]
    cover = patch_cover(scene) if scene.objects else None
    return {
        "image": image,
        "patch": patch_labels(scene, cover),
        "owner": patch_owners(scene, cover),
        "global": global_labels(scene),
        "q_ids": q_ids,
        "q_len": q_len,
        "q_obj": q_obj,
        "cap_ids": np.asarray(_padded(cap, CAPTION_LEN), dtype=np.int16),
        "cap_len": np.asarray(len(cap), dtype=np.int16),
    }


def make_batch(seeds: list[int]) -> dict[str, torch.Tensor]:
    """`make_example` for each seed, stacked into tensors."""
    examples = [make_example(s) for s in seeds]
    return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}


class SceneStream(IterableDataset):
    """An endless, deterministic stream of example batches: batch b holds seeds base + b * size + [0, size).

    With DataLoader workers, worker w makes batches w, w + W, ...; the DataLoader returns them in
    order, so the stream is the same for any number of workers.
    """

    def __init__(self, base_seed: int, batch_size: int, start: int = 0) -> None:
        super().__init__()
        self.base_seed, self.batch_size, self.start = base_seed, batch_size, start

    def seeds(self, b: int) -> list[int]:
        first = self.base_seed + b * self.batch_size
        if first + self.batch_size > TRAIN_SEED_LIMIT:
            raise ValueError("training seeds must stay below 2**40 (validation and test seeds start there)")
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + worker
        while True:
            yield make_batch(self.seeds(b))
            b += workers
