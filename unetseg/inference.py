"""Prediction around one model call, for any runtime: normalization, padding to the stride, TTA views, blended tiles.

SegmenterBase holds all of it, written against a few array operations (`ops`): numpy here, torch in segmenter.py.
The torch Segmenter and the onnxruntime one (runtime_onnx.py) so pad, tile and average views alike, and this module
imports no torch: an ONNX model predicts where torch is not installed.

Images are padded to the encoder's stride and cropped back. Images larger than `max_pixels` (or any image, when
`tile` is given) are cut into overlapping tiles whose class probabilities are blended with weights that fall off
towards each tile's edge, so that no seam shows where two tiles meet. The blend is built in bands of rows, each
final once no later tile reaches it: validation scores large images band by band (`blended_bands`), with memory
that follows the tile and the image width, not the image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np

from .contract.codecs import TTA_MODES
from .data.io import unit_float
from .visualize import overlay


class NumpyOps:
    """The array operations SegmenterBase needs, on numpy arrays (float32, NCHW)."""

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def flip(self, x: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
        return np.flip(x, dims) if dims else x

    def swap_hw(self, x: np.ndarray) -> np.ndarray:
        return x.swapaxes(2, 3)

    def cat(self, xs: Sequence[np.ndarray], dim: int) -> np.ndarray:
        return np.concatenate(xs, dim)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def pad(self, x: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))

    def softmax(self, logits: np.ndarray) -> np.ndarray:
        x = logits.astype(np.float32, copy=False)
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def labels(self, probs: np.ndarray, dim: int) -> np.ndarray:
        return probs.argmax(dim).astype(np.uint8)

    def normalize(self, batch_nhwc: np.ndarray, norm: dict) -> np.ndarray:
        """As segmenter.prepare_input: NHWC uint8/float to normalized NCHW float32."""
        x = batch_nhwc.transpose(0, 3, 1, 2)
        x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
        if norm["mode"] == "per_image":
            mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
            std = np.maximum(x.std(axis=(1, 2, 3), keepdims=True, ddof=1, dtype=np.float64), 1e-6)  # torch's std
            return ((x - mean) / std).astype(np.float32)
        mean = np.asarray(norm["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(norm["std"], np.float32).reshape(1, -1, 1, 1)
        return (x - mean) / std


class SegmenterBase:
    """A trained model that turns numpy images of any size into masks; subclasses supply `run_model` and `ops`."""

    max_pixels = 2048 * 2048  # above this, predict() tiles by default: activations grow with the image
    default_tile = 1024

    def __init__(self, config: dict, history: Optional[list] = None, ops: Any = None):
        self.config = config
        self.history = history or []
        self.ops = ops or NumpyOps()
        # Called before each model call (a batch of tiles, a TTA orientation): the server checks its deadline here.
        self.forward_checks: list[Callable[[], None]] = []

    def run_model(self, x):
        """Logits (N, C, H, W) of a normalized NCHW batch whose sides are multiples of the stride."""
        raise NotImplementedError

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
            return self.ops.to_numpy(self.probabilities(batch, tta)[0])
        return self.ops.to_numpy(self._tiled(batch[0], tile or self.default_tile, overlap, batch_size, tta))

    def predict_proba_batch(self, images: Sequence[np.ndarray], tta: str = "none") -> np.ndarray:
        """(N, C, H, W) float32 probabilities of same-sized images, in one forward pass (per orientation)."""
        return self.ops.to_numpy(self.probabilities(self.to_batch(images), tta))

    def blended_bands(self, image: np.ndarray, *, tile: Optional[int] = None, overlap: float = 0.25,
                      batch_size: int = 4, tta: str = "none") -> Iterator[tuple[int, Any]]:
        """The class probabilities that predict_proba gives a large image (tiled, `tile` by default `default_tile`), in
        bands of rows from the top: (first row, (C, rows, W) array of the runtime). Only the image is held whole."""
        image = as_hwc(image, self.in_channels)
        return self._tiled_bands(image, tile or self.default_tile, overlap, batch_size, tta)

    def predict_batch(self, images: Sequence[np.ndarray], tta: str = "none") -> np.ndarray:
        """(N, H, W) uint8 masks for same-sized images, in one forward pass (per orientation, with `tta`)."""
        return self.ops.to_numpy(self.ops.labels(self.probabilities(self.to_batch(images), tta), 1))

    def overlay(self, image: np.ndarray, mask: Optional[np.ndarray] = None, alpha: float = 0.45) -> np.ndarray:
        """The image with its predicted (or the given) mask blended in the class colours, as HxWx3 uint8."""
        return overlay(image, self.predict(image) if mask is None else mask, self.class_colors, alpha)

    # --- the machinery ----------------------------------------------------------------------------------------------
    def to_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """NHWC array (uint8, or float32 in [0, 1]) of same-sized images, checked against the model."""
        arrays = [as_hwc(img, self.in_channels) for img in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"a batch needs images of one size, got {sorted(shapes)}")
        if all(a.dtype == np.uint8 for a in arrays):
            return np.stack(arrays)
        return np.stack([unit_float(a) for a in arrays])

    def probabilities(self, batch_nhwc, tta: str = "none"):
        """Softmax (N, C, H, W) for an NHWC batch, padded to the stride and cropped back; with `tta`, the mean over
        the views, each mapped back to the original orientation."""
        ops, views = self.ops, tta_views(tta)
        x = ops.normalize(ops.asarray(batch_nhwc), self.config["normalization"])
        n, total = len(x), None
        for transpose in sorted({t for t, _ in views}):  # views of one shape share a forward pass
            flips = [f for t, f in views if t == transpose]
            base = ops.swap_hw(x) if transpose else x
            probs = self._forward(ops.cat([ops.flip(base, f) for f in flips], 0))
            for i, f in enumerate(flips):  # each view back to the original orientation
                view = ops.flip(probs[i * n:(i + 1) * n], f)
                view = ops.swap_hw(view) if transpose else view
                total = view if total is None else total + view
        return total / len(views)

    def _forward(self, x):
        """Softmax of the model on a normalized NCHW batch, padded (bottom, right) to the stride and cropped back."""
        height, width = x.shape[2:]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride
        if pad_h or pad_w:
            x = self.ops.pad(x, pad_h, pad_w)
        for check in self.forward_checks:
            check()
        return self.ops.softmax(self.run_model(x)[:, :, :height, :width])

    def _tiled(self, image_hwc: np.ndarray, tile: int, overlap: float, batch_size: int, tta: str = "none"):
        return self.ops.cat([band for _, band in self._tiled_bands(image_hwc, tile, overlap, batch_size, tta)], 1)

    def _tiled_bands(self, image_hwc: np.ndarray, tile: int, overlap: float, batch_size: int,
                     tta: str = "none") -> Iterator[tuple[int, Any]]:
        """Blended tile probabilities, (first row, band), top to bottom. Tiles run in row-major order, `batch_size` at a
        time; after each batch the rows above the next tile's top are final: no later tile reaches them."""
        ops = self.ops
        height, width = image_hwc.shape[:2]
        tile = max(self.stride, tile // self.stride * self.stride)
        th, tw = min(tile, height), min(tile, width)
        step = max(self.stride, int(tile * (1 - overlap)))
        corners = [(y, x) for y in _starts(height, th, step) for x in _starts(width, tw, step)]
        weight = ops.asarray(_blend_window(th, tw, tile - step))
        top = 0  # the first row not yet handed out; the sums below start there
        total, weights = ops.zeros((len(self.class_names), 0, width)), ops.zeros((1, 0, width))
        for i in range(0, len(corners), batch_size):
            chunk = corners[i:i + batch_size]
            grow = max(y for y, _ in chunk) + th - top - total.shape[1]
            if grow > 0:
                total = ops.cat([total, ops.zeros((total.shape[0], grow, width))], 1)
                weights = ops.cat([weights, ops.zeros((1, grow, width))], 1)
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


def _crops(image_hwc: np.ndarray, corners: Sequence[tuple[int, int]], height: int, width: int) -> np.ndarray:
    """NHWC batch of the crops at `corners`, as to_batch would make it (16-bit pixels scaled crop by crop, so that a
    large image is never converted whole)."""
    stacked = np.stack([image_hwc[y:y + height, x:x + width] for y, x in corners])
    return stacked if stacked.dtype == np.uint8 else unit_float(stacked)


def _starts(length: int, size: int, step: int) -> list[int]:
    starts = list(range(0, max(length - size, 0) + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)  # the last tile ends at the border
    return starts


def _blend_window(height: int, width: int, ramp: int) -> np.ndarray:
    """Weights rising linearly over `ramp` pixels from each edge: overlapping tiles hand over smoothly."""
    def edge(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        return np.clip(np.minimum(i + 1, n - i) / np.float32(max(1, ramp)), 1e-3, 1.0).astype(np.float32)

    return edge(height)[:, None] * edge(width)[None, :]


def as_hwc(image: np.ndarray, channels: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] != channels:
        found = f" has {image.shape[2]} channel(s)" if image.ndim == 3 else ""
        raise ValueError(f"image of shape {image.shape}{found}: this model takes {channels}-channel images (HxW"
                         f"{'' if channels == 1 else f'x{channels}'})")
    return image
