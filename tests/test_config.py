import json
import re

import pytest

from support import REPO
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import ConfigError


def toolkit_decode(hps: dict[str, str]) -> dict:
    """What sagemaker-training does to hyperparameters.json before SM_HPS: json.loads each value if it can."""
    out = {}
    for key, value in hps.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


CONFIGS = [
    {},
    {"encoder_weights": None, "decoder_channels": [32, 16, 8], "encoder_depth": 3, "image_size": 64,
     "classes": 3, "class_names": ["bg", "cell", "123"], "channels_last": False, "compile": True, "lr": 1e-5},
    {"classes": 2, "class_colors": [[0, 0, 0], [255, 0, 0]], "mask_mode": "palette", "num_workers": 3,
     "encoder": "mit_b2", "encoder_weights": "/opt/ml/input/data/weights/encoder.safetensors"},
    {"encoder": "tu-convnext_tiny.fb_in22k", "encoder_weights": "imagenet"},
    {"classes": 3, "class_weights": [0.5, 2, 10], "loss": "ce"},
    {"class_weights": "auto"},
]


@pytest.mark.parametrize("fields", CONFIGS)
def test_round_trip_is_lossless(fields):
    cfg = TrainConfig(**fields)
    hps = cfg.to_hyperparameters()
    assert all(isinstance(v, str) for v in hps.values())
    assert TrainConfig.from_hyperparameters(hps) == cfg  # hyperparameters.json, every value a string
    assert TrainConfig.from_hyperparameters(toolkit_decode(hps)) == cfg  # SM_HPS, values JSON-decoded


def test_sagemaker_string_forms_parse():
    cfg = TrainConfig.from_hyperparameters({
        "channels_last": "True", "compile": "false", "lr": "0.001", "epochs": "40", "encoder_weights": "None",
        "class_names": '["bg", "cell"]', "decoder_channels": "256,128,64,32,16", "num_workers": "null",
    })
    assert cfg.channels_last is True and cfg.compile is False
    assert cfg.lr == 0.001 and cfg.epochs == 40 and cfg.encoder_weights is None
    assert cfg.class_names == ["bg", "cell"] and cfg.decoder_channels == [256, 128, 64, 32, 16]
    assert TrainConfig.from_hyperparameters({"class_weights": "auto"}).class_weights == "auto"
    assert TrainConfig.from_hyperparameters({"class_weights": "1, 4.5"}).class_weights == [1.0, 4.5]  # a command line
    assert TrainConfig.from_hyperparameters({"class_weights": "None"}).class_weights is None


def test_a_number_for_a_string_field_is_read_as_its_text():
    # The training toolkit JSON-decodes "123" to 123 even for a string field: the encoder check sees the text.
    with pytest.raises(ConfigError, match="hyperparameter 'encoder' = 123: not an encoder of segmentation-models"):
        TrainConfig.from_hyperparameters({"encoder": 123})


def test_keys_sagemaker_adds_are_ignored():
    cfg = TrainConfig.from_hyperparameters({"epochs": "3", "_tuning_objective_metric": "val_miou",
                                            "sagemaker_estimator_module": "x", "sagemaker_job_name": "y"})
    assert cfg.epochs == 3


