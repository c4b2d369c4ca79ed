"""`unetseg export`: a trained model as ONNX (for onnxruntime) or TorchScript, with what prediction needs inside.

ONNX: dynamic batch, height and width (the runtime pads them to the stride, as torch does), opset 17 (LayerNorm
for Segformer; onnxruntime 1.16 and later run it). The exporter is torch.onnx's TorchScript-based one
(dynamo=False). Measured with torch 2.14 on resnet18 models: it exports Unet, UnetPlusPlus, MAnet, Linknet, FPN,
DeepLabV3, DeepLabV3Plus, PAN and Segformer with dynamic sides in 1-5 s each, matching torch at other sizes; the
dynamo exporter (torch's default) took 13-65 s, failed on Segformer, PAN and UPerNet, and exported PSPNet with its
pooling windows fixed for the sample size: wrong outputs at any other size, with no error.

Every export is checked before it is written: the exported model against torch on a batch of another size than the
sample it was traced with. A model that does not hold there is refused with the reason, and so is an architecture
whose graph cannot take a dynamic size (REFUSED).

The metadata (ONNX metadata_props; TorchScript extra files): the artifact's config.json whole (classes, names,
colours, normalization, stride, channels, hyperparameters) and provenance: the unetseg version that trained and the
one that exported, a content hash of the weights (`model_id`), the source and the time of export.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import replace_atomically
from .contract.errors import UnetsegError
from .model import artifact_train_config, build_model, read_artifact
from .runtime import EXPORT_FORMATS
from .runtime_onnx import CONFIG_KEY, INPUT_NAME, OUTPUT_NAME

FORMATS = EXPORT_FORMATS
OPSET = 17
TORCHSCRIPT_CONFIG = "unetseg_config.json"  # TorchScript extra file: the artifact's config.json
TORCHSCRIPT_METADATA = "unetseg_metadata.json"  # TorchScript extra file: the provenance below
FP32_TOLERANCE = 1e-4  # max abs difference of class probabilities, exported against torch
FP16_TOLERANCE = 2e-2  # fp16 weights and compute: about 3 significant digits per layer

# Architectures whose graph has no dynamic height and width, and why (what the exporter's failure means).
REFUSED = {
    "PSPNet": "its pyramid pooling averages into fixed 1/2/3/6 bins (adaptive_avg_pool2d), whose window follows the "
              "input size; ONNX pooling has fixed windows, so the model would only hold for one image size",
    "UPerNet": "its pyramid pooling module averages into fixed 1/2/3/6 bins (adaptive_avg_pool2d), whose window "
               "follows the input size; ONNX pooling has fixed windows, so the model would only hold for one size",
    "DPT": "its ViT encoder takes one image size (its position embeddings are fixed), so it has no dynamic height "
           "and width",
}


class ExportRefused(UnetsegError):
    """The model cannot be exported as asked; the message says why and what to do."""


def export_model(source: str | Path, output: str | Path, fmt: str = "onnx", fp16: bool = False) -> Path:
    """Export the model folder or model.tar.gz `source` to `output`; returns `output`."""
    if fmt not in FORMATS:
        raise ExportRefused(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    config, state, _ = read_artifact(source)
    model = build_model(artifact_train_config(config), pretrained=False)
    model.load_state_dict(state)
    metadata = provenance(config, state, source, fp16)
    data = export_bytes(model.eval(), config, metadata, fmt, fp16)
    output = Path(output)
    replace_atomically(output, lambda tmp: tmp.write_bytes(data))
    return output


def provenance(config: dict, state: dict[str, torch.Tensor], source: Any, fp16: bool) -> dict[str, str]:
    """What made this file, for a team that finds it in production."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    norm = config["normalization"]
    return {
        "unetseg.model_id": digest.hexdigest()[:16],  # the weights' content: equal ids, equal models
        "unetseg.weights_sha256": digest.hexdigest(),
        "unetseg.trained_with": str(config.get("unetseg_version", "")),
        "unetseg.exported_by": __version__,
        "unetseg.exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "unetseg.source": str(source),
        "unetseg.precision": "fp16" if fp16 else "fp32",
        "unetseg.arch": f"{config['arch']}/{config['encoder']}",
        "unetseg.classes": str(config["classes"]),
        "unetseg.class_names": json.dumps(config["class_names"]),
        "unetseg.class_colors": json.dumps(config["class_colors"]),
        "unetseg.in_channels": str(config["in_channels"]),
        "unetseg.stride": str(config["input"]["stride"]),
        "unetseg.normalization": json.dumps(norm),
        "unetseg.input": "float32 NCHW, pixels scaled to [0, 1] by bit depth then normalized as unetseg.normalization; "
                         "height and width multiples of unetseg.stride (pad bottom/right with 0)",
        "unetseg.output": "float32 logits NCHW (softmax over C gives the class probabilities)",
    }


