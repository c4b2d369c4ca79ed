"""What an image declares in its header, read without decoding a pixel, and the limit on one decoded image.

A header can claim anything: a PNG of a hundred bytes may declare 40000 x 40000 pixels, and a decoder that trusts
it allocates gigabytes before it finds the pixels missing. Every reader (the data check, training, `unetseg
predict`, the server's decoder) checks the declared size here before decoding:

- the limit: an image may decode to at most UNETSEG_MAX_IMAGE_MB MiB (height x width x channels x bytes per
  sample), default 2048: e.g. 26000 x 26000 RGB or 46000 x 46000 grayscale at 8 bits. Whole-slide and satellite
  images are welcome: raise it to what the machine's memory holds (the data check decodes a few files at once;
  predict needs about 4 x (classes + 1) bytes per pixel on top of the image);
- a file too small for what it declares is truncated or forged, whatever the limit: deflate packs at most 1032
  bytes into 1, so a PNG cannot declare more than 1032 times its own size; an uncompressed TIFF holds its pixels
  as they are.

No torch, no OpenCV: the notebook's predictor and the server's decoder use it too.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, DataError, ImageTooLargeError
from .multiband import npy_data_bytes, npy_header
from .sagemaker_env import MAX_IMAGE_MB_ENV

DEFAULT_MAX_IMAGE_MB = 2048
DEFLATE_MAX_RATIO = 1032  # deflate codes a 258-byte match in at least 2 bits
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel in the compressed stream
# PIL mode -> (channels, bytes per sample) as unetseg decodes it (palette images become RGB)
_PIL_LAYOUT = {"1": (1, 1), "L": (1, 1), "P": (3, 1), "LA": (2, 1), "PA": (4, 1), "La": (2, 1), "RGB": (3, 1),
               "YCbCr": (3, 1), "LAB": (3, 1), "HSV": (3, 1), "RGBA": (4, 1), "RGBa": (4, 1), "RGBX": (4, 1),
               "CMYK": (4, 1), "I": (1, 4), "F": (1, 4), "I;16": (1, 2), "I;16B": (1, 2), "I;16L": (1, 2),
               "I;16N": (1, 2)}


@dataclass(frozen=True)
class Declared:
    """An image's size as its header states it."""

    width: int
    height: int
    channels: int  # as decoded
    sample_bytes: int
    min_file_bytes: Optional[int] = None  # the least a file must hold to contain it, where the format bounds it
    kind: str = "image"

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * self.channels * self.sample_bytes

    def describe(self) -> str:
        return f"{self.width}x{self.height} image ({self.channels} channel(s) of {8 * self.sample_bytes} bits)"


def max_image_bytes(environ: Optional[Mapping[str, str]] = None) -> int:
    """The largest decoded image unetseg reads, in bytes: UNETSEG_MAX_IMAGE_MB of `environ`, else of the job whose
    data is being checked (`job_limit`), else of this process; read at each call."""
    env = environ if environ is not None else _job_environment if _job_environment is not None else os.environ
    text = env.get(MAX_IMAGE_MB_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_MB << 20
    try:
        mib = float(text)
        if not (math.isfinite(mib) and mib > 0):
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"{MAX_IMAGE_MB_ENV}={env[MAX_IMAGE_MB_ENV]!r}: give the largest decoded image in MiB, a "
                          f"number above 0 (default {DEFAULT_MAX_IMAGE_MB})") from None
    return int(mib * 2**20)


# The environment of the job whose data this process checks (the notebook's check of a training job's data), else None.
_job_environment: Optional[Mapping[str, str]] = None
_job_lock = threading.Lock()


@contextlib.contextmanager
def job_limit(environment: Mapping[str, str]) -> Iterator[None]:
    """Within the block, every reader in this process (in every thread: the data check decodes in a pool) takes the
    size limit from `environment`, a job's, as that job's container will: not from the notebook's own environment.
    One job at a time: a second block waits for the first."""
    global _job_environment
    with _job_lock:
        _job_environment = dict(environment)
        try:
            yield
        finally:
            _job_environment = None


def check_declared(declared: Declared, name: str, stored_bytes: Optional[int] = None) -> None:
    """Raise a DataError naming `name` when the file is too small for the image it declares, or the image is over the
    limit (ImageTooLargeError, which says how to raise it)."""
    if declared.min_file_bytes is not None and stored_bytes is not None and stored_bytes < declared.min_file_bytes:
        raise DataError(f"{name}: its header declares a {declared.describe()}, which {stored_bytes:,} bytes of "
                        f"{declared.kind} cannot hold (it needs at least {declared.min_file_bytes:,}): the file is "
                        "truncated or its header forged")
    limit = max_image_bytes()
    if declared.decoded_bytes > limit:
        raise ImageTooLargeError(
            f"{name}: its header declares a {declared.describe()} that decodes to {_mib(declared.decoded_bytes)}, over "
            f"the limit of {_mib(limit)} for one image; {_raise_the_limit(declared.decoded_bytes)}"
        )


