"""Segmenter: a trained model that turns numpy images of any size into masks.

Images are padded to the encoder's stride and cropped back. Images larger than `max_pixels` (or any image, when
`tile` is given) are cut into overlapping tiles whose class probabilities are blended with weights that fall off
towards each tile's edge, so that no seam shows where two tiles meet. The blend is built in bands of rows, each
final once no later tile reaches it: validation scores large images band by band (`blended_bands`), with memory
that follows the tile and the image width, not the image.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .contract.codecs import TTA_MODES
from .data.io import unit_float
from .visualize import overlay


class Segmenter:
    max_pixels = 2048 * 2048  # above this, predict() tiles by default: activations grow with the image
    default_tile = 1024

    def __init__(self, model: torch.nn.Module, config: dict, history: Optional[list] = None,
                 device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.config = config
        self.history = history or []
        # bf16 autocast on GPUs that compute it: inference tolerates it, and it halves memory and time.
        self.amp = torch.bfloat16 if native_bf16(self.device) else None

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def class_colors(self) -> list[list[int]]:
        return [list(c) for c in self.config["class_colors"]]

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def stride(self) -> int:
        return int(self.config["input"]["stride"])

    # --- the public API ----------------------------------------------------------------------------------------
    def predict(self, image: np.ndarray, *, tile: Optional[int] = None, overlap: float = 0.25,
                tta: str = "none") -> np.ndarray:
        """(H, W) uint8 class indices. `tta`: "flip" or "d4" averages over flipped (and transposed) views."""
        return self.predict_proba(image, tile=tile, overlap=overlap, tta=tta).argmax(0).astype(np.uint8)

    def predict_proba(self, image: np.ndarray, *, tile: Optional[int] = None, overlap: float = 0.25,
                      batch_size: int = 4, tta: str = "none") -> np.ndarray:
        """(C, H, W) float32 class probabilities."""
        batch = self.to_batch([image])
        height, width = batch.shape[1:3]
        if tile is None and height * width <= self.max_pixels:
            return self.probabilities(batch, tta)[0].cpu().numpy()
        return self._tiled(batch[0], tile or self.default_tile, overlap, batch_size, tta).cpu().numpy()

    def blended_bands(self, image: np.ndarray, *, tile: Optional[int] = None, overlap: float = 0.25,
                      batch_size: int = 4, tta: str = "none") -> Iterator[tuple[int, torch.Tensor]]:
        """The class probabilities that predict_proba gives a large image (tiled, `tile` by default `default_tile`), in
        bands of rows from the top: (first row, (C, rows, W) tensor on the device). Only the image is held whole."""
        image = as_hwc(image, self.in_channels)
        return self._tiled_bands(image, tile or self.default_tile, overlap, batch_size, tta)

    def predict_batch(self, images: Sequence[np.ndarray], tta: str = "none") -> np.ndarray:
        """(N, H, W) uint8 masks for same-sized images, in one forward pass (per orientation, with `tta`)."""
        return self.probabilities(self.to_batch(images), tta).argmax(1).to(torch.uint8).cpu().numpy()

    def overlay(self, image: np.ndarray, mask: Optional[np.ndarray] = None, alpha: float = 0.45) -> np.ndarray:
        """The image with its predicted (or the given) mask blended in the class colours, as HxWx3 uint8."""
        return overlay(image, self.predict(image) if mask is None else mask, self.class_colors, alpha)

    # --- the machinery ----------------------------------------------------------------------------------------------
    def to_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """NHWC tensor (uint8, or float32 in [0, 1]) of same-sized images, checked against the model."""
        arrays = [as_hwc(img, self.in_channels) for img in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"a batch needs images of one size, got {sorted(shapes)}")
        if all(a.dtype == np.uint8 for a in arrays):
            return torch.from_numpy(np.stack(arrays))
        return torch.from_numpy(np.stack([unit_float(a) for a in arrays]))

    @torch.inference_mode()
    def probabilities(self, batch_nhwc: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Softmax (N, C, H, W) for an NHWC batch, padded to the stride and cropped back; with `tta`, the mean over
        the views, each mapped back to the original orientation."""
        views = tta_views(tta)
        x = prepare_input(batch_nhwc.to(self.device), self.config["normalization"])
        n, total = len(x), None
        for transpose in sorted({t for t, _ in views}):  # views of one shape share a forward pass
            flips = [f for t, f in views if t == transpose]
            base = x.transpose(2, 3) if transpose else x
            probs = self._forward(torch.cat([base.flip(f) if f else base for f in flips]))
            for i, f in enumerate(flips):  # each view back to the original orientation
                view = probs[i * n:(i + 1) * n]
                view = view.flip(f) if f else view
                view = view.transpose(2, 3) if transpose else view
                total = view if total is None else total + view
        return total / len(views)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the model on a normalized NCHW batch, padded (bottom, right) to the stride and cropped back."""
        height, width = x.shape[2:]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(x)
        return torch.softmax(logits[:, :, :height, :width].float(), 1)

    def _tiled(self, image_hwc: torch.Tensor, tile: int, overlap: float, batch_size: int,
               tta: str = "none") -> torch.Tensor:
        return torch.cat([band for _, band in self._tiled_bands(image_hwc, tile, overlap, batch_size, tta)], 1)

    def _tiled_bands(self, image_hwc: torch.Tensor | np.ndarray, tile: int, overlap: float, batch_size: int,
                     tta: str = "none") -> Iterator[tuple[int, torch.Tensor]]:
        """Blended tile probabilities, (first row, band), top to bottom. Tiles run in row-major order, `batch_size` at a
        time; after each batch the rows above the next tile's top are final: no later tile reaches them."""
        height, width = image_hwc.shape[:2]
        tile = max(self.stride, tile // self.stride * self.stride)
        th, tw = min(tile, height), min(tile, width)
        step = max(self.stride, int(tile * (1 - overlap)))
        corners = [(y, x) for y in _starts(height, th, step) for x in _starts(width, tw, step)]
        weight = _blend_window(th, tw, tile - step, self.device)
        top = 0  # the first row not yet handed out; the sums below start there
        total = torch.zeros(len(self.class_names), 0, width, device=self.device)
        weights = torch.zeros(1, 0, width, device=self.device)
        for i in range(0, len(corners), batch_size):
            chunk = corners[i:i + batch_size]
            grow = max(y for y, _ in chunk) + th - top - total.shape[1]
            if grow > 0:
                total = torch.cat([total, total.new_zeros(total.shape[0], grow, width)], 1)
                weights = torch.cat([weights, weights.new_zeros(1, grow, width)], 1)
            probs = self.probabilities(_crops(image_hwc, chunk, th, tw), tta)
            for (y, x), p in zip(chunk, probs):
                total[:, y - top:y - top + th, x:x + tw] += p * weight
                weights[:, y - top:y - top + th, x:x + tw] += weight
            final = corners[i + batch_size][0] if i + batch_size < len(corners) else height
            if final > top:
                yield top, total[:, :final - top] / weights[:, :final - top]
                total, weights = total[:, final - top:], weights[:, final - top:]
                top = final


_FLIPS = ((), (3,), (2,), (2, 3))  # none, horizontal, vertical, both (NCHW dims)


def tta_views(mode: str) -> list[tuple[bool, tuple[int, ...]]]:
    """(transpose, flip dims) of each view that test-time augmentation `mode` averages over."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r}: use one of {', '.join(TTA_MODES)}")
    flips = _FLIPS if mode != "none" else _FLIPS[:1]
    return [(transpose, f) for transpose in ((False, True) if mode == "d4" else (False,)) for f in flips]


def _crops(image_hwc: torch.Tensor | np.ndarray, corners: Sequence[tuple[int, int]], height: int,
           width: int) -> torch.Tensor:
    """NHWC batch of the crops at `corners`: from a tensor as it is; from an array as to_batch would make it (16-bit
    pixels scaled crop by crop, so that a large image is never converted whole)."""
    crops = [image_hwc[y:y + height, x:x + width] for y, x in corners]
    if isinstance(image_hwc, torch.Tensor):
        return torch.stack(crops)
    stacked = np.stack(crops)
    return torch.from_numpy(stacked if stacked.dtype == np.uint8 else unit_float(stacked))


def _starts(length: int, size: int, step: int) -> list[int]:
    starts = list(range(0, max(length - size, 0) + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)  # the last tile ends at the border
    return starts


def _blend_window(height: int, width: int, ramp: int, device) -> torch.Tensor:
    """Weights rising linearly over `ramp` pixels from each edge: overlapping tiles hand over smoothly."""
    def edge(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32, device=device)
        return ((torch.minimum(i + 1, n - i)) / max(1, ramp)).clamp(1e-3, 1.0)

    return edge(height)[:, None] * edge(width)[None, :]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: CUDA compute capability 8.0 (Ampere) or later. Training and serving
    both decide by this. torch.cuda.is_bf16_supported() also counts emulation, which says yes on a T4 or V100 (g4dn,
    p3), where cuDNN has no bf16 convolutions."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def prepare_input(batch_nhwc: torch.Tensor, norm: dict) -> torch.Tensor:
    """NHWC uint8/float batch (already on its device) to a normalized NCHW float tensor.

    The permute leaves NHWC memory order, i.e. channels_last, at no cost; callers that want NCHW memory call
    .contiguous(). Doing this on the device keeps the DataLoader shipping compact uint8 images.
    """
    x = batch_nhwc.permute(0, 3, 1, 2)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if norm["mode"] == "per_image":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return (x - mean) / std
    mean, std = _mean_std(tuple(norm["mean"]), tuple(norm["std"]), x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(1, C, 1, 1) tensors on `device`, built once: a tensor made from a list on a GPU is a host-to-device copy and a
    sync, which at every step would stall the pipeline. Never inference tensors, whoever asks first: training uses
    them too."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def as_hwc(image: np.ndarray, channels: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] != channels:
        found = f" has {image.shape[2]} channel(s)" if image.ndim == 3 else ""
        raise ValueError(f"image of shape {image.shape}{found}: this model takes {channels}-channel images (HxW"
                         f"{'' if channels == 1 else f'x{channels}'})")
    return image
