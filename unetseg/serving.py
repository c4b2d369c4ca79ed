"""The SageMaker inference contract from the training image: `docker run <image> serve`.

HTTP on port 8080 (or SAGEMAKER_BIND_TO_PORT, which an inference pipeline sets): GET /ping (200 once the model is
loaded, 500 with the reason when it failed to load), POST /invocations (see unetseg.codecs for the formats),
GET /execution-parameters (batch transform). The model comes from /opt/ml/model (SageMaker extracts model.tar.gz
there). gunicorn runs one worker per GPU, or a few on a CPU instance, each loading the model once; requests inside a
worker take turns on the model. Errors the client caused get a 4xx with a one-line reason; anything else a 500 that
names no internals (the traceback goes to the endpoint's log).

Limits follow the mode SageMaker runs the container in (sagemaker_env holds the service's numbers): a real-time
endpoint carries at most 6 MB each way and must answer within 60 s; a batch transform (SAGEMAKER_BATCH=true) sends up
to its MaxPayloadInMB (SAGEMAKER_MAX_PAYLOAD_IN_MB, at most 100) and waits 600 s by default; async inference, which
the container cannot tell from real-time, takes up to 1 GB and 900 s once UNETSEG_SERVING_MODE=async says so. Each
request gets the time limit as a deadline, checked before every forward pass (tiles, TTA views) and while it waits
for the model: past it the answer is 504 with the reason, and the worker moves on.

Options by environment: SAGEMAKER_MODEL_SERVER_WORKERS, SAGEMAKER_MODEL_SERVER_TIMEOUT (seconds; default by mode),
UNETSEG_SERVING_MODE (realtime, batch or async; default batch under SAGEMAKER_BATCH, else realtime),
UNETSEG_MAX_BODY_MB (default by mode), UNETSEG_MAX_PIXELS (default 64 million), UNETSEG_MODEL_DIR, UNETSEG_TTA (the
test-time augmentation of requests that name none; batch transform cannot send custom attributes).
Request options in the X-Amzn-SageMaker-Custom-Attributes header: `output=probabilities`, `tile=<pixels>`,
`tta=flip|d4` (test-time augmentation: 4 or 8 forward passes averaged).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from . import codecs
from .errors import UnetsegError
from .sagemaker_env import (ASYNC_MAX_PAYLOAD_BYTES, ASYNC_TIMEOUT_S, BATCH_MAX_PAYLOAD_MB, BATCH_TIMEOUT_S,
                            REALTIME_MAX_PAYLOAD_BYTES, REALTIME_TIMEOUT_S)

log = logging.getLogger("unetseg.serving")

DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_PORT = 8080  # SageMaker's; an inference pipeline names another in SAGEMAKER_BIND_TO_PORT
MODES = ("realtime", "batch", "async")
STATUS = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found", 405: "405 Method Not Allowed",
          406: "406 Not Acceptable", 413: "413 Payload Too Large", 415: "415 Unsupported Media Type",
          500: "500 Internal Server Error", 504: "504 Gateway Timeout"}
# What to send instead when a request is too large or too slow for the mode.
INSTEAD = {"realtime": "a batch transform, or async inference (UNETSEG_SERVING_MODE=async), for larger or slower ones",
           "batch": "a larger MaxPayloadInMB (at most 100) or ModelClientConfig InvocationsTimeoutInSeconds",
           "async": "smaller images, or a larger SAGEMAKER_MODEL_SERVER_TIMEOUT and InvocationTimeoutSeconds"}


class ServingConfigError(UnetsegError):
    """An environment variable of the server has a value it cannot use."""


@dataclass(frozen=True)
class ServerLimits:
    mode: str  # realtime, batch or async
    max_body_bytes: int
    timeout_s: int  # each request's deadline; also what gunicorn's heartbeat timeout is derived from


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _number(environ: Mapping[str, str], name: str, kind, ok: Callable, expected: str):
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise ServingConfigError(f"{name}={raw!r}: {expected}")
    return value


def server_limits(environ: Optional[Mapping[str, str]] = None) -> ServerLimits:
    """The body limit and request deadline for the mode this container serves in, from its environment."""
    env = os.environ if environ is None else environ
    named = env.get("UNETSEG_SERVING_MODE", "").strip().lower()
    if named and named not in MODES:
        raise ServingConfigError(f"UNETSEG_SERVING_MODE={env['UNETSEG_SERVING_MODE']!r}: use realtime, batch or async")
    mode = named or ("batch" if _truthy(env.get("SAGEMAKER_BATCH")) else "realtime")
    if mode == "batch":
        # 0 (or unset): the job named no limit of its own, and SageMaker's own maximum holds.
        payload = _number(env, "SAGEMAKER_MAX_PAYLOAD_IN_MB", int, lambda v: 0 <= v <= BATCH_MAX_PAYLOAD_MB,
                          f"0 to {BATCH_MAX_PAYLOAD_MB} (megabytes)")
        body, timeout = (payload or BATCH_MAX_PAYLOAD_MB) * 2**20, BATCH_TIMEOUT_S
    elif mode == "async":
        body, timeout = ASYNC_MAX_PAYLOAD_BYTES, ASYNC_TIMEOUT_S
    else:
        body, timeout = REALTIME_MAX_PAYLOAD_BYTES, REALTIME_TIMEOUT_S
    body_mb = _number(env, "UNETSEG_MAX_BODY_MB", float, lambda v: v > 0, "a positive number of megabytes")
    seconds = _number(env, "SAGEMAKER_MODEL_SERVER_TIMEOUT", int, lambda v: v > 0,
                      "a whole number of seconds, 1 or more")
    return ServerLimits(mode, int(body_mb * 2**20) if body_mb else body, seconds or timeout)


def bind_port(port: Optional[int] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """--port, else SAGEMAKER_BIND_TO_PORT (each container of an inference pipeline gets its own), else 8080."""
    if port is not None:
        return port
    env = os.environ if environ is None else environ
    port = _number(env, "SAGEMAKER_BIND_TO_PORT", int, lambda v: 0 < v < 65536, "a port number (1-65535)")
    return port or DEFAULT_PORT


class _Deadline(threading.local):
    """The running request's deadline in this thread (a gthread worker serves each request in one thread)."""

    at: Optional[float] = None
    passes = 0


