"""Loss functions by config name. All take logits (N, C, H, W) and targets (N, H, W) with 255 = ignore.

Binary tasks use two logits with softmax: cross-entropy over two classes is binary cross-entropy, and one code
path serves every class count.
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss

from .data.masks import IGNORE_INDEX


def build_loss(name: str) -> torch.nn.Module:
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
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
