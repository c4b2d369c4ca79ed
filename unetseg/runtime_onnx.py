"""Run an exported ONNX model (unetseg export) with onnxruntime: no torch, same padding, tiling and TTA as torch.

The file carries what prediction needs in its metadata properties (export.py writes them): the model's config.json
whole under CONFIG_KEY, and, for a person or another tool reading the file, its classes, normalization, stride and
provenance under their own keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .contract.errors import ArtifactError
from .inference import NumpyOps, SegmenterBase

ONNX_FILE = "model.onnx"  # beside config.json in a model folder (training's export_onnx), and export's default
CONFIG_KEY = "unetseg.config"  # metadata property: the artifact's config.json, verbatim
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class OnnxSegmenter(SegmenterBase):
    """A Segmenter whose model call is an onnxruntime session (float32 NCHW normalized input, logits out)."""

    def __init__(self, session, config: dict, metadata: Optional[dict] = None, source: str = ""):
        super().__init__(config, None, NumpyOps())
        self.session, self.source = session, source
        self.metadata = dict(metadata or {})
        self.device = f"onnxruntime {session.get_providers()[0]}"  # what the server logs
        self.input_name = session.get_inputs()[0].name

    def run_model(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]


def load_onnx(path: str | Path, device: Optional[str] = None) -> OnnxSegmenter:
    """An exported model.onnx, or the model.onnx in a model folder, ready to predict. `device`: cpu (default) or
    cuda (onnxruntime's CUDA provider, where the installed onnxruntime has it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ArtifactError(f"{path}: running an ONNX model needs onnxruntime; pip install 'unetseg[onnx]'") from None
    path = Path(path)
    if path.is_dir():
        path = path / ONNX_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ONNX model; export one with `unetseg export --model <model.tar.gz> "
                            f"--output {path.name}`, or train with export_onnx=true")
    providers = ["CPUExecutionProvider"]
    if str(device or "cpu").startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ArtifactError(f"{path}: device {device} asked for, but this onnxruntime has no CUDA provider "
                                "(install onnxruntime-gpu), or use cpu")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdecimal() and int(threads) > 0:  # the server shares the cores among its workers this way
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a damaged or foreign file
        raise ArtifactError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]}); export it again "
                            "with `unetseg export`") from None
    metadata = session.get_modelmeta().custom_metadata_map
    try:
        config = json.loads(metadata[CONFIG_KEY])
        if not all(key in config for key in ("class_names", "class_colors", "in_channels", "normalization", "input")):
            raise KeyError(CONFIG_KEY)  # what prediction reads
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path}: an ONNX model without unetseg's metadata ({CONFIG_KEY}); export it with "
                            "`unetseg export`, which records the classes, normalization and stride in it") from None
    return OnnxSegmenter(session, config, {k: v for k, v in metadata.items() if k != CONFIG_KEY}, str(path))
