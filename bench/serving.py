"""Endpoint overhead: /invocations latency and throughput against calling the model directly, same run, same CPU.

A model artifact with the demo's architecture (random weights: speed does not depend on them) is served by the
real server (`python -m unetseg.container.serving`: gunicorn, one worker, as in the image) on 127.0.0.1. Each request
sends a PNG and asks for a PNG mask, so the endpoint's figures include decoding the request and encoding the answer;
the direct figures are `Segmenter.predict` on the decoded array. Overhead ratio = endpoint time / direct time.

Where the model runs (--cores, default: one "model core" when the machine has two or more): the direct calls and the
server run on the same CPU cores with as many threads, and the benchmark's own HTTP client runs on another core. On
a real endpoint the client is another machine; sharing the model's cores with it (and with its OpenMP threads, which
spin for a while after each direct call) charged the endpoint for the benchmark's own work. `--cores all` gives the
shared figure: every core to both, the client included.

    python bench/serving.py [--sizes 256 512] [--requests 30] [--cores 1|all]
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
    parser.add_argument("--cores", default="1", help="cores for the model (direct and server), or 'all'")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.cores == "all" or len(cpus) < 2:
        model_cores, client_cores = set(cpus), set(cpus)
    else:
        count = min(int(args.cores), len(cpus) - 1)
        model_cores, client_cores = set(cpus[:count]), set(cpus[count:])
    threads = len(model_cores)
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
                                  stderr=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, model_cores))
        try:
            wait_healthy(port)
            where = ("every core, shared with the client" if model_cores == client_cores else
                     f"cores {sorted(model_cores)}, the client on {sorted(client_cores)}")
            print(f"model: Unet/resnet18 depth 4, 3 classes; CPU, {threads} threads on {where}; {args.requests} "
                  "requests per size; endpoint: gunicorn, 1 worker, PNG in, PNG mask out")
            print(f"{'size':>6} {'path':<9}{'p50 ms':>9}{'p99 ms':>9}{'images/s':>10}{'overhead':>10}")
            for size in args.sizes:
                image = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
                body = codecs.encode_image(image, codecs.PNG)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                direct_times, endpoint_times = [], []
                for _ in range(args.requests + 1):  # interleaved, so that load from elsewhere hits both alike
                    os.sched_setaffinity(0, model_cores)  # this thread: the direct call on the model's cores
                    direct_times.append(timed(direct.predict, image))
                    os.sched_setaffinity(0, client_cores)  # and the client on its own
                    endpoint_times.append(timed(invoke, conn, body))
                direct_times, endpoint_times = direct_times[1:], endpoint_times[1:]  # the first: warm-up
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
