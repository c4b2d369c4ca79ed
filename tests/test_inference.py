"""Prediction: the Python API (any size, tiles), `unetseg predict`, and the /invocations server."""

import io
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import pytest
from PIL import Image

from readiness import first_answer
from support import free_port, wsgi_call
from unetseg.cli import main as cli
from unetseg.container.serving import InferenceApp
from unetseg.contract import codecs
from unetseg.contract.config import TrainConfig
from unetseg.contract.sagemaker_env import (
    ASYNC_MAX_PAYLOAD_BYTES,
    BATCH_ENV,
    BIND_TO_PORT_ENV,
    MAX_BODY_MB_ENV,
    MAX_PAYLOAD_IN_MB_ENV,
    MODEL_SERVER_TIMEOUT_ENV,
    MODEL_SERVER_WORKERS_ENV,
    REALTIME_MAX_PAYLOAD_BYTES,
    SERVING_MODE_ENV,
    TTA_ENV,
)
from unetseg.inference import _starts
from unetseg.model import load_model
from unetseg.synthetic import demo_hyperparameters, make_demo_dataset
from unetseg.training import RunPaths, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's multi-class model trained on 64 px images, and 192 px images to predict."""
    root = tmp_path_factory.mktemp("inference")
    data = make_demo_dataset(root / "data", kind="multiclass", train=48, validation=8, size=64)
    cfg = TrainConfig(**{**demo_hyperparameters("multiclass"), "epochs": 8})
    paths = RunPaths(data / "train", data / "validation", root / "model", root / "ckpt", root / "out")
    train(cfg, paths, progress=False)
    big = make_demo_dataset(root / "big", train=0, validation=3, size=192, seed=9)
    return root / "model", sorted((big / "validation" / "images").iterdir())


def test_tiles_agree_with_one_pass(trained):
    model = load_model(trained[0], device="cpu")
    for path in trained[1]:
        image = np.array(Image.open(path))
        whole = model.predict(image)
        assert np.array_equal(model.predict(image, tile=192), whole)  # one tile covering the image: identical
        # Tiles of twice the training size, 25% overlap: the blended seams may flip at most 1% of pixels
        # (measured: 0.2-0.5%).
        assert (model.predict(image, tile=128, overlap=0.25) == whole).mean() >= 0.99
        proba = model.predict_proba(image, tile=64)
        assert proba.shape == (3, 192, 192) and np.allclose(proba.sum(0), 1, atol=1e-4)


def test_tta_is_the_mean_over_the_views_mapped_back(trained):
    model = load_model(trained[0], device="cpu")
    image = np.array(Image.open(trained[1][0]))[:150, :171]  # not square, not a multiple of the stride
    views = [(lambda a: a, lambda p: p), (lambda a: a[:, ::-1], lambda p: p[:, :, ::-1]),
             (lambda a: a[::-1], lambda p: p[:, ::-1]), (lambda a: a[::-1, ::-1], lambda p: p[:, ::-1, ::-1])]
    flips = [back(model.predict_proba(np.ascontiguousarray(view(image)))) for view, back in views]
    assert np.abs(model.predict_proba(image, tta="flip") - np.mean(flips, axis=0)).max() < 1e-5
    swapped = np.ascontiguousarray(image.transpose(1, 0, 2))
    transposed = [back(model.predict_proba(np.ascontiguousarray(view(swapped)))).transpose(0, 2, 1)
                  for view, back in views]
    assert np.abs(model.predict_proba(image, tta="d4") - np.mean(flips + transposed, axis=0)).max() < 1e-5
    # Tiled: one covering tile gives the untiled result, as without TTA.
    assert np.array_equal(model.predict(image, tile=192, tta="d4"), model.predict(image, tta="d4"))
    assert np.array_equal(model.predict_batch([image, image], tta="flip")[1], model.predict(image, tta="flip"))
    with pytest.raises(ValueError, match="tta='rot'"):
        model.predict(image, tta="rot")


