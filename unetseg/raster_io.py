"""TIFF and GeoTIFF rasters read and written window by window: images larger than memory.

A source is an HxWxC image whose pixels are read only where they are asked for (`source[y0:y1, x0:x1]`), so the
Segmenter's tiling reads a tile's window at a time. A sink takes finished windows of the mask (and of the class
probabilities) and writes a tiled, deflate-compressed TIFF, BigTIFF when it may pass 4 GiB, with the source's
georeferencing (CRS, transform) and a palette of the class colours.

Two backends, one behaviour:
- rasterio (the `geo` extra: `pip install unetseg[geo]`), the field's standard: any TIFF GDAL reads (LZW, JPEG,
  overviews, internal masks), GDAL's block cache held small so that memory does not follow the image;
- tifffile (always installed with the engine) where rasterio is not: tiled or striped TIFFs in the compressions it
  decodes without imagecodecs (none, deflate, packbits), GeoTIFF tags copied as they are. Its writer takes tiles in
  file order only, so the windows go to raw scratch files beside the output first and are then streamed into the TIFF
  a row of tiles at a time.

No-data: a source pixel is void where every band holds the file's no-data value (GDAL_NODATA), or where rasterio's
dataset mask says so (alpha, internal masks). The mask then holds NODATA_CLASS there, which the output declares as
its no-data value: 255, the ignore value of unetseg's masks.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .contract.errors import DataError, OutputError, write_failure_reason
from .contract.image_headers import max_image_bytes

TIFF_SUFFIXES = (".tif", ".tiff")
NODATA_CLASS = 255  # the mask's value where the source has no data: unetseg's ignore value
BLOCK = 256  # the output's tile side
GDAL_CACHE_MB = 64  # GDAL's block cache (its default, 5% of RAM, would grow with the image until full)
SEGMENT_CACHE_BYTES = 64 << 20  # tifffile backend: decoded source tiles/strips kept for the overlapping windows
BIGTIFF_ABOVE = 2**32 - 2**28  # uncompressed bytes above which the output is a BigTIFF (offsets past 4 GiB)
# GeoTIFF tags (pixel scale, tie points, transformation, geo keys, doubles, ASCII) copied to the outputs as they are.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
_GDAL_NODATA_TAG = 42113


def rasterio_available() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: Optional[str]) -> str:
    if backend is None:
        return "rasterio" if rasterio_available() else "tifffile"
    if backend not in ("rasterio", "tifffile"):
        raise ValueError(f"backend={backend!r}: use rasterio or tifffile")
    return backend


def raster_header(path: Path, backend: Optional[str] = None) -> Optional[tuple[int, int, bool]]:
    """(height, width, georeferenced) from a TIFF's header, no pixel read; None when it is not a TIFF this module
    reads (the whole-image reader then names the problem)."""
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    try:
        with open_source(path, backend) as source:
            return source.height, source.width, source.georeferenced
    except (DataError, OSError):
        return None


def open_source(path: Path, backend: Optional[str] = None) -> RasterSource:
    """The TIFF at `path` as a windowed source; DataError naming the file when it cannot be read."""
    if resolve_backend(backend) == "rasterio":
        return _RasterioSource(Path(path))
    return _TiffSource(Path(path))


class RasterSource:
    """An HxWxC image read window by window: `source[y0:y1, x0:x1]` is an (h, w, C) array."""

    path: Path
    height: int
    width: int
    bands: int
    dtype: np.dtype
    georeferenced: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.bands

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        y0, y1, _ = rows.indices(self.height)
        x0, x1, _ = cols.indices(self.width)
        return self.read(y0, y1, x0, x1)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def void(self, y0: int, y1: int, x0: int, x1: int) -> Optional[np.ndarray]:
        """(h, w) bool, True where the source has no data; None when it has no no-data value or mask."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pixels(self, array: np.ndarray) -> np.ndarray:
        """HWC pixels as the model takes them: uint8/uint16/float as stored, other integers as uint16 when in range."""
        if array.dtype in (np.uint8, np.uint16) or array.dtype.kind == "f":
            return np.ascontiguousarray(array)
        if array.dtype.kind in "iu" and (array.size == 0 or (array.min() >= 0 and array.max() <= 65535)):
            return np.ascontiguousarray(array.astype(np.uint16))
        raise DataError(f"{self.path}: pixel values {array.min()}..{array.max()} ({array.dtype}) are outside 0..65535; "
                        "unetseg reads 8- or 16-bit unsigned pixels (or floats in [0, 1])")


