"""Build segmentation-models-pytorch models; save and load the model artifact (prediction: segmenter.py).

The artifact (the model dir, tarred by SageMaker to model.tar.gz) is three files, none of them pickles:
- model.safetensors: the weights;
- config.json: all that inference needs (the architecture: arch, encoder, encoder_depth, decoder_channels,
  in_channels, classes; class names and colours, normalization, input size and stride), the other hyperparameters
  it was trained with, and the best epoch's metrics. The architecture is stated once, at the top level, where the
  Segmenter, the ONNX export and its runtime read it; format 1 stated it again under "hyperparameters":
  read_artifact still reads that form (as format 2), and refuses it when the two copies differ;
- history.json: one record of metrics per epoch.
"""

from __future__ import annotations

import gzip
import inspect
import json
import math
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import replace_atomically
from .contract.config import TrainConfig
from .contract.errors import ArtifactError, ConfigError
from .segmenter import Segmenter

FORMAT = "unetseg-model"
FORMAT_VERSION = 2  # 2: the architecture only at the top level; an older unetseg then says to upgrade
WEIGHTS_FILE, CONFIG_FILE, HISTORY_FILE = "model.safetensors", "config.json", "history.json"

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# A distinct colour per class for drawn masks when the config gives none (background black).
DEFAULT_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


# --- building ----------------------------------------------------------------------------------------------------

def normalization(cfg: TrainConfig, band_stats: Optional[tuple[list[float], list[float]]] = None) -> dict[str, Any]:
    """What the model expects of its input after dividing pixels by their bit depth (data/io.py bit_depth_scale).
    `band_stats`: the (mean, std) per band that the data check measured, used where cfg.resolved_normalize is
    dataset."""
    if cfg.resolved_normalize == "per_image":
        return {"mode": "per_image"}
    if cfg.resolved_normalize == "dataset":
        if band_stats is None:
            raise ValueError("normalize=dataset needs the band statistics of the data check")
        mean, std = band_stats
        return {"mode": "mean_std", "mean": list(mean), "std": list(std), "source": "dataset"}
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
            raise ConfigError(f"hyperparameter 'encoder_depth' = {cfg.encoder_depth}: {cfg.arch} has a fixed depth "
                              "of 5")
        kwargs["encoder_depth"] = cfg.encoder_depth
    if cfg.decoder_channels is not None:  # TrainConfig allows it for DECODER_WIDTH_ARCHITECTURES only
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
    state = (load_file(path) if path.suffix == ".safetensors"
             else torch.load(path, map_location="cpu", weights_only=True))
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    own = model.encoder.state_dict()
    state = {k: _adapt_first_conv(v, own[k]) if k in own else v for k, v in state.items()}
    if not set(state) & set(own):
        raise ConfigError(f"hyperparameter 'encoder_weights' = '{path}': no tensor matches the "
                          f"{type(model.encoder).__name__} encoder")
    try:
        model.encoder.load_state_dict(state, strict=False)  # a classifier head in the file is fine to skip
    except RuntimeError as exc:
        raise ConfigError(f"hyperparameter 'encoder_weights' = '{path}': {str(exc)[:300]}") from None


