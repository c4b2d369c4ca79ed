import json
import subprocess
import sys

import pytest

from unetseg.config import TrainConfig
from unetseg.errors import ConfigError


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
     "encoder": "123", "encoder_weights": "/opt/ml/input/data/weights/encoder.safetensors"},
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


def test_config_does_not_import_torch():
    code = "import sys, unetseg.config, unetseg.metrics_log, unetseg.sagemaker_env, unetseg.data.scan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
