"""The model artifact: safetensors + JSON, opened from a folder or a model.tar.gz, never unpickled."""

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from support import TINY
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import ArtifactError
from unetseg.model import artifact_config, build_model, freeze_unused, load_model, save_artifact

CFG = TrainConfig(**TINY, classes=3, class_names=["bg", "a", "b"])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(CFG)
    folder = tmp_path_factory.mktemp("model")
    config = artifact_config(CFG, "index", {"epoch": 1, "val_miou": 0.5})
    save_artifact(folder, model.state_dict(), config, [{"epoch": 1}])
    tar_path = folder.parent / "model.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for path in folder.iterdir():
            tar.add(path, arcname=path.name)
    return model.eval(), folder, tar_path


def test_folder_and_tarball_give_the_same_predictions_at_any_size(artifact):
    model, folder, tar_path = artifact
    a, b = load_model(folder, device="cpu"), load_model(tar_path, device="cpu")
    rng = np.random.default_rng(0)
    for shape in [(32, 32, 3), (37, 53, 3), (8, 100, 3)]:  # not multiples of the stride (8)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mask = a.predict(image)
        assert mask.shape == shape[:2] and mask.dtype == np.uint8 and mask.max() < 3
        assert np.array_equal(mask, b.predict(image))
        probs = a.predict_proba(image)
        assert probs.shape == (3, *shape[:2]) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert a.class_names == ["bg", "a", "b"] and a.history == [{"epoch": 1}]
    assert json.loads((folder / "config.json").read_text())["best"]["val_miou"] == 0.5


def test_prediction_matches_the_model_on_the_padded_image(artifact):
    model, folder, _ = artifact
    segmenter = load_model(folder, device="cpu")
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        expected = model(x).argmax(1)[0].numpy()
    assert np.array_equal(segmenter.predict(image), expected)


def test_loading_never_unpickles(artifact, monkeypatch):
    _, folder, tar_path = artifact

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load_model")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_model(folder, device="cpu")
    load_model(tar_path, device="cpu")
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.pth"))


def test_bad_artifacts_are_named(artifact, tmp_path):
    _, folder, _ = artifact
    with pytest.raises(ArtifactError, match="no such model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="not a unetseg model config"):
        load_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ArtifactError, match="upgrade unetseg"):
        load_model(tmp_path)
    other = CFG.replace(classes=2, class_names=None)
    (tmp_path / "config.json").write_text(json.dumps(artifact_config(other, "binary")))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="weights do not match"):
        load_model(tmp_path)


def test_wrong_channel_count_is_a_clear_error(artifact):
    segmenter = load_model(artifact[1], device="cpu")
    with pytest.raises(ValueError, match="3-channel"):
        segmenter.predict(np.zeros((16, 16), np.uint8))


def test_unused_encoder_stages_are_frozen():
    model = build_model(CFG)
    unused = freeze_unused(model, 3, CFG.stride)
    assert unused and all(name.startswith(("encoder.layer3", "encoder.layer4")) for name in unused)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in unused)


def test_encoder_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = build_model(CFG)
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    model = build_model(CFG.replace(encoder_weights=str(tmp_path / "enc.safetensors")))
    pairs = zip(model.encoder.state_dict().values(), source.encoder.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    from unetseg.contract.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        build_model(CFG.replace(encoder_weights=str(tmp_path / "nope.pth")))
    with pytest.raises(ConfigError, match="'encoder' = 'resnet999'"):
        build_model(CFG.replace(encoder="resnet999"))


def test_init_model_copies_every_matching_tensor_and_a_new_class_count_gets_a_fresh_head(artifact, tmp_path):
    from unetseg.model import load_matching, read_init_model

    trained, _, tar_path = artifact
    # A folder holding model.tar.gz, as SageMaker delivers an input channel.
    channel = tmp_path / "init_model"
    channel.mkdir()
    (channel / "model.tar.gz").write_bytes(tar_path.read_bytes())
    (channel / "output.tar.gz").write_bytes(b"not this one")

    torch.manual_seed(1)
    same = build_model(CFG, pretrained=False)
    copied, fresh = load_matching(same, read_init_model(channel, CFG))
    assert fresh == [] and copied == len(same.state_dict())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in same.state_dict().items())

    five = CFG.replace(classes=5, class_names=None)
    torch.manual_seed(1)
    wider = build_model(five, pretrained=False)
    head_before = {k: v.clone() for k, v in wider.state_dict().items() if k.startswith("segmentation_head")}
    _, fresh = load_matching(wider, read_init_model(tar_path, five))
    assert fresh == sorted(head_before) and fresh  # only the head, which keeps its own initialisation
    assert all(torch.equal(wider.state_dict()[k], v) for k, v in head_before.items())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in wider.state_dict().items() if k not in head_before)


def test_init_model_with_another_architecture_names_the_differences(artifact):
    from unetseg.contract.errors import ConfigError
    from unetseg.model import read_init_model

    other = CFG.replace(encoder_depth=4, decoder_channels=[32, 16, 8, 8], in_channels=1)
    with pytest.raises(ConfigError) as info:
        read_init_model(artifact[2], other)
    message = str(info.value)
    assert str(artifact[2]) in message
    assert "encoder_depth: 3 there, 4 here" in message and "in_channels: 3 there, 1 here" in message
    with pytest.raises(ArtifactError, match="no such model folder"):
        read_init_model(artifact[2].parent / "missing.tar.gz", CFG)


