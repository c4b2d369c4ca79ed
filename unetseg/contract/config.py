"""TrainConfig: the one hyperparameter schema, used by the notebook client and by the container.

The client validates hyperparameters before any AWS call and sends them with `to_hyperparameters()`; the container
parses what SageMaker hands it (strings such as "True", "0.001", JSON lists, or the training toolkit's JSON-decoded
values) with `TrainConfig.from_hyperparameters()`. Both directions live here so that they cannot drift apart.
This module must not import torch.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .encoders import encoder_problem, encoder_weights_problem
from .errors import ConfigError
from .metrics_log import class_metric, metric_name_clashes
from .sagemaker_env import TUNING_MARKER

# segmentation-models-pytorch architectures, by class name: smp's own list, kept here as a literal because this module
# must not import torch; tests/test_model.py holds it to smp's classes.
ARCHITECTURES = (
    "Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet",
    "DeepLabV3", "DeepLabV3Plus", "PAN", "UPerNet", "Segformer", "DPT",
)
# Those whose constructor takes `decoder_channels` as a list of widths, one per encoder stage (DeepLabV3, PAN and
# UPerNet take a single int by that name): the one rule for the hyperparameter, tied to smp's signatures by a test.
DECODER_WIDTH_ARCHITECTURES = ("Unet", "UnetPlusPlus", "MAnet")

# Keys that SageMaker itself adds to a job's hyperparameters: the HyperparameterTuner's objective and the SDK's
# framework metadata. They are not ours to validate.
_SAGEMAKER_KEYS_PREFIXES = ("sagemaker_", TUNING_MARKER)

_NONE_STRINGS = ("none", "null", "")


class TrainConfig(BaseModel):
    """Every knob of a training job. Defaults suit a real GPU job with ImageNet weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- model -------------------------------------------------------------------------------------------------
    arch: Literal[ARCHITECTURES] = Field("Unet", description="smp architecture")  # type: ignore[valid-type]
    encoder: str = Field("resnet34", min_length=1,
                         description="smp encoder name, e.g. resnet34, efficientnet-b4, tu-convnext_tiny")
    encoder_weights: Optional[str] = Field(
        "imagenet",
        description="pretrained encoder weights: 'imagenet', none, or a path to a .safetensors/.pth encoder state dict",
    )
    encoder_depth: int = Field(5, ge=1, le=5,
                               description="number of encoder stages; the input size must divide by 2**depth")
    decoder_channels: Optional[list[int]] = Field(
        None, description=f"decoder widths, one per encoder stage ({', '.join(DECODER_WIDTH_ARCHITECTURES)}); none = "
        "the architecture's default"
    )
    in_channels: int = Field(3, ge=1, le=64, description="image channels: 1 for grayscale, 3 for RGB, N for N-band "
                             "TIFF or .npy images (multispectral)")
    classes: int = Field(2, ge=2, le=255, description="number of classes, background included (2 = binary)")
    class_names: Optional[list[str]] = Field(None, description="one name per class; default class_0, class_1, ...")
    class_colors: Optional[list[list[int]]] = Field(
        None, description="one [r, g, b] per class: decodes RGB palette masks and colours predictions"
    )
    mask_mode: Literal["auto", "binary", "index", "palette"] = Field(
        "auto",
        description="how mask pixels map to classes: binary ({0,255} or {0,1}), index (0..C-1, ignore_index = void), "
        "palette (RGB through class_colors); auto decides from the data",
    )
    label_attribute: Optional[str] = Field(
        None, description="Ground Truth manifests: the label attribute to train on, where a manifest has several"
    )
    ignore_index: int = Field(
        255, ge=0, le=255,
        description="the mask value of unlabelled (void) pixels, left out of the loss, the metrics and the pixel "
        "counts; outside 0..classes-1 (VOC and Cityscapes 255, CamVid 11)",
    )

    # --- optimisation ------------------------------------------------------------------------------------------
    epochs: int = Field(20, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=4096, description="images per device per step")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate")
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov)")
    weight_decay: float = Field(1e-4, ge=0, le=1)
    scheduler: Literal["cosine", "onecycle", "poly", "constant"] = Field("cosine", description="per-step LR schedule")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length (cosine, poly, constant)")
    grad_clip_norm: float = Field(0.0, ge=0, description="clip the gradient norm to this value; 0 = off")
    loss: Literal["dice", "ce", "dice_ce", "focal"] = Field("dice_ce", description="ce is binary CE when classes=2")
    class_weights: Optional[Union[Literal["auto"], list[float]]] = Field(
        None,
        description="weights of the cross-entropy term (loss ce or dice_ce) for rare classes: one per class, or auto "
        "(1/sqrt of each class's pixel share in the training data); none = equal",
    )
    early_stopping_patience: int = Field(
        0, ge=0, description="stop after this many epochs without a better val_miou; 0 = off")

    # --- data --------------------------------------------------------------------------------------------------
    image_size: int = Field(256, ge=16, le=8192, description="square training crop; must divide by 2**encoder_depth")
    augment: Literal["none", "light", "default", "strong"] = "default"
    normalize: Literal["auto", "imagenet", "dataset", "per_image"] = Field(
        "auto",
        description="pixels are first divided by their bit depth (8-bit by 255, 16-bit by 65535, floats as they are); "
        "then imagenet: ImageNet mean/std; dataset: each band's mean/std measured on the training data; "
        "per_image: zero mean, unit std per image; auto: imagenet for 1 or 3 channels, dataset for other counts"
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="held-out fraction when there is no validation channel")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    num_workers: Optional[int] = Field(None, ge=0, le=64, description="DataLoader workers per process; none = auto")
    cache_images: Literal["auto", "on", "off"] = Field(
        "auto", description="keep decoded images in RAM; auto = when they fit in a quarter of the memory"
    )

    # --- speed -------------------------------------------------------------------------------------------------
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="mixed precision on CUDA; auto = bf16 where supported, else fp16")
    channels_last: bool = Field(True, description="NHWC memory format on CUDA")
    compile: bool = Field(False, description="torch.compile the model")
    log_every: int = Field(0, ge=0, description="print a step line every N optimizer steps; 0 = epoch lines only")

    # --- the artifact ------------------------------------------------------------------------------------------
    export_onnx: bool = Field(False, description="also write model.onnx (onnxruntime: CPU serving, predict "
                                                 "without torch); an architecture that cannot export is skipped, "
                                                 "with the reason")

    # ------------------------------------------------------------------------------------------------------------
    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, data)) from None

    @model_validator(mode="before")
    @classmethod
    def _decode_strings(cls, data: Any) -> Any:
        """Accept SageMaker's string-valued hyperparameters ("True", "0.001", '["a","b"]') field by field."""
        if not isinstance(data, Mapping):
            return data
        return {key: _decode_value(cls.model_fields[key].annotation, value) if key in cls.model_fields else value
                for key, value in data.items()}

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, encoder: str) -> str:
        """smp refuses an unknown encoder only inside the container, after the instances have started."""
        problem = encoder_problem(encoder)
        if problem:
            raise ValueError(problem)
        return encoder

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainConfig:
        weights_problem = encoder_weights_problem(self.encoder, self.encoder_weights)
        if weights_problem:
            raise ValueError(f"hyperparameter 'encoder_weights' = {self.encoder_weights!r}: {weights_problem}")
        stride = 2 ** self.encoder_depth
        if self.image_size % stride:
            raise ValueError(f"image_size={self.image_size} must be a multiple of 2**encoder_depth={stride}")
        if self.decoder_channels is not None:
            if any(c < 1 for c in self.decoder_channels):
                raise ValueError(f"decoder_channels={self.decoder_channels} must be positive")
            if self.arch not in DECODER_WIDTH_ARCHITECTURES:
                raise ValueError(f"decoder_channels={self.decoder_channels}: {self.arch} takes no list of decoder "
                                 f"widths; only {', '.join(DECODER_WIDTH_ARCHITECTURES)} do: leave decoder_channels "
                                 "unset (none) for the architecture's default")
            if len(self.decoder_channels) != self.encoder_depth:
                raise ValueError(
                    f"decoder_channels={self.decoder_channels} needs one width per encoder stage "
                    f"(encoder_depth={self.encoder_depth})"
                )
        if self.class_names is not None:
            if len(self.class_names) != self.classes:
                raise ValueError(f"class_names has {len(self.class_names)} names but classes={self.classes}")
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError(f"class_names={self.class_names} has duplicates")
            for names in metric_name_clashes(self.class_names):
                raise ValueError(f"class_names {' and '.join(repr(n) for n in names)} give the same metric name "
                                 f"{class_metric('val_iou', names[0])}; rename one so that each class has its own")
        if self.class_colors is not None:
            if len(self.class_colors) != self.classes:
                raise ValueError(f"class_colors has {len(self.class_colors)} colours but classes={self.classes}")
            for colour in self.class_colors:
                if len(colour) != 3 or any(not 0 <= c <= 255 for c in colour):
                    raise ValueError(f"class_colors entry {colour} is not [r, g, b] with values 0..255")
            if len({tuple(c) for c in self.class_colors}) != self.classes:
                raise ValueError("class_colors has duplicate colours")
        if isinstance(self.class_weights, list):
            if len(self.class_weights) != self.classes:
                raise ValueError(f"class_weights has {len(self.class_weights)} weights but classes={self.classes}")
            if any(w < 0 for w in self.class_weights) or not any(w > 0 for w in self.class_weights):
                raise ValueError(f"class_weights={self.class_weights}: weights must be >= 0, at least one > 0")
        if self.class_weights is not None and self.loss not in ("ce", "dice_ce"):
            raise ValueError("class_weights weigh the cross-entropy term: use loss=ce or dice_ce, "
                             f"not loss={self.loss} (dice already averages over classes, so rare classes count as "
                             "much as common ones)")
        if self.mask_mode == "palette" and self.class_colors is None:
            raise ValueError("mask_mode=palette needs class_colors")
        if self.ignore_index < self.classes:
            raise ValueError(
                f"ignore_index={self.ignore_index} is one of the classes 0..{self.classes - 1}; the void value must be "
                f"outside them (a mask holding 0 = void and classes 1..N, as ADE20K's, needs its labels shifted down "
                f"by one with the void set to 255: unetseg does not renumber classes silently)")
        if self.mask_mode == "binary" and self.classes != 2:
            raise ValueError(f"mask_mode=binary needs classes=2, got classes={self.classes}")
        return self

    # --- the SageMaker round trip ------------------------------------------------------------------------------
    @classmethod
    def from_hyperparameters(cls, hyperparameters: Mapping[str, Any]) -> TrainConfig:
        """Parse a job's hyperparameters (string-valued, or JSON-decoded by the training toolkit)."""
        ours = {k: v for k, v in hyperparameters.items() if not str(k).startswith(_SAGEMAKER_KEYS_PREFIXES)}
        return cls(**ours)

    def to_hyperparameters(self) -> dict[str, str]:
        """Every field as the string SageMaker carries; `from_hyperparameters` reads it back to an equal config."""
        return {name: value if isinstance(value, str) else json.dumps(value)
                for name, value in self.model_dump().items()}

    def compare(self, other: TrainConfig, fields: Optional[Sequence[str]] = None) -> list[tuple[str, Any, Any]]:
        """(name, this value, the other's value) of each of `fields` (default: all) where the two configs differ."""
        names = fields if fields is not None else list(type(self).model_fields)
        return [(k, getattr(self, k), getattr(other, k)) for k in names if getattr(self, k) != getattr(other, k)]

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed, validated like a new config."""
        return type(self)(**{**self.model_dump(exclude_unset=False), **changes})

    # --- derived facts ------------------------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        """Input sides must be multiples of this for the encoder-decoder to line up."""
        return 2 ** self.encoder_depth

    @property
    def resolved_normalize(self) -> str:
        """imagenet, dataset or per_image: what `normalize` means for this channel count."""
        if self.normalize == "auto":
            return "imagenet" if self.in_channels in (1, 3) else "dataset"
        return self.normalize

    @property
    def resolved_class_names(self) -> list[str]:
        return list(self.class_names) if self.class_names else [f"class_{i}" for i in range(self.classes)]

    @classmethod
    def describe_fields(cls) -> list[tuple[str, str, str]]:
        """(name, default, description) for help texts and docs."""
        rows = []
        for name, field in cls.model_fields.items():
            choices = _literal_choices(field.annotation)
            text = field.description or ""
            if choices:
                text = f"{text} [{'|'.join(choices)}]".strip()
            rows.append((name, json.dumps(field.default), text))
        return rows


# --- helpers ---------------------------------------------------------------------------------------------------

def _members(annotation: Any) -> tuple[list[Any], bool]:
    """The types a field accepts, and whether None is one of them."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _literal_choices(annotation: Any) -> list[str]:
    members, _ = _members(annotation)
    return [str(c) for m in members if typing.get_origin(m) is Literal for c in typing.get_args(m)]