class _RasterioSource(RasterSource):
    def __init__(self, path: Path):
        import rasterio
        from rasterio.enums import MaskFlags
        from rasterio.errors import RasterioIOError

        self.path = path
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self._env.__enter__()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning for a plain TIFF: expected here
                self.ds = rasterio.open(path)
        except RasterioIOError as exc:
            self._env.__exit__(None, None, None)
            raise DataError(f"{path}: not a readable raster ({exc})") from None
        self.height, self.width, self.bands = self.ds.height, self.ds.width, self.ds.count
        self.dtype = np.dtype(self.ds.dtypes[0])
        self.georeferenced = self.ds.crs is not None or not self.ds.transform.is_identity
        self.crs, self.transform = self.ds.crs, self.ds.transform
        self.nodata = self.ds.nodata
        self.masked = any(flags != [MaskFlags.all_valid] for flags in self.ds.mask_flag_enums)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        try:
            window = self.ds.read(window=Window(x0, y0, x1 - x0, y1 - y0))
        except RasterioIOError as exc:  # truncated or damaged blocks (a header bomb has none): the file and the reason
            raise DataError(f"{self.path}: cannot read its pixels at rows {y0}..{y1}, columns {x0}..{x1} ({exc}); "
                            "the file is damaged or incomplete") from None
        return self._pixels(np.moveaxis(window, 0, -1))

    def void(self, y0: int, y1: int, x0: int, x1: int) -> Optional[np.ndarray]:
        from rasterio.windows import Window

        if not self.masked:
            return None
        return self.ds.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0)) == 0

    def close(self) -> None:
        self.ds.close()
        self._env.__exit__(None, None, None)


