"""Read every file of a dataset once, before training, and fail with one error naming each bad file.

The same pass measures what training needs to know (mask convention, bit depth, class balance, and where the
normalization is measured, each band's mean and spread: band_stats.py) and, when the decoded dataset fits in memory,
keeps the pixels so that no epoch decodes a file again. Pixels an image marks as no data are ignored in its mask.

Files are decoded in threads, as many at once as fit in a byte budget known from their headers (the size limit for one
image, UNETSEG_MAX_IMAGE_MB): memory follows the budget, not the thread count times the largest image.

With several training processes, each reads only its own shard of the files (`owners`), keeps only those pixels,
and the facts (not the pixels) are exchanged through `gather`: every process then knows the whole dataset, raises
the same error, and the reading and the memory are divided among the processes instead of multiplied.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import numpy as np

from ..contract.config import TrainConfig
from ..contract.errors import DataError
from ..contract.image_headers import max_image_bytes
from . import band_stats
from .io import declared_size, read_image_valid, read_mask
from .masks import IGNORE_INDEX, MaskCodec, mask_values, resolve_mode, squeeze_gray
from .scan import MAX_LISTED, Sample


@dataclass
class CheckedDataset:
    samples: list[Sample]
    codec: MaskCodec
    sample_class_pixels: np.ndarray  # (samples, classes) pixel counts, ignore excluded
    sizes: list[tuple[int, int]]  # (height, width) per sample
    # (image, class mask) per sample this process keeps in memory, None for the others (another process's shard, or
    # an image too large to keep: see check_dataset's `uncached`)
    cached: Optional[list[Optional[tuple[np.ndarray, np.ndarray]]]] = field(default=None, repr=False)
    stored: list[tuple[int, int]] = field(default_factory=list, repr=False)  # bytes of the image and mask files
    # (samples, 3, channels) per-band pixel count, mean, M2 (band_stats.py), where the normalization is measured
    sample_band_moments: Optional[np.ndarray] = field(default=None, repr=False)

    def subset(self, indices: Sequence[int]) -> CheckedDataset:
        def pick(items: Sequence) -> list:
            return [items[i] for i in indices]

        return CheckedDataset(pick(self.samples), self.codec, self.sample_class_pixels[list(indices)],
                              pick(self.sizes), pick(self.cached) if self.cached is not None else None,
                              pick(self.stored) if self.stored else [],
                              None if self.sample_band_moments is None else self.sample_band_moments[list(indices)])

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on: the sample count and a digest of the file names and
        sizes (from the data check: nothing is read again)."""
        digest = hashlib.sha256()
        for sample, (image_bytes, mask_bytes) in zip(self.samples, self.stored or [(0, 0)] * len(self.samples)):
            digest.update(f"{sample.image.name}\0{image_bytes}\0{sample.mask.name}\0{mask_bytes}\n".encode())
        return {"images": len(self.samples), "files": digest.hexdigest()[:16]}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image HxWxC, class-index mask HxW) of one sample: from memory when cached, else decoded now."""
        if self.cached is not None and self.cached[index] is not None:
            return self.cached[index]
        sample = self.samples[index]
        image, valid = read_image_valid(sample.image)
        raw = squeeze_gray(read_mask(sample.mask, colours=self.codec.mode == "palette"))
        return image, _ignore_outside(self.codec.decode(raw, sample.mask), valid)

    @property
    def class_pixels(self) -> np.ndarray:
        return self.sample_class_pixels.sum(0)

    @property
    def band_stats(self) -> Optional[tuple[list[float], list[float]]]:
        """(mean, std) per band over these samples' pixels, on the scale the model sees; None where not measured."""
        if self.sample_band_moments is None:
            return None
        channels = self.sample_band_moments.shape[2]
        return band_stats.mean_std(band_stats.merge_all(self.sample_band_moments, channels))


class _Header(NamedTuple):
    size: tuple[int, int]  # (height, width)
    decoded: int  # bytes the image and the mask decode to, as their headers declare
    stored: tuple[int, int]  # bytes of the image and mask files