class _Half(torch.nn.Module):
    """fp16 weights and compute inside, float32 in and out: the runtime's interface does not change."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def export_bytes(model: torch.nn.Module, config: dict, metadata: dict[str, str], fmt: str, fp16: bool) -> bytes:
    """The exported file's bytes, checked against `model` at another size than the one traced."""
    stride, channels, arch = int(config["input"]["stride"]), int(config["in_channels"]), config["arch"]
    side = max(2 * stride, int(config["input"]["image_size"]) // stride * stride)
    sample = torch.rand(1, channels, side, side)
    check = torch.rand(2, channels, side + stride, side + 2 * stride)  # another batch, height and width
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic: the check below decides
            expected = torch.softmax(model(check), 1).numpy()  # (DPT fails here: one image size)
            exported = _Half(copy.deepcopy(model)) if fp16 else model
            data = _onnx(exported, sample) if fmt == "onnx" else _torchscript(exported, sample, config, metadata)
            got = _run_onnx(data, check.numpy()) if fmt == "onnx" else _run_torchscript(data, check)
    except Exception as exc:  # noqa: BLE001 - the exporter's and the runtime's own errors: the reason, no traceback
        why = REFUSED.get(arch) or f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        raise ExportRefused(f"cannot export {arch} ({config['encoder']}) to {fmt} with a dynamic image size: {why}; "
                            "use the torch model (load_model on the model.tar.gz) for this architecture") from None
    difference = float(np.abs(_softmax(got) - expected).max())
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    if not difference <= tolerance:
        why = REFUSED.get(arch, "the exported graph does not hold for another image size than the one traced")
        raise ExportRefused(f"cannot export {arch} ({config['encoder']}) to {fmt}: at {tuple(check.shape)} its "
                            f"probabilities differ from torch's by {difference:.2g} (allowed {tolerance:g}): {why}")
    if fmt == "onnx":
        data = _with_metadata(data, {CONFIG_KEY: json.dumps(config), **metadata})
    return data


def _onnx(model: torch.nn.Module, sample: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    sides = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (sample,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: sides, OUTPUT_NAME: sides},
                      do_constant_folding=True)
    return buffer.getvalue()


def _with_metadata(data: bytes, properties: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "unetseg", __version__
    proto.doc_string = f"unetseg {properties.get('unetseg.arch', '')} segmentation model; see metadata_props"
    return proto.SerializeToString()


def _run_onnx(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: x})[0]


def _torchscript(model: torch.nn.Module, sample: torch.Tensor, config: dict, metadata: dict[str, str]) -> bytes:
    traced = torch.jit.trace(model, sample, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_CONFIG: json.dumps(config),
                                                 TORCHSCRIPT_METADATA: json.dumps(metadata)})
    return buffer.getvalue()


def _run_torchscript(data: bytes, x: torch.Tensor) -> np.ndarray:
    return torch.jit.load(io.BytesIO(data), map_location="cpu")(x).float().numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def load_torchscript(path: str | Path, device=None):
    """A Segmenter around an exported TorchScript file (torch, no segmentation-models-pytorch needed)."""
    from .contract.errors import ArtifactError
    from .segmenter import Segmenter

    files = {TORCHSCRIPT_CONFIG: "", TORCHSCRIPT_METADATA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        config = json.loads(files[TORCHSCRIPT_CONFIG])
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: not a TorchScript model that unetseg exported ({str(exc).splitlines()[0][:200]})"
                            "; export it again with `unetseg export --format torchscript`") from None
    return Segmenter(module, config, device=device)
