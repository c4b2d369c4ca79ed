"""Data pipeline throughput: unetseg's loader against a naive PIL + per-sample transform baseline, same run.

Both produce normalized float batches from the same files with the same crop size and a flip augmentation.
unetseg: files checked and decoded once (kept in memory when they fit), albumentations on uint8, uint8 batches,
normalization as one tensor op per batch (on the GPU in training; timed here on the CPU). Baseline: what a
first training script does, PIL decode + per-sample float conversion and normalization in __getitem__.

    python bench/data_pipeline.py [--epochs 3] [--batch-size 8] [--crop 256]
"""

from __future__ import annotations

import argparse
import functools
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common import dataset, median_rate
from unetseg.contract.config import TrainConfig
from unetseg.data.checks import check_dataset
from unetseg.data.dataset import EpochSampler, PadCollate, SegmentationDataset, worker_init
from unetseg.data.scan import pair_channel
from unetseg.data.transforms import train_transform
from unetseg.model import normalization
from unetseg.segmenter import prepare_input


class NaiveDataset(Dataset):
    def __init__(self, samples, crop: int, channels: int, seed: int = 0):
        self.samples, self.crop, self.channels = samples, crop, channels
        self.rng = np.random.default_rng(seed)
        self.mean, self.std = (0.449,) * channels, (0.226,) * channels

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        image = np.asarray(Image.open(s.image).convert("L" if self.channels == 1 else "RGB"), np.float32) / 255.0
        mask = np.asarray(Image.open(s.mask), np.int64)
        image = image[..., None] if image.ndim == 2 else image
        h, w = mask.shape
        y, x = self.rng.integers(0, h - self.crop + 1), self.rng.integers(0, w - self.crop + 1)
        image, mask = image[y:y + self.crop, x:x + self.crop], mask[y:y + self.crop, x:x + self.crop]
        if self.rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = (image - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy((mask > 0).astype(np.int64))


def consume(loader, epochs: int, norm=None, sampler=None) -> None:
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for images, _ in loader:
            if norm is not None:
                prepare_input(images, norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data per timed run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)

    folder, channels, description = dataset()
    samples = pair_channel(folder)
    cfg = TrainConfig(in_channels=channels, image_size=args.crop, batch_size=args.batch_size, augment="light",
                      encoder_weights=None)
    items = len(samples) * args.epochs
    print(f"data: {description}; crop {args.crop}, batch {args.batch_size}, {args.epochs} epochs per timed run, "
          f"{os.cpu_count()} CPUs")
    print(f"{'pipeline':<34}{'workers':>8}{'images/s':>12}{'vs naive':>10}")
    for workers in args.workers:
        extra = dict(num_workers=workers, persistent_workers=workers > 0)
        naive = DataLoader(NaiveDataset(samples, args.crop, channels), batch_size=args.batch_size, shuffle=True,
                           **extra)
        baseline = median_rate(functools.partial(consume, naive, args.epochs), items)
        print(f"{'naive PIL + per-sample transform':<34}{workers:>8}{baseline:>12.1f}{1.0:>10.2f}")
        for cache in ("on", "off"):
            checked = check_dataset(samples, cfg.replace(cache_images=cache))
            sampler = EpochSampler(len(samples), args.batch_size, seed=0)
            loader = DataLoader(SegmentationDataset(checked, train_transform("light", args.crop, channels)),
                                batch_size=args.batch_size, sampler=sampler, collate_fn=PadCollate(32),
                                worker_init_fn=worker_init, **extra)
            run = functools.partial(consume, loader, args.epochs, normalization(cfg), sampler)
            rate = median_rate(run, len(sampler) * args.epochs)
            name = f"unetseg ({'cached' if cache == 'on' else 'decode each time'})"
            print(f"{name:<34}{workers:>8}{rate:>12.1f}{rate / baseline:>10.2f}")


if __name__ == "__main__":
    main()