@pytest.mark.parametrize("fields, expected", [
    ({"optimizer": "adamx"}, ["'optimizer'", "'adamx'", "adamw, adam, sgd"]),
    ({"lrr": 0.1}, ["unknown hyperparameter 'lrr'", "did you mean 'lr'"]),
    ({"lr": "-1"}, ["'lr'", "greater than 0"]),
    ({"epochs": "abc"}, ["'epochs'", "'abc'", "integer"]),
    ({"amp": "bf32"}, ["'amp'", "auto, bf16, fp16, off"]),
    ({"channels_last": "maybe"}, ["'channels_last'", "boolean"]),
    ({"image_size": 100}, ["image_size=100", "multiple of 2**encoder_depth=32"]),
    ({"class_names": ["a"]}, ["class_names has 1 names", "classes=2"]),
    ({"classes": 1}, ["'classes'", "greater than or equal to 2"]),
    ({"decoder_channels": [8, 8]}, ["decoder_channels=[8, 8]", "encoder_depth=5"]),
    ({"decoder_channels": "[1,2"}, ["'decoder_channels'", "valid list"]),
    ({"mask_mode": "palette"}, ["mask_mode=palette needs class_colors"]),
    ({"class_colors": [[0, 0, 0], [0, 0, 300]]}, ["[0, 0, 300]", "0..255"]),
    ({"mask_mode": "binary", "classes": 3}, ["mask_mode=binary needs classes=2"]),
    ({"class_weights": "equal"}, ["'class_weights' = 'equal'", "auto, none, a list of numbers, one per class"]),
    ({"class_weights": "1,x"}, ["'class_weights' = '1,x'", "a list of numbers"]),
    ({"class_weights": [1, 2, 3]}, ["class_weights has 3 weights but classes=2"]),
    ({"class_weights": [0, 0]}, ["class_weights=[0.0, 0.0]", "at least one > 0"]),
    ({"class_weights": "auto", "loss": "focal"}, ["use loss=ce or dice_ce, not loss=focal"]),
    ({"classes": 3, "class_names": ["bg", "Cell Nucleus", "cell-nucleus"]},
     ["class_names 'Cell Nucleus' and 'cell-nucleus'", "val_iou_cell_nucleus", "rename"]),
    ({"class_names": ["", "class"]}, ["class_names '' and 'class'", "val_iou_class"]),
])
def test_bad_values_name_the_key_and_what_is_allowed(fields, expected):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**fields)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message
    assert "\n" not in message  # one problem, one line


def test_several_problems_in_one_error():
    with pytest.raises(ConfigError) as info:
        TrainConfig(epochs=0, batch_size=0, optimizer="x")
    message = str(info.value)
    assert "'epochs'" in message and "'batch_size'" in message and "'optimizer'" in message


def test_replace_revalidates():
    cfg = TrainConfig()
    assert cfg.replace(epochs=3).epochs == 3
    with pytest.raises(ConfigError):
        cfg.replace(epochs=0)


# --- encoder names: the torch-free list, tied to the installed segmentation-models-pytorch and timm ---------------

def test_the_encoder_list_is_smps():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from unetseg.contract.encoders import SMP_ENCODERS

    assert sorted(SMP_ENCODERS) == sorted(smp.encoders.get_encoder_names())
    for name, weights in SMP_ENCODERS.items():
        assert weights == tuple(smp.encoders.encoders[name]["pretrained_settings"]), name


def test_every_timm_model_name_is_accepted_after_tu():
    timm = pytest.importorskip("timm")
    from timm.models import _factory

    from unetseg.contract.encoders import TIMM_SOURCES, encoder_problem

    names = set(timm.list_models()) | set(timm.list_models(pretrained=True))
    assert len(names) > 1000
    refused = [name for name in names if encoder_problem("tu-" + name)]
    assert refused == []
    assert set(TIMM_SOURCES) == set(_factory._MODEL_SOURCES) | set(_factory._MODEL_SOURCE_ALIASES)


@pytest.mark.parametrize("name", ["timm-regnetx_002", "timm-res2net50_26w_4s", "timm-resnest14d",
                                  "timm-mobilenetv3_large_100", "timm-gernet_s"])
def test_names_smp_renames_to_timm_models_are_accepted(name):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from unetseg.contract.encoders import encoder_problem

    assert smp.encoders.is_equivalent_to_timm_universal(name) and encoder_problem(name) is None
    assert not smp.encoders.is_equivalent_to_timm_universal("timm-convnext_tiny")
    assert encoder_problem("timm-convnext_tiny") is not None


@pytest.mark.parametrize("name", ["resnet43", "efficientnet_b4", "ResNet50", "mobilenet-v2", "unet",
                                  "tu-ConvNeXt_Tiny", "tu-convnext tiny", "tu-", "tu-hf-hub:", "timm-convnext_tiny"])
