"""Decompression bombs made from headers, not pixels: files of a few hundred bytes that declare huge images.

Each is well-formed as far as a header reader can tell (valid chunk CRCs, valid IFD, valid .npy header), so a
reader that trusts the header allocates what it claims before it finds out that the pixels are not there.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {1: 0, 3: 2}  # channels -> IHDR colour type (grayscale, truecolour)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, channels: int = 3, bit_depth: int = 8, rows: int = 4) -> bytes:
    """A PNG whose IHDR (valid CRC) declares width x height, followed by a few rows of zeros that zlib packs into
    a few dozen bytes: a decoder that trusts the header allocates the whole image before the data runs out."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, PNG_COLOR_TYPES[channels], 0, 0, 0)
    row = b"\x00" * (1 + min(width, 4096) * channels * bit_depth // 8)
    idat = zlib.compress(row * rows, 9)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def tiff_bomb(width: int, height: int, channels: int = 1) -> bytes:
    """A little-endian baseline TIFF whose one IFD declares an uncompressed width x height image in one strip,
    whose byte count claims the whole image; the strip itself is 16 bytes."""
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),  # width, length, 8 bits, none
        (262, 3, 1, 2 if channels == 3 else 1), (273, 4, 1, 0), (277, 3, 1, channels),  # photometric, offset, spp
        (278, 4, 1, height), (279, 4, 1, min(width * height * channels, 2**32 - 1)),  # rows per strip, byte count
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    body = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
        body += struct.pack("<HHI", tag, kind, count) + packed
    body += struct.pack("<I", 0) + b"\x00" * 16
    return bytes(body)


def jpeg_bomb(width: int, height: int, channels: int = 3) -> bytes:
    """A real 16x16 JPEG whose SOF0 frame header is patched to declare width x height (at most 65535 each)."""
    out = io.BytesIO()
    Image.fromarray(np.full((16, 16, channels), 128, np.uint8).squeeze()).save(out, "JPEG", quality=90)
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def npy_bomb(shape: tuple[int, ...], dtype: str = "<f4", payload: int = 64) -> bytes:
    """A .npy file whose header declares `shape` (a valid version 1.0 header) followed by `payload` bytes."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return out.getvalue() + b"\x00" * payload


def declared_gib(width: int, height: int, channels: int, sample_bytes: int = 1) -> float:
    return width * height * channels * sample_bytes / 2**30
