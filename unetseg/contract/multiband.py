"""N-band images as arrays: TIFFs of any band count and .npy files, read to HxWxC in their own dtype.

A TIFF's bands may be interleaved (axes YXS), planar (SYX) or one page each (IYX); tifffile names the axes, so the
layout is read from them, never guessed from the shape. A 4-band TIFF is four bands, not RGBA. Of a pyramid (a TIFF
with overviews) only the full-resolution level is read: series 0, level 0. A GeoTIFF's no-data value (the GDAL_NODATA
tag) comes with the pixels, for the caller to mask.

No torch, no OpenCV: the data layer (data/io.py) and the server's decoder (codecs.py) both read through here; a
windowed reader can reuse `hwc_from_axes` and `tiff_nodata`.
"""

from __future__ import annotations

import math
from typing import IO, Any, Optional

import numpy as np

from .errors import DataError

GDAL_NODATA_TAG = 42113


def read_tiff(source: Any, name: str) -> tuple[np.ndarray, Optional[float]]:
    """(HxWxC array of the TIFF's own dtype, its no-data value or None) of series 0 at full resolution. `source`: a
    path or a file object; `name`: the file or request that errors name. Raises DataError for a layout that is not
    one image of N bands."""
    import tifffile

    with tifffile.TiffFile(source) as tif:
        series = tif.series[0]
        array = series.asarray()  # level 0 of a pyramid: the full resolution
        return hwc_from_axes(array, series.axes, name), tiff_nodata(series.keyframe)


def hwc_from_axes(array: np.ndarray, axes: str, name: str) -> np.ndarray:
    """`array` laid out as tifffile's `axes` (e.g. YXS, SYX, IYX), as HxWxC: every axis but Y and X is the band axis,
    and at most one of them may be longer than 1 (a stack of several bands of several times is not one image)."""
    if "Y" not in axes or "X" not in axes or len(axes) != array.ndim:
        raise DataError(f"{name}: a TIFF of shape {array.shape} (axes {axes}) is not an image; save one image of "
                        "H x W pixels with any number of bands")
    y, x = axes.index("Y"), axes.index("X")
    others = [i for i in range(array.ndim) if i not in (y, x)]
    long = [axes[i] for i in others if array.shape[i] > 1]
    if len(long) > 1:
        raise DataError(f"{name}: a TIFF of shape {array.shape} (axes {axes}) has several stacked axes "
                        f"({', '.join(long)}); save one image of H x W pixels with its bands on one axis")
    height, width = array.shape[y], array.shape[x]
    return np.ascontiguousarray(array.transpose([y, x, *others]).reshape(height, width, -1))


def tiff_nodata(page: Any) -> Optional[float]:
    """The GDAL_NODATA value of a TIFF page (a number, or NaN), None when it has none or it does not parse."""
    tag = page.tags.get(GDAL_NODATA_TAG)
    if tag is None:
        return None
    text = str(tag.value).strip().strip("\x00")
    try:
        return float(text)
    except ValueError:
        return None


def without_nodata(image: np.ndarray, nodata: Optional[float],
                   name: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(the HxWxC image with its no-data pixels set to 0, HxW bool of the pixels that hold data or None when all do).

    A pixel holds no data when every band equals the no-data value, or (floats) is NaN; 0 in their place keeps NaN
    and sentinels such as -9999 from the model. A NaN or infinity left in a pixel that holds data is a DataError
    naming `name`."""
    empty = None
    if nodata is not None and not np.isnan(nodata) and _representable(nodata, image.dtype):
        empty = (image == image.dtype.type(nodata)).all(2)
    if image.dtype.kind == "f":
        missing = np.isnan(image).all(2)
        empty = missing if empty is None else empty | missing
    if empty is None or not empty.any():
        valid = None
    else:
        valid = ~empty
        image = image.copy() if not image.flags.writeable else image
        image[empty] = 0
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).any(2).sum())
        raise DataError(f"{name}: {bad} pixel(s) hold NaN or infinity in some bands but not all; set them to a value, "
                        "or mark them as no data in every band")
    return image, valid


def _representable(value: float, dtype: np.dtype) -> bool:
    """Whether the no-data value is one the image's dtype can hold (a GeoTIFF may declare -9999 for uint16 bands)."""
    if dtype.kind == "f":
        return True
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max


def npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy stream, read from its header only: numpy allocates what the header declares before it
    reads the data, so the size is checked first. Raises ValueError for a stream that is not .npy 1.0 or 2.0."""
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise ValueError(f".npy format version {version[0]}.{version[1]}; use version 1.0 or 2.0")
    shape, _, dtype = read_header[version](stream)
    return tuple(int(n) for n in shape), dtype


def npy_data_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize
