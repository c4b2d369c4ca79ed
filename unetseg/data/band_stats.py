"""Per-band mean and standard deviation of a dataset, measured in one streaming pass (the data check's).

Each image gives its moments (pixel count, mean, sum of squared deviations per band), in float64, over the pixels
that hold data and on the scale the model sees (pixels divided by their bit depth: io.bit_depth_scale). Images are
folded in row blocks with Welford's update and merged with Chan's formula: across images, the data check's threads
and the training processes alike, in sample order, so every process gets the same numbers to the last bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import numpy as np

from .io import bit_depth_scale

BLOCK_PIXELS = 1 << 20  # float64 copies of at most this many pixels at once: memory follows the block, not the image
MIN_STD = 1e-6  # a band that never changes carries no signal; dividing it by ~0 would blow up its rounding noise


def image_moments(image: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """(3, C) float64: pixel count, mean and sum of squared deviations of each band of an HxWxC image, over the
    pixels where `valid` (HxW bool, None = all) is true."""
    height, width, channels = image.shape
    scale = bit_depth_scale(image.dtype)
    moments = empty_moments(channels)
    rows = max(1, BLOCK_PIXELS // max(1, width))
    for top in range(0, height, rows):
        block = image[top:top + rows].reshape(-1, channels)
        if valid is not None:
            block = block[valid[top:top + rows].reshape(-1)]
        if len(block):
            values = block.astype(np.float64) / scale
            mean = values.mean(0)
            moments = merge(moments, np.stack([np.full(channels, float(len(values))), mean,
                                               ((values - mean) ** 2).sum(0)]))
    return moments


def empty_moments(channels: int) -> np.ndarray:
    return np.zeros((3, channels), np.float64)


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s pairwise combination of two (count, mean, M2) sets: exact, and stable for large counts."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if not n.any():
        return a.copy()
    safe = np.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    return np.stack([n, mean_a + delta * n_b / safe, m2_a + m2_b + delta ** 2 * n_a * n_b / safe])


def merge_all(parts: Iterable[np.ndarray], channels: int) -> np.ndarray:
    total = empty_moments(channels)
    for part in parts:
        total = merge(total, part)
    return total


def mean_std(moments: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-band mean and population standard deviation (floored at MIN_STD); a band no pixel filled has mean 0,
    std 1 (it is left as it is)."""
    count, mean, m2 = moments
    filled = count > 0
    std = np.sqrt(np.where(filled, m2 / np.where(filled, count, 1.0), 1.0))
    return [float(v) for v in np.where(filled, mean, 0.0)], [float(v) for v in np.maximum(std, MIN_STD)]
