"""Mask pixels to class indices, under one of three conventions.

- binary: 0 = background, 1 or 255 = foreground (classes = 2);
- index: 0..C-1 are classes, `ignore_index` (default 255) = void (excluded from loss, metrics and pixel counts);
- palette: RGB colours mapped through `class_colors` (SageMaker Ground Truth semantic segmentation output).

Whatever value a dataset uses for its void (CamVid 11, VOC 255), decoded masks carry IGNORE_INDEX (255): the loss,
the metrics and the crop padding know one value, and the dataset's own is read only here. In binary masks 255 is the
foreground, so there a void other than 255 is honoured and the default 255 is not a void.

`auto` picks one for the whole dataset from the values seen, so that every file is read the same way. It never
guesses per file: masks whose only value besides 0 is 255 (binary 0/255 masks, or index masks whose only label is
ignore) next to masks with class indices 1.. (0/1 binary or index masks) can be read two ways, and one of them
loses pixels, so that mix is refused with files of each kind named, until mask_mode says which reading is meant.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..contract.errors import DataError

IGNORE_INDEX = 255  # the void in decoded masks, whatever the files use (see ignore_index)


def squeeze_gray(raw: np.ndarray) -> np.ndarray:
    """An RGB mask whose three channels are equal is a grayscale mask saved as RGB."""
    if raw.ndim == 3 and np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
        return np.ascontiguousarray(raw[..., 0])
    return raw


def mask_values(raw: np.ndarray) -> dict:
    """Pixel count per distinct value (ints) or colour ((r, g, b) tuples) in a raw mask."""
    if raw.ndim == 2:
        counts = np.bincount(raw.ravel(), minlength=1)
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(_pack(raw), return_counts=True)
    return {((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255): int(c) for v, c in zip(values, counts)}


def resolve_mode(requested: str, classes: int, class_colors: Optional[Sequence[Sequence[int]]],
                 values_by_file: dict[Path, dict], ignore_index: int = IGNORE_INDEX) -> str:
    """The mask convention for the whole dataset."""
    rgb_files = [p for p, v in values_by_file.items() if v and isinstance(next(iter(v)), tuple)]
    if requested != "auto":
        mode = requested
    elif rgb_files:
        if class_colors is None:
            raise DataError(
                f"{rgb_files[0]}: RGB colour mask, but no class_colors hyperparameter; give one [r, g, b] per class "
                f"(colours in this file: {_show(values_by_file[rgb_files[0]])})"
            )
        mode = "palette"
    else:
        union = set().union(*values_by_file.values()) if values_by_file else set()
        if ignore_index == IGNORE_INDEX:
            _refuse_mixed_conventions(values_by_file, classes)
        # 255 with a void of its own is no void: only the binary reading gives it a meaning (the foreground)
        binary = {0, 255} if ignore_index == IGNORE_INDEX else {0, 1, 255, ignore_index}
        mode = "binary" if classes == 2 and 255 in union and union <= binary else "index"
    gray_files = [p for p, v in values_by_file.items() if v and not isinstance(next(iter(v)), tuple)]
    if mode == "palette" and gray_files:
        raise DataError(f"{gray_files[0]}: single-channel mask, but mask_mode is palette (RGB colour masks)")
    if mode != "palette" and rgb_files:
        raise DataError(f"{rgb_files[0]}: RGB colour mask, but mask_mode is {mode}; "
                        "set class_colors (and mask_mode=palette)")
    return mode


def _refuse_mixed_conventions(values_by_file: dict[Path, dict], classes: int) -> None:
    """0/255 masks next to masks with class indices: binary reads 255 as foreground, index as ignore."""
    full = sorted(p for p, v in values_by_file.items() if IGNORE_INDEX in v and set(v) <= {0, IGNORE_INDEX})
    indexed = sorted(p for p, v in values_by_file.items() if any(0 < value < IGNORE_INDEX for value in v))
    if not full or not indexed:
        return
    if classes == 2:
        readings = ("mask_mode=binary reads 1 and 255 alike as the foreground; mask_mode=index reads 1 as the "
                    "foreground and 255 as ignore (left out of loss and metrics)")
    else:
        readings = ("mask_mode=index reads 255 as ignore (left out of loss and metrics), so the 0/255 masks hold no "
                    "class but background")
    labels = "0 and 1" if classes == 2 else f"class indices 1..{classes - 1}"
    raise DataError(
        f"masks mix two conventions, and mask_mode=auto cannot tell which one is meant: {len(full)} mask(s) hold only "
        f"0 and 255 ({_names(full)}); {len(indexed)} hold {labels} ({_names(indexed)}). {readings}. Set mask_mode "
        "to the reading you mean, or save all masks one way"
    )


def _names(paths: Sequence[Path], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(str(p) for p in paths[:limit]) + more


@dataclass(frozen=True)
class MaskCodec:
    mode: str  # binary | index | palette
    classes: int
    class_colors: Optional[tuple[tuple[int, int, int], ...]] = None
    ignore_index: int = IGNORE_INDEX  # the files' void value

    def allowed_values(self) -> set:
        if self.mode == "binary":
            return {0, 1, 255, self.ignore_index}
        if self.mode == "index":
            return set(range(self.classes)) | {self.ignore_index}
        return set(self.class_colors or ())

    def _is_void(self, value) -> bool:
        return self.mode != "palette" and value == self.ignore_index and not (self.mode == "binary" and value == 255)

    def check_values(self, values: Iterable, path: Path) -> None:
        bad = set(values) - self.allowed_values()
        if not bad:
            return
        if self.mode == "binary":
            rule = "binary masks hold 0 (background) and 1 or 255 (foreground)"
            if self.ignore_index != 255:
                rule += f", and {self.ignore_index} = void (ignore_index={self.ignore_index})"
        elif self.mode == "index":
            rule = (f"class indices are 0..{self.classes - 1} (classes={self.classes}) and {self.ignore_index} = void "
                    f"(ignore_index={self.ignore_index}); set ignore_index to the value your dataset marks unlabelled "
                    "pixels with")
        else:
            rule = "every colour must be one of class_colors"
        raise DataError(f"{path}: mask values outside the class range: {_show(bad)}; {rule}")

    def class_counts(self, value_counts: dict) -> np.ndarray:
        """Pixels per class from `mask_values` output (void excluded)."""
        out = np.zeros(self.classes, np.int64)
        lookup = {tuple(c): i for i, c in enumerate(self.class_colors or ())}
        for value, count in value_counts.items():
            if self._is_void(value):
                continue
            index = lookup.get(value) if self.mode == "palette" else (min(value, 1) if self.mode == "binary" else value)
            if index is not None and index < self.classes:
                out[index] += count
        return out

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """HxW uint8 class indices with IGNORE_INDEX = void. `raw` passed squeeze_gray already."""
        if self.mode == "palette":
            if raw.ndim != 3:
                raise DataError(f"{path}: single-channel mask, but mask_mode is palette")
            out = np.full(raw.shape[:2], IGNORE_INDEX, np.uint8)
            packed = _pack(raw)
            for index, colour in enumerate(self.class_colors or ()):
                out[packed == _pack(np.asarray(colour, np.uint8))] = index
            if (out == IGNORE_INDEX).any():
                self.check_values(mask_values(raw), path)  # names the unknown colours
            return out
        if raw.ndim != 2:
            raise DataError(f"{path}: RGB colour mask, but mask_mode is {self.mode}")
        if self.mode == "binary":
            out = (raw > 0).astype(np.uint8)
            if self.ignore_index != 255:
                out[raw == self.ignore_index] = IGNORE_INDEX
            return out
        if raw.dtype != np.uint8:
            if raw.max() > 255:
                self.check_values(mask_values(raw), path)
            raw = raw.astype(np.uint8)
        if self.ignore_index != IGNORE_INDEX:
            raw = np.where(raw == self.ignore_index, np.uint8(IGNORE_INDEX), raw)
        return raw


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _show(values: Iterable, limit: int = 8) -> str:
    items = sorted(values)
    text = ", ".join(str(list(v)) if isinstance(v, tuple) else str(v) for v in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")
