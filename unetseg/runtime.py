"""Which runtime runs a model: torch (model.py, export.load_torchscript) or onnxruntime (runtime_onnx.py).

`unetseg.load_model` is this module's: an ONNX file loads without importing torch. Importing this module is light
(the command line reads EXPORT_FORMATS); each runtime is imported when a model needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .contract.errors import UsageError

RUNTIMES = ("torch", "onnx")
EXPORT_FORMATS = ("onnx", "torchscript")
TORCHSCRIPT_SUFFIXES = (".torchscript", ".ts", ".pt")


def is_onnx_path(path) -> bool:
    return str(path).lower().endswith(".onnx")


def uses_torch(path, runtime: Optional[str] = None) -> bool:
    """Whether loading `path` (with `runtime`, or by its file type) needs torch."""
    return runtime != "onnx" and not is_onnx_path(path)


def load_model(path: str | Path, device=None, runtime: Optional[str] = None):
    """Open a trained model: a model folder or model.tar.gz (local, file:// or s3://) on torch; an exported .onnx on
    onnxruntime; an exported TorchScript file (.torchscript, .ts, .pt) on torch. `runtime="onnx"` runs the
    model.onnx of a model folder (training's export_onnx=true)."""
    if runtime not in (None, *RUNTIMES):
        raise UsageError(f"runtime={runtime!r}: use one of {', '.join(RUNTIMES)}")
    if not uses_torch(path, runtime):
        from .runtime_onnx import load_onnx

        return load_onnx(path, None if device is None else str(device))
    if str(path).lower().endswith(TORCHSCRIPT_SUFFIXES):
        from .export import load_torchscript

        return load_torchscript(path, device)
    from .model import load_model as load_torch

    return load_torch(path, device)
