"""Render a `Scene` to a 336 x 336 RGB PIL image, deterministically."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from visprune.synth.glyphs import text_mask
from visprune.synth.scene import CANVAS, Background, Box, Scene, SceneObject

GRAIN_SIGMA = 5.0
BLOTCH_SIGMA = 9.0
BLOTCH_GRID = 7


@lru_cache(maxsize=4)
def _ramp(direction: str) -> np.ndarray:
    """Blend weights in [0, 1], shape [H, W, 1], for a gradient direction."""
    axis = np.linspace(0.0, 1.0, CANVAS, dtype=np.float32)
    if direction == "horizontal":
        t = np.broadcast_to(axis[None, :], (CANVAS, CANVAS))
    elif direction == "vertical":
        t = np.broadcast_to(axis[:, None], (CANVAS, CANVAS))
    else:
        t = (axis[None, :] + axis[:, None]) / 2
    return np.ascontiguousarray(t[..., None])


def background_array(background: Background) -> np.ndarray:
    """The background as a float32 array [H, W, 3] (before rounding and clipping to uint8)."""
    c0, c1 = (np.asarray(c, dtype=np.float32) for c in background.colors)
    pixels = (
        c0 + (c1 - c0) * _ramp(background.direction)
        if background.kind == "gradient"
        else np.tile(c0, (CANVAS, CANVAS, 1))
    )
    rng = np.random.default_rng(background.texture_seed)
    if background.texture == "grain":
        pixels = pixels + GRAIN_SIGMA * rng.standard_normal(size=(CANVAS, CANVAS, 1), dtype=np.float32)
    elif background.texture == "blotch":
        coarse = BLOTCH_SIGMA * rng.standard_normal(size=(BLOTCH_GRID, BLOTCH_GRID), dtype=np.float32)
        smooth = Image.fromarray(coarse).resize((CANVAS, CANVAS), Image.Resampling.BICUBIC)
        pixels = pixels + np.asarray(smooth, dtype=np.float32)[..., None]
    return pixels


def render_background(scene: Scene) -> Image.Image:
    """The scene's background alone."""
    pixels = np.clip(np.rint(background_array(scene.background)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _star(box: Box) -> list[tuple[float, float]]:
    x0, y0, x1, _ = box
    r = (x1 - x0 - 1) / 2
    cx, cy = x0 + r, y0 + r
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.48
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    right, bottom = x1 - 1, y1 - 1
    cx, cy = (x0 + right) / 2, (y0 + bottom) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, right, bottom), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (right, bottom), (x0, bottom)], fill=obj.rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (right, cy), (cx, bottom), (x0, cy)], fill=obj.rgb)
    elif obj.shape == "star":
        draw.polygon(_star(obj.bbox), fill=obj.rgb)
    elif obj.shape == "cross":
        arm = max(2, round(obj.side / 3))
        lo = x0 + (obj.side - arm) // 2
        top = y0 + (obj.side - arm) // 2
        draw.rectangle((lo, y0, lo + arm - 1, bottom), fill=obj.rgb)
        draw.rectangle((x0, top, right, top + arm - 1), fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    """Draw the scene: background, then each object, then its text (on it or beside it)."""
    image = render_background(scene)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    for obj in scene.objects:
        if obj.text and obj.text_bbox and obj.text_size and obj.text_rgb:
            mask = text_mask(obj.text, obj.text_size)
            image.paste(obj.text_rgb, obj.text_bbox[:2], mask)
    return image
