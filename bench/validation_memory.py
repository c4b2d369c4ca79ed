"""Validation of one large image: peak memory tiled (as predict tiles it) against a whole-image pass, same run.

Each mode runs training's own `evaluate` in a child process of its own on the same validation image, read from disk
(as training reads images too large to keep): "whole" with the tiling threshold out of reach (how validation ran
before: the image in one forward pass), "tiled" with images above --tile^2 pixels tiled in --tile px tiles.
Peak memory is the child's peak RSS above its RSS just before `evaluate` (on CUDA also the peak of allocated device
memory); both modes score the image, and their mIoU is printed beside (tiling changes predictions near tile borders).
A whole-image pass that runs out of memory is reported as such.

    python bench/validation_memory.py [--size 2048] [--tile 512] [--encoder resnet18] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(mode: str, folder: Path, tile: int, encoder: str, device_name: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from unetseg.contract.config import TrainConfig
    from unetseg.data.checks import check_dataset
    from unetseg.data.dataset import PadCollate, SegmentationDataset, ShardSampler
    from unetseg.data.scan import pair_channel
    from unetseg.distributed import DistContext
    from unetseg.losses import build_loss
    from unetseg.model import artifact_config, build_model, normalization
    from unetseg.segmenter import Segmenter
    from unetseg.training import Run, evaluate, is_tiled

    Segmenter.max_pixels = tile * tile if mode == "tiled" else 2**62
    Segmenter.default_tile = tile
    device = torch.device(device_name)
    cfg = TrainConfig(encoder=encoder, encoder_weights=None, image_size=256, batch_size=4)
    data = check_dataset(pair_channel(folder), cfg, uncached=lambda i, size: True)  # read from disk in evaluate
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).to(device)
    tiled = [i for i in range(len(data.samples)) if is_tiled(data.sizes[i])]
    loader = DataLoader(SegmentationDataset(data), batch_size=1, collate_fn=PadCollate(cfg.stride),
                        sampler=ShardSampler(len(data.samples), skip=tiled))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)
    loss_fn = build_loss(cfg.loss).to(device)
    before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        device_before = torch.cuda.memory_allocated(device) / 2**20
    try:
        run = Run(cfg, ctx, model, loss_fn, normalization(cfg), None, False, artifact_config(cfg, data.codec.mode))
        metrics = evaluate(run, loader, large=(data.load(i) for i in tiled))
    except torch.OutOfMemoryError as exc:
        return {"mode": mode, "error": f"out of memory ({str(exc).splitlines()[0][:120]})"}
    result = {"mode": mode, "peak_mib": _peak_rss_mib() - before, "miou": metrics["val_miou"]}
    if device.type == "cuda":
        result["device_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 - device_before
    return result


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the validation image")
    parser.add_argument("--tile", type=int, default=512, help="tile side; images above tile x tile pixels are tiled")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=("whole", "tiled"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.tile, args.encoder, args.device)))
        return

    from unetseg.synthetic import make_demo_dataset

    root = make_demo_dataset(Path(tempfile.mkdtemp(prefix="unetseg-valmem-")), kind="binary", train=0, validation=1,
                             size=args.size)
    results = {}
    for mode in ("whole", "tiled"):
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", str(root / "validation"),
                               "--tile", str(args.tile), "--encoder", args.encoder, "--device", args.device],
                              capture_output=True, text=True)
        if done.returncode != 0:
            # A kill (the kernel's OOM killer) or a crash: the whole-image pass is what this bench expects it from.
            results[mode] = {"mode": mode, "error": f"exit code {done.returncode}: {done.stderr.strip()[-300:]}"}
        else:
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"validation of one {args.size}x{args.size} RGB image, Unet/{args.encoder}, {args.device}, "
          f"tiles of {args.tile} px")
    for mode, result in results.items():
        if "error" in result:
            print(f"{mode:>5}: {result['error']}")
            continue
        device = f", device peak +{result['device_peak_mib']:.0f} MiB" if "device_peak_mib" in result else ""
        print(f"{mode:>5}: peak RSS +{result['peak_mib']:.0f} MiB{device}, mIoU {result['miou']:.4f}")
    whole, tiled = results["whole"], results["tiled"]
    if "error" not in whole and "error" not in tiled:
        key = "device_peak_mib" if "device_peak_mib" in whole else "peak_mib"
        ratio = whole[key] / max(tiled[key], 1.0)
        print(f"ratio: the whole-image pass peaks at {ratio:.1f}x the tiled one's memory ({key})")


if __name__ == "__main__":
    main()
