"""Decode image and mask files to numpy arrays, with errors that name the file.

Images come back as HxWxC, uint8, uint16 or float32: PNG and JPEG with C = 1 or 3, TIFF and .npy with any number
of bands C (contract/multiband.py: a 4-band TIFF is four bands, not RGBA). Pixels a GeoTIFF marks as no data (all
bands equal to its GDAL_NODATA value), and float pixels that are NaN in every band, come back as 0 with a mask of
the pixels that hold data (`read_image_valid`): training ignores them. Masks come back raw: HxW integers (palette
PNGs give their indices) or HxWx3 for RGB palette masks; `masks.MaskCodec` turns them into class indices.
PNG images go through OpenCV: about 30% faster than PIL, and it keeps 16-bit colour, which PIL cuts to 8 bits;
a PNG it cannot decode goes to PIL for a precise error. JPEG goes through PIL, which reports truncated files that
OpenCV silently fills with grey. tifffile reads TIFF images of any band count and depth; masks go through PIL, which
keeps palette indices.

Every reader checks the size the file's header declares before decoding (contract/image_headers.py:
UNETSEG_MAX_IMAGE_MB), so a few hundred bytes that claim 40000 x 40000 pixels cost a few hundred bytes, not gigabytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..contract.errors import DataError
from ..contract.image_headers import Declared, check_declared, declared_file, max_image_bytes, open_failure
from ..contract.multiband import read_tiff, without_nodata

_TIFF = (".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_image(path: str | Path) -> np.ndarray:
    """HxWxC uint8, uint16 or float32 pixels; no-data pixels (see `read_image_valid`) are 0."""
    return read_image_valid(path)[0]


def read_image_valid(path: str | Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(HxWxC uint8, uint16 or float32 pixels, HxW bool mask of the pixels that hold data or None when all do).

    A pixel holds no data when every band equals the GeoTIFF's GDAL_NODATA value, or (float images) is NaN; its
    bands are set to 0, so that no NaN or sentinel such as -9999 reaches the model. A NaN or infinity left in a pixel
    that holds data is an error naming the file."""
    path = Path(path)
    _check_size(path)
    suffix, nodata = path.suffix.lower(), None
    if suffix in _TIFF:
        array, nodata = _read_tiff(path)
    elif suffix == ".npy":
        array = _read_npy(path)
    elif suffix == ".png":
        array = _read_png(path)
    else:
        array = _pil_image_array(path)
    return without_nodata(_as_hwc(array, path), nodata, str(path))


def read_mask(path: str | Path, colours: bool = False) -> np.ndarray:
    """HxW integer labels (palette PNGs: their indices), or HxWx3 uint8 for RGB-coloured masks.

    `colours` (mask_mode=palette: classes are told by colour, as Ground Truth's masks are): a palette PNG gives its
    colours rather than its indices, and an RGBA one its RGB when every pixel is opaque."""
    path = Path(path)
    _check_size(path)
    with _open(path) as im:
        if colours and (im.mode in _ALPHA_MODES or im.mode == "P"):
            return _opaque_rgb(im, path)
        if im.mode in _ALPHA_MODES:
            raise DataError(f"{path}: mask has an alpha channel ({im.mode}); save it as a single-channel or RGB PNG")
        if im.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            array = np.array(im)  # "P" keeps the palette indices, which are the classes in VOC-style masks
        elif im.mode == "RGB":
            array = np.array(im)
        else:
            raise DataError(f"{path}: unsupported mask mode {im.mode}; use 8/16-bit grayscale, palette or RGB")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 2 and array.dtype.kind in "iu" and array.dtype.itemsize > 1:
        if array.min() < 0 or array.max() > 65535:
            raise DataError(f"{path}: mask values {array.min()}..{array.max()} do not fit 16 bits")
        array = array.astype(np.uint16)
    return np.ascontiguousarray(array)


def _opaque_rgb(im: Image.Image, path: Path) -> np.ndarray:
    rgba = np.array(im.convert("RGBA"))
    transparent = rgba[..., 3] != 255
    if transparent.any():
        y, x = np.argwhere(transparent)[0]
        raise DataError(f"{path}: colour mask with {int(transparent.sum())} transparent pixel(s) (the first at x={x}, "
                        f"y={y}); a class is told by its colour, so save every pixel opaque")
    return np.ascontiguousarray(rgba[..., :3])


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels; checked against the size limit."""
    declared = declared_size(path)
    return declared.height, declared.width


def declared_size(path: str | Path) -> Declared:
    """What the file header declares (size, channels, bytes decoded), without decoding; checked against the limit."""
    return _check_size(Path(path))


# --- helpers -----------------------------------------------------------------------------------------------------

def _check_size(path: Path) -> Declared:
    """The file's declared size, refused (DataError) when over the limit or impossible for its byte count."""
    # PIL warns above its own ceiling and refuses above twice it; ours is checked here, so PIL's must not be lower.
    limit = max_image_bytes()
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit
    declared = declared_file(path)
    try:
        stored = path.stat().st_size
    except OSError:
        stored = None
    check_declared(declared, str(path), stored)
    return declared


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """Image.open and load that turn every decoding failure into a DataError naming the file."""
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise open_failure(exc, path) from None
    try:
        yield im
    finally:
        im.close()