def _adapt_first_conv(weight: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A pretrained RGB stem for an encoder of another channel count, as smp adapts ImageNet weights (encoders/_utils.py
    patch_first_conv): 1 channel takes the sum of the RGB filters; N channels cycle R, G, B and scale by 3/N, so that
    an input of equal bands gives the activations the RGB stem gave. Other tensors are returned as they are."""
    if weight.ndim != 4 or own.ndim != 4 or weight.shape[1] != 3 or own.shape[1] == 3 or \
            weight.shape[:1] + weight.shape[2:] != own.shape[:1] + own.shape[2:]:
        return weight
    channels = own.shape[1]
    if channels == 1:
        return weight.sum(1, keepdim=True)
    return weight[:, [i % 3 for i in range(channels)]] * (3 / channels)


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
                    init_model: Optional[str] = None, norm: Optional[dict] = None) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "unetseg_version": __version__,
        **{field: getattr(cfg, field) for field in CONFIG_ARCHITECTURE},
        "class_names": cfg.resolved_class_names, "class_colors": class_colors(cfg.class_colors, cfg.classes),
        "mask_mode": mask_mode, "normalization": norm or normalization(cfg),
        "input": {"image_size": cfg.image_size, "stride": cfg.stride},
        "hyperparameters": _without_architecture(cfg.to_hyperparameters()),
        "best": best or {},
        "init_model": init_model,  # provenance: the model this one was fine-tuned from, if any
    }


def save_artifact(model_dir: str | Path, state_dict: dict[str, torch.Tensor], config: dict, history: list) -> None:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    replace_atomically(model_dir / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp), metadata={"format": FORMAT}))
    replace_atomically(model_dir / HISTORY_FILE, lambda tmp: tmp.write_text(json.dumps(history, indent=1)))
    replace_atomically(model_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=1)))


def _locate(path: str | Path, workdir: Path) -> tuple[Path, Optional[Path]]:
    """The folder holding config.json: `path` itself, or the extracted model.tar.gz (also one inside a folder, as
    when SageMaker hands a model.tar.gz over as an input channel); and the archive it came from, if any."""
    text = str(path)
    if text.startswith("file://"):
        path = text[len("file://"):]
    elif text.startswith("s3://"):
        path = _download_s3(text, workdir)
    path = Path(path)
    archive = None
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        archives = [path / "model.tar.gz"] if (path / "model.tar.gz").is_file() else sorted(path.glob("*.tar.gz"))
        if len(archives) == 1:
            path = archives[0]
    if path.is_file():
        archive = path
        _extract(path, workdir / "model")
        path = workdir / "model"
    if not path.exists():
        raise ArtifactError(f"{path}: no such model folder or model.tar.gz")
    if not (path / CONFIG_FILE).is_file():
        nested = [p.parent for p in path.glob(f"*/{CONFIG_FILE}")]
        if len(nested) != 1:
            raise ArtifactError(f"{archive or path}: not a unetseg model (no {CONFIG_FILE})")
        path = nested[0]
    return path, archive


def _extract(archive: Path, target: Path) -> None:
    """Extract a model.tar.gz, refusing the whole archive for one member that would land outside `target` (../,
    absolute or outward links, devices: tarfile's "data" filter)."""
    try:
        is_tar = tarfile.is_tarfile(archive)
    except (OSError, EOFError, zlib.error):
        is_tar = False
    if not is_tar:
        what = "an empty file" if archive.stat().st_size == 0 else "not a tar archive"
        raise ArtifactError(f"{archive}: {what}; give a model folder or the model.tar.gz that training wrote")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    except tarfile.FilterError as exc:
        member = exc.tarinfo.name if getattr(exc, "tarinfo", None) is not None else "?"
        raise ArtifactError(f"{archive}: unsafe member {member!r} ({exc}); nothing was used from this archive: "
                            "use the model.tar.gz that training wrote") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ArtifactError(f"{archive}: truncated or corrupt model.tar.gz ({exc}); download or copy it "
                            "again") from None


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
    model.load_state_dict(state)  # read_artifact checked every name and shape
    return Segmenter(model, config, history, device)


# What must match between a trained model and a run that starts from it; the class count may differ (new head).
ARCHITECTURE_FIELDS = ("arch", "encoder", "encoder_depth", "decoder_channels", "in_channels")
# The architecture as config.json states it, at the top level (format 1 stated it again under "hyperparameters").
CONFIG_ARCHITECTURE = (*ARCHITECTURE_FIELDS, "classes")


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
    """The TrainConfig an artifact was trained with, less its encoder weights (the artifact's weights replace them):
    its hyperparameters with the architecture from the top level, where config.json states it."""
    return TrainConfig.from_hyperparameters({**config["hyperparameters"], **_architecture(config),
                                             "encoder_weights": None})


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    return {field: config[field] for field in CONFIG_ARCHITECTURE if field in config}


def _without_architecture(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters as config.json keeps them: the architecture is stated at its top level instead."""
    return {k: v for k, v in hyperparameters.items() if k not in CONFIG_ARCHITECTURE}


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Copy the tensors of `state` whose name and shape match; (tensors copied, names of those left as they were)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return len(usable), sorted(k for k in own if k not in usable)


def read_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], list]:
    """The config, the weights and the history of a model folder or model.tar.gz (local, file://, s3://), checked as a
    whole: every field that prediction reads, against the others and against the weights' names and shapes."""
    with tempfile.TemporaryDirectory(prefix="unetseg-model-") as tmp:
        folder, archive = _locate(path, Path(tmp))
        name = (lambda file: f"{file} in {archive}") if archive else (lambda file: str(folder / file))
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{name(CONFIG_FILE)}: not valid JSON ({exc})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            found = config.get("format") if isinstance(config, dict) else type(config).__name__
            raise ArtifactError(f"{name(CONFIG_FILE)}: not a unetseg model config (format={found!r})")
        if not isinstance(config.get("format_version", 0), int) or config.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"{archive or folder}: model format {config['format_version']} is newer than this "
                                f"unetseg ({__version__}) reads; upgrade unetseg")
        if not (folder / WEIGHTS_FILE).is_file():
            raise ArtifactError(f"{archive or folder}: no {WEIGHTS_FILE}")
        try:
            state = load_file(str(folder / WEIGHTS_FILE))  # safetensors: never a pickle
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every malformation
            raise ArtifactError(f"{name(WEIGHTS_FILE)}: not a readable safetensors file ({str(exc)[:200]}); the "
                                "artifact is damaged: copy it again from the model.tar.gz that training "
                                "wrote") from None
        history_file = folder / HISTORY_FILE
        try:
            history = json.loads(history_file.read_text()) if history_file.is_file() else []
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{name(HISTORY_FILE)}: not valid JSON ({exc})") from None
        check_artifact(config, state, name)
    # Read as format 2: whoever reads this config next finds the architecture in one place.
    return {**config, "hyperparameters": _without_architecture(config["hyperparameters"])}, state, history


def check_artifact(config: dict[str, Any], state: dict[str, torch.Tensor], name=lambda file: file) -> None:
    """Raise one ArtifactError naming the first field of config.json that contradicts another or the weights.

    A hand-edited config is otherwise believed: a std of 0 gives NaN probabilities and all-background masks, a
    `classes` that differs from the weights mislabels every class, a stride of 0 fails deep inside prediction."""
    where = name(CONFIG_FILE)

    def bad(field: str, problem: str) -> ArtifactError:
        return ArtifactError(f"{where}: {field} {problem}; the file was edited or damaged: restore it from the "
                             "model.tar.gz that training wrote")

    hyperparameters = config.get("hyperparameters")
    if not isinstance(hyperparameters, dict):
        raise bad("'hyperparameters'", "is missing (it is what rebuilds the network)" if hyperparameters is None
                  else f"is {type(hyperparameters).__name__}, not an object of hyperparameters")
    for field in CONFIG_ARCHITECTURE:
        if field not in config:
            raise bad(f"'{field}'", "is missing")
    twice = [field for field in CONFIG_ARCHITECTURE if field in hyperparameters]  # format 1 (or an edit)
    try:
        if twice:  # which copy built the weights is unknown: they must agree
            copy = TrainConfig.from_hyperparameters({**_architecture(config), **hyperparameters,
                                                     "encoder_weights": None})
            for field in twice:
                theirs = getattr(copy, field)
                if config[field] != (list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
                    raise bad(f"'{field}'", f"is {config[field]!r}, but its hyperparameters say {theirs!r} (the "
                                            "architecture is stated twice, as unetseg wrote it before model format 2, "
                                            "and the copies differ)")
        cfg = artifact_train_config(config)
    except ConfigError as exc:
        raise bad("'hyperparameters'", f"do not parse: {exc}") from None
    _check_list(bad, config, "class_names", cfg.classes, lambda v: isinstance(v, str), "a name (text)")
    _check_list(bad, config, "class_colors", cfg.classes, _is_colour, "[r, g, b] with values 0..255")
    if config.get("mask_mode") not in ("binary", "index", "palette"):
        raise bad("'mask_mode'", f"is {config.get('mask_mode')!r}, not binary, index or palette")
    shape = config.get("input")
    if not isinstance(shape, dict):
        raise bad("'input'", "is missing (it holds the stride that images are padded to)")
    if shape.get("stride") != cfg.stride:
        raise bad("'input.stride'", f"is {shape.get('stride')!r}, but encoder_depth={cfg.encoder_depth} needs "
                                    f"{cfg.stride} (2**encoder_depth)")
    _check_normalization(bad, config.get("normalization"), cfg.in_channels)
    _check_weights(state, cfg, name(WEIGHTS_FILE))


def _check_list(bad, config: dict, field: str, count: int, valid, what: str) -> None:
    value = config.get(field)
    if not isinstance(value, list) or len(value) != count:
        raise bad(f"'{field}'", f"is {value!r}; it needs {count} entries, one per class (classes={count})")
    wrong = [v for v in value if not valid(v)]
    if wrong:
        raise bad(f"'{field}'", f"has {wrong[0]!r}; each entry must be {what}")


def _is_colour(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)


def _check_normalization(bad, norm: Any, channels: int) -> None:
    if not isinstance(norm, dict) or norm.get("mode") not in ("per_image", "mean_std"):
        raise bad("'normalization'", f"is {norm!r}; expected mode per_image, or mean_std with a mean and std per "
                                     "channel")
    if norm["mode"] == "per_image":
        return
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        values = norm.get(key)
        numbers = isinstance(values, list) and all(type(v) in (int, float) for v in values)  # bool is no number
        if not numbers or len(values) != channels or not all(math.isfinite(v) and v > low for v in values):
            need = "numbers above 0" if key == "std" else "finite numbers"
            raise bad(f"'normalization.{key}'", f"is {values!r}; it needs {channels} {need}, one per input channel "
                                                f"(in_channels={channels})")


def _check_weights(state: dict[str, torch.Tensor], cfg: TrainConfig, where: str) -> None:
    """Every tensor the config's architecture has, of the shape it has there, and finite."""
    with torch.device("meta"):  # the architecture's names and shapes, without allocating it
        expected = {k: tuple(v.shape) for k, v in build_model(cfg, pretrained=False).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    differ = [f"{k} is {list(found[k])} there, {list(v)} here"
              for k, v in expected.items() if k in found and found[k] != v]
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if differ or missing or extra:
        details = differ[:2] + [f"missing {', '.join(missing[:3])}"] * bool(missing) + \
            [f"unexpected {', '.join(extra[:3])}"] * bool(extra)
        raise ArtifactError(f"{where}: the weights do not match the architecture in {CONFIG_FILE} ({cfg.arch}/"
                            f"{cfg.encoder}, encoder_depth={cfg.encoder_depth}, in_channels={cfg.in_channels}, "
                            f"classes={cfg.classes}): " + "; ".join(details))
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{where}: tensor {key} holds NaN or infinite values; the weights are damaged (or "
                                "training diverged): use another model")
