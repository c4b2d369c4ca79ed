"""The SageMaker inference contract from the training image: `docker run <image> serve`.

HTTP on port 8080: GET /ping (200 once the model is loaded, 500 with the reason when it failed to load),
POST /invocations (see unetseg.codecs for the formats), GET /execution-parameters (batch transform).
The model comes from /opt/ml/model (SageMaker extracts model.tar.gz there). gunicorn runs one worker per GPU, or a
few on a CPU instance, each loading the model once; requests inside a worker take turns on the model.
Errors the client caused get a 4xx with a one-line reason; anything else a 500 that names no internals (the
traceback goes to the endpoint's log).

Options by environment: SAGEMAKER_MODEL_SERVER_WORKERS, SAGEMAKER_MODEL_SERVER_TIMEOUT (seconds),
UNETSEG_MAX_BODY_MB (default 100), UNETSEG_MAX_PIXELS (default 64 million), UNETSEG_MODEL_DIR, UNETSEG_TTA (the
test-time augmentation of requests that name none; batch transform cannot send custom attributes).
Request options in the X-Amzn-SageMaker-Custom-Attributes header: `output=probabilities`, `tile=<pixels>`,
`tta=flip|d4` (test-time augmentation: 4 or 8 forward passes averaged).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import traceback
from typing import Callable, Iterable, Optional

from . import codecs

log = logging.getLogger("unetseg.serving")

DEFAULT_MODEL_DIR = "/opt/ml/model"
STATUS = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found", 405: "405 Method Not Allowed",
          406: "406 Not Acceptable", 413: "413 Payload Too Large", 415: "415 Unsupported Media Type",
          500: "500 Internal Server Error"}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class InferenceApp:
    """A WSGI application around one loaded model."""

    def __init__(self, model_dir: str = DEFAULT_MODEL_DIR, device: Optional[str] = None,
                 max_body_bytes: Optional[int] = None, max_pixels: Optional[int] = None):
        self.max_body = max_body_bytes or int(float(os.environ.get("UNETSEG_MAX_BODY_MB", "100")) * 2**20)
        self.max_pixels = max_pixels or int(float(os.environ.get("UNETSEG_MAX_PIXELS", str(64e6))))
        self.lock = threading.Lock()
        self.model, self.load_error = None, None
        self.tta = os.environ.get("UNETSEG_TTA", "none").strip().lower() or "none"
        try:
            if self.tta not in codecs.TTA_MODES:  # a misconfigured endpoint must not turn healthy
                raise ValueError(f"UNETSEG_TTA={self.tta!r}: use one of {', '.join(codecs.TTA_MODES)}")
            from .model import load_model

            self.model = load_model(model_dir, device=device)
            log.info("model loaded from %s on %s: %s classes", model_dir, self.model.device, len(self.model.class_names))
        except Exception as exc:  # noqa: BLE001 - reported by /ping, so that the endpoint never turns healthy
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load from %s:\n%s", model_dir, traceback.format_exc())

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
        if path == "/execution-parameters":
            params = {"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD",
                      "MaxPayloadInMB": max(1, min(100, self.max_body // 2**20))}
            return 200, codecs.JSON, json.dumps(params).encode()
        if path != "/invocations":
            raise HttpError(404, f"no such path {path}; use /ping or /invocations")
        if method != "POST":
            raise HttpError(405, "POST an image to /invocations")
        return self.invoke(environ)

    def invoke(self, environ: dict) -> tuple[int, str, bytes]:
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
            raise HttpError(413, f"body of {length} bytes is over the limit of {self.max_body} bytes")
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
        tile = options.get("tile")
        with self.lock:
            probs = self.model.predict_proba(image, tile=int(tile) if tile else None, tta=options.get("tta", self.tta))
        if options.get("output") == "probabilities":
            if accept != codecs.NPY:
                raise HttpError(406, "output=probabilities is sent as application/x-npy; set Accept to it")
            return 200, codecs.NPY, codecs.encode_npy(probs.astype("float16"))
        mask = probs.argmax(0).astype("uint8")
        if accept == codecs.PNG:
            return 200, codecs.PNG, codecs.encode_mask_png(mask, self.model.class_colors)
        if accept == codecs.NPY:
            return 200, codecs.NPY, codecs.encode_npy(mask)
        return 200, codecs.JSON, codecs.encode_json(mask, self.model.class_names)


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


def serve(model_dir: Optional[str] = None, port: int = 8080, host: str = "0.0.0.0") -> None:
    from gunicorn.app.base import BaseApplication

    model_dir = model_dir or os.environ.get("UNETSEG_MODEL_DIR", DEFAULT_MODEL_DIR)
    gpus = gpu_count()
    cpus = len(os.sched_getaffinity(0))
    workers = int(os.environ.get("SAGEMAKER_MODEL_SERVER_WORKERS") or (gpus or max(1, min(4, cpus // 2))))
    timeout = int(os.environ.get("SAGEMAKER_MODEL_SERVER_TIMEOUT", "60"))

    def post_fork(server, worker) -> None:
        # Before torch loads in the worker: pin it to one GPU, and share the CPU cores among workers.
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = str((worker.age - 1) % gpus)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // workers)))

    class Server(BaseApplication):
        def load_config(self):
            for key, value in {"bind": f"{host}:{port}", "workers": workers, "threads": 4, "worker_class": "gthread",
                               "timeout": timeout + 30, "graceful_timeout": 30, "keepalive": 75,
                               "post_fork": post_fork, "accesslog": "-", "errorlog": "-"}.items():
                self.cfg.set(key, value)

        def load(self):
            return InferenceApp(model_dir)

    log.info("serving %s on %s:%s with %s worker(s), %s GPU(s)", model_dir, host, port, workers, gpus)
    Server().run()


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="serve", description="SageMaker inference server for a unetseg model")
    parser.add_argument("--model-dir", default=None, help=f"default: $UNETSEG_MODEL_DIR or {DEFAULT_MODEL_DIR}")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    serve(args.model_dir, args.port, args.host)


if __name__ == "__main__":
    main()