def test_names_refused_here_are_names_smp_refuses(name):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from unetseg.contract.encoders import encoder_problem

    assert encoder_problem(name) is not None
    with pytest.raises((KeyError, RuntimeError, ValueError)):
        smp.encoders.get_encoder(name, weights=None)


@pytest.mark.parametrize("encoder, weights, fragment", [
    ("resnext101_32x48d", "imagenet", "has no imagenet weights in segmentation-models-pytorch (it has instagram"),
    ("dpn92", "imagenet", "choose an encoder with imagenet weights such as dpn"),
    ("resnet34", "ImageNet", "did you mean 'imagenet'?"),
    ("resnet34", "noisy-student", "use imagenet"),
    ("efficientnet-b0", "advprop", "by the name 'imagenet' only"),
])
def test_encoder_weights_smp_cannot_give_are_refused(encoder, weights, fragment):
    with pytest.raises(ConfigError) as info:
        TrainConfig(encoder=encoder, encoder_weights=weights)
    assert f"hyperparameter 'encoder_weights' = {weights!r}: " in str(info.value) and fragment in str(info.value)


# --- the README's hyperparameter table, against TrainConfig ------------------------------------------------------

NOT_IN_THE_TABLE = "Not in the table"  # the README's paragraph that names every other field


def _readme_hyperparameters() -> tuple[dict[str, str], list[str], list[str]]:
    """{name: default as the README's table states it}, the names listed as not in the table, and rows that do not
    state one default per name."""
    text = (REPO / "README.md").read_text().split("## Hyperparameters", 1)[1].split("\n## ", 1)[0]
    stated, uneven = {}, []
    for row in (line for line in text.splitlines() if line.startswith("| `")):
        names_cell, defaults_cell = row.split(" | ")[:2]
        names = re.findall(r"`([a-z_0-9]+)`", names_cell)
        defaults = [d.strip().strip("`") for d in defaults_cell.split(",")]
        if len(defaults) != len(names):
            uneven.append(f"{names} with the defaults {defaults}")
        stated.update(zip(names, defaults))
    others = [re.findall(r"`([a-z_0-9]+)`", paragraph) for paragraph in text.split("\n\n")
              if paragraph.startswith(NOT_IN_THE_TABLE)]
    return stated, [name for paragraph in others for name in paragraph], uneven


def _states(field: str, written: str) -> bool:
    """Whether the README's `written` is TrainConfig's default of `field` (None: none, or what the field's description
    says none means, such as auto)."""
    info = TrainConfig.model_fields[field]
    default = info.default
    if default is None:
        meaning = re.search(r"none = ([^;,)]+)", info.description or "")
        return written == "none" or (meaning is not None and written == meaning.group(1).strip())
    if isinstance(default, bool):
        return written == json.dumps(default)
    if isinstance(default, (int, float)):
        try:
            return float(written) == default
        except ValueError:
            return False
    return written == str(default)


def test_the_readme_table_states_every_hyperparameter_as_trainconfig_defines_it():
    """Every field of TrainConfig is in the README's table, with its name and default, or named in the paragraph below
    it that lists the others; the README names no field TrainConfig lacks."""
    stated, others, uneven = _readme_hyperparameters()
    fields = list(TrainConfig.model_fields)
    problems = [f"a row without one default per name: {row}" for row in uneven]
    unknown = sorted((set(stated) | set(others)) - set(fields))
    problems += [f"names hyperparameters TrainConfig does not have: {unknown}"] if unknown else []
    missing = [name for name in fields if name not in stated and name not in others]
    problems += [f"neither shows nor lists (after {NOT_IN_THE_TABLE!r}): {missing}"] if missing else []
    both = sorted(set(stated) & set(others))
    problems += [f"both shows and lists: {both}"] if both else []
    defaults = {name: TrainConfig.model_fields[name].default for name in fields}
    problems += [f"{name}: the table says {written!r}, TrainConfig's default is {defaults[name]!r}"
                 for name, written in stated.items() if name in fields and not _states(name, written)]
    assert not problems, "README's hyperparameters drift from TrainConfig:\n" + "\n".join(problems)
