"""The server's probe suite (issue 9, "The server"): a client's mistake gets a 4xx with the reason, in JSON, never a
500; no request holds a worker thread past its time limit; a bad server setting is named at start and by /ping.

Classes, each attacked the way a demanding client would:
1. pixels: empty arrays, dimensions, dtypes, NaN and inf, floats outside [0, 1], channel counts, channels-first;
2. wire format: a body that is not the content type it claims, content types with parameters, unknown types,
   truncated and malformed files, compressed metadata;
3. sizes: decompression bombs from headers (PNG, JPEG, TIFF, .npy) and a real deflate bomb, refused from the header;
4. request options: custom attributes (values, unknown and duplicate keys, length), Accept, methods, paths;
5. body framing in the WSGI app: Content-Length absent, malformed, short or over the limit; a body read to its end
   (chunked), never buffered past the limit;
6. transport, through the real `serve` command (gunicorn): chunked bodies, a short body, a trickle, stalled headers,
   huge headers, malformed chunks; the worker's threads are free again afterwards;
7. settings: every server setting with a bad value is one log line at start and a 500 with the reason at /ping;
8. memory: the real server's peak RSS on bombs.

Most cases call the WSGI app directly (fast); the transport, settings and memory cases start the real command.
A tiny untrained model: predictions are arbitrary but exact.
"""

from __future__ import annotations

import functools
import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bombs import PNG_SIGNATURE, jpeg_bomb, npy_bomb, png_bomb, tiff_bomb
from readiness import first_answer
from support import TINY, free_port, wsgi_call
from unetseg.contract import codecs
from unetseg.contract.config import TrainConfig
from unetseg.contract.sagemaker_env import (
    BATCH_ENV,
    BIND_TO_PORT_ENV,
    CUSTOM_ATTRIBUTES_MAX_CHARS,
    MAX_BODY_MB_ENV,
    MAX_IMAGE_MB_ENV,
    MAX_PAYLOAD_IN_MB_ENV,
    MAX_PIXELS_ENV,
    MODEL_SERVER_TIMEOUT_ENV,
    MODEL_SERVER_WORKERS_ENV,
    SERVING_MODE_ENV,
    TTA_ENV,
)

# The stated bound, as for the data check and predict (tests/test_bad_input.py): on bombs a worker peaks at most
# 256 MiB above its peak serving good images, and under 1.5 GiB in all.
BOMB_EXTRA_MIB, BOMB_TOTAL_MIB = 256, 1536
STALL_TIMEOUT_S = 3  # SAGEMAKER_MODEL_SERVER_TIMEOUT of the transport server: how long a stalled client may hold it
ANSWER_WAIT_S = 30  # how long a probe waits for an answer that must come after STALL_TIMEOUT_S: "never" if longer