def declared_png(head: bytes) -> Optional[Declared]:
    """From a PNG's first 33 bytes (signature and IHDR); None when they are not those of a PNG."""
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        return None  # the decoder names the malformation
    samples = _PNG_CHANNELS[colour]
    packed = height * (1 + -(-width * samples * depth // 8))  # the deflate stream: each row and its filter byte
    channels = 3 if colour == 3 else samples  # a palette decodes to RGB
    return Declared(width, height, channels, 2 if depth == 16 else 1, -(-packed // DEFLATE_MAX_RATIO), "PNG")


def declared_pil(im: Image.Image) -> Declared:
    """From an image PIL opened lazily (its header read, no pixel decoded)."""
    channels, sample = _PIL_LAYOUT.get(im.mode, (len(im.getbands()), 1))
    return Declared(im.width, im.height, channels, sample)


def declared_file(path: Path) -> Declared:
    """The declared size of an image file: PNG from its IHDR, TIFF from tifffile's reading of the IFDs (every band of
    the first series at full resolution, as it decodes them), .npy from its header, others from PIL's header parser.
    Raises DataError naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from None
    png = declared_png(head)
    if png is not None:
        return png
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        tiff = declared_tiff(path)
        if tiff is not None:
            return tiff
    if suffix == ".npy":
        with open(path, "rb") as f:
            try:
                return declared_npy(f)
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from None
    try:
        with Image.open(path) as im:
            return declared_pil(im)
    except Exception as exc:  # noqa: BLE001 - every way PIL fails becomes one message naming the file
        raise open_failure(exc, path) from None


def open_failure(exc: Exception, name: str | Path) -> DataError:
    """The DataError for an exception PIL raised opening or decoding `name`."""
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own ceiling: above ours unless the limit was raised
        return ImageTooLargeError(f"{name}: {_pil_bomb_text(exc)}")
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{name}: file not found")
    if isinstance(exc, UnidentifiedImageError):
        return DataError(f"{name}: not a readable image (unknown or corrupt format)")
    return DataError(f"{name}: unreadable or truncated image ({exc})")


def _pil_bomb_text(exc: Exception) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    amount = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than PIL opens"
    return f"its header declares {amount}, over the limit of {_mib(max_image_bytes())} for one image; " + \
        _raise_the_limit(None)


def _raise_the_limit(needed_bytes: Optional[int]) -> str:
    """What to do about a real image over the limit, where the limit is set: this process's, or the job's."""
    mib = -(-needed_bytes // 2**20) if needed_bytes else None
    if _job_environment is not None:
        return ("if the image is real and the training instance has the memory, raise the job's limit: "
                f"UNetEstimator(..., environment={{'{MAX_IMAGE_MB_ENV}': '{mib or '<MiB>'}'}})")
    return ("if the image is real and this machine has the memory, raise "
            + (f"the limit: {MAX_IMAGE_MB_ENV}={mib}" if mib else MAX_IMAGE_MB_ENV))


def declared_tiff(source: Any, kind: str = "uncompressed TIFF") -> Optional[Declared]:
    """From a TIFF's IFDs (a path or a file object): series 0 at full resolution, as multiband.read_tiff decodes it,
    every band counted whatever its layout (interleaved, planar, a page per band). None where tifffile cannot parse
    it."""
    try:
        import tifffile

        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            shape, axes, itemsize = tuple(series.shape), series.axes, series.dtype.itemsize
            page = series.keyframe
            raw = page.compression == 1  # uncompressed: the file holds the first page's pixels as they are
            page_bytes = math.prod(page.shape) * itemsize if raw else None
    except Exception:  # noqa: BLE001 - no tifffile, or a TIFF it cannot parse: PIL reads the header instead
        return None
    if "Y" in axes and "X" in axes and len(axes) == len(shape):
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
    else:  # not an image: the reader names the layout; the size counts every sample all the same
        height, width = int(page.imagelength), int(page.imagewidth)
    channels = max(1, -(-math.prod(shape) // max(1, height * width)))
    return Declared(int(width), int(height), int(channels), itemsize, page_bytes, kind)


def declared_npy(head: Any, kind: str = ".npy file") -> Declared:
    """From a .npy stream's header (HxW or HxWxC); DataError (without a name: the caller adds it) for one that is
    not an image. The least the file holds is the header's data size: numpy allocates it before reading."""
    try:
        shape, dtype = npy_header(head)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise DataError(f"not a readable .npy array ({exc})") from None
    if len(shape) not in (2, 3) or dtype.kind not in "buif":
        raise DataError(f"an array of shape {'x'.join(map(str, shape)) or '()'} and dtype {dtype} is not an image; "
                        "save an HxW or HxWxC array of integers or floats")
    channels = shape[2] if len(shape) == 3 else 1
    return Declared(shape[1], shape[0], channels, dtype.itemsize, head.tell() + npy_data_bytes(shape, dtype), kind)


def _mib(count: int) -> str:
    return f"{count / 2**20:,.0f} MiB" if count >= 2**20 else f"{count / 2**20:.2f} MiB"
