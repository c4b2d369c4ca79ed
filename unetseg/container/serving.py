"""The SageMaker inference contract from the training image: `docker run <image> serve`.

HTTP on port 8080 (or SAGEMAKER_BIND_TO_PORT, which an inference pipeline sets): GET /ping (200 once the model is
loaded, 500 with the reason when it failed to load or a setting is bad), POST /invocations (see contract/codecs.py for
the formats), GET /execution-parameters (batch transform). The model comes from /opt/ml/model (SageMaker extracts
model.tar.gz there). gunicorn runs one worker per GPU, or a few on a CPU instance, each loading the model once;
requests inside a worker take turns on the model. Errors the client caused get a 4xx with a one-line reason in JSON;
anything else a 500 that names no internals (the traceback goes to the endpoint's log).

Limits follow the mode SageMaker runs the container in (sagemaker_env holds the service's numbers): a real-time
endpoint carries at most 6 MB each way and must answer within 60 s; a batch transform (SAGEMAKER_BATCH=true) sends up
to its MaxPayloadInMB (SAGEMAKER_MAX_PAYLOAD_IN_MB, at most 100) and waits 600 s by default; async inference, which
the container cannot tell from real-time, takes up to 1 GB and 900 s once UNETSEG_SERVING_MODE=async says so. Each
request gets the time limit as a deadline: for its body to arrive (408 past it), and before every forward pass (tiles,
TTA views) and while it waits for the model (504 past it); the worker moves on. A client that stops sending its
headers, or stops reading its answer, for as long as the time limit loses its connection.

Settings by environment, all read and checked by read_settings: SAGEMAKER_MODEL_SERVER_WORKERS,
SAGEMAKER_MODEL_SERVER_TIMEOUT (seconds; default by mode), UNETSEG_SERVING_MODE (realtime, batch or async; default
batch under SAGEMAKER_BATCH, else realtime), UNETSEG_MAX_BODY_MB (default by mode), UNETSEG_MAX_PIXELS (height x width,
default 64 million), UNETSEG_MAX_IMAGE_MB (decoded bytes of one image, contract/image_headers.py), UNETSEG_MODEL_DIR,
UNETSEG_TTA (the test-time augmentation of requests that name none; batch transform cannot send custom attributes),
UNETSEG_RUNTIME (torch, onnx or auto: onnxruntime on the model dir's model.onnx on a CPU instance, see choose_runtime).
A bad value does not stop the server: it is one line in the log at start, and /ping answers 500 naming it, so the
endpoint never turns healthy on a guessed value.
Request options in the X-Amzn-SageMaker-Custom-Attributes header: `output=probabilities`, `tile=<pixels>`,
`tta=flip|d4` (test-time augmentation: 4 or 8 forward passes averaged).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

from ..contract import codecs
from ..contract.errors import ConfigError
from ..contract.sagemaker_env import (
    ASYNC_MAX_PAYLOAD_BYTES,
    ASYNC_TIMEOUT_S,
    BATCH_ENV,
    BATCH_MAX_PAYLOAD_MB,
    BATCH_TIMEOUT_S,
    BIND_TO_PORT_ENV,
    CUSTOM_ATTRIBUTES_MAX_CHARS,
    MAX_BODY_MB_ENV,
    MAX_PAYLOAD_IN_MB_ENV,
    MAX_PIXELS_ENV,
    MODEL_SERVER_TIMEOUT_ENV,
    MODEL_SERVER_WORKERS_ENV,
    REALTIME_MAX_PAYLOAD_BYTES,
    REALTIME_TIMEOUT_S,
    RUNTIME_ENV,
    SERVING_MODE_ENV,
    SERVING_MODEL_DIR_ENV,
    SERVING_RUNTIMES,
    TTA_ENV,
)

log = logging.getLogger("unetseg.container.serving")  # not __name__: `python -m` runs it as __main__

DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_PORT = 8080  # SageMaker's; an inference pipeline names another in SAGEMAKER_BIND_TO_PORT
DEFAULT_MAX_PIXELS = 64_000_000
MODES = ("realtime", "batch", "async")
STATUS = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found", 405: "405 Method Not Allowed",
          406: "406 Not Acceptable", 408: "408 Request Timeout", 413: "413 Payload Too Large",
          415: "415 Unsupported Media Type", 500: "500 Internal Server Error", 504: "504 Gateway Timeout"}
# What to send instead when a request is too large or too slow for the mode.
INSTEAD = {"realtime": "a batch transform, or an asynchronous endpoint (UNetEstimator.deploy(..., async_inference="
                       f"True): {ASYNC_MAX_PAYLOAD_BYTES >> 30} GB, {ASYNC_TIMEOUT_S} s by default), for larger or "
                       "slower ones",
           "batch": f"a larger MaxPayloadInMB (at most {BATCH_MAX_PAYLOAD_MB}) or ModelClientConfig "
                    "InvocationsTimeoutInSeconds",
           "async": f"smaller images, or a larger {MODEL_SERVER_TIMEOUT_ENV} and InvocationTimeoutSeconds"}
BODY_READ_BYTES = 1 << 20  # one read of the request body: what gunicorn's reader takes from the socket at most


# --- settings ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSettings:
    """Every setting the server takes from its environment. A bad value is replaced by its default and named in
    `problems`, one line each (`NAME='value': what it must be`)."""

    mode: str  # realtime, batch or async
    max_body_bytes: int
    timeout_s: int  # each request's deadline; also what gunicorn's heartbeat and the socket waits derive from
    max_pixels: int
    tta: str
    workers: Optional[int]  # None: one per GPU, or a few on a CPU
    port: int
    problems: tuple[str, ...] = ()
    runtime: str = "auto"  # torch, onnx or auto (choose_runtime)


class _Reader:
    """Reads environment variables for read_settings, noting each bad one."""

    def __init__(self, environ):
        self.env, self.problems = environ, []

    def get(self, name: str, parse: Callable[[str], object], expected: str, default=None):
        raw = self.env.get(name, "")
        if not raw.strip():
            return default
        try:
            return parse(raw.strip())
        except (ValueError, OverflowError, KeyError):
            self.problems.append(f"{name}={raw!r}: {expected}")
            return default


def _whole(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value
    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    """A positive whole number, also written as a float (64e6)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise ValueError(text)
    return int(value)