def test_predict_command_writes_masks_probabilities_and_overlays(trained, tmp_path, capsys):
    model_dir, images = trained
    out = tmp_path / "pred"
    assert cli(["predict", "--model", str(model_dir), "--input", str(images[0].parent), "--output", str(out),
                "--probabilities", "--overlay", "--batch-size", "2"]) == 0
    assert "wrote 3 mask(s)" in capsys.readouterr().out
    model = load_model(model_dir, device="cpu")
    for path in images:
        mask_png = Image.open(out / f"{path.stem}.png")
        assert mask_png.mode == "P"  # indices are classes, the palette shows them in colour
        assert mask_png.getpalette()[:9] == [c for colour in model.class_colors for c in colour]
        assert np.array_equal(np.array(mask_png), model.predict(np.array(Image.open(path))))
        assert np.load(out / f"{path.stem}.npy").shape == (3, 192, 192)
        assert Image.open(out / f"{path.stem}_overlay.png").size == (192, 192)
    assert cli(["predict", "--model", str(model_dir), "--input", str(tmp_path / "none"), "--output", str(out)]) == 2
    assert cli(["predict", "--model", str(model_dir), "--input", str(images[0]), "--output", str(tmp_path / "tta"),
                "--tta", "flip"]) == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "tta" / f"{images[0].stem}.png")),
                          model.predict(np.array(Image.open(images[0])), tta="flip"))


# --- the server -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(trained):
    return InferenceApp(str(trained[0]), device="cpu", max_body_bytes=200_000)


@pytest.fixture(scope="module")
def image(trained):
    return np.array(Image.open(trained[1][0]))


def test_every_request_and_response_type(app, image):
    expected = app.model.predict(image)
    assert wsgi_call(app, "/ping", method="GET")[0] == 200
    for content_type in (codecs.PNG, codecs.NPY):
        body = codecs.encode_image(image, content_type)
        status, headers, payload = wsgi_call(app, body=body, content_type=content_type, accept=codecs.PNG)
        assert (status, headers["Content-Type"]) == (200, codecs.PNG)
        assert np.array_equal(np.array(Image.open(io.BytesIO(payload))), expected)
        status, headers, payload = wsgi_call(app, body=body, content_type=content_type, accept=codecs.NPY)
        assert (status, headers["Content-Type"]) == (200, codecs.NPY)
        assert np.array_equal(np.load(io.BytesIO(payload)), expected)
        status, headers, payload = wsgi_call(app, body=body, content_type=content_type, accept=codecs.JSON)
        answer = json.loads(payload)
        assert np.array_equal(codecs.decode_json_mask(answer), expected)
        assert answer["pixel_counts"] == {n: int((expected == i).sum()) for i, n in enumerate(app.model.class_names)}
        assert len(payload) < expected.size  # run-length encoded, not a pixel list
    status, headers, payload = wsgi_call(app, body=codecs.encode_image(image, codecs.JPEG), content_type=codecs.JPEG)
    assert status == 200 and headers["Content-Type"] == codecs.PNG  # image/png for no Accept header
    status, headers, payload = wsgi_call(app, body=codecs.encode_image(image, codecs.NPY), content_type=codecs.NPY,
                                 accept=codecs.NPY, attrs="output=probabilities")
    probs = np.load(io.BytesIO(payload))
    assert probs.dtype == np.float16 and probs.shape == (3, *image.shape[:2])
    assert np.array_equal(probs.argmax(0), expected) or (probs.argmax(0) == expected).mean() > 0.999
    status, headers, payload = wsgi_call(app, body=codecs.encode_image(image, codecs.NPY), content_type=codecs.NPY,
                                 accept=codecs.NPY, attrs="output=probabilities; tta=d4")
    assert status == 200
    assert np.abs(np.load(io.BytesIO(payload)) - app.model.predict_proba(image, tta="d4")).max() < 1e-3  # float16


