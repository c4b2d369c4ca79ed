"""Endpoint overhead: /invocations latency and throughput against calling the model directly, same run, same CPU.

A model artifact with the demo's architecture (random weights: speed does not depend on them) is served by the
real server (`python -m unetseg.container.serving`: gunicorn, one worker, as in the image) on 127.0.0.1. Each request
sends a PNG and asks for a PNG mask, so the endpoint's figures include decoding the request and encoding the answer;
the direct figures are `Segmenter.predict` on the decoded array. Overhead ratio = endpoint time / direct time.

    python bench/serving.py [--sizes 256 512] [--requests 30]
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unetseg.contract import codecs
from unetseg.contract.config import TrainConfig
from unetseg.model import artifact_config, build_model, load_model, save_artifact
from unetseg.synthetic import demo_hyperparameters


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        cfg = TrainConfig(**{**demo_hyperparameters("multiclass"), "encoder_depth": 4,
                             "decoder_channels": [128, 64, 32, 16]})
        torch.manual_seed(0)
        save_artifact(model_dir, build_model(cfg).state_dict(), artifact_config(cfg, "index"), [])
        direct = load_model(model_dir, device="cpu")
        port = free_port()
        env = {**os.environ, "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "OMP_NUM_THREADS": str(threads)}
        server = subprocess.Popen([sys.executable, "-m", "unetseg.container.serving", "--model-dir", str(model_dir),
                                   "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_healthy(port)
            print(f"model: Unet/resnet18 depth 4, 3 classes; CPU, {threads} threads; {args.requests} requests per "
                  "size; endpoint: gunicorn, 1 worker, PNG in, PNG mask out")
            print(f"{'size':>6} {'path':<9}{'p50 ms':>9}{'p99 ms':>9}{'images/s':>10}{'overhead':>10}")
            for size in args.sizes:
                image = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
                body = codecs.encode_image(image, codecs.PNG)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                direct.predict(image), invoke(conn, body)  # warm-up
                direct_times, endpoint_times = [], []
                for _ in range(args.requests):  # interleaved, so that load from elsewhere hits both alike
                    direct_times.append(timed(direct.predict, image))
                    endpoint_times.append(timed(invoke, conn, body))
                conn.close()
                d50, d99 = percentiles(direct_times)
                e50, e99 = percentiles(endpoint_times)
                direct_s, endpoint_s = statistics.mean(direct_times), statistics.mean(endpoint_times)
                print(f"{size:>6} {'direct':<9}{d50:>9.1f}{d99:>9.1f}{1 / direct_s:>10.2f}{1.0:>10.2f}")
                overhead = endpoint_s / direct_s
                print(f"{size:>6} {'endpoint':<9}{e50:>9.1f}{e99:>9.1f}{1 / endpoint_s:>10.2f}{overhead:>10.2f}")
        finally:
            server.terminate()
            server.wait(timeout=60)


def timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def invoke(conn: http.client.HTTPConnection, body: bytes) -> bytes:
    conn.request("POST", "/invocations", body, {"Content-Type": codecs.PNG, "Accept": codecs.PNG})
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"/invocations answered {response.status}: {payload[:200]!r}")
    return payload


def wait_healthy(port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


if __name__ == "__main__":
    main()
