"""Loss functions by config name. All take logits (N, C, H, W) and targets (N, H, W) with 255 = ignore (the
dataset's own void value, `ignore_index`, is 255 once MaskCodec has decoded a mask).

Binary tasks use two logits with softmax: cross-entropy over two classes is binary cross-entropy, and one code
path serves every class count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss

from .data.masks import IGNORE_INDEX

AUTO_WEIGHT_RATIO = 50.0  # the most that "auto" lets the rarest class outweigh the commonest


def class_weights(setting: Union[None, str, Sequence[float]], class_pixels: np.ndarray) -> Optional[list[float]]:
    """The cross-entropy weight of each class: as given, or for "auto" 1/sqrt of the class's share of the training
    pixels, scaled to mean 1 over the classes present (milder than 1/share, which makes a 1% class count 99 times
    and floods predictions with it). A class absent from the training data gets 1: no target ever uses it."""
    if setting is None:
        return None
    if setting != "auto":
        return [float(w) for w in setting]
    counts = np.asarray(class_pixels, dtype=np.float64)
    present = counts > 0
    weights = np.ones(len(counts))
    if present.any():
        raw = 1.0 / np.sqrt(counts[present] / counts.sum())
        raw = np.minimum(raw, raw.min() * AUTO_WEIGHT_RATIO)
        weights[present] = raw / raw.mean()
    return [round(float(w), 4) for w in weights]


def build_loss(name: str, weights: Optional[Sequence[float]] = None) -> torch.nn.Module:
    """`weights` (one per class) weigh the cross-entropy term; TrainConfig allows them only with ce and dice_ce."""
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX,
                                   weight=torch.tensor(weights, dtype=torch.float32) if weights is not None else None)
    if name == "ce":
        return ce
    dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX, from_logits=True)
    if name == "dice":
        return dice
    if name == "dice_ce":
        return _Sum(dice, ce)
    if name == "focal":
        return FocalLoss(mode="multiclass", ignore_index=IGNORE_INDEX)
    raise ValueError(f"unknown loss {name!r}")


class _Sum(torch.nn.Module):
    def __init__(self, *terms: torch.nn.Module):
        super().__init__()
        self.terms = torch.nn.ModuleList(terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(term(logits, target) for term in self.terms)