def _one_of(options) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(text)
        return text.lower()
    return parse


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def read_settings() -> ServerSettings:
    """The server's settings from os.environ, each checked here, and only here."""
    from ..contract.image_headers import max_image_bytes

    read = _Reader(os.environ)
    named = read.get(SERVING_MODE_ENV, _one_of(MODES), "use realtime, batch or async")
    batch = read.get(BATCH_ENV, lambda text: _BOOLEANS[text.lower()], "true or false", False)
    # 0 (or unset): the job named no limit of its own, and SageMaker's own maximum holds.
    payload_mb = read.get(MAX_PAYLOAD_IN_MB_ENV, _whole(0, BATCH_MAX_PAYLOAD_MB),
                          f"0 to {BATCH_MAX_PAYLOAD_MB} (megabytes)")
    mode = named or ("batch" if batch else "realtime")
    body, timeout = {"realtime": (REALTIME_MAX_PAYLOAD_BYTES, REALTIME_TIMEOUT_S),
                     "batch": ((payload_mb or BATCH_MAX_PAYLOAD_MB) * 2**20, BATCH_TIMEOUT_S),
                     "async": (ASYNC_MAX_PAYLOAD_BYTES, ASYNC_TIMEOUT_S)}[mode]
    body_mb = read.get(MAX_BODY_MB_ENV, _positive, "a positive number of megabytes")
    timeout = read.get(MODEL_SERVER_TIMEOUT_ENV, _whole(1), "a whole number of seconds, 1 or more", timeout)
    max_pixels = read.get(MAX_PIXELS_ENV, _count, "a whole number of pixels (height x width), 1 or more",
                          DEFAULT_MAX_PIXELS)
    tta = read.get(TTA_ENV, _one_of(codecs.TTA_MODES), f"use one of {', '.join(codecs.TTA_MODES)}", "none")
    workers = read.get(MODEL_SERVER_WORKERS_ENV, _whole(1), "a whole number of workers, 1 or more")
    port = read.get(BIND_TO_PORT_ENV, _whole(1, 65535), "a port number (1-65535)", DEFAULT_PORT)
    runtime = read.get(RUNTIME_ENV, _one_of(SERVING_RUNTIMES), f"use {', '.join(SERVING_RUNTIMES)}", "auto")
    try:  # read by the decoder at each request (image_headers.py); checked here so that a bad one is named at start
        max_image_bytes()
    except ConfigError as exc:
        read.problems.append(str(exc))
    return ServerSettings(mode, max(1, int(body_mb * 2**20)) if body_mb else body, timeout, max_pixels, tta, workers,
                          port, tuple(read.problems), runtime)


