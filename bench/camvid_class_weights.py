"""Multi-class quality on real data: per-class IoU with class_weights=auto against none, same steps, same seed.

CamVid (mini), 11 classes with void = 11 (ignore_index=11), from ../shared/datasets/camvid-mini/: 48 training and 16
validation street scenes, shrunk (nearest-neighbour masks) so that a CPU runs both trainings in minutes. Five
classes hold 0.6-1.5 % of the pixels each: plain cross-entropy spends its steps on road, building and sky.

    python bench/camvid_class_weights.py [--scale 0.25] [--epochs 12] [--loss ce]
    python bench/camvid_class_weights.py --smoke      # synthetic data with a void label, seconds: the code runs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unetseg.contract.config import TrainConfig
from unetseg.training import RunPaths, train

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "camvid-mini"
CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
           "bicyclist"]
VOID = 11


def shrink(source: Path, target: Path, scale: float) -> Path:
    """A copy of the dataset at `scale` (images bilinear, masks nearest, so that no label is invented)."""
    for split in ("train", "validation"):
        for folder, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
            (target / split / folder).mkdir(parents=True, exist_ok=True)
            for path in sorted((source / split / folder).glob("*.png")):
                with Image.open(path) as img:
                    size = (round(img.width * scale), round(img.height * scale))
                    img.resize(size, resample).save(target / split / folder / path.name)
    return target


def synthetic(target: Path) -> Path:
    """The demo's discs and squares (classes 0..2) with a void band (value 3) over noise: the smoke form."""
    from unetseg.synthetic import make_demo_dataset

    make_demo_dataset(target, kind="multiclass", train=8, validation=4, size=32)
    for path in target.glob("*/masks/*.png"):
        mask = np.array(Image.open(path))
        mask[:, :4] = 3
        Image.fromarray(mask).save(path)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="image scale (480x360 frames: 0.25 gives 120x90)")
    parser.add_argument("--crop", type=int, default=96, help="training crop (image_size)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--loss", default="ce", choices=["ce", "dice_ce"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data, 1 epoch: checks that it runs")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="unetseg-camvid-"))
    if args.smoke:
        data, names, void, crop, epochs = synthetic(tmp / "data"), ["background", "disc", "square"], 3, 32, 1
        what = "synthetic smoke data (3 classes, void = 3)"
    else:
        if not (CAMVID / "train").is_dir():
            raise SystemExit(f"{CAMVID} not found: this benchmark needs the CamVid (mini) dataset")
        data = shrink(CAMVID, tmp / "data", args.scale)
        names, void, crop, epochs = CLASSES, VOID, args.crop, args.epochs
        what = f"CamVid mini at scale {args.scale} (48 train / 16 validation), void = 11"
    hps = {"classes": len(names), "class_names": names, "ignore_index": void, "encoder": "resnet18",
           "encoder_depth": 3, "decoder_channels": [64, 32, 16], "encoder_weights": None, "image_size": crop,
           "batch_size": 8, "lr": 3e-3, "augment": "light", "loss": args.loss, "epochs": epochs, "seed": args.seed,
           "num_workers": 0}
    results = {}
    for setting in (None, "auto"):
        run = tmp / str(setting)
        start = time.perf_counter()
        result = train(TrainConfig(**{**hps, "class_weights": setting}),
                       RunPaths(data / "train", data / "validation", run / "model", run / "ckpt", run / "out"),
                       progress=False)
        last = result.history[-1]
        results[setting] = (last, time.perf_counter() - start)
    steps = results[None][0]["step"]
    print(f"{what}; {epochs} epochs = {steps} steps of {hps['batch_size']} x {crop} px crops, loss={args.loss}, "
          f"seed {args.seed}, last epoch's validation scores")
    print("| class | IoU, class_weights=none | IoU, class_weights=auto |\n|---|---|---|")
    for name in names:
        key = f"val_iou_{name}"
        print(f"| {name} | {results[None][0][key]:.3f} | {results['auto'][0][key]:.3f} |")
    print(f"| **mIoU** | **{results[None][0]['val_miou']:.3f}** | **{results['auto'][0]['val_miou']:.3f}** |")
    print(f"pixel accuracy: none {results[None][0]['val_acc']:.3f}, auto {results['auto'][0]['val_acc']:.3f}; "
          f"time: none {results[None][1]:.0f} s, auto {results['auto'][1]:.0f} s")


if __name__ == "__main__":
    main()
