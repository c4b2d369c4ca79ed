"""Test-time augmentation: what it buys (validation mIoU) and what it costs (images/s), against no TTA, same run.

Trains the demo's multi-class model on synthetic 64 px data (CPU, about 20 s), then predicts a separate set of
held-out images with tta none, flip (4 views) and d4 (8 views).

    python bench/tta.py [--epochs 8] [--images 48] [--size 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unetseg.contract.config import TrainConfig
from unetseg.metrics import confusion, summarize
from unetseg.model import load_model
from unetseg.synthetic import demo_hyperparameters, make_demo_dataset
from unetseg.training import RunPaths, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=48, help="held-out images to score")
    parser.add_argument("--size", type=int, default=128, help="side of the held-out images")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="unetseg-tta-"))
    data = make_demo_dataset(tmp / "data", kind="multiclass", train=48, validation=16, size=64)
    cfg = TrainConfig(**{**demo_hyperparameters("multiclass"), "epochs": args.epochs})
    train(cfg, RunPaths(data / "train", data / "validation", tmp / "model", tmp / "ckpt", tmp / "out"), progress=False)
    model = load_model(tmp / "model", device="cuda" if torch.cuda.is_available() else "cpu")

    held = make_demo_dataset(tmp / "held", kind="multiclass", train=0, validation=args.images, size=args.size, seed=123)
    pairs = [(np.array(Image.open(p)), np.array(Image.open(held / "validation" / "masks" / p.name)))
             for p in sorted((held / "validation" / "images").iterdir())]
    print(f"demo model ({args.epochs} epochs on 48 x 64 px), {len(pairs)} held-out {args.size} px images, "
          f"{model.device.type}")
    base = None
    for mode in ("none", "flip", "d4"):
        model.predict(pairs[0][0], tta=mode)  # warm-up
        start = time.perf_counter()
        masks = [model.predict(image, tta=mode) for image, _ in pairs]
        rate = len(pairs) / (time.perf_counter() - start)
        matrix = sum(confusion(torch.from_numpy(m), torch.from_numpy(t), len(model.class_names))
                     for m, (_, t) in zip(masks, pairs))
        miou = summarize(matrix, model.class_names)["val_miou"]
        base = base or (miou, rate)
        print(f"tta={mode:<5} mIoU {miou:.4f} ({miou - base[0]:+.4f})   {rate:7.1f} images/s "
              f"({base[1] / rate:.2f}x the time of tta=none)")


if __name__ == "__main__":
    main()