def report_problems(settings: ServerSettings) -> None:
    for problem in settings.problems:
        log.error("bad setting %s; /ping answers 500 until it is fixed", problem)


def choose_runtime(setting: str, model_dir: str, device: Optional[str] = None) -> tuple[str, str]:
    """(torch or onnx, why) for UNETSEG_RUNTIME=`setting`. auto: torch on a GPU; onnxruntime on a CPU when the model
    dir has a model.onnx (training's export_onnx): it ran the default Unet/resnet34 1.35x as fast as torch eager there,
    at 256 and 512 px (bench/onnx_runtime.py); else torch."""
    from ..runtime_onnx import ONNX_FILE

    if setting != "auto":
        return setting, f"{RUNTIME_ENV}={setting}"
    if str(device or "").startswith("cuda") or (device is None and gpu_count()):
        return "torch", "auto, on a GPU"
    if os.path.isfile(os.path.join(model_dir, ONNX_FILE)):
        return "onnx", f"auto, on a CPU, with {ONNX_FILE}"
    return "torch", f"auto, on a CPU, no {ONNX_FILE} in the model dir (train with export_onnx=true for onnxruntime)"


class _Deadline(threading.local):
    """The running request's deadline in this thread (a gthread worker serves each request in one thread)."""

    at: Optional[float] = None
    passes = 0


class DeadlineExceeded(Exception):
    pass


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status, self.headers = status, headers


