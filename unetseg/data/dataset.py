"""Torch datasets, samplers and batching.

Determinism by construction: a sample's augmentation is seeded by (seed, epoch, index) and an epoch's order by
(seed, epoch), so a run gives the same batches whatever the number of workers, and a run resumed mid-epoch
continues exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .checks import CheckedDataset
from .io import unit_float
from .masks import IGNORE_INDEX


def sample_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class SegmentationDataset(Dataset):
    """Items are (image HxWxC uint8 or float32 in [0, 1], mask HxW uint8 with 255 = ignore)."""

    def __init__(self, checked: CheckedDataset, transform=None, seed: int = 0):
        self.checked, self.transform, self.seed = checked, transform, seed

    def __len__(self) -> int:
        return len(self.checked.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, mask = self.checked.load(index)
        if image.dtype == np.uint16:  # uint8 stays compact until prepare_input scales it on the device
            image = unit_float(image)
        if self.transform is not None:
            self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))


class EpochSampler(Sampler):
    """Yields (epoch, index): this rank's shard of the samples (index % world == rank, the files it read and keeps
    in memory), in a per-epoch order seeded by (seed, epoch). Shards differ in size by at most one; the smaller
    ones repeat a sample so that every rank runs the same number of steps.

    `set_epoch(epoch, start_batch)` resumes inside an epoch by skipping the batches already trained on.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world)

    @property
    def batches_per_epoch(self) -> int:
        # Full batches only (BatchNorm dislikes a stray batch of one), but at least one for tiny datasets.
        return max(1, self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shard = np.arange(self.rank, self.size, self.world)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(shard) if self.shuffle else shard
        mine = np.resize(order, self.per_rank)[: self.batches_per_epoch * self.batch_size]
        for index in mine[self.start_batch * self.batch_size :]:
            yield self.epoch, int(index)

    def __len__(self) -> int:
        return max(0, min(self.per_rank, self.batches_per_epoch * self.batch_size) - self.start_batch * self.batch_size)


class ShardSampler(Sampler):
    """Validation: each rank sees its own shard (index % world == rank, as it read them), no padding, so summed
    confusion matrices are exact. `skip`: indices validated otherwise (tiled, one at a time)."""

    def __init__(self, size: int, rank: int = 0, world: int = 1, skip: Sequence[int] = ()):
        skipped = set(skip)
        self.indices = [i for i in range(rank, size, world) if i not in skipped]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PadCollate:
    """Stack (image, mask) pairs into NHWC and NHW batches, padding each side up to a multiple of `stride`
    (images with 0, masks with ignore): validation images may differ in size and need not fit the encoder."""

    def __init__(self, stride: int):
        self.stride = stride

    def __call__(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        height = _round_up(max(img.shape[0] for img, _ in batch), self.stride)
        width = _round_up(max(img.shape[1] for img, _ in batch), self.stride)
        dtype = torch.float32 if any(img.dtype != torch.uint8 for img, _ in batch) else torch.uint8
        images = torch.zeros((len(batch), height, width, batch[0][0].shape[2]), dtype=dtype)
        masks = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.uint8)
        for i, (img, mask) in enumerate(batch):
            if dtype != img.dtype:
                img = img.float() / 255.0
            images[i, : img.shape[0], : img.shape[1]] = img
            masks[i, : mask.shape[0], : mask.shape[1]] = mask
        return images, masks


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(0)  # OpenCV's own thread pool in every worker oversubscribes the CPU
    torch.set_num_threads(1)