# --- config.json states the architecture once ------------------------------------------------------------------------

ARCHITECTURE = ("arch", "encoder", "encoder_depth", "decoder_channels", "in_channels", "classes")
# What unetseg wrote before format 2 (by the code of that time, for CFG): the architecture at the top level and again
# under "hyperparameters".
TWO_COPIES = Path(__file__).parent / "artifacts" / "config-two-copies.json"


def test_config_json_states_the_architecture_once_at_the_top_level(artifact):
    from unetseg.model import artifact_train_config

    config = json.loads((artifact[1] / "config.json").read_text())
    assert not set(ARCHITECTURE) & set(config["hyperparameters"]), "the architecture is written twice"
    assert {k: config[k] for k in ARCHITECTURE} == {k: getattr(CFG, k) for k in ARCHITECTURE}
    assert artifact_train_config(config) == CFG  # the whole TrainConfig: the hyperparameters and the architecture
    segmenter = load_model(artifact[1], device="cpu")
    assert segmenter.in_channels == 3 and segmenter.class_names == ["bg", "a", "b"]


def old_artifact(folder, edit=None):
    """A model folder as the code before format 2 wrote it: the weights of `artifact`, the config of that time."""
    folder.mkdir()
    config = json.loads(TWO_COPIES.read_text())
    if edit:
        edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_artifact_with_the_architecture_twice_still_loads_and_predicts_the_same(artifact, tmp_path):
    _, folder, _ = artifact
    old = old_artifact(tmp_path / "old")
    (old / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert set(ARCHITECTURE) <= set(json.loads((old / "config.json").read_text())["hyperparameters"])  # format 1
    then, now = load_model(old, device="cpu"), load_model(folder, device="cpu")
    image = np.random.default_rng(3).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    assert np.array_equal(then.predict_proba(image), now.predict_proba(image))
    assert then.in_channels == 3 and then.class_names == ["bg", "a", "b"]
    assert not set(ARCHITECTURE) & set(then.config["hyperparameters"])  # read as format 2: one copy

    from unetseg.model import read_init_model

    assert read_init_model(old, CFG).keys() == now.model.state_dict().keys()  # fine-tuning from it, too


@pytest.mark.parametrize("field, value", [("in_channels", 1), ("encoder", "resnet34"), ("classes", 2),
                                          ("decoder_channels", [16, 8, 4])])
def test_an_old_artifact_whose_two_copies_disagree_is_refused_naming_both(artifact, tmp_path, field, value):
    """Which copy built the weights cannot be known from the file: neither wins, and the message says so."""
    old = old_artifact(tmp_path / "old", lambda config: config.update({field: value}))
    (old / "model.safetensors").write_bytes((artifact[1] / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError) as info:
        load_model(old, device="cpu")
    message = str(info.value)
    assert str(old / "config.json") in message and f"'{field}' is {value!r}" in message
    assert "twice" in message and "hyperparameters say" in message and "restore it" in message


# --- the architecture list is smp's ----------------------------------------------------------------------------------

def smp_architectures() -> dict:
    """smp's own mapping, built from its classes as its __init__.py builds MODEL_ARCHITECTURES_MAPPING."""
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp._MODEL_ARCHITECTURES}


def test_every_architecture_we_accept_is_an_smp_architecture_and_none_is_left_out():
    from unetseg.contract.config import ARCHITECTURES

    assert sorted(ARCHITECTURES) == sorted(smp_architectures())


def takes_decoder_widths(cls) -> bool:
    """Whether an smp architecture's constructor takes `decoder_channels` as a sequence of widths, one per stage
    (DeepLabV3, PAN and UPerNet take one int under the same name)."""
    import collections.abc
    import inspect
    import typing

    parameter = inspect.signature(cls.__init__).parameters.get("decoder_channels")
    return parameter is not None and typing.get_origin(parameter.annotation) is collections.abc.Sequence


def test_one_rule_for_decoder_channels_derived_from_smp_signatures():
    from unetseg.contract.config import DECODER_WIDTH_ARCHITECTURES

    assert sorted(DECODER_WIDTH_ARCHITECTURES) == sorted(a for a, cls in smp_architectures().items()
                                                        if takes_decoder_widths(cls))


@pytest.mark.parametrize("arch", ["Linknet", "FPN", "DeepLabV3", "PAN", "UPerNet", "Segformer"])
def test_decoder_channels_for_an_architecture_without_decoder_widths_is_refused_in_the_notebook(arch):
    from unetseg.contract.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        TrainConfig(**{**TINY, "arch": arch})
    message = str(info.value)
    assert "decoder_channels" in message and arch in message and "Unet, UnetPlusPlus, MAnet" in message


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "MAnet"])
def test_decoder_widths_reach_the_model(arch):
    model = build_model(CFG.replace(arch=arch), pretrained=False)
    widths = [m.out_channels for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths[-1] == 8  # the last of [32, 16, 8]
