"""`unetseg predict`: masks for an image or a folder of images, written as palette PNGs.

Per image `<stem>.png` (pixel values are class indices; viewers show the class colours), and on request
`<stem>.npy` (float16 class probabilities, C x H x W) and `<stem>_overlay.png` (the mask blended on the image).
Same-sized images are batched; large images are tiled (see Segmenter); decoding runs ahead in threads.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from .codecs import encode_mask_png
from .data.io import read_image
from .data.scan import IMAGE_EXTENSIONS
from .errors import DataError
from .segmenter import Segmenter, tta_views
from .visualize import overlay


def find_images(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"{source}: no such image or folder")
    folder = source / "images" if (source / "images").is_dir() else source
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def predict_files(model: Segmenter, images: Sequence[Path], output: Path, *, probabilities: bool = False,
                  overlays: bool = False, tile: Optional[int] = None, batch_size: int = 8,
                  progress: Optional[bool] = None, tta: str = "none") -> list[Path]:
    """Write one mask per image into `output`; returns the mask paths. `tta`: see Segmenter.predict."""
    tta_views(tta)  # a bad mode fails before any image is read
    output.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise DataError(f"two input images share a name ({', '.join(sorted({s for s in stems if stems.count(s) > 1}))}); "
                        "their masks would overwrite each other")
    bar = None
    if progress if progress is not None else sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(images), unit="image")
    written = []
    for chunk in _decoded_chunks(images, batch_size):
        for path, image, probs in _predict_chunk(model, chunk, tile, tta):
            mask = probs.argmax(0).astype(np.uint8)
            target = output / f"{path.stem}.png"
            target.write_bytes(encode_mask_png(mask, model.class_colors))
            if probabilities:
                np.save(output / f"{path.stem}.npy", probs.astype(np.float16), allow_pickle=False)
            if overlays:
                Image.fromarray(overlay(image, mask, model.class_colors)).save(output / f"{path.stem}_overlay.png")
            written.append(target)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return written


def _decoded_chunks(images: Sequence[Path], size: int) -> Iterator[list[tuple[Path, np.ndarray]]]:
    with ThreadPoolExecutor(4) as pool:  # decode the next images while the model runs
        decoded = pool.map(lambda p: (p, read_image(p)), images)
        chunk = []
        for item in decoded:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _predict_chunk(model: Segmenter, chunk, tile: Optional[int], tta: str):
    """Same-sized small images in one forward pass; others one by one (tiled when large)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, image) in enumerate(chunk):
        by_shape.setdefault(image.shape, []).append(i)
    results: dict[int, np.ndarray] = {}
    for shape, members in by_shape.items():
        if tile is None and len(members) > 1 and shape[0] * shape[1] <= model.max_pixels:
            probs = model.probabilities(model.to_batch([chunk[i][1] for i in members]), tta).cpu().numpy()
            results.update(zip(members, probs))
        else:
            for i in members:
                results[i] = model.predict_proba(chunk[i][1], tile=tile, tta=tta)
    for i, (path, image) in enumerate(chunk):
        yield path, image, results[i]
