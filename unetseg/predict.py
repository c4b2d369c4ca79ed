"""`unetseg predict`: masks for an image or a folder of images, written as palette PNGs.

Per image `<stem>.png` (pixel values are class indices; viewers show the class colours), and on request
`<stem>.npy` (float16 class probabilities, C x H x W) and `<stem>_overlay.png` (the mask blended on the image).
Same-sized images are batched; large images are tiled (see Segmenter). TIFFs above the tiling size and GeoTIFFs are
read and written window by window instead, their masks as `<stem>.tif` (predict_raster.py). Decoding runs ahead in
threads, at most two batches ahead and within a byte budget known from the headers (the size limit for one image,
UNETSEG_MAX_IMAGE_MB), so memory stays bounded whatever the folder holds, also when its images are near the limit.
An image that cannot be used (unreadable, over the size limit, the wrong channel count) does not stop the others: the
good ones get their masks, and every bad one is named in one DataError at the end.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .contract.codecs import encode_mask_png
from .contract.errors import DataError, OutputError, UsageError, write_failure_reason
from .contract.image_headers import max_image_bytes
from .contract.layout import IMAGES
from .data.io import declared_size, read_image_valid
from .data.scan import IMAGE_EXTENSIONS
from .inference import SegmenterBase, tta_views
from .predict_raster import note_overlays, predict_rasters, windowed
from .raster_io import NODATA_CLASS
from .visualize import overlay


def find_images(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"{source}: no such image or folder")
    folder = source / IMAGES if (source / IMAGES).is_dir() else source
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def resolve_device(name: Optional[str]):
    """The torch.device `--device` names, checked here: a typo or a missing GPU is one message, not a CUDA
    traceback."""
    import torch  # here: an ONNX model predicts without torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UsageError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return device
    if device.type == "cpu" or (device.type == "mps" and torch.backends.mps.is_available()):
        return device
    raise UsageError(f"--device {name}: unetseg predicts on cpu, cuda or cuda:<index>")


def predict_files(model: SegmenterBase, images: Sequence[Path], output: Path, *, probabilities: bool = False,
                  overlays: bool = False, tile: Optional[int] = None, batch_size: int = 8,
                  progress: Optional[bool] = None, tta: str = "none") -> list[Path]:
    """Write one mask per image into `output`; returns the mask paths. `tta`: see Segmenter.predict.

    Images that cannot be used are named together in one DataError, raised after the others' masks are written."""
    tta_views(tta)  # a bad mode fails before any image is read
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size}: give a positive number")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{output}: cannot create the folder ({write_failure_reason(exc.errno, exc)})") from None
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        shared = ", ".join(sorted({s for s in stems if stems.count(s) > 1}))
        raise DataError(f"two input images share a name ({shared}); "
                        "their masks would overwrite each other")
    rasters = [p for p in images if windowed(p, model)]  # large TIFFs and GeoTIFFs: read and written window by window
    images = [p for p in images if p not in rasters]
    if overlays:
        note_overlays(rasters)
    problems: list[str] = []
    written = predict_rasters(model, rasters, output, problems, probabilities=probabilities, tile=tile, tta=tta)
    bar = None
    if progress if progress is not None else sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(images), unit="image")
    for chunk in _decoded_chunks(images, batch_size, model.in_channels, problems):
        for path, image, valid, probs in _predict_chunk(model, chunk, tile, tta):
            mask = probs.argmax(0).astype(np.uint8)
            if valid is not None:  # no data there: say so, as the windowed path does, not the zeros' class
                mask[~valid] = NODATA_CLASS
            target = output / f"{path.stem}.png"
            with _writing(target):
                target.write_bytes(encode_mask_png(mask, model.class_colors))
            if probabilities:
                with _writing(output / f"{path.stem}.npy") as t:
                    np.save(t, probs.astype(np.float16), allow_pickle=False)
            if overlays:
                with _writing(output / f"{path.stem}_overlay.png") as t:
                    Image.fromarray(overlay(image, mask, model.class_colors)).save(t)
            written.append(target)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if problems:
        total = len(images) + len(rasters)
        raise DataError(f"wrote {len(written)} mask(s) to {output}, but {len(problems)} of {total} images could not be "
                        "used:\n  " + "\n  ".join(problems))
    return written


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[Path]:
    """Writes `target` in the with-block, or raises one OutputError naming the file (its partial content removed: it
    holds space, and a half-written mask must not pass for a whole one)."""
    try:
        yield target
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise OutputError(f"could not write {target}: {write_failure_reason(exc.errno, exc)}; free space or choose "
                          "another --output") from None