class DeadlineExceeded(Exception):
    pass


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class InferenceApp:
    """A WSGI application around one loaded model."""

    def __init__(self, model_dir: str = DEFAULT_MODEL_DIR, device: Optional[str] = None,
                 max_body_bytes: Optional[int] = None, max_pixels: Optional[int] = None,
                 timeout_s: Optional[float] = None):
        self.lock = threading.Lock()
        self.model, self.load_error = None, None
        self.deadline = _Deadline()
        self.tta = os.environ.get("UNETSEG_TTA", "none").strip().lower() or "none"
        self.limits = ServerLimits("realtime", REALTIME_MAX_PAYLOAD_BYTES, REALTIME_TIMEOUT_S)
        try:  # a misconfigured endpoint must not turn healthy: /ping reports why
            self.limits = server_limits()
            if self.tta not in codecs.TTA_MODES:
                raise ValueError(f"UNETSEG_TTA={self.tta!r}: use one of {', '.join(codecs.TTA_MODES)}")
            from .model import load_model

            self.model = load_model(model_dir, device=device)
            # Every forward pass (a tile batch, a TTA orientation) first checks the request's deadline.
            self.model.model.register_forward_pre_hook(self._check_deadline)
            log.info("model loaded from %s on %s: %s classes", model_dir, self.model.device,
                     len(self.model.class_names))
        except Exception as exc:  # noqa: BLE001 - reported by /ping, so that the endpoint never turns healthy
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load from %s:\n%s", model_dir, traceback.format_exc())
        self.max_body = max_body_bytes or self.limits.max_body_bytes
        self.max_pixels = max_pixels or int(float(os.environ.get("UNETSEG_MAX_PIXELS", str(64e6))))
        self.timeout_s = timeout_s or self.limits.timeout_s

    def _check_deadline(self, module, args) -> None:
        if self.deadline.at is not None:
            if time.monotonic() > self.deadline.at:
                raise DeadlineExceeded()
            self.deadline.passes += 1

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        try:
            status, content_type, body = self.route(environ)
        except HttpError as exc:
            status, content_type, body = exc.status, codecs.JSON, json.dumps({"error": str(exc)}).encode()
        except Exception:  # noqa: BLE001 - never leak a stack trace to the client
            log.error("request failed:\n%s", traceback.format_exc())
            status, content_type, body = 500, codecs.JSON, b'{"error": "internal error; see the endpoint log"}'
        start_response(STATUS[status], [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def route(self, environ: dict) -> tuple[int, str, bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/ping":
            if self.model is None:
                raise HttpError(500, f"model not loaded: {self.load_error}")
            return 200, codecs.JSON, b'{"status": "healthy"}'
        if path == "/execution-parameters":  # a batch transform asks; the payload it announces is what we accept
            params = {"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD",
                      "MaxPayloadInMB": max(1, min(BATCH_MAX_PAYLOAD_MB, self.max_body // 2**20))}
            return 200, codecs.JSON, json.dumps(params).encode()
        if path != "/invocations":
            raise HttpError(404, f"no such path {path}; use /ping or /invocations")
        if method != "POST":
            raise HttpError(405, "POST an image to /invocations")
        return self.invoke(environ)

    def invoke(self, environ: dict) -> tuple[int, str, bytes]:
        started = time.monotonic()
        if self.model is None:
            raise HttpError(500, f"model not loaded: {self.load_error}")
        accept = negotiate(environ.get("HTTP_ACCEPT"))
        options = custom_attributes(environ.get("HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES", ""))
        content_type = codecs.media_type(environ.get("CONTENT_TYPE"))
        if content_type not in codecs.REQUEST_TYPES:
            raise HttpError(415, f"content type {content_type or '(none)'!r} is not supported; "
                                 f"send one of {', '.join(codecs.REQUEST_TYPES)}")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > self.max_body:
            raise HttpError(413, f"body of {length} bytes is over the limit of {self.max_body} bytes for "
                                 f"{self.limits.mode} inference (UNETSEG_MAX_BODY_MB); use {INSTEAD[self.limits.mode]}")
        body = environ["wsgi.input"].read(length) if length else b""
        if not body:
            raise HttpError(400, "empty body: POST an image")
        try:
            image = codecs.decode_image(body, content_type)
        except codecs.CodecError as exc:
            raise HttpError(400, str(exc)) from None
        height, width = image.shape[:2]
        if height * width > self.max_pixels:
            raise HttpError(413, f"image of {width}x{height} pixels is over the limit of {self.max_pixels} pixels")
        channels = image.shape[2] if image.ndim == 3 else 1
        if channels != self.model.in_channels:
            raise HttpError(400, f"image has {channels} channel(s); this model takes {self.model.in_channels}")
        probabilities = options.get("output") == "probabilities"
        if probabilities and accept != codecs.NPY:  # before the work, not after it
            raise HttpError(406, "output=probabilities is sent as application/x-npy; set Accept to it")
        tile = options.get("tile")
        probs = self.predict(image, started, tile=int(tile) if tile else None, tta=options.get("tta", self.tta))
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
        if self.limits.mode == "realtime" and len(answer) > limit:
            raise HttpError(413, f"the answer ({kind}, {len(answer)} bytes) is over the limit of {limit} bytes for "
                                 f"realtime inference; ask for the mask (image/png) rather than probabilities, send a "
                                 f"smaller image, or use {INSTEAD['realtime']}")
        return 200, kind, answer

    def predict(self, image, started: float, **kwargs):
        """The model's probabilities, within the request's time limit (less a margin to encode and send the answer
        before the caller's own limit cuts the connection)."""
        budget = self.timeout_s - min(5.0, 0.1 * self.timeout_s)
        if not self.lock.acquire(timeout=max(0.0, started + budget - time.monotonic())):
            raise self._timed_out(started, "waiting for the model (other requests held it)")
        try:
            self.deadline.at, self.deadline.passes = started + budget, 0
            return self.model.predict_proba(image, **kwargs)
        except DeadlineExceeded:
            raise self._timed_out(started, f"after {self.deadline.passes} forward passes") from None
        finally:
            self.deadline.at = None
            self.lock.release()

    def _timed_out(self, started: float, where: str) -> HttpError:
        return HttpError(504, f"prediction stopped {where} at {time.monotonic() - started:.1f} s, the time limit "
                              f"of {self.timeout_s:g} s for {self.limits.mode} inference "
                              f"(SAGEMAKER_MODEL_SERVER_TIMEOUT); send a smaller image or fewer TTA views, or use "
                              f"{INSTEAD[self.limits.mode]}")


def negotiate(accept: Optional[str]) -> str:
    """The first response type the Accept header allows; image/png for */* or no header."""
    if not accept:
        return codecs.PNG
    for part in accept.split(","):
        kind = codecs.media_type(part)
        if kind in codecs.RESPONSE_TYPES:
            return kind
        if kind in ("*/*", "image/*"):
            return codecs.PNG
        if kind == "application/*":
            return codecs.JSON
    raise HttpError(406, f"cannot answer in {accept!r}; accept one of {', '.join(codecs.RESPONSE_TYPES)}")


def custom_attributes(header: str) -> dict[str, str]:
    """`output=probabilities; tile=512` (SageMaker's CustomAttributes) as a dict; unknown keys are refused."""
    pairs = {}
    for item in header.replace(",", ";").split(";"):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "output" and value in ("mask", "probabilities"):
            pairs[key] = value
        elif key == "tile" and value.isdigit() and int(value) >= 32:
            pairs[key] = value
        elif key == "tta" and value in codecs.TTA_MODES:
            pairs[key] = value
        else:
            raise HttpError(400, f"custom attribute {item.strip()!r} not understood; use output=mask|probabilities, "
                                 f"tile=<pixels, 32 or more> and tta={'|'.join(codecs.TTA_MODES)}")
    return pairs


# --- the server --------------------------------------------------------------------------------------------------

def gpu_count() -> int:
    """GPUs on this instance, asked of nvidia-smi: the gunicorn master must not import torch before forking."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        return 0


def worker_hooks(gpus: int, workers: int, cpus: int) -> tuple[Callable, Callable]:
    """gunicorn's pre_fork and post_fork: each worker holds a slot, 0 to workers-1, and runs on GPU slot % gpus.

    A slot is the lowest one no live worker holds, chosen in the master before the fork, so that the replacement of a
    dead worker takes its slot and its GPU. (gunicorn's worker age counts every spawn, so numbering GPUs by age
    drifts after a restart: two workers on one GPU, another idle.)
    """
    def pre_fork(server, worker) -> None:
        held = {getattr(other, "unetseg_slot", None) for other in server.WORKERS.values()}
        worker.unetseg_slot = next(slot for slot in itertools.count() if slot not in held)

    def post_fork(server, worker) -> None:
        # Before torch loads in the worker: pin it to one GPU, and share the CPU cores among workers.
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(worker.unetseg_slot % gpus)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // workers)))

    return pre_fork, post_fork


def serve(model_dir: Optional[str] = None, port: Optional[int] = None, host: str = "0.0.0.0") -> None:
    from gunicorn.app.base import BaseApplication

    model_dir = model_dir or os.environ.get("UNETSEG_MODEL_DIR", DEFAULT_MODEL_DIR)
    port = bind_port(port)
    limits = server_limits()  # a bad setting stops the server here, with its name, rather than in every worker
    gpus = gpu_count()
    cpus = len(os.sched_getaffinity(0))
    workers = int(os.environ.get("SAGEMAKER_MODEL_SERVER_WORKERS") or (gpus or max(1, min(4, cpus // 2))))
    pre_fork, post_fork = worker_hooks(gpus, workers, cpus)

    class Server(BaseApplication):
        def load_config(self):
            # gunicorn's timeout is a heartbeat that a gthread worker keeps beating while a request runs: it catches
            # a hung worker process, and each request's own deadline (InferenceApp.predict) bounds the request.
            for key, value in {"bind": f"{host}:{port}", "workers": workers, "threads": 4, "worker_class": "gthread",
                               "timeout": limits.timeout_s + 30, "graceful_timeout": 30, "keepalive": 75,
                               "pre_fork": pre_fork, "post_fork": post_fork, "accesslog": "-", "errorlog": "-"}.items():
                self.cfg.set(key, value)
            # gunicorn >= 25.1 opens a control socket at one path per user ($HOME/.gunicorn/gunicorn.ctl): a second
            # server on the machine (another model, a test) would take it over. Nothing here uses it.
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)

        def load(self):
            return InferenceApp(model_dir)

    log.info("serving %s on %s:%s with %s worker(s), %s GPU(s); %s limits: %s bytes a request, %s s",
             model_dir, host, port, workers, gpus, limits.mode, limits.max_body_bytes, limits.timeout_s)
    Server().run()


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="serve", description="SageMaker inference server for a unetseg model")
    parser.add_argument("--model-dir", default=None, help=f"default: $UNETSEG_MODEL_DIR or {DEFAULT_MODEL_DIR}")
    parser.add_argument("--port", type=int, default=None,
                        help=f"default: $SAGEMAKER_BIND_TO_PORT (inference pipelines) or {DEFAULT_PORT}")
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        serve(args.model_dir, args.port, args.host)
    except ServingConfigError as exc:  # the container's environment: one line in the endpoint's log, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
