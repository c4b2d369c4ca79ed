"""A synthetic segmentation dataset that a small model can learn in a minute on a CPU.

Discs and squares on textured noise. Objects differ from the background in texture and only partly in brightness,
and their brightness varies per image, so a threshold does not solve it but a small U-Net does. Binary (objects vs
background, masks {0,255}) or multi-class (background, disc, square as indices 0..2). Numpy and PIL only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .contract.layout import IMAGES, MASKS, TRAIN_CHANNEL, VALIDATION_CHANNEL

KINDS = {
    "binary": ["background", "object"],
    "multiclass": ["background", "disc", "square"],
}


def demo_hyperparameters(kind: str = "binary", channels: int = 3, size: int = 64) -> dict:
    """Hyperparameters that suit the demo dataset (small model, no pretrained weights)."""
    return {
        "classes": len(KINDS[kind]), "class_names": KINDS[kind], "in_channels": channels,
        "image_size": size, "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [64, 32, 16],
        "encoder_weights": None, "batch_size": 8, "lr": 3e-3, "augment": "light", "loss": "dice_ce",
    }


def make_demo_dataset(root: str | Path, *, kind: str = "binary", train: int = 48, validation: int = 16,
                      size: int = 64, channels: int = 3, seed: int = 0) -> Path:
    """Write `root/train` and `root/validation`, each with images/ and masks/. Returns `root`."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: choose 1 or 3")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in ((TRAIN_CHANNEL, train), (VALIDATION_CHANNEL, validation)):
        (root / split / IMAGES).mkdir(parents=True, exist_ok=True)
        (root / split / MASKS).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, labels = _sample(rng, size, channels)
            mask = labels if kind == "multiclass" else (labels > 0).astype(np.uint8) * 255
            name = f"{split}_{i:04d}"
            Image.fromarray(image.squeeze(-1) if channels == 1 else image).save(root / split / IMAGES / f"{name}.png")
            Image.fromarray(mask).save(root / split / MASKS / f"{name}.png")
    return root


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32)


def _sample(rng: np.random.Generator, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    labels = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(2, 5)):
        r = rng.uniform(size * 0.08, size * 0.18)
        cy, cx = rng.uniform(r, size - r, 2)
        if rng.random() < 0.5:
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        else:
            labels[(np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)] = 2

    base = rng.uniform(0.35, 0.65)
    background = base + 0.25 * (_smooth_noise(rng, size, 4) - 0.5) + rng.normal(0, 0.06, (size, size))
    period = rng.uniform(3.0, 5.0)
    texture = np.where(
        labels == 1,
        0.12 * np.sin(2 * np.pi * (xx + yy) / period),  # discs: diagonal stripes
        0.12 * np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)),  # squares: checkers
    )
    objects = base + rng.uniform(-0.1, 0.1) + 0.18 + texture + rng.normal(0, 0.04, (size, size))
    gray = np.where(labels > 0, objects, background)
    if channels == 1:
        pixels = gray[..., None]
    else:
        tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        pixels = gray[..., None] * tint
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8), labels
