"""The encoder names segmentation-models-pytorch accepts, and the pretrained weights it has for each: plain data, so
that the notebook checks `encoder` and `encoder_weights` without importing torch (smp imports it).

Three kinds of name reach smp's `get_encoder`:
- smp's own encoders (`SMP_ENCODERS`, from smp 0.6's `encoders` table; tests/test_config.py checks it against the
  installed smp), each with the names of the weights smp can download for it;
- `tu-<timm model>`: any model of timm's registry, optionally with a pretrained tag (`tu-convnext_tiny.fb_in22k`), or
  a model from the Hugging Face Hub or a folder (`tu-hf-hub:org/name`). Accepted by their shape, not by a list: timm
  has about 1,400 architectures, differing by version between this notebook and the image, and whether one can serve
  as an encoder (features_only) is known only by building it, which needs torch. The shape is checked against every
  name of the installed timm in the tests;
- the deprecated `timm-regnet*`, `timm-res2*`, ... names, which smp renames to `tu-` models.

unetseg loads pretrained weights by one name, 'imagenet' (any other value is a weights file: unetseg/model.py).
"""

from __future__ import annotations

import difflib
import re
from typing import Optional

IMAGENET = "imagenet"

# smp 0.6: encoder name -> the pretrained weights smp offers for it (smp.encoders.encoders[name]["pretrained_settings"])
SMP_ENCODERS: dict[str, tuple[str, ...]] = {
    "resnet18": ("imagenet", "ssl", "swsl"),
    "resnet34": ("imagenet",),
    "resnet50": ("imagenet", "ssl", "swsl"),
    "resnet101": ("imagenet",),
    "resnet152": ("imagenet",),
    "resnext50_32x4d": ("imagenet", "ssl", "swsl"),
    "resnext101_32x4d": ("ssl", "swsl"),
    "resnext101_32x8d": ("imagenet", "instagram", "ssl", "swsl"),
    "resnext101_32x16d": ("instagram", "ssl", "swsl"),
    "resnext101_32x32d": ("instagram",),
    "resnext101_32x48d": ("instagram",),
    "dpn68": ("imagenet",),
    "dpn68b": ("imagenet+5k",),
    "dpn92": ("imagenet+5k",),
    "dpn98": ("imagenet",),
    "dpn107": ("imagenet+5k",),
    "dpn131": ("imagenet",),
    "vgg11": ("imagenet",),
    "vgg11_bn": ("imagenet",),
    "vgg13": ("imagenet",),
    "vgg13_bn": ("imagenet",),
    "vgg16": ("imagenet",),
    "vgg16_bn": ("imagenet",),
    "vgg19": ("imagenet",),
    "vgg19_bn": ("imagenet",),
    "senet154": ("imagenet",),
    "se_resnet50": ("imagenet",),
    "se_resnet101": ("imagenet",),
    "se_resnet152": ("imagenet",),
    "se_resnext50_32x4d": ("imagenet",),
    "se_resnext101_32x4d": ("imagenet",),
    "densenet121": ("imagenet",),
    "densenet169": ("imagenet",),
    "densenet201": ("imagenet",),
    "densenet161": ("imagenet",),
    "inceptionresnetv2": ("imagenet", "imagenet+background"),
    "inceptionv4": ("imagenet", "imagenet+background"),
    **{f"efficientnet-b{i}": ("imagenet", "advprop") for i in range(8)},
    "mobilenet_v2": ("imagenet",),
    "xception": ("imagenet",),
    **{f"timm-efficientnet-b{i}": ("imagenet", "advprop", "noisy-student") for i in range(8)},
    "timm-efficientnet-b8": ("imagenet", "advprop"),
    "timm-efficientnet-l2": ("noisy-student", "noisy-student-475"),
    **{f"timm-tf_efficientnet_lite{i}": ("imagenet",) for i in range(5)},
    "timm-skresnet18": ("imagenet",),
    "timm-skresnet34": ("imagenet",),
    "timm-skresnext50_32x4d": ("imagenet",),
    **{f"mit_b{i}": ("imagenet",) for i in range(6)},
    **{f"mobileone_s{i}": ("imagenet",) for i in range(5)},
}

