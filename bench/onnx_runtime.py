"""CPU inference: onnxruntime against torch eager on the same model, same run, same threads.

A model artifact (random weights: speed does not depend on them) is exported with `unetseg export` and predicted on
random images through the Segmenter of each runtime (same padding, normalization and softmax), so the figures are
what `unetseg predict` and the endpoint see. Ratio = onnxruntime images/s / torch images/s (above 1: onnx faster).
The probabilities' largest difference is printed too (parity).

    python bench/onnx_runtime.py [--sizes 256 512] [--images 8] [--arch Unet --encoder resnet34]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unetseg.contract.config import TrainConfig
from unetseg.export import export_model
from unetseg.model import artifact_config, build_model, load_model, save_artifact
from unetseg.runtime_onnx import load_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--images", type=int, default=4, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per runtime, interleaved (median)")
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--classes", type=int, default=3)
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)))))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # load_onnx gives onnxruntime as many

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(arch=args.arch, encoder=args.encoder, encoder_weights=None, classes=args.classes,
                          image_size=256)
        torch.manual_seed(0)
        save_artifact(Path(tmp) / "model", build_model(cfg, pretrained=False).state_dict(),
                      artifact_config(cfg, "index"), [])
        export_model(Path(tmp) / "model", Path(tmp) / "model.onnx")
        runtimes = {"torch": load_model(Path(tmp) / "model", device="cpu"), "onnx": load_onnx(Path(tmp) / "model.onnx")}
        print(f"model: {args.arch}/{args.encoder}, {args.classes} classes, fp32; CPU, {threads} threads; "
              f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
        print(f"{'size':>6}{'torch img/s':>13}{'onnx img/s':>12}{'ratio':>8}{'max |dp|':>10}")
        for size in args.sizes:
            rng = np.random.default_rng(size)
            images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.images)]
            rates = interleaved_rates(runtimes, images, args.repeats)
            probs = {name: model.predict_proba(images[0]) for name, model in runtimes.items()}
            diff = float(np.abs(probs["onnx"] - probs["torch"]).max())
            print(f"{size:>6}{rates['torch']:>13.2f}{rates['onnx']:>12.2f}{rates['onnx'] / rates['torch']:>8.2f}"
                  f"{diff:>10.1e}")


def interleaved_rates(runtimes: dict, images: list, repeats: int) -> dict[str, float]:
    """Images/s per runtime: the median of `repeats` runs after a warm-up, the runtimes taking turns, so that load
    from elsewhere on the machine hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for repeat in range(repeats + 1):
        for name, model in runtimes.items():
            start = time.perf_counter()
            for image in images:
                model.predict_proba(image)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: len(images) / statistics.median(spent) for name, spent in times.items()}


if __name__ == "__main__":
    main()