# --- the model and the app --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained TINY model artifact: RGB in, 2 classes."""
    import torch

    from unetseg.model import artifact_config, build_model, save_artifact

    cfg = TrainConfig(**TINY, in_channels=3, classes=2, class_names=["background", "cell"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "rgb"
    save_artifact(folder, build_model(cfg).state_dict(), artifact_config(cfg, "binary"), [])
    return folder


@pytest.fixture(scope="module")
def app(model_dir):
    from unetseg.container.serving import InferenceApp

    app = InferenceApp(str(model_dir), device="cpu", max_body_bytes=2**20)
    assert app.model is not None, app.load_error
    return app


# This file's requests carry .npy unless they say otherwise.
call = functools.partial(wsgi_call, content_type=codecs.NPY)


def refused(answer: tuple[int, dict, bytes], status: int, *fragments: str) -> str:
    """The answer is `status`, JSON, with one error message holding every fragment; the message is returned."""
    got, headers, payload = answer
    assert got == status, f"{got} (expected {status}): {payload[:500]!r}"
    assert headers["Content-Type"] == codecs.JSON, headers
    error = json.loads(payload)["error"]
    assert "Traceback" not in error and "\n" not in error, error
    for fragment in fragments:
        assert fragment in error, f"{fragment!r} not in {error!r}"
    return error


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def encoded(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **kwargs)
    return out.getvalue()


def rgb(shape=(24, 32, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def served_mask(answer: tuple[int, dict, bytes]) -> np.ndarray:
    status, headers, payload = answer
    assert status == 200, payload[:500]
    return np.load(io.BytesIO(payload)) if headers["Content-Type"] == codecs.NPY else np.array(Image.open(
        io.BytesIO(payload)))


# =================================================================================================================
# 1. Pixels: what a .npy body can hold
# =================================================================================================================

def _float_image(fill=None, at=(), dtype=np.float32) -> np.ndarray:
    image = (rgb() / 255).astype(dtype)
    for index in at:
        image[index] = fill
    return image


REFUSED_ARRAYS = {  # array, fragments of the 400's reason
    "0xN": (np.zeros((0, 16, 3), np.uint8), ["empty", "0x16x3"]),
    "Nx0": (np.zeros((16, 0), np.uint8), ["empty", "16x0"]),
    "0-channels": (np.zeros((16, 16, 0), np.uint8), ["empty", "16x16x0"]),
    "0-d": (np.array(7, np.uint8), ["HxW or HxWxC"]),
    "1-d": (np.zeros(16, np.uint8), ["HxW or HxWxC"]),
    "4-d": (np.zeros((1, 16, 16, 3), np.uint8), ["HxW or HxWxC"]),
    "bool": (np.ones((16, 16, 3), bool), ["dtype bool", "uint8"]),
    "complex": (np.ones((16, 16, 3), np.complex64), ["dtype complex64", "uint8"]),
    "unicode": (np.full((16, 16, 3), "a"), ["dtype <U1", "uint8"]),
    "datetime": (np.zeros((16, 16, 3), "datetime64[s]"), ["datetime64", "uint8"]),
    "structured": (np.zeros((16, 16, 3), [("a", "u1"), ("b", "u1")]), ["uint8"]),
    "int64-negative": (rgb().astype(np.int64) - 5, ["int64", "-5", "0..65535"]),
    "int32-over-16-bit": (rgb().astype(np.int32) * 1000, ["int32", "255000", "0..65535"]),
    "uint64-over-16-bit": (np.full((16, 16, 3), 2**40, np.uint64), ["uint64", "0..65535"]),
    "int8-negative": (np.full((16, 16, 3), -1, np.int8), ["int8", "-1"]),
    "float32-nan": (_float_image(np.nan, [(0, 0, 0), (3, 4, 1), (3, 4, 2)]), ["2 of 768 pixels", "NaN or infinite"]),
    "float64-inf": (_float_image(np.inf, [(5, 5)], np.float64), ["1 of 768 pixels", "NaN or infinite"]),
    "float32--inf": (_float_image(-np.inf, [(1, 2, 0)]), ["1 of 768 pixels", "NaN or infinite"]),
    "float16-nan-everywhere": (np.full((24, 32, 3), np.nan, np.float16), ["768 of 768 pixels"]),
    "float-0..255": (rgb().astype(np.float32), ["[0, 1]", "255", "divide"]),
    "float-negative": (_float_image() - 0.5, ["[0, 1]", "-0.5"]),
    "2-channels": (np.zeros((16, 16, 2), np.uint8), ["2 channel(s)", "takes 3"]),
    "4-channels": (np.zeros((16, 16, 4), np.uint8), ["4 channel(s)", "takes 3"]),
    "grayscale": (np.zeros((16, 16), np.uint8), ["1 channel(s)", "takes 3"]),
    "channels-first": (np.zeros((3, 16, 20), np.uint8), ["3x16x20", "channels first", "HxWxC"]),
}


@pytest.mark.parametrize("case", REFUSED_ARRAYS)
def test_an_array_the_model_cannot_take_is_refused_with_the_reason(app, case):
    array, fragments = REFUSED_ARRAYS[case]
    body = io.BytesIO()
    np.save(body, array, allow_pickle=False)
    refused(call(app, body=body.getvalue(), accept=codecs.NPY), 400, *fragments)


def test_an_object_array_is_refused_and_never_unpickled(app, tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    body = io.BytesIO()
    np.save(body, np.array([[Payload()]], dtype=object), allow_pickle=True)
    refused(call(app, body=body.getvalue()), 400, "dtype object")
    assert not marker.exists()


ACCEPTED_ARRAYS = {  # array, the uint8/uint16/float array the model sees for it
    "uint8": (rgb(), rgb()),
    "uint16": (rgb().astype(np.uint16) * 257, rgb().astype(np.uint16) * 257),
    "int32-within-16-bit": (rgb().astype(np.int32) * 257, rgb().astype(np.uint16) * 257),
    "int64-within-16-bit": (rgb().astype(np.int64), rgb().astype(np.uint16)),
    "big-endian-uint16": (rgb().astype(">u2") * 257, rgb().astype(np.uint16) * 257),
    "big-endian-float32": ((rgb() / 255).astype(">f4"), (rgb() / 255).astype(np.float32)),
    "float16": ((rgb() / 255).astype(np.float16), (rgb() / 255).astype(np.float16).astype(np.float32)),
    "float64-0..1": (rgb() / 255, (rgb() / 255).astype(np.float32)),
    "fortran-order": (np.asfortranarray(rgb()), rgb()),
    "one-pixel": (rgb((1, 1, 3)), rgb((1, 1, 3))),
}


@pytest.mark.parametrize("case", ACCEPTED_ARRAYS)
def test_an_array_the_model_can_take_is_served_as_its_plain_equivalent(app, case):
    array, plain = ACCEPTED_ARRAYS[case]
    assert np.array_equal(served_mask(call(app, body=npy(array), accept=codecs.NPY)), app.model.predict(plain))


# =================================================================================================================
# 2. Wire format: the body against its content type
# =================================================================================================================

def _png_with_ztxt(text_bytes: int) -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to `text_bytes` (compressed metadata: a bomb of its own)."""
    png = encoded(rgb((8, 8, 3)), "PNG")
    data = b"comment\x00\x00" + zlib.compress(b" " * text_bytes, 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return png[:33] + chunk + png[33:]  # after IHDR


def _bad_crc_png() -> bytes:
    png = bytearray(encoded(rgb((8, 8, 3)), "PNG"))
    png[29] ^= 0xFF  # IHDR's CRC
    return bytes(png)


MISLABELLED = {  # body, claimed content type, fragments
    "png-as-jpeg": (lambda: encoded(rgb(), "PNG"), codecs.JPEG, ["PNG", "image/jpeg", "Content-Type: image/png"]),
    "jpeg-as-png": (lambda: encoded(rgb(), "JPEG"), codecs.PNG, ["JPEG", "image/png", "Content-Type: image/jpeg"]),
    "gif-as-png": (lambda: encoded(rgb(), "GIF"), codecs.PNG, ["GIF", "image/png"]),
    "bmp-as-jpeg": (lambda: encoded(rgb(), "BMP"), codecs.JPEG, ["BMP", "image/jpeg"]),
    "tiff-as-png": (lambda: encoded(rgb(), "TIFF"), codecs.PNG, ["TIFF", "image/png"]),
    "webp-as-png": (lambda: encoded(rgb(), "WEBP"), codecs.PNG, ["WEBP", "image/png"]),
    "npy-as-png": (lambda: npy(rgb()), codecs.PNG, ["not a image/png image"]),
    "png-as-npy": (lambda: encoded(rgb(), "PNG"), codecs.NPY, [".npy"]),
    "text-as-png": (lambda: b"hello, world", codecs.PNG, ["not a image/png image"]),
    "json-as-npy": (lambda: b'{"image": [[1, 2], [3, 4]]}', codecs.NPY, [".npy"]),
    "truncated-png": (lambda: encoded(rgb(), "PNG")[:-40], codecs.PNG, ["image/png"]),
    "truncated-jpeg": (lambda: encoded(rgb((64, 64, 3)), "JPEG")[:300], codecs.JPEG, ["image/jpeg"]),
    "bad-crc-png": (_bad_crc_png, codecs.PNG, ["image/png"]),
    "png-ztxt-bomb": (lambda: _png_with_ztxt(64 << 20), codecs.PNG, ["image/png"]),
    "npy-version-3": (lambda: b"\x93NUMPY\x03\x00" + npy(rgb())[8:], codecs.NPY, ["version 3.0"]),
    "npy-truncated": (lambda: npy(rgb())[:-10], codecs.NPY, ["truncated"]),
    "rgba-png": (lambda: encoded(rgb((8, 8, 4)), "PNG"), codecs.PNG, ["alpha"]),
}


@pytest.mark.parametrize("case", MISLABELLED)
def test_a_body_that_is_not_what_its_content_type_says_is_refused(app, case):
    make, content_type, fragments = MISLABELLED[case]
    refused(call(app, body=make(), content_type=content_type), 400, *fragments)


@pytest.mark.parametrize("content_type", ["image/png; charset=binary", "IMAGE/PNG", " image/png ;q=1",
                                          'image/png; name="a;b.png"'])
def test_a_content_type_with_parameters_or_case_is_understood(app, content_type):
    image = rgb()
    answer = call(app, body=encoded(image, "PNG"), content_type=content_type, accept=codecs.NPY)
    assert np.array_equal(served_mask(answer), app.model.predict(image))


@pytest.mark.parametrize("content_type", [None, "", "image/tif", "image/jpg", "application/octet-stream",
                                          "multipart/form-data; boundary=x", "image/png\x00", "*/*"])
def test_an_unsupported_content_type_is_415_naming_the_supported_ones(app, content_type):
    refused(call(app, body=encoded(rgb(), "PNG"), content_type=content_type), 415,
            ", ".join(codecs.REQUEST_TYPES))


# =================================================================================================================
# 3. Sizes: bombs refused from the header
# =================================================================================================================

def real_png_bomb(width: int, height: int, channels: int = 3) -> bytes:
    """A complete, valid PNG of zeros: deflate packs it about 1000 to 1, so its file size does not give it away (unlike
    tests/bombs.py's forged ones), and only the declared size can."""
    row = b"\x00" * (1 + width * channels)
    pack = zlib.compressobj(9)
    idat = b"".join(pack.compress(row * 64) for _ in range(height // 64)) + pack.compress(row * (height % 64))
    idat += pack.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2}[channels], 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BOMBS = {  # body, content type, the statuses it may get: 413 for the size, 400 for a header its body cannot hold
    "png-rgb-40k": (lambda: png_bomb(40000, 40000, 3), codecs.PNG, (400, 413)),
    "png-100k": (lambda: png_bomb(100000, 100000, 1), codecs.PNG, (400, 413)),
    "png-16bit-30k": (lambda: png_bomb(30000, 30000, 3, bit_depth=16), codecs.PNG, (400, 413)),
    "png-max": (lambda: png_bomb(2**31 - 1, 2**31 - 1, 1), codecs.PNG, (400, 413)),
    "jpeg-rgb-40k": (lambda: jpeg_bomb(40000, 40000, 3), codecs.JPEG, (413,)),
    "jpeg-gray-65k": (lambda: jpeg_bomb(65000, 65000, 1), codecs.JPEG, (413,)),
    "tiff-as-tiff": (lambda: tiff_bomb(100000, 100000, 1), codecs.TIFF, (400, 413)),
    "tiff-7-bands": (lambda: tiff_bomb(20000, 20000, 7), codecs.TIFF, (400, 413)),
    "tiff-as-png": (lambda: tiff_bomb(100000, 100000, 1), codecs.PNG, (400, 413)),
    "npy-27.9GiB": (lambda: npy_bomb((100000, 100000, 3), "<f4"), codecs.NPY, (400, 413)),
    "npy-overflow": (lambda: npy_bomb((2**62, 2**62), "<u1"), codecs.NPY, (400, 413)),
}


@pytest.mark.parametrize("case", BOMBS)
def test_a_bomb_is_refused_from_its_header(app, case):
    make, content_type, statuses = BOMBS[case]
    body = make()
    tracemalloc.start()
    try:
        answer = call(app, body=body, content_type=content_type)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    refused(answer, answer[0] if answer[0] in statuses else statuses[0])
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated for a {len(body)}-byte request"


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(model_dir):
    """A real deflate bomb (a valid PNG of zeros, 48 MB decoded from a 50 kB body) under the decoded-size limit
    (UNETSEG_MAX_IMAGE_MB) but over the server's pixel limit: 413 from the IHDR, nothing decoded."""
    from unetseg.container.serving import InferenceApp

    small = InferenceApp(str(model_dir), device="cpu", max_pixels=1_000_000)
    body = real_png_bomb(4000, 4000)
    assert len(body) < 100_000
    tracemalloc.start()
    try:
        answer = call(small, body=body, content_type=codecs.PNG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    refused(answer, 413, "4000x4000", "1000000 pixels")
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB allocated: the image was decoded before its size was checked"


# =================================================================================================================
# 4. Request options: custom attributes, Accept, methods, paths
# =================================================================================================================

@pytest.mark.parametrize("attrs, fragments", [
    ("tile=10^30", ["tile=10^30"]),
    ("tile=-1", ["tile=-1"]),
    ("tile=1e3", ["tile=1e3"]),
    ("tile=0", ["tile=0", "32"]),
    ("tile=31", ["tile=31", "32"]),
    ("tile=", ["tile="]),
    ("tile=\u00b2", ["tile=\u00b2"]),  # str.isdigit() says yes, int() says no
    ("tile=\u0661\u0662\u0668", ["tile="]),  # Arabic-Indic digits: int() reads 128
    ("tile=" + "9" * 31, ["tile=", "at most 2048"]),  # 10^31 - 1: a tile larger than the model runs in one pass
    ("tile=4096", ["tile=4096", "at most 2048"]),
    ("tile=64; tile=128", ["tile", "twice"]),
    ("tta=flip, tta=flip", ["tta", "twice"]),
    ("output=probabilities; OUTPUT=mask", ["output", "twice"]),
    ("colour=red", ["colour=red", "not understood"]),
    ("tile", ["'tile'", "not understood"]),
    ("=64", ["not understood"]),
    ("tta=rot90", ["tta=none|flip|d4"]),
    ("tile=64" + ";" * CUSTOM_ATTRIBUTES_MAX_CHARS, [f"{CUSTOM_ATTRIBUTES_MAX_CHARS}", "characters"]),
    ("x" * 100_000, [f"{CUSTOM_ATTRIBUTES_MAX_CHARS}", "characters"]),
    ("tta=fl\u00efp", ["not understood"]),
])
def test_absurd_custom_attributes_are_refused(app, attrs, fragments):
    error = refused(call(app, body=npy(rgb()), attrs=attrs), 400, *fragments)
    assert len(error) < 600, f"the message echoes {len(error)} characters"


@pytest.mark.parametrize("attrs, kwargs", [
    ("", {}), (";; ,", {}), ("TILE=64", {"tile": 64}), (" tile = 64 ", {"tile": 64}), ("tile=2048", {"tile": 2048}),
    ("tta=flip,tile=64", {"tile": 64, "tta": "flip"}),
])
def test_sensible_custom_attributes_are_served(app, attrs, kwargs):
    image = rgb((40, 48, 3))
    answer = call(app, body=npy(image), accept=codecs.NPY, attrs=attrs)
    assert np.array_equal(served_mask(answer), app.model.predict(image, **kwargs))


@pytest.mark.parametrize("accept, kind", [
    ("application/json;q=0, image/png", codecs.PNG),  # q=0: not acceptable
    ("*/*;q=0.1, application/x-npy", codecs.NPY),  # the higher quality wins, not the first listed
    ("image/png;q=0.5, application/json;q=0.9", codecs.JSON),
    ("application/json; charset=utf-8", codecs.JSON),
    ("application/json, application/x-npy", codecs.JSON),  # equal quality: the first
    ("APPLICATION/X-NPY", codecs.NPY),
    ("", codecs.PNG),
    ("image/*", codecs.PNG),
    ("application/*", codecs.JSON),
])
def test_accept_is_read_as_http_says(app, accept, kind):
    status, headers, _ = call(app, body=npy(rgb()), accept=accept)
    assert (status, headers["Content-Type"]) == (200, kind)


@pytest.mark.parametrize("accept, status, fragments", [
    ("text/html", 406, ["text/html", "accept one of"]),
    ("image/png;q=0", 406, ["accept one of"]),
    ("application/x-npy;q=0, */*;q=0", 406, ["accept one of"]),
    ("application/x-npy;q=abc", 400, ["q=abc"]),
    ("application/x-npy;q=2", 400, ["q=2"]),
    (", ".join(["text/html"] * 5000), 406, ["accept one of"]),
])
def test_an_accept_the_server_cannot_meet_is_refused(app, accept, status, fragments):
    error = refused(call(app, body=npy(rgb()), accept=accept), status, *fragments)
    assert len(error) < 600, f"the message echoes {len(error)} characters"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "post"])
def test_other_methods_on_invocations_are_405_with_allow(app, method):
    answer = call(app, method=method, body=npy(rgb()))
    refused(answer, 405, "POST")
    assert answer[1].get("Allow") == "POST"


@pytest.mark.parametrize("path", ["/invocations/", "/INVOCATIONS", "/", "/../../etc/passwd", "/ping/",
                                  "/" + "a" * 100_000, "/invocations\x00", "/%2e%2e/model"])
def test_unknown_paths_are_404_without_echoing_them_whole(app, path):
    error = refused(call(app, path=path, body=npy(rgb())), 404, "/ping", "/invocations")
    assert len(error) < 600, f"the message echoes {len(error)} characters"


def test_a_query_string_is_ignored(app):
    image = rgb()
    answer = call(app, body=npy(image), accept=codecs.NPY, environ={"QUERY_STRING": "tile=64&x=" + "y" * 5000})
    assert np.array_equal(served_mask(answer), app.model.predict(image))


# =================================================================================================================
# 5. Body framing, in the WSGI app
# =================================================================================================================

@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "0x10", " ", "12 13", "99999999999999999999999999"])
def test_a_malformed_content_length_is_400(app, length):
    body = npy(rgb())
    status = 413 if length.startswith("9999") else 400
    refused(call(app, body=body, environ={"CONTENT_LENGTH": length}), status, "Content-Length")


def test_a_body_shorter_than_its_content_length_is_400(app):
    body = npy(rgb())
    refused(call(app, body=body, environ={"CONTENT_LENGTH": str(len(body) + 100)}), 400,
            f"ended after {len(body)} of {len(body) + 100} bytes")


def test_a_body_without_content_length_is_read_to_its_end(app):
    """What gunicorn hands over for Transfer-Encoding: chunked: no CONTENT_LENGTH, wsgi.input_terminated."""
    image = rgb()
    answer = call(app, body=npy(image), accept=codecs.NPY,
                  environ={"CONTENT_LENGTH": "", "wsgi.input": _Pieces(npy(image), 100), "wsgi.input_terminated": True})
    assert np.array_equal(served_mask(answer), app.model.predict(image))


def test_without_content_length_or_input_terminated_the_body_is_empty(app):
    """WSGI (PEP 3333): without CONTENT_LENGTH the body may not be read past; reading it to the end would wait for
    a kept-alive connection to close."""
    refused(call(app, environ={"CONTENT_LENGTH": "", "wsgi.input": _Endless()}), 400, "empty body")


def test_a_body_without_content_length_over_the_limit_is_413_and_read_no_further(app):
    endless = _Endless()
    refused(call(app, environ={"CONTENT_LENGTH": "", "wsgi.input": endless, "wsgi.input_terminated": True}), 413,
            f"over the limit of {app.max_body} bytes")
    assert app.max_body < endless.served <= app.max_body + (1 << 20), endless.served


def test_an_unreadable_body_is_400(app):
    """gunicorn raises from wsgi.input.read() for a malformed chunked body (InvalidChunkSize and the like)."""
    refused(call(app, environ={"CONTENT_LENGTH": "", "wsgi.input": _Broken(), "wsgi.input_terminated": True}),
            400, "could not be read", "InvalidChunkSize")


def test_the_body_read_stops_at_the_deadline(model_dir):
    """A gunicorn worker hands the app the client's socket as `gunicorn.socket`, and wsgi.input reads from it: a
    client that sends less than its Content-Length and waits gets 408 by the request's time limit."""
    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import SocketUnreader

    from unetseg.container.serving import InferenceApp

    timed = InferenceApp(str(model_dir), device="cpu", timeout_s=2)
    server, client = socket.socketpair()
    with server, client:
        client.sendall(b"\x93NUMPY")  # and then nothing
        body = Body(LengthReader(SocketUnreader(server), 1000))
        started = time.monotonic()
        result = {}
        thread = threading.Thread(target=lambda: result.update(answer=call(timed, environ={
            "CONTENT_LENGTH": "1000", "wsgi.input": body, "gunicorn.socket": server})), daemon=True)
        thread.start()
        thread.join(ANSWER_WAIT_S)
        assert not thread.is_alive(), f"the read still waits after {ANSWER_WAIT_S} s"
        refused(result["answer"], 408, "Content-Length 1000", "did not arrive", "time limit of 2 s")
        assert time.monotonic() - started < ANSWER_WAIT_S


class _Pieces(io.RawIOBase):
    """A stream that gives at most `piece` bytes a read, as a socket does."""

    def __init__(self, data: bytes, piece: int):
        self.data, self.piece = data, piece

    def read(self, size=-1):
        size = self.piece if size is None or size < 0 else min(size, self.piece)
        out, self.data = self.data[:size], self.data[size:]
        return out


class _Endless:
    """A body that never ends (a client streaming chunks for ever); counts what it served."""

    def __init__(self):
        self.served = 0

    def read(self, size=-1):
        size = 1 << 16 if size is None or size < 0 else size
        self.served += size
        return b"\x00" * size


class _Broken:
    def read(self, size=-1):
        class InvalidChunkSize(Exception):
            pass

        raise InvalidChunkSize("Invalid chunk size: 'zz'")


# =================================================================================================================
# 6. Transport, through the real `serve` command (gunicorn)
# =================================================================================================================

def start_server(model_dir: Path, port: int, env: dict) -> subprocess.Popen:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", MODEL_SERVER_WORKERS_ENV: "1",
               **env}
    return subprocess.Popen([sys.executable, "-m", "unetseg.container.serving", "--model-dir", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=environ)


def stop_server(proc: subprocess.Popen) -> str:
    if not hasattr(proc, "log"):
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.log = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.log = proc.communicate()[0]
    return proc.log


class Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port

    def raw(self, data: bytes, *, then: bytes = b"", wait: float = ANSWER_WAIT_S) -> tuple[int | None, bytes, float]:
        """Send `data` on a new connection, then nothing (or `then`, a byte every 0.5 s) and read until the server
        closes or answers: (status or None when it closed without a word, everything read, seconds)."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as conn:
            try:
                conn.sendall(data)
                for byte in then:
                    if select.select([conn], [], [], 0.5)[0]:  # an answer, or the server closed
                        break
                    conn.sendall(bytes([byte]))
            except OSError:  # the server answered and closed before it read everything
                pass
            received = b""
            try:
                while not _complete(received):
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    received += piece
            except (ConnectionResetError, TimeoutError):
                pass
        final = _final(received)
        status = int(final.split(b" ", 2)[1]) if final.startswith(b"HTTP/1.") else None
        return status, final, time.monotonic() - started

    def post(self, body: bytes, content_type: str = codecs.PNG, headers: str = "", chunked: bool = False,
             chunk: int = 1000) -> tuple[int | None, bytes, float]:
        head = f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nAccept: {codecs.NPY}\r\n"
        head += headers
        if not chunked:
            return self.raw(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + chunk]), body[i:i + chunk])
                          for i in range(0, len(body), chunk))
        return self.raw(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + pieces + b"0\r\n\r\n")


def _final(received: bytes) -> bytes:
    """The answer without the interim ones (100 Continue) before it."""
    while received.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in received:
        received = received.partition(b"\r\n\r\n")[2]
    return received


def _complete(received: bytes) -> bool:
    head, sep, body = _final(received).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def payload(received: bytes) -> bytes:
    return received.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def served(model_dir):
    """The real command, one worker (4 threads), requests limited to STALL_TIMEOUT_S and bodies to 1 MiB."""
    port = free_port()
    proc = start_server(model_dir, port, {MODEL_SERVER_TIMEOUT_ENV: str(STALL_TIMEOUT_S),
                                          MAX_BODY_MB_ENV: "1"})
    try:
        status, body, _ = first_answer(f"http://127.0.0.1:{port}/ping", timeout=120, alive=lambda: proc.poll() is None,
                                       logs=lambda: stop_server(proc))
        assert status == 200, body
        yield Server(proc, port)
    finally:
        stop_server(proc)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 1000, 1 << 20])
def test_a_chunked_body_is_served(served, app, chunk):
    image = rgb((40, 48, 3), seed=chunk)
    status, received, _ = served.post(encoded(image, "PNG"), chunked=True, chunk=chunk)
    assert status == 200, received[:500]
    assert np.array_equal(np.load(io.BytesIO(payload(received))), app.model.predict(image))


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_413(served):
    body = encoded(rgb((1200, 1200, 3)), "PNG")  # about 4.3 MB, over the 1 MiB the server takes
    status, received, _ = served.post(body, chunked=True, chunk=64 << 10)
    assert status == 413, received[:500]
    assert f"over the limit of {2**20} bytes" in json.loads(payload(received))["error"]


@pytest.mark.slow
def test_a_body_shorter_than_its_content_length_times_out(served):
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n")
    status, received, seconds = served.raw(head + encoded(rgb(), "PNG")[:100])
    assert status == 408, (received[:500], seconds)
    error = json.loads(payload(received))["error"]
    assert "Content-Length 10000" in error and f"time limit of {STALL_TIMEOUT_S} s" in error, error


@pytest.mark.slow
def test_a_trickling_body_times_out_at_the_deadline(served):
    """One byte every half second never stalls a read for long: the request's deadline still ends it."""
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n")
    status, received, seconds = served.raw(head, then=b"\x00" * 60)
    assert status == 408, (received[:500], seconds)


@pytest.mark.slow
def test_stalled_clients_do_not_hold_the_worker(served, app):
    """Eight clients (twice the worker's threads) stop mid-headers or mid-body; a request sent after them is answered,
    and each stalled connection ends."""
    stalled = [b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Le",
               b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\nab"]
    ended = []
    threads = [threading.Thread(target=lambda data=stalled[i % 2]: ended.append(served.raw(data)), daemon=True)
               for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1)  # the stalled ones hold their threads
    image = rgb((24, 24, 3), seed=3)
    status, received, seconds = served.post(encoded(image, "PNG"))
    assert status == 200, (received[:500], seconds)
    assert np.array_equal(np.load(io.BytesIO(payload(received))), app.model.predict(image))
    for thread in threads:
        thread.join(ANSWER_WAIT_S)
    assert len(ended) == 8 and all(seconds < ANSWER_WAIT_S for _, _, seconds in ended), ended
    assert sorted(status for status, _, _ in ended if status is not None) == [408] * 4, ended


@pytest.mark.slow
@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Amzn-SageMaker-Custom-Attributes: " + b"t" * 100_000 + b"\r\n\r\n",
     431),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"POST /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef", 400),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nab\r\n0\r\n\r\n", 400),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nabcdefgh\r\n0\r\n\r\n", 400),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: abc\r\n\r\n", 400),
    (b"GET /invocations HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"POST /invocations HTTP/1.0\r\nContent-Type: image/png\r\n\r\n", 400),
])
def test_malformed_requests_get_a_4xx(served, request_bytes, status):
    got, received, seconds = served.raw(request_bytes)
    assert got == status, (received[:500], seconds)
    assert b"Traceback" not in received


@pytest.mark.slow
def test_expect_100_continue_is_served(served, app):
    image = rgb((24, 24, 3), seed=4)
    status, received, _ = served.post(encoded(image, "PNG"), headers="Expect: 100-continue\r\n")
    assert status == 200, received[:500]
    assert np.array_equal(np.load(io.BytesIO(payload(received))), app.model.predict(image))


# =================================================================================================================
# 7. Settings: named at start and by /ping, never a crashed worker
# =================================================================================================================

BAD_SETTINGS = {
    MAX_BODY_MB_ENV: ["abc", "0", "-1", "nan", "inf", "1e400"],
    MAX_IMAGE_MB_ENV: ["abc", "0", "inf"],
    MAX_PIXELS_ENV: ["abc", "0", "-5", "1.5", "inf"],
    MODEL_SERVER_TIMEOUT_ENV: ["1m", "0", "-1", "1.5"],
    MODEL_SERVER_WORKERS_ENV: ["two", "0", "-1"],
    TTA_ENV: ["rotate"],
    SERVING_MODE_ENV: ["streaming"],
    BATCH_ENV: ["maybe"],
    MAX_PAYLOAD_IN_MB_ENV: ["101", "x", "-1"],
    BIND_TO_PORT_ENV: ["http", "70000", "0"],
}


@pytest.mark.parametrize("name, value", [(name, value) for name, values in BAD_SETTINGS.items() for value in values])
def test_a_bad_setting_is_named_by_ping_and_every_request(model_dir, monkeypatch, caplog, name, value):
    from unetseg.container.serving import InferenceApp

    monkeypatch.setenv(name, value)
    app = InferenceApp(str(model_dir), device="cpu")  # no exception: the worker lives, and says why it is unhealthy
    named = f"{name}={value!r}"
    refused(call(app, "/ping", method="GET"), 500, named)
    refused(call(app, body=npy(rgb())), 500, named)
    lines = [r.getMessage() for r in caplog.records if named in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines


def test_good_settings_are_taken(model_dir, monkeypatch):
    from unetseg.container.serving import InferenceApp

    for name, value in {MAX_BODY_MB_ENV: "0.5", MAX_PIXELS_ENV: "64e6", MAX_IMAGE_MB_ENV: "100",
                        MODEL_SERVER_TIMEOUT_ENV: "30", MODEL_SERVER_WORKERS_ENV: "2",
                        TTA_ENV: "Flip", SERVING_MODE_ENV: "ASYNC", BATCH_ENV: "false",
                        BIND_TO_PORT_ENV: "9090"}.items():
        monkeypatch.setenv(name, value)
    app = InferenceApp(str(model_dir), device="cpu")
    assert call(app, "/ping", method="GET")[0] == 200
    assert (app.max_body, app.max_pixels, app.timeout_s, app.tta, app.settings.mode) == (2**19, 64_000_000, 30, "flip",
                                                                                       "async")


@pytest.mark.slow
def test_the_real_server_starts_names_each_bad_setting_once_and_stays_unhealthy(model_dir):
    port = free_port()
    bad = {MAX_BODY_MB_ENV: "abc", MODEL_SERVER_WORKERS_ENV: "two", MAX_PIXELS_ENV: "lots",
           MAX_IMAGE_MB_ENV: "0", BIND_TO_PORT_ENV: "http"}
    proc = start_server(model_dir, port, bad)
    try:
        status, body, _ = first_answer(f"http://127.0.0.1:{port}/ping", timeout=120, alive=lambda: proc.poll() is None,
                                       logs=lambda: stop_server(proc))
        assert status == 500, body
        error = json.loads(body)["error"]
        server = Server(proc, port)
        got, received, _ = server.post(encoded(rgb(), "PNG"))
        assert got == 500 and b"UNETSEG_MAX_BODY_MB='abc'" in received, received[:500]
    finally:
        log = stop_server(proc)
    for name, value in bad.items():
        named = f"{name}={value!r}"
        assert named in error, error
        assert sum(named in line for line in log.splitlines()) == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


# =================================================================================================================
# 8. Memory: the real server's peak RSS on bombs
# =================================================================================================================

def workers_of(proc: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the most the process has held resident since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.slow
def test_bombs_keep_the_real_servers_memory_bounded(model_dir):
    """Header bombs (PNG, JPEG, TIFF, .npy claiming up to 27.9 GiB) and a real deflate bomb (a valid 12000 x 12000 RGB
    PNG of zeros in 420 kB: 432 MB decoded, under UNETSEG_MAX_IMAGE_MB and under PIL's own ceiling of 179 million
    pixels, but over the server's 64 million) sent to the real server: each answered 4xx, and the worker's peak RSS
    stays within the stated bound."""
    bombs = {name: make() for name, (make, _, _) in BOMBS.items()}
    types = {name: content_type for name, (_, content_type, _) in BOMBS.items()}
    bombs["png-real-12k"], types["png-real-12k"] = real_png_bomb(12000, 12000), codecs.PNG
    assert max(len(b) for b in bombs.values()) < 2**20
    port = free_port()
    proc = start_server(model_dir, port, {})
    try:
        status, body, _ = first_answer(f"http://127.0.0.1:{port}/ping", timeout=120, alive=lambda: proc.poll() is None,
                                       logs=lambda: stop_server(proc))
        assert status == 200, body
        server = Server(proc, port)
        (worker,) = workers_of(proc)
        for seed in range(3):
            assert server.post(encoded(rgb((256, 256, 3), seed), "PNG"))[0] == 200
        baseline = peak_rss_mib(worker)
        answers = {name: server.post(body, types[name]) for name, body in bombs.items()}
        peak = peak_rss_mib(worker)
        assert workers_of(proc) == [worker], "the worker died"
    finally:
        stop_server(proc)
    for name, (status, received, _) in answers.items():
        assert status is not None and 400 <= status < 500, (name, received[:300])
    assert peak < baseline + BOMB_EXTRA_MIB and peak < BOMB_TOTAL_MIB, f"{peak:.0f} MiB, {baseline:.0f} before bombs"
    print(f"worker peak RSS {baseline:.0f} MiB serving 256 px images, {peak:.0f} MiB after {len(bombs)} bombs")
