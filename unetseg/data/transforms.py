"""Albumentations presets, applied to image and mask together.

Training samples are random crops of `image_size` (padded with mask=ignore where an image is smaller), so that
the model learns at the data's own scale and batches stack. Validation and prediction see whole images.

Any channel count: geometric transforms move every band together (albumentations warps more than 4 channels in
chunks of 4, with the same parameters). Photometric ones assume grayscale or colour pixels in [0, 1]: brightness,
contrast, gamma and noise are applied to 1- and 3-channel images only, hue and saturation to 3 only. Multispectral
bands keep their measured values (their spread is what the dataset normalization measures); blur, linear and the
same for every band, applies to any count.
"""

from __future__ import annotations

import albumentations as A
import cv2

from .masks import IGNORE_INDEX


def train_transform(preset: str, size: int, channels: int) -> A.Compose:
    crop = [
        A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(size, size),
    ]
    flips = [A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90()]
    # Reflect, not constant, at the borders that rotation and scaling open: no artificial edges to learn.
    affine = dict(border_mode=cv2.BORDER_REFLECT_101, fill_mask=IGNORE_INDEX)
    steps: list = list(crop)
    if preset in ("light", "default", "strong"):
        steps += flips
    photometric = channels in (1, 3)
    if preset == "default":
        steps += [A.Affine(scale=(0.85, 1.15), rotate=(-20, 20), translate_percent=(-0.05, 0.05), p=0.5, **affine)]
        if photometric:
            steps += [A.RandomBrightnessContrast(0.15, 0.15, p=0.5)]
    if preset == "strong":
        steps += [
            A.Affine(scale=(0.7, 1.3), rotate=(-45, 45), translate_percent=(-0.1, 0.1), shear=(-8, 8), p=0.7, **affine),
            A.OneOf([A.ElasticTransform(alpha=30, sigma=6, **affine), A.GridDistortion(**affine)], p=0.25),
        ]
        if photometric:
            steps += [
                A.RandomBrightnessContrast(0.25, 0.25, p=0.7),
                A.RandomGamma(p=0.3),
                A.GaussNoise(std_range=(0.02, 0.06), p=0.25),
            ]
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=0.15))
        if channels == 3:
            steps.append(A.HueSaturationValue(10, 15, 10, p=0.3))
    return A.Compose(steps, seed=0)
