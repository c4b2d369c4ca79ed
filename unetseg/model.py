"""Build segmentation-models-pytorch models; save and load the model artifact (prediction: segmenter.py).

The artifact (the model dir, tarred by SageMaker to model.tar.gz) is three files, none of them pickles:
- model.safetensors: the weights;
- config.json: all that inference needs (architecture, encoder, classes and names, colours, normalization,
  input size and stride) plus the training hyperparameters and the best epoch's metrics;
- history.json: one record of metrics per epoch.
"""

from __future__ import annotations

import inspect
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file, save_file

from .segmenter import Segmenter

from . import __version__
from .atomic import replace_atomically
from .config import TrainConfig
from .errors import ArtifactError, ConfigError

FORMAT = "unetseg-model"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, HISTORY_FILE = "model.safetensors", "config.json", "history.json"

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# A distinct colour per class for drawn masks when the config gives none (background black).
DEFAULT_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


# --- building ----------------------------------------------------------------------------------------------------

def normalization(cfg: TrainConfig) -> dict[str, Any]:
    """What the model expects of its input after scaling pixels to [0, 1] by their bit depth."""
    if cfg.normalize == "per_image":
        return {"mode": "per_image"}
    if cfg.in_channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:  # smp folds a pretrained RGB stem into other channel counts; the grey statistics match that
        mean, std = (sum(IMAGENET_MEAN) / 3,) * cfg.in_channels, (sum(IMAGENET_STD) / 3,) * cfg.in_channels
    return {"mode": "mean_std", "mean": list(mean), "std": list(std)}


def class_colors(cfg_colors: Optional[Sequence[Sequence[int]]], classes: int) -> list[list[int]]:
    if cfg_colors:
        return [list(c) for c in cfg_colors]
    rng = np.random.default_rng(classes)
    extra = [tuple(int(v) for v in rng.integers(40, 256, 3)) for _ in range(max(0, classes - len(DEFAULT_PALETTE)))]
    return [list(c) for c in (DEFAULT_PALETTE + extra)[:classes]]


def build_model(cfg: TrainConfig, *, pretrained: bool = True) -> torch.nn.Module:
    """The smp model the config describes; `pretrained=False` skips encoder weights (loading an artifact)."""
    cls = getattr(smp, cfg.arch)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    if cfg.encoder_depth != 5:
        if "encoder_depth" not in accepted:
            raise ConfigError(f"hyperparameter 'encoder_depth' = {cfg.encoder_depth}: {cfg.arch} has a fixed depth of 5")
        kwargs["encoder_depth"] = cfg.encoder_depth
    if cfg.decoder_channels is not None:
        if "decoder_channels" not in accepted:
            raise ConfigError(f"hyperparameter 'decoder_channels': {cfg.arch} does not take a list of decoder widths")
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
    weights = cfg.encoder_weights if pretrained else None
    path_weights = weights is not None and weights != "imagenet"
    try:
        model = cls(encoder_name=cfg.encoder, encoder_weights=None if path_weights else weights,
                    in_channels=cfg.in_channels, classes=cfg.classes, **kwargs)
    except KeyError as exc:
        if "encoder" in str(exc).lower() and "weights" not in str(exc).lower():
            raise ConfigError(f"hyperparameter 'encoder' = {cfg.encoder!r}: not an smp encoder "
                              f"(e.g. resnet34, efficientnet-b0, mobilenet_v2, or tu-<timm model>)") from None
        raise ConfigError(f"hyperparameter 'encoder_weights' = {weights!r}: {exc}") from None
    except OSError as exc:  # the Hugging Face hub download of pretrained weights
        raise ConfigError(
            f"hyperparameter 'encoder_weights' = {weights!r}: could not fetch the pretrained weights of "
            f"{cfg.encoder} ({type(exc).__name__}). Without network access, bake them into the image "
            f"or pass a local weights file, or set encoder_weights=none"
        ) from None
    if path_weights:
        _load_encoder_file(model, Path(weights))
    return model


def _load_encoder_file(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"hyperparameter 'encoder_weights' = '{path}': no such file")
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    own = model.encoder.state_dict()
    if not set(state) & set(own):
        raise ConfigError(f"hyperparameter 'encoder_weights' = '{path}': no tensor matches the {type(model.encoder).__name__} encoder")
    try:
        model.encoder.load_state_dict(state, strict=False)  # a classifier head in the file is fine to skip
    except RuntimeError as exc:
        raise ConfigError(f"hyperparameter 'encoder_weights' = '{path}': {str(exc)[:300]}") from None


def freeze_unused(model: torch.nn.Module, in_channels: int, stride: int) -> list[str]:
    """Stop training parameters that the forward pass never reaches (encoder stages beyond encoder_depth).

    DDP refuses parameters without gradients, and the optimizer would only decay them. Found by probing, so it
    holds for every architecture and encoder.
    """
    was_training = model.training
    model.eval()  # BatchNorm in training mode rejects the probe's 1x1 deepest features
    model.zero_grad(set_to_none=True)
    model(torch.zeros(1, in_channels, 2 * stride, 2 * stride)).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    model.train(was_training)
    return unused


