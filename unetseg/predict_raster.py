"""`unetseg predict` on rasters larger than memory: a TIFF read, predicted and written window by window.

Which path a TIFF takes: one above predict's tiling threshold (Segmenter.max_pixels, 2048 x 2048) or georeferenced (a
GeoTIFF, whose mask must keep its CRS and transform) goes here and gets `<stem>.tif`; other images, TIFFs included,
are decoded whole and get `<stem>.png` as before. UNETSEG_MAX_IMAGE_MB limits what is decoded whole, so it does not
apply to the image here (only to one stored tile or strip of it, on the tifffile backend).

The tiles are the ones the whole-image path uses (same grid, same overlap, same blend), so the mask is the same. What
keeps memory flat is the order: the image is cut into vertical stripes of about `stripe` pixels at tile starts, and
each stripe runs through the Segmenter's banded blend top to bottom (rows are written as soon as no later tile reaches
them). A stripe takes every tile that reaches its columns, so the one tile column that straddles each stripe border is
predicted twice (about 1 in `stripe / step` tile columns) and no blend buffer is ever wider than a stripe: memory
follows the tile and the stripe, not the image.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .contract.errors import DataError, OutputError
from .inference import SegmenterBase, _starts
from .raster_io import TIFF_SUFFIXES, RasterSink, RasterSource, open_source, raster_header

DEFAULT_STRIPE = 8192  # pixels: 12 x 4 bytes x (tile + step) rows x stripe per blend buffer at 3 classes


def windowed(path: Path, model: SegmenterBase) -> bool:
    """Whether `unetseg predict` takes `path` window by window (see the module's docstring)."""
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return False
    header = raster_header(path)
    return header is not None and (header[0] * header[1] > model.max_pixels or header[2])


def predict_rasters(model: SegmenterBase, paths: Sequence[Path], output: Path, problems: list[str], *,
                    probabilities: bool = False, tile: Optional[int] = None, batch_size: int = 4,
                    tta: str = "none") -> list[Path]:
    """`predict_raster` for each path; a raster that cannot be used goes to `problems`, the others are written."""
    written = []
    for path in paths:
        try:
            written.append(predict_raster(model, path, output, probabilities=probabilities, tile=tile,
                                          batch_size=batch_size, tta=tta)[0])
        except DataError as exc:
            problems.append(str(exc))
    return written


def predict_raster(model: SegmenterBase, path: Path, output: Path, *, probabilities: bool = False,
                   tile: Optional[int] = None, overlap: float = 0.25, batch_size: int = 4, tta: str = "none",
                   stripe: int = DEFAULT_STRIPE, backend: Optional[str] = None) -> list[Path]:
    """Write `<stem>.tif` (the mask: class indices, the class colours as its palette, 255 where the source has no data)
    and with `probabilities` `<stem>_proba.tif` (one uint8 band per class: probability x 255) into `output`."""
    mask_path = output / f"{path.stem}.tif"
    if mask_path.resolve() == path.resolve():
        raise OutputError(f"{path}: its mask {mask_path.name} would overwrite the image itself; choose another "
                          "--output")
    with open_source(path, backend) as source:
        if source.bands != model.in_channels:
            raise DataError(f"{path}: the image has {source.bands} band(s), but the model takes {model.in_channels}")
        sink = RasterSink(source, mask_path,
                          output / f"{path.stem}_proba.tif" if probabilities else None, model.class_colors)
        try:
            for y0, x0, proba in probability_windows(model, source, tile=tile, overlap=overlap,
                                                     batch_size=batch_size, tta=tta, stripe=stripe):
                mask = proba.argmax(0).astype(np.uint8)
                void = source.void(y0, y0 + mask.shape[0], x0, x0 + mask.shape[1]) if sink.nodata is not None else None
                if void is not None:
                    mask[void] = sink.nodata
                    proba[:, void] = 0
                sink.write(y0, x0, mask, proba if probabilities else None)
        except BaseException:
            sink.abort()
            raise
        return sink.close()


def probability_windows(model: SegmenterBase, source: RasterSource, *, tile: Optional[int] = None,
                        overlap: float = 0.25, batch_size: int = 4, tta: str = "none",
                        stripe: int = DEFAULT_STRIPE) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, first column, (C, h, w) float32 probabilities) of the whole image, stripe by stripe and band by band
    within each: what `model.predict_proba(image, tile=tile)` gives, without the image or its probabilities whole.
    `tile=None` is predict's default: one tile covering an image up to `max_pixels`, else `default_tile`."""
    height, width = source.height, source.width
    if tile is None:
        covering = -(-max(height, width) // model.stride) * model.stride
        tile = covering if height * width <= model.max_pixels else model.default_tile
    # As Segmenter._tiled_bands sizes its grid: the same tiles, so the same blend.
    tile = max(model.stride, tile // model.stride * model.stride)
    tw, step = min(tile, width), max(model.stride, int(tile * (1 - overlap)))
    for c0, c1, s0, s1 in stripes(width, tw, step, stripe):
        view = _Columns(source, s0, s1)
        for top, band in model._tiled_bands(view, tile, overlap, batch_size, tta):
            yield top, c0, model.ops.to_numpy(band[:, :, c0 - s0:c1 - s0]).astype(np.float32, copy=False)


def stripes(width: int, tile: int, step: int, stripe: int) -> list[tuple[int, int, int, int]]:
    """(first column, end column) of each stripe, and of the columns its tiles cover: stripes end at tile starts of the
    whole image's grid, about `stripe` pixels apart, and the tiles that reach a stripe start on that grid, so a stripe
    tiled on its own is tiled exactly as the whole image is."""
    starts = _starts(width, tile, step)
    every = max(1, stripe // step)
    bounds = [starts[k] for k in range(0, len(starts), every)] + [width]
    out = []
    for c0, c1 in zip(bounds, bounds[1:]):
        reach = [x for x in starts if x < c1 and x + tile > c0]
        out.append((c0, c1, reach[0], reach[-1] + tile))
    return out


class _Columns:
    """Columns [x0, x1) of a source, as an HxWxC image the Segmenter's tiling reads crop by crop."""

    def __init__(self, source: RasterSource, x0: int, x1: int):
        self.source, self.x0 = source, x0
        self.shape = (source.height, x1 - x0, source.bands)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        y0, y1, _ = rows.indices(self.shape[0])
        a, b, _ = cols.indices(self.shape[1])
        return self.source.read(y0, y1, self.x0 + a, self.x0 + b)


def note_overlays(paths: Sequence[Path]) -> None:
    """--overlay asks for a picture of each image; a raster's would be as large as the raster itself."""
    if paths:
        print(f"note: no overlay for {len(paths)} raster(s) predicted window by window ({paths[0].name}...): open "
              "the mask .tif over the image in a GIS or viewer instead", file=sys.stderr)