@dataclass(frozen=True)
class _FileFacts:
    channels: int
    dtype: str
    values: dict  # pixel count per raw mask value, of the pixels that hold data
    image: Optional[np.ndarray]
    mask: Optional[np.ndarray]
    valid: Optional[np.ndarray] = None  # HxW pixels that hold data; None = all
    moments: Optional[np.ndarray] = None  # (3, channels) band moments, where the normalization is measured

    def without_pixels(self) -> _FileFacts:
        """What other processes need to know: small enough to send."""
        return _FileFacts(self.channels, self.dtype, self.values, None, None, None, self.moments)


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
                  gather: Optional[Callable[[Any], list[Any]]] = None,
                  uncached: Optional[Callable[[int, tuple[int, int]], bool]] = None) -> CheckedDataset:
    """Validate every sample; raise one DataError listing the bad files. `codec` fixes the mask convention
    (the validation channel reuses the training channel's).

    Several processes: `owners[i]` is the rank that reads sample i, and `gather(x)` returns every rank's `x` in rank
    order (an all-gather). `cache_share`: the processes on this host, which share its memory. `uncached(i, (height,
    width))`: true for samples never kept in memory (nor counted against it), read from disk where used."""
    if not samples:
        raise DataError("the dataset has no samples")
    threads = threads or min(8, os.cpu_count() or 1)
    budget = max_image_bytes()  # decoded bytes in flight at once: one image at the size limit
    mine = [i for i in range(len(samples)) if owners is None or owners[i] == rank]
    everyone = gather or (lambda x: [x])

    def merged(local: dict[int, Any]) -> dict[int, Any]:
        return {i: v for part in everyone(local) for i, v in part.items()}

    # Headers first: cheap, they size the cache and the decoding before a pixel is decoded, and refuse bombs undecoded.
    headers = merged(dict(zip(mine, _parallel(lambda i: _header(samples[i]), mine, threads))))
    readable = [i for i in range(len(samples)) if not isinstance(headers[i], str)]
    skip = {i for i in readable if uncached is not None and uncached(i, headers[i].size)}
    per_rank = {}  # decoded bytes each rank would keep (16-bit bound); all ranks decide alike, on the largest share
    for i in readable:
        h, w = headers[i].size
        owner = owners[i] if owners is not None else rank
        per_rank[owner] = per_rank.get(owner, 0) + (0 if i in skip else h * w * (cfg.in_channels * 2 + 1))
    largest = max(per_rank.values(), default=0)
    keep = cfg.cache_images == "on" or (cfg.cache_images == "auto" and largest < memory_budget_bytes(cache_share))

    # Then every pixel, also of files after a bad one: the error lists every problem at once.
    readable_set = set(readable)
    to_read = [i for i in mine if i in readable_set]
    read = dict(zip(to_read, _parallel(lambda i: _read(samples[i], cfg, keep and i not in skip), to_read, threads,
                                       cost=lambda i: headers[i].decoded, budget=budget)))
    pixels = {i: (f.image, f.mask) for i, f in read.items() if not isinstance(f, str)}
    facts = merged({i: f if isinstance(f, str) else f.without_pixels() for i, f in read.items()})
    problems = [headers[i] if isinstance(headers[i], str) else facts[i] for i in range(len(samples))
                if isinstance(headers[i], str) or isinstance(facts[i], str)]
    good = {i: f for i, f in facts.items() if not isinstance(f, str)}

    dtypes = {f.dtype for f in good.values()}
    if len(dtypes) > 1:
        first = {d: next(samples[i].image for i, f in good.items() if f.dtype == d) for d in dtypes}
        depths = ", ".join(f"{p.name} is {d}" for d, p in sorted(first.items()))
        problems.append(f"{first[max(dtypes)]}: images mix bit depths ({depths}); convert them to one depth")

    if codec is None and good:
        values = {samples[i].mask: f.values for i, f in good.items()}
        mode = resolve_mode(cfg.mask_mode, cfg.classes, cfg.class_colors, values, cfg.ignore_index)
        colours = tuple(tuple(c) for c in cfg.class_colors) if cfg.class_colors else None
        codec = MaskCodec(mode, cfg.classes, colours, cfg.ignore_index)
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
            if image is not None:
                cached[i] = (image, _ignore_outside(codec.decode(raw, samples[i].mask), read[i].valid))
    moments = np.stack([good[i].moments for i in range(len(samples))]) if cfg.resolved_normalize == "dataset" else None
    return CheckedDataset(list(samples), codec, class_pixels, [headers[i].size for i in range(len(samples))], cached,
                          [headers[i].stored for i in range(len(samples))], moments)