def _clip(text: str, limit: int = 100) -> str:
    """At most `limit` characters of something a client sent, for a message that quotes it."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class InferenceApp:
    """A WSGI application around one loaded model."""

    def __init__(self, model_dir: str = DEFAULT_MODEL_DIR, device: Optional[str] = None,
                 max_body_bytes: Optional[int] = None, max_pixels: Optional[int] = None,
                 timeout_s: Optional[float] = None, settings: Optional[ServerSettings] = None):
        if settings is None:  # serve() passes the settings it read and reported once, before the workers start
            settings = read_settings()
            report_problems(settings)
        self.settings = settings
        self.lock = threading.Lock()
        self.model, self.load_error = None, None
        self.deadline = _Deadline()
        self.tta = settings.tta
        self.max_body = max_body_bytes or settings.max_body_bytes
        self.max_pixels = max_pixels or settings.max_pixels
        self.timeout_s = timeout_s or settings.timeout_s
        try:
            from ..runtime import load_model

            runtime, why = choose_runtime(settings.runtime, model_dir, device)
            self.model = load_model(model_dir, device=device, runtime=runtime)
            # Every forward pass (a tile batch, a TTA orientation) first checks the request's deadline.
            self.model.forward_checks.append(self._check_deadline)
            log.info("model loaded from %s on %s (%s runtime: %s): %s classes", model_dir, self.model.device, runtime,
                     why, len(self.model.class_names))
        except Exception as exc:  # noqa: BLE001 - reported by /ping, so that the endpoint never turns healthy
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load from %s:\n%s", model_dir, traceback.format_exc())
        # A tile larger than this would run a large image in one pass, which the model itself avoids (it tiles above
        # max_pixels): the memory of a whole large image at once.
        self.max_tile = math.isqrt(self.model.max_pixels) if self.model is not None else None

    @property
    def unhealthy(self) -> Optional[str]:
        """Why the endpoint cannot serve (bad settings, no model), or None."""
        reasons = [f"bad setting {problem}" for problem in self.settings.problems]
        if self.model is None:
            reasons.append(f"model not loaded: {self.load_error}")
        return "; ".join(reasons) or None

    def _check_deadline(self) -> None:
        if self.deadline.at is not None:
            if time.monotonic() > self.deadline.at:
                raise DeadlineExceeded()
            self.deadline.passes += 1

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        headers: tuple[tuple[str, str], ...] = ()
        try:
            status, content_type, body = self.route(environ)
        except HttpError as exc:
            status, content_type, headers = exc.status, codecs.JSON, exc.headers
            body = json.dumps({"error": str(exc)}).encode()
        except Exception:  # noqa: BLE001 - never leak a stack trace to the client
            log.error("request failed:\n%s", traceback.format_exc())
            status, content_type, body = 500, codecs.JSON, b'{"error": "internal error; see the endpoint log"}'
        start_response(STATUS[status], [("Content-Type", content_type), ("Content-Length", str(len(body))),
                                        *headers])
        return [body]

    def route(self, environ: dict) -> tuple[int, str, bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/ping":
            if self.unhealthy:
                raise HttpError(500, self.unhealthy)
            return 200, codecs.JSON, b'{"status": "healthy"}'
        if path == "/execution-parameters":  # a batch transform asks; the payload it announces is what we accept
            params = {"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD",
                      "MaxPayloadInMB": max(1, min(BATCH_MAX_PAYLOAD_MB, self.max_body // 2**20))}
            return 200, codecs.JSON, json.dumps(params).encode()
        if path != "/invocations":
            raise HttpError(404, f"no such path {_clip(path)!r}; use /ping or /invocations")
        if method != "POST":
            raise HttpError(405, f"{_clip(method, 20)} /invocations: POST an image to it", (("Allow", "POST"),))
        return self.invoke(environ)

    def invoke(self, environ: dict) -> tuple[int, str, bytes]:
        started = time.monotonic()
        if self.unhealthy:
            raise HttpError(500, self.unhealthy)
        # The request's time limit, less a margin to encode and send the answer before the caller's own limit cuts
        # the connection: its body must arrive, and its prediction end, by then.
        deadline = started + self.timeout_s - min(5.0, 0.1 * self.timeout_s)
        accept = negotiate(environ.get("HTTP_ACCEPT"))
        options = custom_attributes(environ.get("HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES", ""), self.max_tile)
        content_type = codecs.media_type(environ.get("CONTENT_TYPE"))
        if content_type not in codecs.REQUEST_TYPES:
            raise HttpError(415, f"content type {_clip(content_type) or '(none)'!r} is not supported; "
                                 f"send one of {', '.join(codecs.REQUEST_TYPES)}")
        probabilities = options.get("output") == "probabilities"
        if probabilities and accept != codecs.NPY:  # before the work, not after it
            raise HttpError(406, "output=probabilities is sent as application/x-npy; set Accept to it")
        body = self.read_body(environ, deadline)
        if not body:
            raise HttpError(400, "empty body: POST an image")
        try:
            # A model normalized by measured band statistics takes float bands as they are, in any range.
            measured = self.model.config.get("normalization", {}).get("source") == "dataset"
            image = codecs.decode_request(body, content_type, max_pixels=self.max_pixels, any_float=measured)
        except codecs.CodecError as exc:
            raise HttpError(exc.status, str(exc)) from None
        del body
        self.check_channels(image)
        tile = options.get("tile")
        probs = self.predict(image, started, deadline, tile=int(tile) if tile else None,
                             tta=options.get("tta", self.tta))
        if probabilities:
            kind, answer = codecs.NPY, codecs.encode_npy(probs.astype("float16"))
        else:
            mask = probs.argmax(0).astype("uint8")
            if accept == codecs.PNG:
                kind, answer = codecs.PNG, codecs.encode_mask_png(mask, self.model.class_colors)
            elif accept == codecs.NPY:
                kind, answer = codecs.NPY, codecs.encode_npy(mask)
            else:
                kind, answer = codecs.JSON, codecs.encode_json(mask, self.model.class_names)
        # A real-time endpoint carries 6 MB back too: SageMaker would drop a larger answer with an error that names
        # nothing. (Batch transform and async inference write answers to S3.)
        limit = max(self.max_body, REALTIME_MAX_PAYLOAD_BYTES)
        if self.settings.mode == "realtime" and len(answer) > limit:
            raise HttpError(413, f"the answer ({kind}, {len(answer)} bytes) is over the limit of {limit} bytes for "
                                 f"realtime inference; ask for the mask (image/png) rather than probabilities, send a "
                                 f"smaller image, or use {INSTEAD['realtime']}")
        return 200, kind, answer

    def read_body(self, environ: dict, deadline: float) -> bytearray:
        """The request body, read by `deadline` and never past the body limit.

        With Content-Length, exactly that many bytes (a larger one is refused before reading). Without it, to the end
        when the server frames the body (gunicorn's chunked transfer encoding: wsgi.input_terminated), reading at
        most one byte past the limit; otherwise there is no body (PEP 3333). gunicorn's wsgi.input reads from the
        client's blocking socket, which it hands over as gunicorn.socket: _ReadDeadline ends the read there."""
        declared = _content_length(environ.get("CONTENT_LENGTH"))
        if declared is not None and declared > self.max_body:
            raise HttpError(413, f"the body of {declared} bytes (Content-Length) is over the limit of {self.max_body} "
                                 f"bytes for {self.settings.mode} inference ({MAX_BODY_MB_ENV}); use "
                                 f"{INSTEAD[self.settings.mode]}")
        if declared is None and not environ.get("wsgi.input_terminated"):
            return bytearray()
        wanted = self.max_body + 1 if declared is None else declared
        sock = environ.get("gunicorn.socket")
        watch = _ReadDeadline(sock, deadline - time.monotonic()) if sock is not None else None
        body, failure = bytearray(), None
        try:
            while len(body) < wanted:
                piece = environ["wsgi.input"].read(min(BODY_READ_BYTES, wanted - len(body)))
                if not piece:
                    break
                body += piece
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - gunicorn raises for a malformed chunked body; a client went away
            failure = exc
        finally:
            if watch is not None:
                watch.cancel()
        if (watch is not None and watch.fired) or isinstance(failure, BlockingIOError):  # the socket's own wait
            framing = f"Content-Length {declared}" if declared is not None else "chunked"
            raise HttpError(408, f"the request body ({framing}) did not arrive in full within the time limit of "
                                 f"{self.timeout_s:g} s ({MODEL_SERVER_TIMEOUT_ENV}): the client sent less than "
                                 "it declared, or stalled; send the whole body at once")
        if failure is not None:
            raise HttpError(400, f"the request body could not be read ({type(failure).__name__}: "
                                 f"{_clip(str(failure), 200)})")
        if declared is None and len(body) > self.max_body:
            raise HttpError(413, f"the body (chunked, no Content-Length) is over the limit of {self.max_body} bytes "
                                 f"for {self.settings.mode} inference ({MAX_BODY_MB_ENV}); use "
                                 f"{INSTEAD[self.settings.mode]}")
        if declared is not None and len(body) < declared:
            raise HttpError(400, f"the request body ended after {len(body)} of {declared} bytes (its "
                                 "Content-Length): send the whole body")
        return body

    def check_channels(self, image) -> None:
        channels, wanted = (image.shape[2] if image.ndim == 3 else 1), self.model.in_channels
        if channels == wanted:
            return
        shape = "x".join(map(str, image.shape))
        hint = ""
        if image.ndim == 3 and image.shape[0] == wanted:
            hint = ": it looks like channels first (CxHxW); send HxWxC, e.g. np.moveaxis(image, 0, -1)"
        raise HttpError(400, f"image of shape {shape} has {channels} channel(s); this model takes {wanted}{hint}")

    def predict(self, image, started: float, deadline: float, **kwargs):
        """The model's probabilities, by `deadline`."""
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._timed_out(started, "waiting for the model (other requests held it)")
        try:
            self.deadline.at, self.deadline.passes = deadline, 0
            return self.model.predict_proba(image, **kwargs)
        except DeadlineExceeded:
            raise self._timed_out(started, f"after {self.deadline.passes} forward passes") from None
        finally:
            self.deadline.at = None
            self.lock.release()

    def _timed_out(self, started: float, where: str) -> HttpError:
        return HttpError(504, f"prediction stopped {where} at {time.monotonic() - started:.1f} s, the time limit "
                              f"of {self.timeout_s:g} s for {self.settings.mode} inference "
                              f"({MODEL_SERVER_TIMEOUT_ENV}); send a smaller image or fewer TTA views, or use "
                              f"{INSTEAD[self.settings.mode]}")


class _ReadDeadline:
    """Ends the reads from a client's socket at a deadline.

    A socket timeout bounds each recv(), not a whole read: gunicorn's reader waits for as many bytes as asked, so a
    client that trickles a byte now and then would hold the thread long past the request's time limit. At the
    deadline, shutdown(SHUT_RD) makes the pending recv() and every later one return at once, as at the end of the
    stream; the answer can still be sent on the socket."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.fired, self.lock = sock, False, threading.Lock()
        self.timer: Optional[threading.Timer] = threading.Timer(max(0.0, seconds), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        with self.lock:
            if self.timer is None:  # the read ended first
                return
            self.fired = True
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def cancel(self) -> None:
        with self.lock:
            self.timer.cancel()
            self.timer = None


def _content_length(value: Optional[str]) -> Optional[int]:
    """CONTENT_LENGTH as a number of bytes; None when absent (a chunked body, or none)."""
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdecimal()):
        raise HttpError(400, f"Content-Length {_clip(value, 40)!r} is not a number of bytes")
    return int(value)


# Accept media ranges -> the answer each gives, in the server's order of preference.
_ACCEPTABLE = {codecs.PNG: (codecs.PNG,), codecs.NPY: (codecs.NPY,), codecs.JSON: (codecs.JSON,),
               "*/*": (codecs.PNG, codecs.NPY, codecs.JSON), "image/*": (codecs.PNG,),
               "application/*": (codecs.JSON, codecs.NPY)}


def negotiate(accept: Optional[str]) -> str:
    """The response type the Accept header prefers (RFC 9110 12.5.1: the highest q, then the first listed; q=0
    excludes); image/png for no header."""
    if not accept or not accept.strip():
        return codecs.PNG
    ranges = []
    for position, part in enumerate(accept.split(",")):
        kind, *params = [piece.strip() for piece in part.split(";")]
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = math.nan
                if not 0 <= quality <= 1:
                    raise HttpError(400, f"Accept {_clip(part.strip())!r}: q={_clip(value.strip(), 20)} is not a "
                                         "quality from 0 to 1")
        if kind:
            ranges.append((-quality, position, kind.lower()))
    excluded = {kind for quality, _, kind in ranges if quality == 0}
    for quality, _, kind in sorted(ranges):
        for answer in _ACCEPTABLE.get(kind, ()) if quality < 0 else ():
            if answer not in excluded:
                return answer
    raise HttpError(406, f"cannot answer in {_clip(accept)!r}; accept one of {', '.join(codecs.RESPONSE_TYPES)}")


def custom_attributes(header: str, max_tile: Optional[int] = None) -> dict[str, str]:
    """`output=probabilities; tile=512` (SageMaker's CustomAttributes) as a dict; unknown or repeated keys are
    refused, and so are tiles over `max_tile`."""
    if len(header) > CUSTOM_ATTRIBUTES_MAX_CHARS:
        raise HttpError(400, f"custom attributes of {len(header)} characters: SageMaker passes at most "
                             f"{CUSTOM_ATTRIBUTES_MAX_CHARS} characters")
    tiles = f"32 to {max_tile}" if max_tile else "32 or more"
    pairs = {}
    for item in header.replace(",", ";").split(";"):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key in pairs:
            raise HttpError(400, f"custom attribute {key} given twice in {_clip(header)!r}; give it once")
        tile = int(value) if key == "tile" and value.isascii() and value.isdecimal() else None
        if key == "output" and value in ("mask", "probabilities"):
            pairs[key] = value
        elif tile is not None and max_tile and tile > max_tile:
            raise HttpError(400, f"custom attribute {_clip(item.strip())!r}: a tile of at most {max_tile} pixels, "
                                 "the largest this model runs in one pass (a larger one would need the memory of a "
                                 "whole large image at once)")
        elif tile is not None and tile >= 32:
            pairs[key] = value
        elif key == "tta" and value in codecs.TTA_MODES:
            pairs[key] = value
        else:
            raise HttpError(400, f"custom attribute {_clip(item.strip())!r} not understood; use "
                                 f"output=mask|probabilities, tile=<pixels, {tiles}> and "
                                 f"tta={'|'.join(codecs.TTA_MODES)}")
    return pairs


# --- the server --------------------------------------------------------------------------------------------------

def gpu_count() -> int:
    """GPUs on this instance, asked of nvidia-smi: the gunicorn master must not import torch before forking."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        return 0


def worker_hooks(gpus: int, workers: int, cpus: int,
                 client_wait_s: Optional[float] = None) -> tuple[Callable, Callable]:
    """gunicorn's pre_fork and post_fork: each worker holds a slot, 0 to workers-1, and runs on GPU slot % gpus.

    A slot is the lowest one no live worker holds, chosen in the master before the fork, so that the replacement of a
    dead worker takes its slot and its GPU. (gunicorn's worker age counts every spawn, so numbering GPUs by age
    drifts after a restart: two workers on one GPU, another idle.) With `client_wait_s`, the worker's listening
    sockets also bound how long a client may stall (bound_client_waits).
    """
    def pre_fork(server, worker) -> None:
        held = {getattr(other, "unetseg_slot", None) for other in server.WORKERS.values()}
        worker.unetseg_slot = next(slot for slot in itertools.count() if slot not in held)

    def post_fork(server, worker) -> None:
        # Before torch loads in the worker: pin it to one GPU, and share the CPU cores among workers.
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(worker.unetseg_slot % gpus)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // workers)))
        if client_wait_s:
            bound_client_waits(getattr(worker, "sockets", ()), client_wait_s)

    return pre_fork, post_fork


def bound_client_waits(listeners, seconds: float) -> None:
    """Bound every wait of a worker thread on a client to `seconds`.

    gunicorn's gthread worker reads a request's headers (and the app its body) from a blocking socket with no time
    limit: a client that sends part of its headers and waits holds the thread for ever, and a few such clients hold
    the worker. A receive and a send timeout on the listening socket is inherited by each accepted connection (Linux),
    and makes such a read (or a send to a client that stopped reading) fail after `seconds` without a byte, which
    ends the connection. The body read has its own deadline as well (InferenceApp.read_body).
    """
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    for listener in listeners:
        if getattr(listener, "family", None) in (socket.AF_INET, socket.AF_INET6):
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    logging.getLogger("gunicorn.error").addFilter(_StalledClient(seconds))


class _StalledClient(logging.Filter):
    """gunicorn logs a connection that timed out this way as a socket error with a traceback: one line instead."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BlockingIOError):
            record.msg, record.args = f"closed a connection whose client stalled for {self.seconds:g} s", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"  # the client's doing, not the server's
        return True


def serve(model_dir: Optional[str] = None, port: Optional[int] = None, host: str = "0.0.0.0") -> None:
    from gunicorn.app.base import BaseApplication

    model_dir = model_dir or os.environ.get(SERVING_MODEL_DIR_ENV, DEFAULT_MODEL_DIR)
    settings = read_settings()
    report_problems(settings)  # once, here; the workers serve 500s that name them (the container must not die silent)
    port = settings.port if port is None else port
    gpus = gpu_count()
    cpus = len(os.sched_getaffinity(0))
    workers = settings.workers or gpus or max(1, min(4, cpus // 2))
    pre_fork, post_fork = worker_hooks(gpus, workers, cpus, client_wait_s=settings.timeout_s)

    class Server(BaseApplication):
        def load_config(self):
            # gunicorn's timeout is a heartbeat that a gthread worker keeps beating while a request runs: it catches
            # a hung worker process, and each request's own deadline (InferenceApp.predict) bounds the request.
            for key, value in {"bind": f"{host}:{port}", "workers": workers, "threads": 4, "worker_class": "gthread",
                               "timeout": settings.timeout_s + 30, "graceful_timeout": 30, "keepalive": 75,
                               "pre_fork": pre_fork, "post_fork": post_fork, "accesslog": "-", "errorlog": "-"}.items():
                self.cfg.set(key, value)
            # gunicorn >= 25.1 opens a control socket at one path per user ($HOME/.gunicorn/gunicorn.ctl): a second
            # server on the machine (another model, a test) would take it over. Nothing here uses it.
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)

        def load(self):
            return InferenceApp(model_dir, settings=settings)

    log.info("serving %s on %s:%s with %s worker(s), %s GPU(s); %s limits: %s bytes a request, %s s",
             model_dir, host, port, workers, gpus, settings.mode, settings.max_body_bytes, settings.timeout_s)
    Server().run()


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="serve", description="SageMaker inference server for a unetseg model")
    parser.add_argument("--model-dir", default=None, help=f"default: ${SERVING_MODEL_DIR_ENV} or {DEFAULT_MODEL_DIR}")
    parser.add_argument("--port", type=int, default=None,
                        help=f"default: ${BIND_TO_PORT_ENV} (inference pipelines) or {DEFAULT_PORT}")
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    serve(args.model_dir, args.port, args.host)


if __name__ == "__main__":
    main()