@pytest.mark.parametrize("request_args, status, fragment", [
    (dict(body=b"x", content_type="text/plain"), 415, "not supported"),
    (dict(body=b"not a png", content_type=codecs.PNG), 400, "not a image/png image"),
    (dict(body=b"\x89PNG\r\n\x1a\n\x00\x00", content_type=codecs.PNG), 400, "image/png"),
    (dict(body=b"\x93NUMPY garbage", content_type=codecs.NPY), 400, ".npy"),
    (dict(body=b"", content_type=codecs.PNG), 400, "empty body"),
    (dict(body=b"x" * 200_001, content_type=codecs.PNG), 413, "over the limit"),
    (dict(body=b"x", content_type=codecs.PNG, accept="text/html"), 406, "accept one of"),
    (dict(body=b"x", content_type=codecs.PNG, attrs="colour=red"), 400, "custom attribute"),
    (dict(body=b"x", content_type=codecs.PNG, attrs="tta=rot90"), 400, "tta=none|flip|d4"),
    (dict(path="/nothing"), 404, "no such path"),
    (dict(method="GET"), 405, "POST"),
])
def test_client_errors_are_4xx_with_a_reason(app, request_args, status, fragment):
    got, headers, payload = wsgi_call(app, **request_args)
    assert got == status and headers["Content-Type"] == codecs.JSON and fragment in json.loads(payload)["error"]


def test_wrong_channel_count_and_oversized_image(app, image):
    got, _, payload = wsgi_call(app, body=codecs.encode_image(image[..., 0]), content_type=codecs.PNG)
    assert got == 400 and "1 channel(s); this model takes 3" in json.loads(payload)["error"]
    small = InferenceApp.__new__(InferenceApp)
    small.__dict__.update(app.__dict__, max_pixels=100)
    got, _, payload = wsgi_call(small, body=codecs.encode_image(image), content_type=codecs.PNG)
    assert got == 413 and "pixels" in json.loads(payload)["error"]


def test_a_server_error_leaks_no_internals(app, image, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail in /opt/ml/model")

    monkeypatch.setattr(app.model, "predict_proba", explode)
    status, _, payload = wsgi_call(app, body=codecs.encode_image(image), content_type=codecs.PNG)
    assert status == 500 and b"secret" not in payload and b"Traceback" not in payload


def test_ping_fails_when_the_model_failed_to_load(tmp_path):
    broken = InferenceApp(str(tmp_path / "missing"), device="cpu")
    status, _, payload = wsgi_call(broken, "/ping", method="GET")
    assert status == 500 and "model not loaded" in json.loads(payload)["error"]
    assert wsgi_call(broken, body=b"x", content_type=codecs.PNG)[0] == 500


def test_endpoint_default_tta_from_the_environment(trained, image, monkeypatch):
    # Batch transform sends no custom attributes: UNETSEG_TTA (the model's env) sets the default for every request.
    monkeypatch.setenv(TTA_ENV, "flip")
    app = InferenceApp(str(trained[0]), device="cpu")
    body = codecs.encode_image(image, codecs.PNG)
    status, _, payload = wsgi_call(app, body=body, content_type=codecs.PNG, accept=codecs.NPY)
    assert status == 200 and np.array_equal(np.load(io.BytesIO(payload)), app.model.predict(image, tta="flip"))
    status, _, payload = wsgi_call(app, body=body, content_type=codecs.PNG, accept=codecs.NPY, attrs="tta=none")
    assert np.array_equal(np.load(io.BytesIO(payload)), app.model.predict(image))  # a request's own choice wins
    monkeypatch.setenv(TTA_ENV, "rotate")
    status, _, payload = wsgi_call(InferenceApp(str(trained[0]), device="cpu"), "/ping", method="GET")
    assert status == 500 and "UNETSEG_TTA='rotate'" in json.loads(payload)["error"]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def post(url: str, body: bytes, content_type: str, accept: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_concurrent_requests_over_http(app, trained):
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/invocations"
        images = [np.array(Image.open(p)) for p in trained[1]] * 4
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda im: post(url, codecs.encode_image(im), codecs.PNG, codecs.NPY), images))
        for im, (status, payload) in zip(images, answers):
            assert status == 200 and np.array_equal(np.load(io.BytesIO(payload)), app.model.predict(im))
    finally:
        server.shutdown()