def _decoded_chunks(images: Sequence[Path], size: int, channels: int,
                    problems: list[str]) -> Iterator[list[tuple[Path, np.ndarray, Optional[np.ndarray]]]]:
    """Chunks of up to `size` decoded images, decoded in threads at most two chunks ahead of the model, and while the
    images decoded and not yet predicted stay within the byte budget (an image over it is decoded alone). An image
    that cannot be used goes to `problems` instead."""
    pool = ThreadPoolExecutor(4)
    budget = max_image_bytes()
    todo, pending = deque(images), deque()  # pending: (future, declared bytes)
    held = 0  # declared bytes of the images started and not yet predicted (pending and in the chunk)

    def refill() -> None:
        nonlocal held
        while todo and len(pending) < 2 * size:
            cost = _declared_bytes(todo[0])
            if held and held + cost > budget:
                return
            pending.append((pool.submit(_load, todo.popleft(), channels), cost))
            held += cost

    try:
        refill()
        chunk, chunk_cost = [], 0
        while pending or chunk:
            if pending:
                future, cost = pending.popleft()
                path, image, valid, problem = future.result()
                if problem is not None:
                    problems.append(problem)
                    held -= cost
                else:
                    chunk.append((path, image, valid))
                    chunk_cost += cost
            refill()
            # The chunk goes to the model when full, at the end, or when the budget lets nothing more start.
            if chunk and (len(chunk) == size or not pending):
                yield chunk
                chunk, held, chunk_cost = [], held - chunk_cost, 0
                refill()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C or an error: drop the images not yet started


def _declared_bytes(path: Path) -> int:
    """What the image decodes to, from its header; 0 when the header cannot be read (the decoder then names why)."""
    try:
        return declared_size(path).decoded_bytes
    except Exception:  # noqa: BLE001 - unreadable or too large: _load reports it without decoding
        return 0


def _load(path: Path, channels: int) -> tuple[Path, Optional[np.ndarray], Optional[np.ndarray], Optional[str]]:
    """(path, image, pixels that hold data or None when all do, problem)."""
    try:
        image, valid = read_image_valid(path)
    except DataError as exc:
        return path, None, None, str(exc)
    if image.shape[2] != channels:
        found = image.shape[2]
        names = {1: " (grayscale)", 3: " (RGB)"}
        hint = (f"; convert it, e.g. with PIL's .convert('{'RGB' if channels == 3 else 'L'}')"
                if found in names and channels in names else "; give it the bands the model was trained on")
        return path, None, None, (f"{path}: the image has {found} channel(s){names.get(found, '')}, but the model "
                                  f"takes {channels}{names.get(channels, '')}{hint}")
    return path, image, valid, None


def _predict_chunk(model: SegmenterBase, chunk, tile: Optional[int], tta: str):
    """Same-sized small images in one forward pass; others one by one (tiled when large)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, image, _) in enumerate(chunk):
        by_shape.setdefault(image.shape, []).append(i)
    results: dict[int, np.ndarray] = {}
    for shape, members in by_shape.items():
        if tile is None and len(members) > 1 and shape[0] * shape[1] <= model.max_pixels:
            probs = model.predict_proba_batch([chunk[i][1] for i in members], tta)
            results.update(zip(members, probs))
        else:
            for i in members:
                results[i] = model.predict_proba(chunk[i][1], tile=tile, tta=tta)
    for i, (path, image, valid) in enumerate(chunk):
        yield path, image, valid, results[i]
