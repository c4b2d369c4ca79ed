"""The metric vocabulary: the names the training loop prints, the line format, and the regexes SageMaker needs.

The loop prints one line per epoch, e.g.

    epoch=3 train_loss=0.1234 val_loss=0.2345 val_miou=0.8123 val_mdice=0.8901 val_acc=0.9712 ...

and `metric_definitions()` turns the same names into the regexes that SageMaker applies to the job's log, so
every printed metric reaches CloudWatch and can be a tuning objective. This module must not import torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

# Printed once per epoch by rank 0, in this order.
EPOCH_METRICS = (
    "train_loss",  # mean training loss over the epoch
    "val_loss",  # mean validation loss per pixel
    "val_miou",  # mean IoU over classes present in validation (the model-selection metric)
    "val_mdice",  # mean Dice over the same classes
    "val_acc",  # pixel accuracy, ignore pixels excluded
    "lr",  # learning rate at the end of the epoch
    "epoch_time",  # seconds, training and validation
    "images_per_sec",  # training throughput, all processes together
)
# Printed per class after the epoch metrics: val_iou_<class>, val_dice_<class>.
PER_CLASS_METRICS = ("val_iou", "val_dice")
# Printed every `log_every` steps when asked: step=120 epoch=3 step_loss=0.2345
STEP_METRICS = ("step_loss",)

SELECTION_METRIC = "val_miou"  # best model, early stopping, and the default tuning objective

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def slug(name: str) -> str:
    """A class name as it appears in a metric name: lower case, [a-z0-9_]."""
    text = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return text or "class"


def class_metric(prefix: str, class_name: str) -> str:
    """`val_iou` and `cell nucleus` give `val_iou_cell_nucleus`."""
    return f"{prefix}_{slug(class_name)}"


def metric_name_clashes(class_names: Iterable[str]) -> list[list[str]]:
    """Groups of class names that give the same metric names ("Cell Nucleus" and "cell-nucleus"): their values would
    print under one name, and SageMaker would record only the first."""
    groups: dict[str, list[str]] = {}
    for name in class_names:
        groups.setdefault(slug(name), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def per_class_names(class_names: Iterable[str]) -> list[str]:
    return [class_metric(prefix, name) for prefix in PER_CLASS_METRICS for name in class_names]


def all_metric_names(class_names: Iterable[str]) -> list[str]:
    return [*EPOCH_METRICS, *per_class_names(class_names), *STEP_METRICS]


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.6g}"


def format_line(metrics: Mapping[str, float], *, epoch: int | None = None, step: int | None = None) -> str:
    """`epoch=3 train_loss=0.1234 ...`: space-separated name=value pairs, nothing else."""
    head = {}
    if step is not None:
        head["step"] = step
    if epoch is not None:
        head["epoch"] = epoch
    return " ".join(f"{k}={format_value(v)}" for k, v in {**head, **metrics}.items())


def parse_line(line: str) -> dict[str, float]:
    """The metrics on one log line (empty when the line is not a metrics line)."""
    pairs = re.findall(r"(?:^|\s)([a-z][a-z0-9_]*)=(\S+)", line.strip())
    if not pairs or pairs[0][0] not in ("epoch", "step"):
        return {}
    out = {}
    for name, text in pairs:
        try:
            out[name] = float(text)
        except ValueError:
            continue
    return out


def regex_for(name: str) -> str:
    # \b keeps val_iou from matching inside val_iou_background, and loss inside train_loss.
    return rf"\b{name}={_NUMBER}"


def metric_definitions(class_names: Iterable[str]) -> list[dict[str, str]]:
    """SageMaker `metric_definitions` for every metric the loop prints."""
    return [{"Name": name, "Regex": regex_for(name)} for name in all_metric_names(class_names)]
