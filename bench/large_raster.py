"""`unetseg predict` on large single-band rasters: peak RSS and time, windowed against today's whole-image path.

For each --sizes side (default 4096, 16384, 32768) a tiled, deflate-compressed TIFF is written window by window (a
32768^2 uint8 image is 1 GiB raw: never held whole), then predicted in a child process of its own, whose ru_maxrss is
its peak RSS: "windowed" is what `unetseg predict` does with a TIFF above the tiling size (predict_raster.py);
"whole" is the path before it (the image decoded whole, tiled in memory, its C x H x W probabilities whole), run
where the image is at most --whole-max pixels a side. The model is a small untrained one (tests/support.py's TINY
shape, 2 classes): memory and time, not quality. Targets: windowed peak RSS flat (within 1.5x) from the smallest to
the largest size; time linear in pixels (s/Mpx about constant).

    python bench/large_raster.py [--sizes 4096,16384,32768] [--whole-max 4096] [--tile 1024] [--threads N]
                                 [--tiling-side 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TINY = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8], "encoder_weights": None,
        "image_size": 32, "classes": 2, "in_channels": 1}


def write_raster(path: Path, side: int, block: int = 512) -> None:
    """A smooth single-band picture with noise, written a tile at a time."""
    import tifffile

    rng = np.random.default_rng(0)

    def tiles():
        for y in range(0, side, block):
            yy = np.arange(y, y + block)[:, None]
            for x in range(0, side, block):
                xx = np.arange(x, x + block)[None, :]
                base = np.sin(xx / 97.0) * np.cos(yy / 61.0) * 100 + 128
                yield np.clip(base + rng.normal(0, 8, (block, block)), 0, 255).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(side, side), dtype=np.uint8, tile=(block, block), compression="zlib",
                     bigtiff=side * side > 2**31)


def write_model(folder: Path) -> None:
    import torch

    from unetseg.contract.config import TrainConfig
    from unetseg.model import artifact_config, build_model, save_artifact

    torch.manual_seed(0)
    cfg = TrainConfig(**TINY)
    save_artifact(folder, build_model(cfg, pretrained=False).state_dict(), artifact_config(cfg, "binary"), [])


def child(mode: str, model_dir: Path, image: Path, out: Path, tile: int, tiling_side: int) -> dict:
    from unetseg import predict
    from unetseg.model import load_model
    from unetseg.segmenter import Segmenter

    Segmenter.max_pixels = tiling_side * tiling_side  # the size above which a TIFF goes window by window

    if mode == "whole":
        predict.windowed = lambda path, model: False  # the path before windowed rasters
    os.environ.setdefault("UNETSEG_MAX_IMAGE_MB", "100000")  # the whole-image path's limit, out of the way here
    model = load_model(model_dir, device="cpu")
    start = time.perf_counter()
    written = predict.predict_files(model, [image], out, tile=tile, progress=False)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "output": written[0].name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,32768", help="image sides, comma-separated")
    parser.add_argument("--whole-max", type=int, default=4096, help="largest side also run on the whole-image path")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--tiling-side", type=int, default=2048, help="predict's tiling threshold, as a side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        mode, model_dir, image, out = args.child
        print(json.dumps(child(mode, Path(model_dir), Path(image), Path(out), args.tile, args.tiling_side)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="unetseg-large-raster-") as tmp:
        root = Path(tmp)
        write_model(root / "model")
        for side in (int(s) for s in args.sizes.split(",")):
            image = root / f"raster{side}.tif"
            write_raster(image, side)
            for mode in ("whole", "windowed") if side <= args.whole_max else ("windowed",):
                out = root / f"out-{mode}-{side}"
                command = [sys.executable, __file__, "--tile", str(args.tile), "--tiling-side", str(args.tiling_side),
                           "--child", mode, str(root / "model"), str(image), str(out)]
                command += ["--threads", str(args.threads)] if args.threads else []
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    rows.append({"side": side, "mode": mode, "error": done.stderr.strip().splitlines()[-1:]})
                else:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result.update(side=side, s_per_mpx=result["seconds"] / (side * side / 1e6))
                    rows.append(result)
                print(json.dumps(rows[-1]), flush=True)
            image.unlink()
    print(f"\n{'side':>6} {'mode':>9} {'peak RSS MiB':>13} {'seconds':>9} {'s/Mpx':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['side']:>6} {r['mode']:>9}  failed: {r['error']}")
        else:
            print(f"{r['side']:>6} {r['mode']:>9} {r['peak_rss_mib']:>13.0f} {r['seconds']:>9.1f} "
                  f"{r['s_per_mpx']:>7.2f}")
    windowed = [r for r in rows if r.get("mode") == "windowed" and "error" not in r]
    if len(windowed) > 1:
        ratio = windowed[-1]["peak_rss_mib"] / windowed[0]["peak_rss_mib"]
        print(f"windowed peak RSS, {windowed[-1]['side']}^2 / {windowed[0]['side']}^2: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