# --- the artifact -----------------------------------------------------------------------------------------------

def artifact_config(cfg: TrainConfig, mask_mode: str, best: Optional[dict] = None,
                    init_model: Optional[str] = None) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "unetseg_version": __version__,
        "arch": cfg.arch, "encoder": cfg.encoder, "encoder_depth": cfg.encoder_depth,
        "decoder_channels": cfg.decoder_channels, "in_channels": cfg.in_channels, "classes": cfg.classes,
        "class_names": cfg.resolved_class_names, "class_colors": class_colors(cfg.class_colors, cfg.classes),
        "mask_mode": mask_mode, "normalization": normalization(cfg),
        "input": {"image_size": cfg.image_size, "stride": cfg.stride},
        "hyperparameters": cfg.to_hyperparameters(), "best": best or {},
        "init_model": init_model,  # provenance: the model this one was fine-tuned from, if any
    }


def save_artifact(model_dir: str | Path, state_dict: dict[str, torch.Tensor], config: dict, history: list) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    replace_atomically(model_dir / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp), metadata={"format": FORMAT}))
    replace_atomically(model_dir / HISTORY_FILE, lambda tmp: tmp.write_text(json.dumps(history, indent=1)))
    replace_atomically(model_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=1)))


def _locate(path: str | Path, workdir: Path) -> Path:
    """The folder holding config.json: `path` itself, or the extracted model.tar.gz (also one inside a folder, as
    when SageMaker hands a model.tar.gz over as an input channel)."""
    text = str(path)
    if text.startswith("file://"):
        path = text[len("file://"):]
    elif text.startswith("s3://"):
        path = _download_s3(text, workdir)
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        archives = [path / "model.tar.gz"] if (path / "model.tar.gz").is_file() else sorted(path.glob("*.tar.gz"))
        if len(archives) == 1:
            path = archives[0]
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            tar.extractall(workdir / "model", filter="data")
        path = workdir / "model"
    if not path.exists():
        raise ArtifactError(f"{path}: no such model folder or model.tar.gz")
    if not (path / CONFIG_FILE).is_file():
        nested = [p.parent for p in path.glob(f"*/{CONFIG_FILE}")]
        if len(nested) != 1:
            raise ArtifactError(f"{path}: not a unetseg model (no {CONFIG_FILE})")
        path = nested[0]
    return path


def _download_s3(uri: str, workdir: Path) -> Path:
    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    target = workdir / (Path(key).name or "model.tar.gz")
    boto3.client("s3").download_file(bucket, key, str(target))
    return target


def load_model(path: str | Path, device: str | torch.device | None = None) -> Segmenter:
    """Open a model folder, a model.tar.gz (local, file:// or s3://) written by unetseg training."""
    config, state, history = read_artifact(path)
    model = build_model(artifact_train_config(config), pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not match the architecture in {CONFIG_FILE}: {str(exc)[:300]}") from None
    return Segmenter(model, config, history, device)


# What must match between a trained model and a run that starts from it; the class count may differ (new head).
ARCHITECTURE_FIELDS = ("arch", "encoder", "encoder_depth", "decoder_channels", "in_channels")


def read_init_model(path: str | Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Fine-tuning: the weights of a trained unetseg model, after checking that `cfg` builds the same architecture
    (the class count may differ: the segmentation head then starts fresh)."""
    config, state, _ = read_artifact(path)
    clash = artifact_train_config(config).compare(cfg, ARCHITECTURE_FIELDS)
    if clash:
        raise ConfigError(f"init model {path} has a different architecture ("
                          + ", ".join(f"{k}: {theirs} there, {ours} here" for k, theirs, ours in clash)
                          + "); train with its values or start without it")
    return state


def artifact_train_config(config: dict[str, Any]) -> TrainConfig:
    """The TrainConfig an artifact was trained with, less its encoder weights (the artifact's weights replace them)."""
    return TrainConfig.from_hyperparameters({**config["hyperparameters"], "encoder_weights": None})


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Copy the tensors of `state` whose name and shape match; (tensors copied, names of those left as they were)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return len(usable), sorted(k for k in own if k not in usable)


def read_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], list]:
    """The checked config, the weights and the history of a model folder or model.tar.gz (local, file://, s3://)."""
    with tempfile.TemporaryDirectory(prefix="unetseg-model-") as tmp:
        folder = _locate(path, Path(tmp))
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{folder / CONFIG_FILE}: not valid JSON ({exc})") from None
        if config.get("format") != FORMAT:
            raise ArtifactError(f"{folder / CONFIG_FILE}: not a unetseg model config (format={config.get('format')!r})")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"{folder}: model format {config['format_version']} is newer than this unetseg "
                                f"({__version__}) reads; upgrade unetseg")
        if not (folder / WEIGHTS_FILE).is_file():
            raise ArtifactError(f"{folder}: no {WEIGHTS_FILE}")
        state = load_file(str(folder / WEIGHTS_FILE))
        history_file = folder / HISTORY_FILE
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
    return config, state, history
