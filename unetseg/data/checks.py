"""Read every file of a dataset once, before training, and fail with one error naming each bad file.

The same pass measures what training needs to know (mask convention, bit depth, class balance) and, when the
decoded dataset fits in memory, keeps the pixels so that no epoch decodes a file again.

With several training processes, each reads only its own shard of the files (`owners`), keeps only those pixels,
and the facts (not the pixels) are exchanged through `gather`: every process then knows the whole dataset, raises
the same error, and the reading and the memory are divided among the processes instead of multiplied.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..contract.config import TrainConfig
from ..contract.errors import DataError
from .io import image_size, read_image, read_mask
from .masks import MaskCodec, mask_values, resolve_mode, squeeze_gray
from .scan import MAX_LISTED, Sample


@dataclass
class CheckedDataset:
    samples: list[Sample]
    codec: MaskCodec
    sample_class_pixels: np.ndarray  # (samples, classes) pixel counts, ignore excluded
    sizes: list[tuple[int, int]]  # (height, width) per sample
    # (image, class mask) per sample this process keeps in memory, None for the others (another process's shard)
    cached: Optional[list[Optional[tuple[np.ndarray, np.ndarray]]]] = field(default=None, repr=False)

    def subset(self, indices: Sequence[int]) -> "CheckedDataset":
        pick = lambda items: [items[i] for i in indices]  # noqa: E731
        return CheckedDataset(pick(self.samples), self.codec, self.sample_class_pixels[list(indices)],
                              pick(self.sizes), pick(self.cached) if self.cached is not None else None)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image HxWxC, class-index mask HxW) of one sample: from memory when cached, else decoded now."""
        if self.cached is not None and self.cached[index] is not None:
            return self.cached[index]
        sample = self.samples[index]
        return read_image(sample.image), self.codec.decode(squeeze_gray(read_mask(sample.mask)), sample.mask)

    @property
    def class_pixels(self) -> np.ndarray:
        return self.sample_class_pixels.sum(0)


@dataclass(frozen=True)
class _FileFacts:
    channels: int
    dtype: str
    values: dict  # pixel count per raw mask value
    image: Optional[np.ndarray]
    mask: Optional[np.ndarray]

    def without_pixels(self) -> "_FileFacts":
        """What other processes need to know: small enough to send."""
        return _FileFacts(self.channels, self.dtype, self.values, None, None)


def memory_budget_bytes(share: int = 1) -> int:
    """A quarter of physical memory, split among `share` processes on this host."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return total // 4 // max(1, share)


def check_dataset(samples: Sequence[Sample], cfg: TrainConfig, *, codec: Optional[MaskCodec] = None,
                  cache_share: int = 1, threads: Optional[int] = None, rank: int = 0,
                  owners: Optional[Sequence[int]] = None,
                  gather: Optional[Callable[[Any], list[Any]]] = None) -> CheckedDataset:
    """Validate every sample; raise one DataError listing the bad files. `codec` fixes the mask convention
    (the validation channel reuses the training channel's).

    Several processes: `owners[i]` is the rank that reads sample i, and `gather(x)` returns every rank's `x` in rank
    order (an all-gather). `cache_share`: the processes on this host, which share its memory."""
    if not samples:
        raise DataError("the dataset has no samples")
    threads = threads or min(8, os.cpu_count() or 1)
    mine = [i for i in range(len(samples)) if owners is None or owners[i] == rank]
    everyone = gather or (lambda x: [x])

    def merged(local: dict[int, Any]) -> dict[int, Any]:
        return {i: v for part in everyone(local) for i, v in part.items()}

    # Headers first: cheap, they size the cache before any pixel is decoded, and they refuse bombs undecoded.
    sizes = merged(dict(zip(mine, _parallel(lambda i: _header_sizes(samples[i]), mine, threads))))
    readable = [i for i in range(len(samples)) if not isinstance(sizes[i], str)]
    per_rank = {}  # decoded bytes each rank would keep (16-bit bound); all ranks decide alike, on the largest share
    for i in readable:
        h, w = sizes[i]
        owner = owners[i] if owners is not None else rank
        per_rank[owner] = per_rank.get(owner, 0) + h * w * (cfg.in_channels * 2 + 1)
    largest = max(per_rank.values(), default=0)
    keep = cfg.cache_images == "on" or (cfg.cache_images == "auto" and largest < memory_budget_bytes(cache_share))

    # Then every pixel, also of files after a bad one: the error lists every problem at once.
    readable_set = set(readable)
    to_read = [i for i in mine if i in readable_set]
    read = dict(zip(to_read, _parallel(lambda i: _read(samples[i], cfg, keep), to_read, threads)))
    pixels = {i: (f.image, f.mask) for i, f in read.items() if not isinstance(f, str)}
    facts = merged({i: f if isinstance(f, str) else f.without_pixels() for i, f in read.items()})
    problems = [sizes[i] if isinstance(sizes[i], str) else facts[i] for i in range(len(samples))
                if isinstance(sizes[i], str) or isinstance(facts[i], str)]
    good = {i: f for i, f in facts.items() if not isinstance(f, str)}

    dtypes = {f.dtype for f in good.values()}
    if len(dtypes) > 1:
        first = {d: next(samples[i].image for i, f in good.items() if f.dtype == d) for d in dtypes}
        problems.append(f"{first[max(dtypes)]}: images mix bit depths (" +
                        ", ".join(f"{p.name} is {d}" for d, p in sorted(first.items())) + "); convert them to one depth")

    if codec is None and good:
        mode = resolve_mode(cfg.mask_mode, cfg.classes, cfg.class_colors, {samples[i].mask: f.values for i, f in good.items()})
        colours = tuple(tuple(c) for c in cfg.class_colors) if cfg.class_colors else None
        codec = MaskCodec(mode, cfg.classes, colours)
    for i, fact in good.items():
        try:
            codec.check_values(fact.values, samples[i].mask)
        except DataError as exc:
            problems.append(str(exc))
    _raise_if(problems, samples)

    class_pixels = np.stack([codec.class_counts(good[i].values) for i in range(len(samples))])
    cached = None
    if keep:
        cached = [None] * len(samples)
        for i, (image, raw) in pixels.items():
            cached[i] = (image, codec.decode(raw, samples[i].mask))
    return CheckedDataset(list(samples), codec, class_pixels, [sizes[i] for i in range(len(samples))], cached)


def _parallel(work: Callable[[int], Any], items: Sequence[int], threads: int) -> list[Any]:
    """`work` over `items` in threads. On an exception (Ctrl-C included) the files not yet started are dropped at once:
    a pool left to its `with` block would read every remaining file before the interrupt could end the process."""
    pool = ThreadPoolExecutor(threads)
    try:
        return list(pool.map(work, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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
