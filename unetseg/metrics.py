"""Segmentation metrics from a confusion matrix, which sums exactly across batches and processes."""

from __future__ import annotations

import torch

from .contract.metrics_log import class_metric
from .data.masks import IGNORE_INDEX


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = truth, columns = prediction; void pixels (decoded to IGNORE_INDEX) skipped."""
    valid = target != IGNORE_INDEX
    index = target[valid].long() * classes + pred[valid].long()
    return torch.bincount(index, minlength=classes * classes).view(classes, classes)


def summarize(matrix: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """val_miou, val_mdice, val_acc and per-class val_iou_<name>, val_dice_<name>.

    A class absent from both truth and prediction has no defined IoU; it is left out of the means (NaN per class).
    """
    m = matrix.double()
    tp = m.diag()
    fp, fn = m.sum(0) - tp, m.sum(1) - tp
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.full_like(tp, float("nan")))
    out = {
        "val_miou": float(iou.nanmean()),
        "val_mdice": float(dice.nanmean()),
        "val_acc": float(tp.sum() / m.sum().clamp_min(1)),
    }
    out.update({class_metric("val_iou", n): float(v) for n, v in zip(class_names, iou)})
    out.update({class_metric("val_dice", n): float(v) for n, v in zip(class_names, dice)})
    return out
