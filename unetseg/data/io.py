"""Decode image and mask files to numpy arrays, with errors that name the file.

Images come back as HxWxC (C = 1 or 3), uint8 or uint16. Masks come back raw: HxW integers (palette PNGs give
their indices) or HxWx3 for RGB palette masks; `masks.MaskCodec` turns them into class indices.
PNG images go through OpenCV: about 30% faster than PIL, and it keeps 16-bit colour, which PIL cuts to 8 bits;
a PNG it cannot decode goes to PIL for a precise error. JPEG goes through PIL, which reports truncated files that
OpenCV silently fills with grey. tifffile reads multi-channel and 16-bit TIFFs; masks go through PIL, which keeps
palette indices.

Every reader checks the size the file's header declares before decoding (contract/image_headers.py:
UNETSEG_MAX_IMAGE_MB), so a few hundred bytes that claim 40000 x 40000 pixels cost a few hundred bytes, not gigabytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..contract.errors import DataError
from ..contract.image_headers import Declared, check_declared, declared_file, max_image_bytes, open_failure

_TIFF = (".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_image(path: str | Path) -> np.ndarray:
    """HxWxC uint8 or uint16 pixels."""
    path = Path(path)
    _check_size(path)
    if path.suffix.lower() in _TIFF:
        array = _read_tiff(path)
    elif path.suffix.lower() == ".png":
        array = _read_png(path)
    else:
        array = _pil_image_array(path)
    return _as_hwc(array, path)


def read_mask(path: str | Path) -> np.ndarray:
    """HxW integer labels (palette PNGs: their indices), or HxWx3 uint8 for RGB-coloured masks."""
    path = Path(path)
    _check_size(path)
    with _open(path) as im:
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


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import tifffile

        array = tifffile.imread(path)
    except Exception:  # noqa: BLE001 - compressions tifffile lacks a codec for (LZW without imagecodecs) go to PIL
        return _pil_image_array(path)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) TIFF
    if array.ndim > 3 or (array.ndim == 3 and array.shape[-1] > 4):
        raise DataError(f"{path}: TIFF with shape {array.shape}; expected one 2-D page (grayscale or RGB)")
    return array


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
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"{path}: image shape {array.shape} is not HxW, HxWx1 or HxWx3")
    if array.shape[2] == 4:
        raise DataError(f"{path}: image has 4 channels (RGBA); drop the alpha channel and save as RGB")
    if array.dtype == np.uint8 or array.dtype == np.uint16:
        return np.ascontiguousarray(array)
    if array.dtype.kind in "iu" and array.min() >= 0 and array.max() <= 65535:
        return np.ascontiguousarray(array.astype(np.uint16))
    raise DataError(f"{path}: pixel type {array.dtype} is not supported; use 8- or 16-bit unsigned integers")


def unit_float(image: np.ndarray) -> np.ndarray:
    """Pixels scaled to [0, 1] by their bit depth (uint8 by 255, uint16 by 65535); floats are taken as already so."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype.kind == "f":
        return image.astype(np.float32)
    raise ValueError(f"image dtype {image.dtype}: use uint8, uint16 or float in [0, 1]")