def start_server(model_dir, env: dict, *args: str) -> subprocess.Popen:
    """`python -m unetseg.container.serving` (what the image's `serve` runs): gunicorn and its workers, logging to a
    pipe."""
    return subprocess.Popen([sys.executable, "-m", "unetseg.container.serving", "--model-dir", str(model_dir),
                             "--host", "127.0.0.1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM (if it still runs), and its whole log; again, the same log."""
    if not hasattr(proc, "log"):
        if proc.poll() is None:
            proc.terminate()
        proc.log = proc.communicate(timeout=60)[0]
    return proc.log


def wait_healthy(proc: subprocess.Popen, port: int) -> None:
    """/ping answers 200; a slow answer while the workers load the model is "not ready yet" (tests/readiness.py)."""
    status, body, _ = first_answer(f"http://127.0.0.1:{port}/ping", timeout=120, alive=lambda: proc.poll() is None,
                                   logs=lambda: stop_server(proc))
    assert status == 200, body


def test_serve_command_runs_gunicorn_workers(trained, image):
    port = free_port()
    proc = start_server(trained[0], {MODEL_SERVER_WORKERS_ENV: "2"}, "--port", str(port))
    try:
        wait_healthy(proc, port)
        url = f"http://127.0.0.1:{port}/invocations"
        status, payload = post(url, codecs.encode_image(image), codecs.PNG, codecs.JSON)
        assert status == 200 and json.loads(payload)["shape"] == list(image.shape[:2])
    finally:
        log = stop_server(proc)
    assert log.count("model loaded from") == 2  # once per worker


def test_serve_listens_on_sagemaker_bind_to_port(trained, image):
    """Each container of an inference pipeline gets its port in SAGEMAKER_BIND_TO_PORT (SageMaker runs `serve` with
    no arguments)."""
    port = free_port()
    proc = start_server(trained[0], {BIND_TO_PORT_ENV: str(port), MODEL_SERVER_WORKERS_ENV: "1"})
    try:
        wait_healthy(proc, port)
        url = f"http://127.0.0.1:{port}/invocations"
        status, payload = post(url, codecs.encode_image(image), codecs.PNG, codecs.JSON)
        assert status == 200 and json.loads(payload)["shape"] == list(image.shape[:2])
    finally:
        log = stop_server(proc)
    assert f"Listening at: http://127.0.0.1:{port}" in log, log[-2000:]


def test_a_request_past_the_server_timeout_is_answered_504(trained):
    """SAGEMAKER_MODEL_SERVER_TIMEOUT bounds a request, not only gunicorn's heartbeat (a gthread worker's heartbeat
    goes on while a request runs): a request that outlasts it is answered 504 with the reason, between two forward
    passes, and the worker serves the next request."""
    port = free_port()
    proc = start_server(trained[0], {MODEL_SERVER_TIMEOUT_ENV: "1", MODEL_SERVER_WORKERS_ENV: "1"},
                        "--port", str(port))
    # 2048 x 2048 (a smooth picture: a small PNG, far under the 6 MB limit) in 64-pixel tiles with d4 TTA: hundreds of
    # forward passes, many seconds on any CPU; the request may take one.
    side, tile = 2048, 64
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    big = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128, np.tile(ramp, (side, 1))], -1)
    corners = len(_starts(side, tile, int(tile * 0.75))) ** 2
    passes = -(-corners // 4) * 2  # tiles 4 at a time; d4 = 2 orientations, each one pass for its 4 flips
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        wait_healthy(proc, port)
        request = urllib.request.Request(url, data=codecs.encode_image(big.astype(np.uint8)), headers={
            "Content-Type": codecs.PNG, "Accept": codecs.NPY,
            "X-Amzn-SageMaker-Custom-Attributes": f"tile={tile}; tta=d4"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        assert status == 504, (status, payload[:300])
        error = json.loads(payload)["error"]
        assert MODEL_SERVER_TIMEOUT_ENV in error and "1 s" in error, error
        done = int(re.search(r"after (\d+) forward pass", error).group(1))
        assert 0 < done < passes, (done, passes, error)  # stopped between passes, long before the end
        small = np.zeros((64, 64, 3), np.uint8)
        status, payload = post(url, codecs.encode_image(small), codecs.PNG, codecs.NPY)
        assert status == 200 and np.load(io.BytesIO(payload)).shape == (64, 64)  # the worker is free again
    finally:
        stop_server(proc)
    print(f"504 after {done} of {passes} forward passes: {error}")


def test_the_body_limit_follows_the_mode(trained, monkeypatch):
    """A real-time endpoint carries at most 6 MB, so the server's default is that; a batch transform sends up to its
    MaxPayloadInMB (and asks /execution-parameters for it); async inference up to 1 GB."""
    for name in (BATCH_ENV, MAX_PAYLOAD_IN_MB_ENV, MAX_BODY_MB_ENV, SERVING_MODE_ENV,
                 MODEL_SERVER_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)

    def status_for(app, length: int) -> tuple[int, str]:
        """The answer to a request that declares `length` bytes (and sends none: the limit is checked first)."""
        status, _, payload = wsgi_call(app, content_type=codecs.PNG, environ={"CONTENT_LENGTH": str(length)})
        return status, json.loads(payload).get("error", "")

    realtime = InferenceApp(str(trained[0]), device="cpu")
    status, error = status_for(realtime, REALTIME_MAX_PAYLOAD_BYTES + 1)
    assert status == 413 and f"limit of {REALTIME_MAX_PAYLOAD_BYTES} bytes" in error and "batch transform" in error
    assert status_for(realtime, REALTIME_MAX_PAYLOAD_BYTES)[0] == 400  # read, and found empty: within the limit

    monkeypatch.setenv(BATCH_ENV, "true")
    monkeypatch.setenv(MAX_PAYLOAD_IN_MB_ENV, "20")
    batch = InferenceApp(str(trained[0]), device="cpu")
    assert json.loads(wsgi_call(batch, "/execution-parameters", method="GET")[2])["MaxPayloadInMB"] == 20
    assert status_for(batch, 20 * 2**20)[0] == 400 and status_for(batch, 20 * 2**20 + 1)[0] == 413

    monkeypatch.delenv(BATCH_ENV)
    monkeypatch.delenv(MAX_PAYLOAD_IN_MB_ENV)
    monkeypatch.setenv(SERVING_MODE_ENV, "async")
    asynchronous = InferenceApp(str(trained[0]), device="cpu")
    assert status_for(asynchronous, ASYNC_MAX_PAYLOAD_BYTES)[0] == 400
    assert status_for(asynchronous, ASYNC_MAX_PAYLOAD_BYTES + 1)[0] == 413


def test_a_realtime_answer_over_6_mb_is_refused_with_the_reason(trained, monkeypatch):
    """6 MB each way: the float16 probabilities of a 1024 x 1024 image with 3 classes are 6 MB and a header, which
    SageMaker would drop with an error naming nothing. The server says so, and what to ask for instead."""
    for name in (BATCH_ENV, MAX_BODY_MB_ENV, SERVING_MODE_ENV):
        monkeypatch.delenv(name, raising=False)
    app = InferenceApp(str(trained[0]), device="cpu")
    ramp = np.linspace(0, 255, 1024, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8)  # a small PNG: the request is fine
    body = codecs.encode_image(image)
    assert len(body) < REALTIME_MAX_PAYLOAD_BYTES
    status, _, payload = wsgi_call(app, body=body, content_type=codecs.PNG, accept=codecs.NPY,
                                   attrs="output=probabilities")
    assert status == 413, (status, f"{len(payload)} bytes")
    error = json.loads(payload)["error"]
    assert f"over the limit of {REALTIME_MAX_PAYLOAD_BYTES} bytes" in error, error
    assert "ask for the mask" in error
    status, headers, payload = wsgi_call(app, body=body, content_type=codecs.PNG, accept=codecs.PNG)
    assert (status, headers["Content-Type"]) == (200, codecs.PNG) and len(payload) < REALTIME_MAX_PAYLOAD_BYTES