TIMM_PREFIX = "tu-"
# Deprecated smp names that smp itself turns into tu- models (smp.encoders.is_equivalent_to_timm_universal).
TIMM_RENAMED_PREFIXES = ("timm-regnet", "timm-res2", "timm-resnest", "timm-mobilenetv3", "timm-gernet")
# A timm registry name, optionally with a pretrained tag; or a model from a source timm knows (timm's
# _MODEL_SOURCES and their aliases, in timm/models/_factory.py), which names a Hub repository or a folder.
_TIMM_NAME = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)?$")
TIMM_SOURCES = ("hf-hub", "hf_hub", "local-dir")

# File suffixes of an encoder state dict (unetseg/model.py reads .safetensors with safetensors, others with torch.load)
WEIGHTS_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def encoder_problem(name: str) -> Optional[str]:
    """Why smp would not build an encoder of this name, or None."""
    if name in SMP_ENCODERS:
        return None
    if name.startswith(TIMM_PREFIX) or name.startswith(TIMM_RENAMED_PREFIXES):
        model = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name[len("timm-"):]
        source, colon, identifier = model.partition(":")
        if colon and source.lower() in TIMM_SOURCES:
            return None if identifier else f"names no model after '{source}:'"
        if _TIMM_NAME.match(model):
            return None
        hint = f" (did you mean {TIMM_PREFIX + model.lower()!r}?)" if _TIMM_NAME.match(model.lower()) else ""
        return (f"not a timm model name{hint}: after 'tu-' comes a timm model in lower case, e.g. "
                "tu-convnext_tiny or tu-resnet50.a1_in1k (timm.list_models() lists them)")
    close = difflib.get_close_matches(name.lower(), list(SMP_ENCODERS), n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (f"not an encoder of segmentation-models-pytorch; {hint}e.g. resnet34, efficientnet-b4, mit_b2, or "
            "tu-<timm model> such as tu-convnext_tiny")


def encoder_weights_problem(encoder: str, weights: Optional[str]) -> Optional[str]:
    """Why these pretrained weights cannot be loaded into this encoder, or None (also for a weights file: it lies in
    the container, where only the engine can open it)."""
    if weights is None or weights == IMAGENET:
        if weights == IMAGENET and encoder in SMP_ENCODERS and IMAGENET not in SMP_ENCODERS[encoder]:
            return (f"{encoder} has no imagenet weights in segmentation-models-pytorch (it has "
                    f"{', '.join(SMP_ENCODERS[encoder])}, which unetseg does not load by name): set encoder_weights "
                    "to none, or to a weights file, or choose an encoder with imagenet weights such as "
                    f"{_with_imagenet(encoder)}")
        return None
    if "/" in weights or "\\" in weights or weights.lower().endswith(WEIGHTS_FILE_SUFFIXES):
        return None  # a weights file
    offered = SMP_ENCODERS.get(encoder, ())
    if weights in offered:
        return (f"unetseg loads pretrained weights by the name 'imagenet' only ({encoder} also has {weights} weights "
                "in segmentation-models-pytorch, but unetseg does not load them); use imagenet, none, or a weights "
                "file")
    close = difflib.get_close_matches(weights.lower(), [IMAGENET, "none"], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (f"{hint}use imagenet (downloaded pretrained weights), none (random initialisation), or the path of an "
            f"encoder weights file ({', '.join(WEIGHTS_FILE_SUFFIXES)})")


def _with_imagenet(encoder: str) -> str:
    with_imagenet = [n for n, weights in SMP_ENCODERS.items() if IMAGENET in weights]
    return difflib.get_close_matches(encoder, with_imagenet, n=1, cutoff=0)[0]
