"""`ignore_index`: any dataset's void label (CamVid 11, VOC 255, ...) is left out of the data check's pixel counts,
the loss and the metrics, and a mask value that is neither a class nor the void is refused naming both."""

import numpy as np
import pytest
import torch

from support import write_pair
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import ConfigError, DataError
from unetseg.contract.metrics_log import per_class_names
from unetseg.data.checks import check_dataset
from unetseg.data.masks import IGNORE_INDEX
from unetseg.data.scan import pair_channel
from unetseg.losses import build_loss
from unetseg.metrics import confusion, summarize
from unetseg.synthetic import demo_hyperparameters, make_demo_dataset

CFG = TrainConfig(encoder_weights=None, image_size=32)
VOID = 11  # CamVid's void label, with 11 classes 0..10


def camvid_like(root, count=2, size=16, seed=0):
    """Masks with classes 0..10 and a void band (value 11) along the top rows."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        mask = rng.integers(0, VOID, (size, size), dtype=np.uint8)
        mask[:4] = VOID
        write_pair(root, f"f{i}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mask)
    return root


def test_the_void_value_is_refused_until_ignore_index_names_it(tmp_path):
    camvid_like(tmp_path)
    with pytest.raises(DataError) as info:
        check_dataset(pair_channel(tmp_path), CFG.replace(classes=11))
    message = str(info.value)
    assert "masks/f0.png" in message and "11" in message and "ignore_index=255" in message and "0..10" in message

    checked = check_dataset(pair_channel(tmp_path), CFG.replace(classes=11, ignore_index=VOID))
    assert checked.codec.mode == "index"
    # Pixel counts: the void rows are in no class (16 x 12 labelled pixels per file).
    assert checked.class_pixels.sum() == 2 * 16 * 12 and len(checked.class_pixels) == 11
    # Decoded, the void is the engine's one ignore value, whatever the files use.
    mask = checked.cached[0][1]
    assert (mask[:4] == IGNORE_INDEX).all() and mask[4:].max() < 11


def test_a_value_neither_class_nor_void_names_the_value_and_ignore_index(tmp_path):
    camvid_like(tmp_path)
    mask = np.zeros((16, 16), np.uint8)
    mask[0, 0] = 255  # VOC's void, but this dataset's void is 11
    write_pair(tmp_path, "odd", np.zeros((16, 16, 3), np.uint8), mask)
    with pytest.raises(DataError) as info:
        check_dataset(pair_channel(tmp_path), CFG.replace(classes=11, ignore_index=VOID))
    message = str(info.value)
    assert "masks/odd.png" in message and "255" in message and "ignore_index=11" in message


def test_binary_masks_with_their_own_void_value(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[8:] = 255
    mask[:, :2] = 128
    write_pair(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), mask)
    checked = check_dataset(pair_channel(tmp_path), CFG.replace(ignore_index=128))
    assert checked.codec.mode == "binary"
    assert list(checked.class_pixels) == [8 * 14, 8 * 14]  # the two void columns are neither class
    decoded = checked.cached[0][1]
    assert (decoded[:, :2] == IGNORE_INDEX).all() and set(np.unique(decoded[:, 2:])) == {0, 1}


def test_ignore_index_inside_the_class_range_is_refused_and_stored_in_the_hyperparameters():
    with pytest.raises(ConfigError) as info:
        TrainConfig(classes=151, ignore_index=0, encoder_weights=None)
    assert "ignore_index=0" in str(info.value) and "0..150" in str(info.value)
    cfg = TrainConfig(classes=11, ignore_index=VOID, encoder_weights=None)
    assert TrainConfig.from_hyperparameters(cfg.to_hyperparameters()).ignore_index == VOID
    assert TrainConfig(encoder_weights=None).ignore_index == 255
    # The void is not a class: no metric carries its name.
    assert len(per_class_names(cfg.resolved_class_names)) == 2 * 11


def test_void_pixels_count_in_neither_the_loss_nor_the_metrics(tmp_path):
    camvid_like(tmp_path, count=1)
    checked = check_dataset(pair_channel(tmp_path), CFG.replace(classes=11, ignore_index=VOID))
    target = torch.from_numpy(checked.cached[0][1]).long()[None]
    logits = torch.randn(1, 11, 16, 16)
    changed = logits.clone()
    changed[..., :4, :] = torch.randn(1, 11, 4, 16) * 10  # other predictions on the void rows only
    for name in ("ce", "dice_ce", "focal"):
        loss = build_loss(name)
        assert float(loss(changed, target)) == pytest.approx(float(loss(logits, target)), rel=1e-5), name
    matrix = confusion(changed.argmax(1), target, 11)
    assert int(matrix.sum()) == 16 * 12 and torch.equal(matrix, confusion(logits.argmax(1), target, 11))


@pytest.mark.slow
def test_a_dataset_with_void_11_learns_and_scores_without_the_void(tmp_path):
    """The demo's objects on textured noise (masks 0/255); a band of each image is void = 11 over pixels that are
    pure noise: the model learns, and the scores count none of the band's pixels."""
    from PIL import Image

    from unetseg.training import RunPaths, train

    data = make_demo_dataset(tmp_path / "data", kind="binary", train=32, validation=8, size=64)
    rng = np.random.default_rng(1)
    for mask_path in sorted(data.glob("*/masks/*.png")):
        mask = np.array(Image.open(mask_path))
        mask[:, :12] = VOID
        Image.fromarray(mask).save(mask_path)
        image_path = mask_path.parent.parent / "images" / mask_path.name
        image = np.array(Image.open(image_path))
        image[:, :12] = rng.integers(0, 256, (64, 12, 3), dtype=np.uint8)
        Image.fromarray(image).save(image_path)
    cfg = TrainConfig(**{**demo_hyperparameters("binary"), "epochs": 8, "seed": 0, "ignore_index": VOID})
    paths = RunPaths(data / "train", data / "validation", tmp_path / "model", tmp_path / "ckpt", tmp_path / "out")
    result = train(cfg, paths, progress=False)
    assert result.best["val_miou"] >= 0.7, [(h["epoch"], round(h["val_miou"], 3)) for h in result.history]
    assert [key for key in result.history[-1] if key.startswith("val_iou_")] == ["val_iou_background", "val_iou_object"]

    from unetseg.model import load_model

    model = load_model(paths.model_dir, device="cpu")
    val = check_dataset(pair_channel(data / "validation"), cfg)
    assert val.codec.mode == "binary" and val.class_pixels.sum() == 8 * 64 * 52  # the band is in no class
    matrix = sum(confusion(torch.from_numpy(model.predict(img)), torch.from_numpy(mask), 2) for img, mask in val.cached)
    assert int(matrix.sum()) == 8 * 64 * 52  # the void band is scored nowhere
    assert summarize(matrix, cfg.resolved_class_names)["val_miou"] == pytest.approx(result.best["val_miou"], abs=1e-6)