def _parallel(work: Callable[[int], Any], items: Sequence[int], threads: int,
              cost: Optional[Callable[[int], int]] = None, budget: int = 0) -> list[Any]:
    """`work` over `items` in threads, in order. With `cost`, items start only while the cost of those running stays
    within `budget` (an item over it runs alone). On an exception (Ctrl-C included) the items not yet started are
    dropped at once: a pool left to its `with` block would read every remaining file before the interrupt ends it."""
    pool = ThreadPoolExecutor(threads)
    try:
        if cost is None:
            return list(pool.map(work, items))
        results: list[Any] = [None] * len(items)
        running: dict[Any, tuple[int, int]] = {}  # future -> (position, cost)
        spent, position = 0, 0
        while position < len(items) or running:
            while position < len(items) and len(running) < threads:
                price = cost(items[position])
                if running and spent + price > budget:
                    break
                running[pool.submit(work, items[position])] = (position, price)
                spent += price
                position += 1
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                where, price = running.pop(future)
                spent -= price
                results[where] = future.result()
        return results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _header(sample: Sample) -> _Header | str:
    try:
        image, mask = declared_size(sample.image), declared_size(sample.mask)
        stored = (sample.image.stat().st_size, sample.mask.stat().st_size)
    except DataError as exc:
        return str(exc)
    except OSError as exc:
        return f"{sample.image}: unreadable ({exc.strerror or exc})"
    if (image.height, image.width) != (mask.height, mask.width):
        return (f"{sample.mask}: mask size {mask.width}x{mask.height} differs from image size "
                f"{image.width}x{image.height} ({sample.image.name})")
    return _Header((image.height, image.width), image.decoded_bytes + mask.decoded_bytes, stored)


def _read(sample: Sample, cfg: TrainConfig, keep: bool) -> _FileFacts | str:
    try:
        image, valid = read_image_valid(sample.image)
        raw = squeeze_gray(read_mask(sample.mask, colours=cfg.mask_mode == "palette"))
    except DataError as exc:
        return str(exc)
    channels = image.shape[2]
    if channels != cfg.in_channels:
        hint = {1: "; set in_channels=1 for grayscale data", 3: "; set in_channels=3 for RGB data"}.get(
            channels, f"; set in_channels={channels} for {channels}-band data")
        return f"{sample.image}: image has {channels} channel(s), but in_channels={cfg.in_channels}{hint}"
    if image.shape[:2] != raw.shape[:2]:  # headers agreed; the decoded pixels must too
        return (f"{sample.mask}: mask size {raw.shape[1]}x{raw.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]}")
    values = mask_values(raw if valid is None else raw[valid][None])  # no-data pixels are no class's
    if image.dtype.kind == "f" and cfg.resolved_normalize == "imagenet":
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 1:
            return (f"{sample.image}: float pixel values {low:g}..{high:g} lie outside [0, 1], the "
                    "range normalize=imagenet expects of float images; set normalize=dataset to normalize each band by "
                    "the mean and std measured on the training data")
    moments = band_stats.image_moments(image, valid) if cfg.resolved_normalize == "dataset" else None
    return _FileFacts(channels, str(image.dtype), values, image if keep else None, raw if keep else None,
                      valid if keep else None, moments)


def _ignore_outside(mask: np.ndarray, valid: Optional[np.ndarray]) -> np.ndarray:
    """The class mask with the pixels that hold no image data set to ignore: they are not learned, nor scored."""
    if valid is not None:
        mask = mask.copy() if not mask.flags.writeable else mask
        mask[~valid] = IGNORE_INDEX
    return mask


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
