"""Segmenter: a trained torch model that turns numpy images of any size into masks.

The padding, tiling and TTA are SegmenterBase's (inference.py), shared with the onnxruntime runtime
(runtime_onnx.py); here are the torch parts: the model call on a device (bf16 autocast where the GPU computes it),
the array operations on torch tensors, and the input normalization that training uses too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .inference import SegmenterBase


class TorchOps:
    """SegmenterBase's array operations on torch tensors on `device`."""

    def __init__(self, device: torch.device):
        self.device = device

    def asarray(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(np.ascontiguousarray(x))
        return x.to(self.device)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    def flip(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return x.flip(dims) if dims else x

    def swap_hw(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(2, 3)

    def cat(self, xs: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(list(xs), dim)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, device=self.device)

    def pad(self, x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
        return F.pad(x, (0, pad_w, 0, pad_h))

    def softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), 1)

    def labels(self, probs: torch.Tensor, dim: int) -> torch.Tensor:
        return probs.argmax(dim).to(torch.uint8)

    def normalize(self, batch_nhwc: torch.Tensor, norm: dict) -> torch.Tensor:
        return prepare_input(batch_nhwc, norm)


class Segmenter(SegmenterBase):
    def __init__(self, model: torch.nn.Module, config: dict, history: Optional[list] = None,
                 device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        super().__init__(config, history, TorchOps(self.device))
        # bf16 autocast on GPUs that compute it: inference tolerates it, and it halves memory and time.
        self.amp = torch.bfloat16 if native_bf16(self.device) else None

    @torch.inference_mode()
    def probabilities(self, batch_nhwc, tta: str = "none") -> torch.Tensor:
        return super().probabilities(batch_nhwc, tta)

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(x)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: CUDA compute capability 8.0 (Ampere) or later. Training and serving
    both decide by this. torch.cuda.is_bf16_supported() also counts emulation, which says yes on a T4 or V100 (g4dn,
    p3), where cuDNN has no bf16 convolutions."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def prepare_input(batch_nhwc: torch.Tensor, norm: dict) -> torch.Tensor:
    """NHWC uint8/float batch (already on its device) to a normalized NCHW float tensor. (Its numpy twin, for the
    torch-free runtime: inference.NumpyOps.normalize; the parity tests hold them together.)

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