def _decode_value(annotation: Any, value: Any) -> Any:
    members, optional = _members(annotation)
    inner = members[0]
    if isinstance(value, str):
        if optional and value.strip().lower() in _NONE_STRINGS:
            return None
        if value in _literal_choices(annotation):
            return value  # e.g. class_weights="auto"
        if any(typing.get_origin(m) is list for m in members):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return value  # pydantic reports it as not a list
            return [part.strip() for part in text.split(",")]  # "bg,cell" from a command line
        return value  # pydantic's lax mode parses "True", "0.001", "40"
    if inner is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # the training toolkit JSON-decodes "123" to 123 even for string fields
    return value


def _describe(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """One message naming each bad key, its value, and what is allowed."""
    known = list(TrainConfig.model_fields)
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        key = loc[0] if loc else ""
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"unknown hyperparameter '{key}'{hint}; known: {', '.join(known)}")
            continue
        if not key:  # a cross-field rule from _check_consistency
            problems.append(err["msg"].removeprefix("Value error, "))
            continue
        annotation = TrainConfig.model_fields[key].annotation
        members, optional = _members(annotation)
        choices = _literal_choices(annotation)
        if choices and len(members) > 1:  # a word or a list (class_weights): pydantic's loc names union members
            where = key
            allowed = choices + ["none"] * optional + ["a list of numbers, one per class"]
            reason = "allowed values: " + ", ".join(allowed)
        else:
            where = key + "".join(f"[{p}]" for p in loc[1:])
            reason = f"allowed values: {', '.join(choices)}" if choices else err["msg"].removeprefix("Value error, ")
        problems.append(f"hyperparameter '{where}' = {data.get(key)!r}: {reason}")
    # pydantic reports a value once per union member; keep each message once, in order
    unique = list(dict.fromkeys(problems))
    return unique[0] if len(unique) == 1 else "invalid hyperparameters:\n  " + "\n  ".join(unique)
