"""Find a channel's image/mask pairs. Pure pathlib: the notebook client runs this before uploading.

A channel is a folder with `images/` and `masks/`; an image and its mask share a file stem (`a.jpg` with `a.png`),
never a sort position. Every problem found is reported at once, each naming the file at fault.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..contract.errors import DataError
from ..contract.ground_truth import PAIRING_FILE, read_pairing
from ..contract.layout import IMAGES, MASKS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")  # .npy: an HxW or HxWxC array
MASK_EXTENSIONS = (".png", ".tif", ".tiff")  # lossless only: JPEG smears class boundaries into new values
MAX_LISTED = 10  # files named in one error message; the rest are counted


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path


def pair_channel(root: str | Path) -> list[Sample]:
    """The channel's samples sorted by stem, or one DataError listing every problem found."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if (root / PAIRING_FILE).is_file():
        return ground_truth_samples(root / PAIRING_FILE)
    missing = [name for name in (IMAGES, MASKS) if not (root / name).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        raise DataError(
            f"{root}: expected sub-folders images/ and masks/, missing {', '.join(m + '/' for m in missing)} "
            f"(found: {', '.join(found) or 'nothing'})"
        )

    problems: list[str] = []
    images = _index_folder(root / IMAGES, IMAGE_EXTENSIONS, problems)
    masks = _index_folder(root / MASKS, MASK_EXTENSIONS, problems)
    if not images and not problems:
        raise DataError(f"{root / IMAGES}: no images (expected {', '.join(IMAGE_EXTENSIONS)} files)")

    no_mask = [images[s] for s in sorted(images.keys() - masks.keys())]
    no_image = [masks[s] for s in sorted(masks.keys() - images.keys())]
    if no_mask:
        problems.append(_listing(f"{len(no_mask)} image(s) without a mask of the same name in {root / MASKS}", no_mask))
    if no_image:
        problems.append(_listing(f"{len(no_image)} mask(s) without an image of the same name in {root / IMAGES}",
                                 no_image))
    if problems:
        raise DataError(f"dataset {root} is not usable:\n  " + "\n  ".join(problems))
    return [Sample(stem, images[stem], masks[stem]) for stem in sorted(images)]


def ground_truth_samples(path: Path) -> list[Sample]:
    """The pairs of a Ground Truth manifest (contract/ground_truth.py): image and mask paths relative to the pairing
    file's two roots, which are relative to the folder holding the pairing file's folder (a job's channels are
    siblings: /opt/ml/input/data/train_manifest beside train and train_masks). Files are read by the data check."""
    content = read_pairing(path)
    roots = [path.parent.parent / root for root in content["roots"]]  # an absolute root stays absolute
    samples, stems = [], set()
    for entry in content["samples"]:
        stem = Path(entry["image"]).stem
        stem = stem if stem not in stems else f"{stem}-line{entry['line']}"  # one image name in two folders
        stems.add(stem)
        samples.append(Sample(stem, roots[0] / entry["image"], roots[1] / entry["mask"]))
    missing = [s for s in samples if not s.image.is_file() or not s.mask.is_file()]
    if missing:
        lines = {s.stem: e["line"] for s, e in zip(samples, content["samples"])}
        first = missing[0]
        gone = first.image if not first.image.is_file() else first.mask
        raise DataError(f"{content.get('manifest', path)} line {lines[first.stem]}: {gone} is not there "
                        f"({len(missing)} of {len(samples)} samples miss a file)")
    return samples


def _index_folder(folder: Path, allowed: Sequence[str], problems: list[str]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    unknown: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .DS_Store, ._foo, editor swap files
        suffix = path.suffix.lower()
        if path.is_dir() or suffix not in allowed:
            unknown.append(path)
            continue
        if path.stem in by_stem:
            problems.append(f"{by_stem[path.stem]} and {path}: two files with the stem '{path.stem}'; keep one")
            continue
        by_stem[path.stem] = path
    if unknown:
        kind = "mask" if folder.name == MASKS else "image"
        jpeg_masks = kind == "mask" and any(p.suffix.lower() in (".jpg", ".jpeg") for p in unknown)
        hint = " (masks must be lossless: JPEG is not accepted)" if jpeg_masks else ""
        problems.append(_listing(f"{len(unknown)} file(s) in {folder} with an unknown {kind} extension; "
                                 f"allowed: {', '.join(allowed)}{hint}", unknown))
    return by_stem


def _listing(headline: str, paths: Iterable[Path]) -> str:
    paths = list(paths)
    names = ", ".join(p.name for p in paths[:MAX_LISTED])
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return f"{headline}: {names}{more}"


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A deterministic (train, validation) split by a hash of each stem.

    Hashing, rather than shuffling a list, keeps a sample on the same side when files are added or removed.
    """
    if len(samples) < 2:
        raise DataError(
            f"{len(samples)} sample(s) cannot be split into train and validation; "
            "add images or give a separate validation channel"
        )
    n_val = min(len(samples) - 1, max(1, math.ceil(fraction * len(samples))))
    ranked = sorted(samples, key=lambda s: hashlib.sha256(f"{seed}:{s.stem}".encode()).hexdigest())
    val = sorted(ranked[:n_val], key=lambda s: s.stem)
    train = sorted(ranked[n_val:], key=lambda s: s.stem)
    return train, val
