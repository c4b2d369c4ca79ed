"""Wire formats of the inference endpoint, shared by the server and the notebook's predictor. No torch.

Requests: image/png, image/jpeg (8- or 16-bit, grayscale or RGB), image/tiff (any number of bands, 8/16-bit or
float; no-data pixels of a GeoTIFF set to 0 as in training) or application/x-npy (an HxW or HxWxC array).
Responses, chosen by Accept:
- image/png: the class-index mask as a palette PNG (pixel values are classes; viewers show the class colours);
- application/x-npy: the uint8 mask, or float16 probabilities (C, H, W) when asked for;
- application/json: per-class pixel counts and the mask run-length encoded in row-major order.

A request is never decoded on the word of its header alone: the size an image or .npy header declares is checked
first (image_headers.py: UNETSEG_MAX_IMAGE_MB, and the caller's pixel limit), so a bomb costs its own bytes.

The server reads a request with decode_request: the body must be the format its content type names (PIL alone would
read any format it knows), and the pixels must be ones a model takes (request_pixels): HxW or HxWxC, at least one
pixel, uint8 or uint16, other integers within 0..65535 (read as 16-bit, as unetseg reads 32-bit integer image
files), or floats with no NaN or infinity, in [0, 1] unless the model normalizes by measured band statistics (which
take floats as they are). Anything else is a CodecError whose `status` is the HTTP answer.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError, ImageTooLargeError
from .image_headers import Declared, check_declared, declared_pil, declared_png, declared_tiff
from .multiband import npy_header, read_tiff, without_nodata

PNG, JPEG, TIFF, NPY, JSON = "image/png", "image/jpeg", "image/tiff", "application/x-npy", "application/json"
REQUEST_TYPES = (PNG, JPEG, TIFF, NPY)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order
RESPONSE_TYPES = (PNG, NPY, JSON)
# Test-time augmentation: none; flip = the 4 horizontal/vertical flips; d4 = those and their transposes (8 views,
# for images without a preferred orientation, e.g. microscopy). Probabilities are averaged over the views.
TTA_MODES = ("none", "flip", "d4")


class CodecError(ValueError):
    """The request body cannot be read as the content type it claims. `status`: the HTTP status it deserves."""

    status = 400


class ImageTooLarge(CodecError):
    """The body declares an image larger than the server takes; it was not decoded."""

    status = 413


def media_type(header: Optional[str]) -> str:
    """`image/png; charset=x` -> `image/png`."""
    return (header or "").split(";")[0].strip().lower()


def checked_type(value: str, allowed: Sequence[str], name: str) -> str:
    """The media type of `value` if it is one of `allowed`, else a ValueError naming the argument."""
    kind = media_type(value)
    if kind not in allowed:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return kind


def decode_request(body: bytes, content_type: str, max_pixels: Optional[int] = None,
                   any_float: bool = False) -> np.ndarray:
    """The image of an /invocations request, as the server takes it: decode_image, with the body's format checked
    against its content type, then request_pixels (`any_float`: see there)."""
    return request_pixels(decode_image(body, content_type, max_pixels, exact_type=True), any_float)


def decode_image(body: bytes, content_type: str, max_pixels: Optional[int] = None,
                 exact_type: bool = False) -> np.ndarray:
    """The image in a request body. Its declared size is checked before anything is decoded: against the decoded-size
    limit (UNETSEG_MAX_IMAGE_MB), and against `max_pixels` (height x width) when given. `exact_type`: the body must
    be the format `content_type` names; otherwise PNG and JPEG read any format PIL knows (the predictor's files)."""
    kind = media_type(content_type)
    if kind == NPY:
        return _decode_npy(body, max_pixels)
    if bytes(body[:4]) in _TIFF_MAGIC and (kind == TIFF or not exact_type):
        array = _decode_tiff(body, max_pixels)
        if array is not None:
            return array
    if kind not in (PNG, JPEG, TIFF):
        raise CodecError(f"content type {content_type!r} is not supported; send one of {', '.join(REQUEST_TYPES)}")
    png = declared_png(bytes(body[:33]))
    if png is not None:
        _check_size(png, max_pixels, len(body))
    try:
        with Image.open(io.BytesIO(body)) as im:
            if exact_type and im.format not in _PIL_FORMATS[kind]:
                fits = _FORMAT_TYPES.get(im.format)
                raise CodecError(f"the body is a {im.format} image, not {kind} as its content type says: "
                                 + (f"send it with Content-Type: {fits}" if fits else "send PNG or JPEG"))
            _check_size(declared_pil(im), max_pixels, len(body))
            im.load()
            if im.mode in ("RGBA", "LA", "PA"):
                raise CodecError(f"the image has an alpha channel ({im.mode}); send grayscale or RGB")
            if im.mode in ("P", "CMYK", "YCbCr", "1"):
                im = im.convert("RGB" if im.mode != "1" else "L")
            array = np.array(im)
    except CodecError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's ceiling (Image.MAX_IMAGE_PIXELS), met opening the header
        raise ImageTooLarge(f"the {kind} image is too large: {exc}") from None
    except UnidentifiedImageError:
        raise CodecError(f"body is not a {kind} image") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated data, bad CRCs, oversized metadata (PIL's ValueError for a zTXt
        # chunk that inflates past its limit): the body's fault, whatever the decoder raises
        raise CodecError(f"body is not a readable {kind} image ({type(exc).__name__}: {str(exc)[:200]})") from None
    if kind == PNG and array.dtype == np.uint8 and array.ndim == 3 and _png_16bit_colour(body):
        array = _decode_png16(body)  # PIL reads 16-bit colour PNGs as 8-bit
    if array.dtype == np.int32:
        array = array.astype(np.uint16)
    return array


_PIL_FORMATS = {PNG: ("PNG",), JPEG: ("JPEG", "MPO"), TIFF: ("TIFF",)}  # MPO: a camera's JPEG with more frames
_FORMAT_TYPES = {"PNG": PNG, "JPEG": JPEG, "MPO": JPEG, "TIFF": TIFF}
ACCEPTED_PIXELS = "uint8 or uint16 pixels (or other integers within 0..65535, or floats in [0, 1])"


def request_pixels(array: np.ndarray, any_float: bool = False) -> np.ndarray:
    """`array` as a model takes it (uint8, uint16, or float in [0, 1], in native byte order), or a CodecError that
    says what is wrong with it. Floats are taken to be in [0, 1], as unetseg scales uint8 and uint16 images: values
    outside would be read with another meaning than the sender's, so they are refused rather than clipped. With
    `any_float` (a model normalized by measured band statistics, which takes floats as they are) any finite float."""
    shape = "x".join(map(str, array.shape)) or "()"
    if array.ndim not in (2, 3):
        raise CodecError(f"array of shape {shape}: send an HxW or HxWxC image")
    if array.size == 0:
        raise CodecError(f"empty image (shape {shape}): send at least one pixel")
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise CodecError(f"{array.dtype} pixel values {low}..{high} are outside 0..65535: send {ACCEPTED_PIXELS}")
        return array.astype(np.uint16)
    if array.dtype.kind != "f":
        raise CodecError(f"dtype {array.dtype} is not an image: send {ACCEPTED_PIXELS}")
    finite = np.isfinite(array)
    if not finite.all():
        pixels = array.shape[0] * array.shape[1]
        bad = int((~finite).reshape(pixels, -1).any(1).sum())
        raise CodecError(f"{bad} of {pixels} pixels are NaN or infinite: send finite values in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if not any_float and (low < 0 or high > 1):
        raise CodecError(f"float pixel values must lie in [0, 1]; this image has {low:g}..{high:g}: divide 8-bit "
                         "values by 255 (16-bit by 65535), or send the uint8 or uint16 image")
    return array


def _check_size(declared: Declared, max_pixels: Optional[int], body_bytes: int) -> None:
    if max_pixels is not None and declared.width * declared.height > max_pixels:
        raise ImageTooLarge(f"image of {declared.width}x{declared.height} pixels is over the limit of {max_pixels} "
                            "pixels")
    try:
        check_declared(declared, "the request body", body_bytes)
    except ImageTooLargeError as exc:
        raise ImageTooLarge(str(exc)) from None
    except DataError as exc:
        raise CodecError(str(exc)) from None


def _decode_tiff(body: bytes, max_pixels: Optional[int]) -> Optional[np.ndarray]:
    """A TIFF body of any number of bands, its declared size checked before its pixels are decoded; None where
    tifffile cannot read it (no tifffile, a compression it has no codec for): PIL then tries, and names the fault."""
    declared = declared_tiff(io.BytesIO(body), "TIFF")
    if declared is None:
        return None
    _check_size(declared, max_pixels, len(body))
    try:
        image, nodata = read_tiff(io.BytesIO(body), "the request body")
        image = without_nodata(image, nodata, "the request body")[0]
        return image[..., 0] if image.shape[2] == 1 else image  # one band: HxW, as a grayscale PNG decodes
    except DataError as exc:
        raise CodecError(str(exc)) from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - PIL reads some TIFFs tifffile cannot, and refuses the rest with a reason
        return None


def _decode_npy(body: bytes, max_pixels: Optional[int]) -> np.ndarray:
    """A .npy body, its header checked first: numpy allocates the array its header declares before reading it."""
    stream = io.BytesIO(body)
    try:
        shape, dtype = npy_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise CodecError(f"body is not a readable .npy array ({exc})") from None
    described = f"array of shape {'x'.join(map(str, shape)) or '()'} and dtype {dtype}"
    if len(shape) not in (2, 3):
        raise CodecError(f"{described}: send an HxW or HxWxC image")
    if dtype.kind not in "uif":
        raise CodecError(f"{described}: dtype {dtype} is not an image; send {ACCEPTED_PIXELS}")
    declared_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    stored = len(body) - stream.tell()
    if declared_bytes > stored:
        raise CodecError(f"the .npy header declares an {described} ({declared_bytes:,} bytes), but the body holds "
                         f"{stored:,} bytes after it: truncated, or a forged header")
    channels = shape[2] if len(shape) == 3 else 1
    _check_size(Declared(shape[1], shape[0], channels, dtype.itemsize), max_pixels, len(body))
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)  # never unpickle a request
    except (ValueError, OSError, EOFError) as exc:
        raise CodecError(f"body is not a readable .npy array ({exc})") from None


def encode_mask_png(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> bytes:
    image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    image.putpalette(palette.ravel().tolist())
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def run_lengths(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Row-major runs: `np.repeat(values, lengths).reshape(shape)` gives the mask back."""
    flat = np.asarray(mask).ravel()
    if flat.size == 0:
        return [], []
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    lengths = np.diff(np.r_[starts, flat.size])
    return flat[starts].tolist(), lengths.tolist()


def encode_json(mask: np.ndarray, class_names: Sequence[str]) -> bytes:
    counts = np.bincount(np.asarray(mask, np.uint8).ravel(), minlength=len(class_names))
    values, lengths = run_lengths(mask)
    return json.dumps({
        "shape": list(mask.shape),
        "class_names": list(class_names),
        "pixel_counts": {name: int(counts[i]) for i, name in enumerate(class_names)},
        "mask": {"encoding": "rle-row-major", "values": values, "lengths": lengths},
    }).encode()


def decode_json_mask(payload: dict) -> np.ndarray:
    runs = payload["mask"]
    return np.repeat(np.asarray(runs["values"], np.uint8), runs["lengths"]).reshape(payload["shape"])


def encode_image(image: np.ndarray, content_type: str = PNG) -> bytes:
    """A numpy image as a request body (the predictor's serializer)."""
    kind = media_type(content_type)
    if kind == NPY:
        return encode_npy(np.asarray(image))
    array = np.asarray(image)
    if kind == TIFF:
        import tifffile

        out = io.BytesIO()
        rgb = array.ndim == 3 and array.shape[2] == 3
        tifffile.imwrite(out, array, photometric="rgb" if rgb else "minisblack",
                         planarconfig="contig" if array.ndim == 3 else None)  # the last axis holds the bands
        return out.getvalue()
    array = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    out = io.BytesIO()
    if kind == PNG and array.dtype == np.uint16 and array.ndim == 3:
        import cv2

        return cv2.imencode(".png", np.ascontiguousarray(array[..., ::-1]))[1].tobytes()
    Image.fromarray(array).save(out, format="PNG" if kind == PNG else "JPEG", quality=95)
    return out.getvalue()


def _png_16bit_colour(body: bytes) -> bool:
    return len(body) > 26 and body[:8] == b"\x89PNG\r\n\x1a\n" and body[24] == 16 and body[25] in (2, 6)


def _decode_png16(body: bytes) -> np.ndarray:
    import cv2

    try:
        array = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        array = None
    if array is None:
        raise CodecError("body is not a readable 16-bit PNG")
    if array.ndim == 3 and array.shape[2] == 4:
        raise CodecError("the image has an alpha channel (RGBA); send grayscale or RGB")
    return np.ascontiguousarray(array[..., ::-1])