class _TiffSource(RasterSource):
    """The first (full-resolution) page of a TIFF through tifffile, decoded a tile or strip at a time."""

    def __init__(self, path: Path):
        import tifffile

        self.path = path
        try:
            self.tif = tifffile.TiffFile(path)
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except Exception as exc:  # noqa: BLE001 - every way tifffile fails to parse becomes one message
            raise DataError(f"{path}: not a readable TIFF ({exc})") from None
        page = self.page = self.tif.pages.first
        planes, _, self.height, self.width, samples = page.shaped
        self.bands, self.dtype = planes * samples, np.dtype(page.dtype)
        self.planar = planes > 1
        self.geo_tags = [(t.code, int(t.dtype), t.count, t.value) for t in page.tags.values() if t.code in GEO_TAGS]
        self.georeferenced = bool(self.geo_tags)
        nodata_tag = page.tags.get(_GDAL_NODATA_TAG)
        self.nodata = _number(nodata_tag.value) if nodata_tag is not None else None
        self.seg_h, self.seg_w = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, self.width)
        self.seg_h = min(self.seg_h or self.height, self.height)
        self.rows, self.cols = -(-self.height // self.seg_h), -(-self.width // self.seg_w)
        seg_bytes = self.seg_h * self.seg_w * (1 if self.planar else self.bands) * self.dtype.itemsize
        if seg_bytes > max_image_bytes():
            self.close()
            raise DataError(f"{path}: its pixels are stored in blocks of {self.seg_w}x{self.seg_h}, each decoded "
                            "whole, over the size limit for one image; install unetseg[geo] (rasterio), or rewrite the "
                            "file tiled (e.g. gdal_translate -co TILED=YES)")
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached = 0
        self._segment(0)  # a compression tifffile cannot decode fails here, naming the file

    def _segment(self, index: int) -> np.ndarray:
        """Segment `index` (plane-major, then rows, then columns of segments) as (seg_h, seg_w, samples)."""
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        page, fh = self.page, self.tif.filehandle
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        try:
            fh.seek(offset)
            data = fh.read(count) if count else None
            segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # noqa: BLE001 - a missing codec or damaged data: the file and the reason
            self.close()
            hint = "; install unetseg[geo] (rasterio) to read it" if "imagecodecs" in str(exc) else ""
            raise DataError(f"{self.path}: cannot decode its pixels ({exc}){hint}") from None
        shape = tuple(shape[-3:])  # (rows, columns, samples) of this segment
        segment = np.zeros(shape, self.dtype) if segment is None else np.asarray(segment).reshape(shape)
        while self._cache and self._cached + segment.nbytes > SEGMENT_CACHE_BYTES:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        self._cache[index] = segment
        self._cached += segment.nbytes
        return segment

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, self.bands), self.dtype)
        planes = self.bands if self.planar else 1
        for r in range(y0 // self.seg_h, -(-y1 // self.seg_h)):
            for c in range(x0 // self.seg_w, -(-x1 // self.seg_w)):
                top, left = r * self.seg_h, c * self.seg_w
                ys = slice(max(y0, top), min(y1, top + self.seg_h))
                xs = slice(max(x0, left), min(x1, left + self.seg_w))
                for plane in range(planes):
                    seg = self._segment(plane * self.rows * self.cols + r * self.cols + c)
                    block = seg[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left]
                    bands = slice(plane, plane + 1) if self.planar else slice(None)
                    out[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0, bands] = block
        return self._pixels(out)

    def void(self, y0: int, y1: int, x0: int, x1: int) -> Optional[np.ndarray]:
        if self.nodata is None:
            return None
        pixels = self.read(y0, y1, x0, x1)
        if isinstance(self.nodata, float) and math.isnan(self.nodata):
            return np.isnan(pixels).all(-1)
        return (pixels == self.nodata).all(-1)

    def close(self) -> None:
        self.tif.close()


def _number(text: str) -> Optional[float]:
    try:
        value = float(str(text).strip().strip("\x00"))
    except ValueError:
        return None
    return int(value) if value.is_integer() else value


# --- sinks --------------------------------------------------------------------------------------------------------

class RasterSink:
    """A mask (uint8 class indices, one band) and optionally the class probabilities (uint8, probability x 255, one band
    per class) written window by window to tiled, compressed TIFFs. Written under a temporary name and renamed when
    whole: a half-written mask never passes for a whole one."""

    def __init__(self, source: RasterSource, mask_path: Path, proba_path: Optional[Path],
                 colors: Sequence[Sequence[int]]):
        self.source, self.colors = source, [tuple(int(v) for v in c) for c in colors]
        self.targets = [(mask_path, 1)] + ([(proba_path, len(colors))] if proba_path is not None else [])
        self.partials = [p.with_name(f".{p.name}.partial") for p, _ in self.targets]
        self.backend = "rasterio" if isinstance(source, _RasterioSource) else "tifffile"  # georeferencing as read
        self.nodata = NODATA_CLASS if _has_void(source) else None
        self._writers = []
        try:
            for partial, (_, bands) in zip(self.partials, self.targets):
                self._writers.append(self._open(partial, bands))
        except Exception:
            self.abort()
            raise

    def write(self, y0: int, x0: int, mask: np.ndarray, proba: Optional[np.ndarray] = None) -> None:
        """The (h, w) mask and (C, h, w) float probabilities of the window at (y0, x0)."""
        for writer, array in zip(self._writers, (mask[None], proba)):
            if array is not None:
                if array.dtype != np.uint8:
                    array = np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8)
                self._guarded(writer.write, y0, x0, array)

    def close(self) -> list[Path]:
        for writer in self._writers:
            self._guarded(writer.close)
        for partial, (target, _) in zip(self.partials, self.targets):
            self._guarded(os.replace, partial, target)
        return [target for target, _ in self.targets]

    def abort(self) -> None:
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.discard()
        for partial in self.partials:
            partial.unlink(missing_ok=True)

    def _guarded(self, act, *args) -> None:
        try:
            act(*args)
        except OSError as exc:
            self.abort()
            raise OutputError(f"could not write {self.targets[0][0]}: {write_failure_reason(exc.errno, exc)}; free "
                              "space or choose another --output") from None

    def _open(self, path: Path, bands: int):
        colormap = self.colors if bands == 1 else None
        nodata = self.nodata if bands == 1 else None
        if self.backend == "rasterio":
            return _RasterioWriter(path, self.source, bands, colormap, nodata)
        return _TiffWriter(path, self.source, bands, colormap, nodata)


def _has_void(source: RasterSource) -> bool:
    return bool(getattr(source, "masked", False) or getattr(source, "nodata", None) is not None)


class _RasterioWriter:
    def __init__(self, path: Path, source: RasterSource, bands: int, colormap, nodata: Optional[int]):
        import rasterio

        profile = dict(driver="GTiff", width=source.width, height=source.height, count=bands, dtype="uint8",
                       tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate", nodata=nodata,
                       BIGTIFF="YES" if source.height * source.width * bands > BIGTIFF_ABOVE else "IF_SAFER")
        if isinstance(source, _RasterioSource) and source.georeferenced:
            profile.update(crs=source.crs, transform=source.transform)
        self.env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self.env.__enter__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning for a plain TIFF's mask
            self.ds = rasterio.open(path, "w", **profile)
        if colormap:
            self.ds.write_colormap(1, {i: (*c, 255) for i, c in enumerate(colormap)})

    def write(self, y0: int, x0: int, array: np.ndarray) -> None:
        from rasterio.windows import Window

        self.ds.write(array, window=Window(x0, y0, array.shape[2], array.shape[1]))

    def close(self) -> None:
        self.ds.close()
        self.env.__exit__(None, None, None)

    def discard(self) -> None:
        self.close()


class _TiffWriter:
    """Windows go to a raw (H, W, bands) scratch file by positioned writes (nothing of it held in memory); close()
    streams it into a tiled TIFF one row of tiles at a time."""

    def __init__(self, path: Path, source: RasterSource, bands: int, colormap, nodata: Optional[int]):
        self.path, self.source, self.bands, self.colormap, self.nodata = path, source, bands, colormap, nodata
        self.scratch = path.with_name(path.name + ".raw")
        self.fd = os.open(self.scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, source.height * source.width * bands)

    def write(self, y0: int, x0: int, array: np.ndarray) -> None:
        rows = np.ascontiguousarray(np.moveaxis(array, 0, -1))  # (h, w, bands), as the scratch file lays them out
        row_bytes = self.source.width * self.bands
        for i, row in enumerate(rows):
            os.pwrite(self.fd, row.tobytes(), (y0 + i) * row_bytes + x0 * self.bands)

    def close(self) -> None:
        import tifffile

        height, width, bands = self.source.height, self.source.width, self.bands
        extratags = [tag + (True,) for tag in getattr(self.source, "geo_tags", [])]
        if self.nodata is not None:
            extratags.append((_GDAL_NODATA_TAG, 2, 0, str(self.nodata), True))
        colormap = None
        if self.colormap:
            colormap = np.zeros((3, 256), np.uint16)
            colormap[:, :len(self.colormap)] = np.array(self.colormap, np.uint16).T * 257
        shape = (height, width) if bands == 1 else (height, width, bands)
        tifffile.imwrite(self.path, self._tiles(), shape=shape, dtype=np.uint8, tile=(BLOCK, BLOCK),
                         compression="zlib", bigtiff=height * width * bands > BIGTIFF_ABOVE,
                         photometric="palette" if colormap is not None else "minisblack", colormap=colormap,
                         planarconfig="contig", extratags=extratags, metadata=None)
        self.discard()

    def _tiles(self):
        height, width, bands = self.source.height, self.source.width, self.bands
        for y in range(0, height, BLOCK):
            rows = min(BLOCK, height - y)
            band = np.frombuffer(os.pread(self.fd, rows * width * bands, y * width * bands), np.uint8)
            band = band.reshape(rows, width, bands)
            for x in range(0, width, BLOCK):
                tile = np.zeros((BLOCK, BLOCK, bands), np.uint8)
                block = band[:, x:x + BLOCK]
                tile[:block.shape[0], :block.shape[1]] = block
                yield tile if bands > 1 else tile[..., 0]

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.scratch.unlink(missing_ok=True)
