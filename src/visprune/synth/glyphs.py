"""Text glyphs from Pillow's built-in font (no font files), as cropped anti-aliased masks."""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

CAP_HEIGHT_RATIO = 0.72  # cap height / font size of the built-in scalable font


def _ink_crop(mask: Image.Image) -> Image.Image:
    box = mask.getbbox()
    return mask.crop(box) if box else mask


def _scaled_bitmap_mask(text: str, size: int) -> Image.Image:
    """Fallback for Pillow builds without FreeType: the fixed bitmap font, upscaled (nearest)."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    mask = _ink_crop(mask)
    scale = max(1.0, size * CAP_HEIGHT_RATIO / max(mask.height, 1))
    return mask.resize((round(mask.width * scale), round(mask.height * scale)), Image.Resampling.NEAREST)


@lru_cache(maxsize=1024)
def text_mask(text: str, size: int) -> Image.Image:
    """Mask ('L', 0-255) of `text` at font `size`, cropped to its ink. Treat as read-only (cached)."""
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        return _scaled_bitmap_mask(text, size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        return _scaled_bitmap_mask(text, size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    return _ink_crop(mask)


def text_extent(text: str, size: int) -> tuple[int, int]:
    """(width, height) in pixels of the ink of `text` at font `size`."""
    return text_mask(text, size).size