def _pil_image_array(path: Path) -> np.ndarray:
    with _open(path) as im:
        if im.mode in _ALPHA_MODES:
            raise DataError(
                f"{path}: image has an alpha channel ({im.mode}); unetseg reads grayscale or RGB: "
                "drop the alpha channel (e.g. PIL's .convert('RGB'))"
            )
        if im.mode in ("L", "RGB", "I;16", "I;16B", "I;16L"):
            return np.array(im)
        if im.mode in ("1",):
            return np.asarray(im.convert("L"))
        if im.mode == "I":
            array = np.asarray(im)
            if array.min() < 0 or array.max() > 65535:
                raise DataError(f"{path}: 32-bit pixel values {array.min()}..{array.max()} are outside 0..65535")
            return array.astype(np.uint16)
        if im.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(im.convert("RGB"))
        raise DataError(f"{path}: unsupported pixel mode {im.mode}; use 8/16-bit grayscale or 8-bit RGB")


def _read_tiff(path: Path) -> tuple[np.ndarray, Optional[float]]:
    try:
        import tifffile
    except ImportError:  # the light client install: PIL reads 1- and 3-channel TIFFs
        return _pil_image_array(path), None
    try:
        return read_tiff(path, str(path))
    except DataError:
        raise
    except tifffile.TiffFileError as exc:
        raise DataError(f"{path}: not a readable TIFF ({exc})") from None
    except Exception:  # noqa: BLE001 - compressions tifffile lacks a codec for (LZW without imagecodecs) go to PIL
        return _pil_image_array(path), None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)  # never unpickle a data file
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None


def _read_png(path: Path) -> np.ndarray:
    try:
        import cv2
    except ImportError:  # the light client install has no OpenCV
        return _pil_image_array(path)
    try:
        array = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):
        array = None
    if array is None:
        return _pil_image_array(path)  # raises the precise error (missing, truncated, not a PNG)
    if array.ndim == 3:
        if array.shape[2] in (2, 4):
            raise DataError(f"{path}: image has an alpha channel; unetseg reads grayscale or RGB: "
                            "drop the alpha channel")
        array = array[..., ::-1]  # OpenCV decodes to BGR
    return array


def _as_hwc(array: np.ndarray, path: Path) -> np.ndarray:
    """HxWxC of a supported dtype. Channels are as the file has them: only formats that cannot hold bands other than
    colours (PNG, JPEG) have their 2 or 4 channels taken as alpha, and refused by their readers."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or 0 in array.shape:
        raise DataError(f"{path}: image shape {array.shape} is not HxW or HxWxC")
    if array.dtype == np.uint8 or array.dtype == np.uint16 or array.dtype == np.float32:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return np.ascontiguousarray(array.astype(np.uint8))
    if array.dtype.kind in "iu" and array.min() >= 0 and array.max() <= 65535:
        return np.ascontiguousarray(array.astype(np.uint16))
    if array.dtype.kind == "f":  # float16 and float64: float32 keeps what an image measures
        return np.ascontiguousarray(array.astype(np.float32))
    raise DataError(f"{path}: pixel type {array.dtype} is not supported; use 8- or 16-bit unsigned integers, or floats")


def bit_depth_scale(dtype: np.dtype) -> float:
    """What unetseg divides pixels of `dtype` by before the model: 255 for 8-bit, 65535 for 16-bit, 1 for floats (taken
    as they are: their range is the data's own). One rule for training, predict and the server."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if dtype.kind == "f":
        return 1.0
    raise ValueError(f"image dtype {dtype}: use uint8, uint16 or float")


def unit_float(image: np.ndarray) -> np.ndarray:
    """Pixels as float32 divided by their bit depth (uint8 by 255, uint16 by 65535); floats are taken as they are."""
    scale = bit_depth_scale(image.dtype)
    return image.astype(np.float32) if scale == 1.0 else image.astype(np.float32) / scale
