"""Read every file of a dataset once, before training, and fail with one error naming each bad file.

The same pass measures what training needs to know (mask convention, bit depth, class balance) and, when the
decoded dataset fits in memory, keeps the pixels so that no epoch decodes a file again.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..config import TrainConfig
from ..errors import DataError
from .io import image_size, read_image, read_mask
from .masks import MaskCodec, mask_values, resolve_mode, squeeze_gray
from .scan import MAX_LISTED, Sample


@dataclass
class CheckedDataset:
    samples: list[Sample]
    codec: MaskCodec
    class_pixels: np.ndarray  # pixels per class (ignore excluded)
    cached: Optional[list[tuple[np.ndarray, np.ndarray]]] = field(default=None, repr=False)  # (image, class mask)


@dataclass(frozen=True)
class _FileFacts:
    channels: int
    dtype: str
    values: frozenset
    image: Optional[np.ndarray]
    mask: Optional[np.ndarray]


def memory_budget_bytes(share: int = 1) -> int:
    """A quarter of physical memory, split among `share` processes on this host."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return total // 4 // max(1, share)


def check_dataset(samples: Sequence[Sample], cfg: TrainConfig, *, codec: Optional[MaskCodec] = None,
                  cache_share: int = 1, threads: Optional[int] = None) -> CheckedDataset:
    """Validate every sample; raise one DataError listing the bad files. `codec` fixes the mask convention
    (the validation channel reuses the training channel's)."""
    if not samples:
        raise DataError("the dataset has no samples")
    threads = threads or min(8, os.cpu_count() or 1)

    # Headers first: cheap, and they size the cache before any pixel is decoded.
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(_header_sizes, samples))
    problems = [s for s in sizes if isinstance(s, str)]
    _raise_if(problems, samples)
    decoded_bytes = sum(h * w * (cfg.in_channels * 2 + 1) for (h, w) in sizes)  # upper bound: 16-bit pixels
    keep = cfg.cache_images == "on" or (cfg.cache_images == "auto" and decoded_bytes < memory_budget_bytes(cache_share))

    with ThreadPoolExecutor(threads) as pool:
        facts = list(pool.map(lambda s: _read(s, cfg, keep), samples))
    _raise_if([f for f in facts if isinstance(f, str)], samples)

    dtypes = {f.dtype for f in facts}
    if len(dtypes) > 1:
        first = {d: next(s.image for s, f in zip(samples, facts) if f.dtype == d) for d in dtypes}
        raise DataError("images mix bit depths: " + ", ".join(f"{p} is {d}" for d, p in sorted(first.items())) +
                        "; convert them to one depth")

    if codec is None:
        mode = resolve_mode(cfg.mask_mode, cfg.classes, cfg.class_colors,
                            {s.mask: f.values for s, f in zip(samples, facts)})
        colours = tuple(tuple(c) for c in cfg.class_colors) if cfg.class_colors else None
        codec = MaskCodec(mode, cfg.classes, colours)
    problems = []
    for sample, fact in zip(samples, facts):
        try:
            codec.check_values(fact.values, sample.mask)
        except DataError as exc:
            problems.append(str(exc))
    _raise_if(problems, samples)

    cached = None
    class_pixels = np.zeros(cfg.classes, np.int64)
    if keep:
        cached = []
        for sample, fact in zip(samples, facts):
            mask = codec.decode(fact.mask, sample.mask)
            class_pixels += np.bincount(mask.ravel(), minlength=256)[: cfg.classes]
            cached.append((fact.image, mask))
    return CheckedDataset(list(samples), codec, class_pixels, cached)


def _header_sizes(sample: Sample) -> tuple[int, int] | str:
    try:
        image_hw, mask_hw = image_size(sample.image), image_size(sample.mask)
    except DataError as exc:
        return str(exc)
    if image_hw != mask_hw:
        return (f"{sample.mask}: mask size {mask_hw[1]}x{mask_hw[0]} differs from image size "
                f"{image_hw[1]}x{image_hw[0]} ({sample.image.name})")
    return image_hw


def _read(sample: Sample, cfg: TrainConfig, keep: bool) -> _FileFacts | str:
    try:
        image = read_image(sample.image)
        raw = squeeze_gray(read_mask(sample.mask))
    except DataError as exc:
        return str(exc)
    channels = image.shape[2]
    if channels != cfg.in_channels:
        hint = {1: "; set in_channels=1 for grayscale data", 3: "; set in_channels=3 for RGB data"}.get(channels, "")
        return f"{sample.image}: image has {channels} channel(s), but in_channels={cfg.in_channels}{hint}"
    if image.shape[:2] != raw.shape[:2]:  # headers agreed; the decoded pixels must too
        return f"{sample.mask}: mask size {raw.shape[1]}x{raw.shape[0]} differs from image size {image.shape[1]}x{image.shape[0]}"
    return _FileFacts(channels, str(image.dtype), mask_values(raw), image if keep else None, raw if keep else None)


def _raise_if(problems: list[str], samples: Sequence[Sample]) -> None:
    """One DataError for all problems; files that share a problem are listed under it once."""
    if not problems:
        return
    if len(problems) == 1:
        raise DataError(problems[0])
    grouped: dict[str, list[str]] = {}
    for text in problems:
        path, _, reason = text.partition(": ")
        grouped.setdefault(reason, []).append(path)
    lines = []
    for reason, paths in list(grouped.items())[:MAX_LISTED]:
        if len(paths) == 1:
            lines.append(f"{paths[0]}: {reason}")
        else:
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            lines.append(f"{len(paths)} files: {reason} (e.g. {', '.join(paths[:3])}{more})")
    more = f"\n  ... and {len(grouped) - MAX_LISTED} other problems" if len(grouped) > MAX_LISTED else ""
    raise DataError(f"{len(problems)} of {len(samples)} samples are not usable:\n  " + "\n  ".join(lines) + more)
