"""Scene descriptions and their seeded generator. All answers are computed from these, never from pixels."""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from visprune.synth.glyphs import text_extent

CANVAS = 336
GRID = 3
CELL = CANVAS // GRID
PATCH = 14

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SHAPE_WEIGHTS: tuple[float, ...] = (6, 5, 4, 3, 3, 2)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (50, 170, 70),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 120, 190),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
COLOR_WEIGHTS: tuple[float, ...] = (7, 6, 5, 5, 4, 4, 3, 2)
COLOR_JITTER = 12

SIZE_CLASSES: tuple[str, ...] = ("small", "medium", "large")
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (12, 22), "medium": (28, 44), "large": (52, 76)}
SIZE_WEIGHTS: tuple[float, ...] = (0.4, 0.35, 0.25)

POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top-left", "top", "top-right"),
    ("left", "center", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)
POSITION_NAMES: tuple[str, ...] = tuple(p for row in POSITIONS for p in row)

_WORDS = (
    "CAT",
    "DOG",
    "SUN",
    "BOX",
    "CAR",
    "MAP",
    "PEN",
    "CUP",
    "BUS",
    "KEY",
    "HAT",
    "FOX",
    "BEE",
    "ZIP",
    "JAM",
    "WEB",
)
TEXTS: tuple[str, ...] = (
    tuple(c for c in string.ascii_uppercase if c not in "IO")
    + tuple(string.digits)
    + tuple(str(n) for n in range(10, 100, 4))
    + _WORDS
)
FONT_SIZES: tuple[int, ...] = (22, 26, 30)  # cap heights of about 16-22 px: one to two 14 px patches
TEXT_GAP = 3
INTERIOR_RATIO: dict[str, float] = {"square": 0.9, "circle": 0.68, "diamond": 0.48}

LIGHT_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (236, 236, 236),
    (214, 214, 208),
    (238, 230, 214),
    (214, 224, 230),
    (224, 232, 220),
)
DARK_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((34, 34, 40), (60, 60, 64), (38, 48, 60), (56, 44, 40))
TEXTURES: tuple[str, ...] = ("none", "grain", "blotch")
GRADIENTS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")

MIN_OBJECTS, MAX_OBJECTS = 3, 8
MAX_TEXTS = 2
TEXT_PROB = 0.4
THEME_PROB = 0.5  # chance that a scene repeats one colour or shape (harder counting)
THEME_SHARE = 0.6  # chance that each object of a themed scene takes the theme value
UNIT_GAP = 8  # min free pixels between two objects (with their text)
EDGE_MARGIN = 4
CELL_MARGIN = 8  # min distance of an object centre from a 3x3 cell border (also >= size / 4)
PLACEMENT_TRIES = 150

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class SceneObject:
    """One object: `bbox` is (x0, y0, x1, y1) with x1/y1 exclusive; text `text_where` is "on" or "beside"."""

    shape: str
    color: str
    size: str
    bbox: Box
    rgb: RGB
    text: str | None = None
    text_where: str | None = None
    text_bbox: Box | None = None
    text_size: int | None = None
    text_rgb: RGB | None = None

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) centre of the bbox in pixels."""
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the centre in the 3x3 grid."""
        x, y = self.centre
        return int(y // CELL), int(x // CELL)

    @property
    def position(self) -> str:
        """Name of the 3x3 cell holding the centre: "top-left" ... "bottom-right"."""
        row, col = self.cell
        return POSITIONS[row][col]

    @property
    def side(self) -> int:
        """Side of the (square) bbox in pixels."""
        return self.bbox[2] - self.bbox[0]


@dataclass(frozen=True)
class Background:
    """Plain or two-colour gradient background, light or dark, with optional light texture."""

    tone: str
    kind: str
    colors: tuple[RGB, RGB]
    direction: str
    texture: str
    texture_seed: int


@dataclass(frozen=True)
class Scene:
    """A full scene description; `seed` is the seed it was made from (None if made from a Generator)."""

    seed: int | None
    background: Background
    objects: tuple[SceneObject, ...]


def as_rng(seed_or_rng: int | np.random.Generator) -> np.random.Generator:
    """A numpy Generator from an int seed (or the Generator itself)."""
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(int(seed_or_rng))


def _choice(rng: np.random.Generator, items: tuple, weights: tuple[float, ...] | None = None):
    if weights is None:
        return items[int(rng.integers(len(items)))]
    p = np.asarray(weights, dtype=float)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _make_background(rng: np.random.Generator) -> Background:
    tone = "light" if rng.random() < 0.6 else "dark"
    palette = LIGHT_BACKGROUNDS if tone == "light" else DARK_BACKGROUNDS
    kind = "gradient" if rng.random() < 0.4 else "plain"
    first = int(rng.integers(len(palette)))
    second = int(rng.integers(len(palette))) if kind == "gradient" else first
    return Background(
        tone=tone,
        kind=kind,
        colors=(palette[first], palette[second]),
        direction=_choice(rng, GRADIENTS),
        texture=_choice(rng, TEXTURES),
        texture_seed=int(rng.integers(2**31)),
    )


def _jitter(rng: np.random.Generator, rgb: RGB) -> RGB:
    delta = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(rgb, delta, strict=True))  # type: ignore[return-value]


def _luminance(rgb: RGB) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _text_fits_on(shape: str, side: int, extent: tuple[int, int]) -> bool:
    inner = INTERIOR_RATIO.get(shape, 0.0) * side - 4
    return extent[0] <= inner and extent[1] <= inner


