"""Pictures of masks: colour overlays and an image | truth | prediction grid. Numpy and PIL only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any HxW / HxWxC uint8, uint16 or float image as HxWx3 uint8 for display."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype == np.uint16:
        image = (image / 257).astype(np.uint8)
    elif image.dtype.kind == "f":
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def colorize(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """HxW class indices to HxWx3 colours (ignore and unknown indices: white)."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[: len(colors)] = np.asarray(colors, np.uint8)
    return lut[np.asarray(mask, np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.45) -> np.ndarray:
    """The image with each non-background class blended in its colour (class 0 left as is)."""
    base = to_rgb8(image).astype(np.float32)
    painted = colorize(mask, colors).astype(np.float32)
    blend = np.where((np.asarray(mask) > 0)[..., None], (1 - alpha) * base + alpha * painted, base)
    return blend.astype(np.uint8)


def prediction_grid(rows: Sequence[tuple[np.ndarray, Optional[np.ndarray], np.ndarray]],
                    colors: Sequence[Sequence[int]], cell: int = 256) -> Image.Image:
    """One row per sample: image | true mask | predicted mask | prediction overlay, each scaled to `cell` px."""
    titles = ["image", "truth", "prediction", "overlay"]
    pad, header = 4, 16
    grid = Image.new("RGB", (len(titles) * (cell + pad) + pad, header + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(titles):
        draw.text((pad + col * (cell + pad), 2), title, fill="black")
    for row, (image, truth, pred) in enumerate(rows):
        panels = [to_rgb8(image), colorize(truth, colors) if truth is not None else None, colorize(pred, colors),
                  overlay(image, pred, colors)]
        for col, panel in enumerate(panels):
            if panel is None:
                continue
            tile = Image.fromarray(panel).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (pad + col * (cell + pad), header + pad + row * (cell + pad)))
    return grid
