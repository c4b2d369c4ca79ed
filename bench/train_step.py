"""Training step throughput: unetseg's engine against a raw PyTorch loop on the same model and data, same run.

The raw loop is the floor: pre-cropped, pre-normalized tensors already in memory, forward, loss, backward, step.
The engine does everything a job does per step: sampling, augmentation, collation, normalization, AMP where
available, scheduler, signal checks. Its images/s come from its own epoch lines (epoch 1 excluded: warm-up).
A ratio near 1.0 means the engine adds nothing the raw loop does not pay.

    python bench/train_step.py [--epochs 4] [--crop 128] [--encoder resnet18] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import dataset
from unetseg.contract.config import TrainConfig
from unetseg.data.checks import check_dataset
from unetseg.data.scan import pair_channel
from unetseg.losses import build_loss
from unetseg.model import build_model, freeze_unused, normalization
from unetseg.segmenter import prepare_input
from unetseg.training import RunPaths, train


def raw_loop(cfg: TrainConfig, folder: Path, steps: int, device: torch.device) -> float:
    checked = check_dataset(pair_channel(folder), cfg.replace(cache_images="on"))
    gen = torch.Generator().manual_seed(0)
    crops, masks = [], []
    for image, mask in checked.cached:  # random crops, decoded and normalized ahead of time
        h, w = mask.shape
        y = int(torch.randint(0, h - cfg.image_size + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - cfg.image_size + 1, (1,), generator=gen))
        crops.append(torch.from_numpy(image[y:y + cfg.image_size, x:x + cfg.image_size].copy()))
        masks.append(torch.from_numpy(mask[y:y + cfg.image_size, x:x + cfg.image_size].copy()).long())
    images = prepare_input(torch.stack(crops), normalization(cfg)).contiguous().to(device)
    targets = torch.stack(masks).to(device)
    model = build_model(cfg)
    freeze_unused(model, cfg.in_channels, cfg.stride)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    loss_fn = build_loss(cfg.loss)
    n, bs = len(images), cfg.batch_size

    def step(i: int) -> None:
        idx = torch.arange(i * bs, i * bs + bs) % n
        loss = loss_fn(model(images[idx]), targets[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    folder, channels, description = dataset()
    cfg = TrainConfig(encoder=args.encoder, encoder_depth=args.depth, encoder_weights=None, in_channels=channels,
                      decoder_channels=[128, 64, 32, 16, 8][5 - args.depth:], image_size=args.crop,
                      batch_size=args.batch_size, epochs=args.epochs, augment="light", amp="off",
                      channels_last=False, num_workers=0, cache_images="on")
    device = torch.device(args.device)
    print(f"data: {description}; Unet/{args.encoder} depth {args.depth}, crop {args.crop}, batch {args.batch_size}, "
          f"{device}, fp32, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = train(cfg, RunPaths(folder, None, tmp / "m", tmp / "c", tmp / "o"), progress=False)
    engine = statistics.median(h["images_per_sec"] for h in result.history[1:])
    steps = max(10, int(result.history[-1]["step"] / args.epochs))
    raw = raw_loop(cfg, folder, steps * 2, device)
    print(f"{'loop':<10}{'images/s':>10}{'vs raw':>8}")
    print(f"{'raw':<10}{raw:>10.2f}{1.0:>8.2f}")
    print(f"{'unetseg':<10}{engine:>10.2f}{engine / raw:>8.2f}")


if __name__ == "__main__":
    main()