def _layout_text(side: int, extent: tuple[int, int], where: str) -> tuple[Box, Box]:
    """Object and text boxes relative to the unit's top-left corner, for `where` in on/right/below/left."""
    tw, th = extent
    if where == "on":
        return (0, 0, side, side), ((side - tw) // 2, (side - th) // 2, (side - tw) // 2 + tw, (side - th) // 2 + th)
    if where == "right":
        oy, ty = max(0, (th - side) // 2), max(0, (side - th) // 2)
        return (0, oy, side, oy + side), (side + TEXT_GAP, ty, side + TEXT_GAP + tw, ty + th)
    if where == "left":
        oy, ty = max(0, (th - side) // 2), max(0, (side - th) // 2)
        return (tw + TEXT_GAP, oy, tw + TEXT_GAP + side, oy + side), (0, ty, tw, ty + th)
    ox, tx = max(0, (tw - side) // 2), max(0, (side - tw) // 2)
    return (ox, 0, ox + side, side), (tx, side + TEXT_GAP, tx + tw, side + TEXT_GAP + th)


def _shift(box: Box, dx: int, dy: int) -> Box:
    return box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy


def _union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _overlaps(a: Box, b: Box, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _centre_ok(box: Box) -> bool:
    """The centre is far enough from every 3x3 cell border that its cell is unambiguous."""
    side = box[2] - box[0]
    margin = max(CELL_MARGIN, side / 4)
    for lo, hi in ((box[0], box[2]), (box[1], box[3])):
        c = (lo + hi) / 2
        if any(abs(c - k * CELL) < margin for k in range(1, GRID)):
            return False
    return True


def _place(rng: np.random.Generator, occupied: list[Box], unit: Box, obj_box: Box) -> tuple[int, int] | None:
    width, height = unit[2] - unit[0], unit[3] - unit[1]
    hi_x, hi_y = CANVAS - EDGE_MARGIN - width, CANVAS - EDGE_MARGIN - height
    if hi_x < EDGE_MARGIN or hi_y < EDGE_MARGIN:
        return None
    for _ in range(PLACEMENT_TRIES):
        dx, dy = int(rng.integers(EDGE_MARGIN, hi_x + 1)), int(rng.integers(EDGE_MARGIN, hi_y + 1))
        placed = _shift(unit, dx, dy)
        if _centre_ok(_shift(obj_box, dx, dy)) and not any(_overlaps(placed, o, UNIT_GAP) for o in occupied):
            return dx, dy
    return None


def _make_object(
    rng: np.random.Generator, background: Background, occupied: list[Box], text: str | None, theme: dict[str, str]
) -> SceneObject | None:
    shape = _choice(rng, SHAPES, SHAPE_WEIGHTS)
    color = _choice(rng, COLOR_NAMES, COLOR_WEIGHTS)
    if theme and rng.random() < THEME_SHARE:
        shape, color = theme.get("shape", shape), theme.get("color", color)
    size = _choice(rng, SIZE_CLASSES, SIZE_WEIGHTS)
    lo, hi = SIZE_RANGES[size]
    side = int(rng.integers(lo, hi + 1))
    rgb = _jitter(rng, COLORS[color])
    font_size = int(_choice(rng, FONT_SIZES))
    if text is None:
        obj_box = (0, 0, side, side)
        offset = _place(rng, occupied, obj_box, obj_box)
        if offset is None:
            return None
        occupied.append(_shift(obj_box, *offset))
        return SceneObject(shape, color, size, _shift(obj_box, *offset), rgb)
    extent = text_extent(text, font_size)
    where = "on" if _text_fits_on(shape, side, extent) else _choice(rng, ("right", "below", "left"))
    obj_box, text_box = _layout_text(side, extent, where)
    unit = _union(obj_box, text_box)
    offset = _place(rng, occupied, unit, obj_box)
    if offset is None:
        return None
    occupied.append(_shift(unit, *offset))
    if where == "on":
        text_rgb = (0, 0, 0) if _luminance(rgb) > 140 else (255, 255, 255)
    else:
        text_rgb = (0, 0, 0) if background.tone == "light" else (255, 255, 255)
    return SceneObject(
        shape,
        color,
        size,
        _shift(obj_box, *offset),
        rgb,
        text=text,
        text_where="on" if where == "on" else "beside",
        text_bbox=_shift(text_box, *offset),
        text_size=font_size,
        text_rgb=text_rgb,
    )


def make_scene(seed_or_rng: int | np.random.Generator) -> Scene:
    """A random scene: 3-8 non-overlapping objects, some with 1-3 characters of text, on a varied background.

    Some scenes repeat one colour or shape on about half their objects, so that counts above 2 are common.

    Deterministic in the seed. Every object centre lies clearly inside one 3x3 cell.
    """
    rng = as_rng(seed_or_rng)
    seed = None if isinstance(seed_or_rng, np.random.Generator) else int(seed_or_rng)
    background = _make_background(rng)
    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    theme: dict[str, str] = {}
    if rng.random() < THEME_PROB:
        if rng.random() < 0.5:
            theme["color"] = _choice(rng, COLOR_NAMES, COLOR_WEIGHTS)
        else:
            theme["shape"] = _choice(rng, SHAPES, SHAPE_WEIGHTS)
    occupied: list[Box] = []
    objects: list[SceneObject] = []
    used_texts: set[str] = set()
    for _ in range(n_objects):
        text = None
        if len(used_texts) < MAX_TEXTS and rng.random() < TEXT_PROB:
            text = _choice(rng, tuple(t for t in TEXTS if t not in used_texts))
        obj = _make_object(rng, background, occupied, text, theme)
        if obj is not None:
            objects.append(obj)
            if obj.text:
                used_texts.add(obj.text)
    return Scene(seed=seed, background=background, objects=tuple(objects))
