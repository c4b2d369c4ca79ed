"""Multispectral and N-channel images: N-band TIFFs (interleaved, planar, a page per band, pyramids, GeoTIFF no-data)
and .npy arrays read as N channels, per-band statistics measured in the data check, augmentations for any band count,
pretrained stems adapted to N channels, and N-band images through predict, the server and the client's serializer."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import tifffile
import torch

from support import TINY, wsgi_call
from unetseg.contract import codecs
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import DataError, ImageTooLargeError
from unetseg.contract.sagemaker_env import MAX_IMAGE_MB_ENV
from unetseg.data.checks import check_dataset
from unetseg.data.io import read_image
from unetseg.data.masks import IGNORE_INDEX
from unetseg.data.scan import pair_channel
from unetseg.data.transforms import train_transform

BANDS = 7


def write_tiff(path, hwc: np.ndarray, layout: str = "contig", **kwargs) -> None:
    """An N-band TIFF as GIS tools write them: bands interleaved (contig), planar (separate), or one page each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "pages":
        tifffile.imwrite(path, np.moveaxis(hwc, -1, 0), photometric="minisblack", **kwargs)
    elif layout == "separate":
        tifffile.imwrite(path, np.moveaxis(hwc, -1, 0), photometric="minisblack", planarconfig="separate", **kwargs)
    elif hwc.shape[2] == 1:
        tifffile.imwrite(path, hwc[..., 0], photometric="minisblack", **kwargs)
    else:
        tifffile.imwrite(path, hwc, photometric="minisblack", planarconfig="contig", **kwargs)


def write_mask(path, mask: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def bands(rng, size=32, channels=BANDS, dtype=np.uint16) -> np.ndarray:
    return rng.integers(0, 4000, (size, size, channels)).astype(dtype)


# --- reading ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contig", "separate", "pages"])
def test_an_n_band_tiff_is_read_as_n_channels_whatever_its_layout(tmp_path, layout):
    image = bands(np.random.default_rng(0))
    write_tiff(tmp_path / "a.tif", image, layout)
    got = read_image(tmp_path / "a.tif")
    assert got.shape == (32, 32, BANDS) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, image)


def test_a_4_band_tiff_is_four_bands_not_rgba(tmp_path):
    image = bands(np.random.default_rng(1), channels=4)
    write_tiff(tmp_path / "rgbn.tif", image)
    np.testing.assert_array_equal(read_image(tmp_path / "rgbn.tif"), image)


def test_a_pyramid_tiff_is_read_at_full_resolution(tmp_path):
    image = bands(np.random.default_rng(2), size=64, channels=5)
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as tif:
        tif.write(image, subifds=1, photometric="minisblack", planarconfig="contig")
        tif.write(image[::2, ::2], subfiletype=1, photometric="minisblack", planarconfig="contig")
    np.testing.assert_array_equal(read_image(tmp_path / "pyramid.tif"), image)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.uint8])
def test_npy_images_are_read_as_hwc_of_their_dtype(tmp_path, dtype):
    image = np.random.default_rng(3).random((16, 24, BANDS)).astype(dtype)
    np.save(tmp_path / "a.npy", image)
    np.save(tmp_path / "gray.npy", image[..., 0])
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), image)
    assert read_image(tmp_path / "gray.npy").shape == (16, 24, 1)


def test_the_size_limit_counts_every_band_of_tiff_and_npy_before_decoding(tmp_path, monkeypatch):
    image = np.zeros((256, 256, BANDS), np.uint16)  # 896 KiB decoded; one band would be 128 KiB
    write_tiff(tmp_path / "big.tif", image, "separate", compression="zlib")
    np.save(tmp_path / "big.npy", image)
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "0.5")
    for name in ("big.tif", "big.npy"):
        with pytest.raises(ImageTooLargeError, match=rf"{name}: .*256x256 image \({BANDS} channel\(s\) of 16 bits\)"):
            read_image(tmp_path / name)


def test_a_truncated_npy_is_refused_from_its_header(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((64, 64, BANDS), np.float32))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="a.npy: .*truncated"):
        read_image(tmp_path / "a.npy")


# --- the data check: no-data, float ranges, per-band statistics ---------------------------------------------------

def test_geotiff_nodata_pixels_are_ignored_in_the_mask_and_the_statistics(tmp_path):
    rng = np.random.default_rng(4)
    image = bands(rng) + 1  # no valid pixel is all zero
    image[:8] = 0  # the top 8 rows: no data in every band
    image[8:10, :, 0] = 0  # zero in one band only: data
    mask = rng.integers(0, 2, (32, 32), dtype=np.uint8)
    write_tiff(tmp_path / "train/images/a.tif", image, extratags=[(42113, "s", 0, "0", True)])
    write_mask(tmp_path / "train/masks/a.png", mask)
    cfg = TrainConfig(**TINY, in_channels=BANDS, classes=2)
    checked = check_dataset(pair_channel(tmp_path / "train"), cfg)

    from unetseg.data.io import read_image_valid

    _, valid = read_image_valid(tmp_path / "train/images/a.tif")
    assert valid is not None and not valid[:8].any() and valid[8:].all()
    cached_mask = checked.cached[0][1]
    assert (cached_mask[:8] == IGNORE_INDEX).all() and (cached_mask[8:] < 2).all()
    assert checked.class_pixels.sum() == 24 * 32  # the no-data rows are no class's
    data = image[8:].reshape(-1, BANDS).astype(np.float64) / 65535
    mean, std = checked.band_stats
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, data.std(0), rtol=1e-6)


def test_float_images_outside_0_1_need_measured_normalization(tmp_path):
    image = np.random.default_rng(5).normal(300, 40, (32, 32, 1)).astype(np.float32)  # e.g. temperatures in kelvin
    write_tiff(tmp_path / "train/images/a.tif", image)
    write_mask(tmp_path / "train/masks/a.png", np.zeros((32, 32), np.uint8))
    samples = pair_channel(tmp_path / "train")
    with pytest.raises(DataError, match=r"a.tif: float pixel values .* outside \[0, 1\].*normalize=dataset"):
        check_dataset(samples, TrainConfig(**TINY, in_channels=1, normalize="imagenet"))
    mean, std = check_dataset(samples, TrainConfig(**TINY, in_channels=1, normalize="dataset")).band_stats
    assert mean[0] == pytest.approx(float(image.astype(np.float64).mean()), rel=1e-6)  # floats are taken as they are
    assert std[0] == pytest.approx(float(image.astype(np.float64).std()), rel=1e-6)


def _two_ranks(run):
    """`run(rank, gather)` in two threads that exchange their facts as torch.distributed's all-gather does."""
    slots, barrier, results = [None, None], threading.Barrier(2, timeout=60), [None, None]

    def gather_for(rank):
        def gather(value):
            slots[rank] = value
            barrier.wait()
            everyone = list(slots)
            barrier.wait()
            return everyone
        return gather

    def target(rank):
        results[rank] = run(rank, gather_for(rank))

    threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def test_band_statistics_match_numpy_across_two_shards(tmp_path):
    rng = np.random.default_rng(6)
    images = []
    for i in range(5):  # sizes differ, so that the shards differ in pixel count
        size = 32 + 8 * i
        image = rng.integers(0, 65535, (size, size, BANDS)).astype(np.uint16)
        image[..., 3] = 30000 + rng.integers(0, 3, (size, size))  # a band with a large mean and a small spread
        write_tiff(tmp_path / f"train/images/s{i}.tif", image, "separate" if i % 2 else "contig")
        write_mask(tmp_path / f"train/masks/s{i}.png", rng.integers(0, 2, (size, size), dtype=np.uint8))
        images.append(image)
    pixels = np.concatenate([im.reshape(-1, BANDS) for im in images]).astype(np.float64) / 65535
    samples = pair_channel(tmp_path / "train")
    cfg = TrainConfig(**TINY, in_channels=BANDS)  # normalize=auto: measured, for 7 bands
    assert cfg.resolved_normalize == "dataset"

    results = _two_ranks(lambda rank, gather: check_dataset(samples, cfg, rank=rank, owners=[i % 2 for i in range(5)],
                                                            gather=gather, threads=2))
    for checked in results:
        mean, std = checked.band_stats
        np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
        np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)
    assert results[0].band_stats == results[1].band_stats  # every rank normalizes alike, to the last bit
    # The training subset's statistics are its own samples' only.
    subset = np.concatenate([im.reshape(-1, BANDS) for im in images[:2]]).astype(np.float64) / 65535
    np.testing.assert_allclose(results[0].subset([0, 1]).band_stats[0], subset.mean(0), rtol=1e-6)


def test_rgb_users_keep_imagenet_normalization_and_no_statistics_pass(tmp_path):
    from unetseg.model import IMAGENET_MEAN, normalization

    rng = np.random.default_rng(7)
    write_tiff(tmp_path / "train/images/a.tif", rng.integers(0, 255, (32, 32, 3)).astype(np.uint8))
    write_mask(tmp_path / "train/masks/a.png", np.zeros((32, 32), np.uint8))
    cfg = TrainConfig(**TINY)
    checked = check_dataset(pair_channel(tmp_path / "train"), cfg)
    assert cfg.resolved_normalize == "imagenet" and checked.band_stats is None
    assert normalization(cfg, checked.band_stats)["mean"] == list(IMAGENET_MEAN)


# --- augmentation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["none", "light", "default", "strong"])
def test_every_preset_keeps_n_bands_float_and_moves_them_together(preset):
    rng = np.random.default_rng(8)
    base = rng.random((48, 48)).astype(np.float32)
    factors = np.arange(1, BANDS + 1, dtype=np.float32)
    image = base[..., None] * factors / BANDS  # band k is (k + 1) times band 0, in [0, 1]
    mask = (base > 0.5).astype(np.uint8)
    transform = train_transform(preset, 32, BANDS)
    for seed in range(25):  # strong's rarer steps (elastic, grid, blur) included
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        got = out["image"]
        assert got.shape == (32, 32, BANDS) and got.dtype == np.float32 and out["mask"].shape == (32, 32)
        # Geometric steps move every band alike, and nothing photometric is applied to 7 bands: the ratios hold.
        np.testing.assert_allclose(got, got[..., :1] * factors, rtol=1e-4, atol=1e-5)


# --- pretrained stems for N channels -------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 4, BANDS])
def test_a_pretrained_encoder_file_is_adapted_to_n_channels_as_smp_adapts_imagenet(tmp_path, channels):
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    from unetseg.model import build_model

    torch.manual_seed(0)
    rgb = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=3, encoder_depth=3,
                   decoder_channels=[32, 16, 8]).encoder.state_dict()
    save_file(rgb, str(tmp_path / "encoder.safetensors"))
    cfg = TrainConfig(**{**TINY, "encoder_weights": str(tmp_path / "encoder.safetensors")}, in_channels=channels)
    model = build_model(cfg)
    stem = model.encoder.conv1.weight.detach()
    expected = rgb["conv1.weight"].sum(1, keepdim=True) if channels == 1 else \
        rgb["conv1.weight"][:, [i % 3 for i in range(channels)]] * (3 / channels)
    torch.testing.assert_close(stem, expected)
    torch.testing.assert_close(model.encoder.layer1[0].conv1.weight.detach(), rgb["layer1.0.conv1.weight"])
    assert model(torch.zeros(1, channels, 32, 32)).shape == (1, 2, 32, 32)


# --- a model of N bands: learning, predict, the server, the client ------------------------------------------------

def multispectral_dataset(root, count: int, size: int = 64, seed: int = 0):
    """7-band 16-bit images where only bands 5 and 6 carry the objects, faintly (a few hundred of 65535, as surface
    reflectance x 10000 does), and the other five are brighter noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        mask = np.zeros((size, size))
        for _ in range(3):
            cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(5, 12))]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        image = rng.integers(0, 8000, (size, size, BANDS)).astype(np.float64)
        image[..., 4] = 1500 + 400 * mask + rng.normal(0, 60, (size, size))
        image[..., 5] = 2500 - 300 * mask + rng.normal(0, 60, (size, size))
        write_tiff(root / "images" / f"s{i:02d}.tif", image.astype(np.uint16), "separate" if i % 2 else "contig")
        write_mask(root / "masks" / f"s{i:02d}.png", mask.astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def multispectral_model(tmp_path_factory):
    from unetseg.training import RunPaths, train

    root = tmp_path_factory.mktemp("multispectral")
    multispectral_dataset(root / "train", 24, seed=0)
    multispectral_dataset(root / "validation", 8, seed=1)
    cfg = TrainConfig(**{**TINY, "image_size": 64, "batch_size": 8, "epochs": 8, "seed": 0, "num_workers": 2},
                      in_channels=BANDS)
    result = train(cfg, RunPaths(root / "train", root / "validation", root / "model", root / "ckpt", root / "out"),
                   progress=False)
    return root, result


@pytest.mark.slow
def test_a_7_band_16_bit_model_learns_from_the_two_bands_that_carry_the_signal(multispectral_model):
    root, result = multispectral_model
    assert result.best["val_miou"] >= 0.8, result.history

    # config.json carries the training set's band statistics, on the scale the model sees (pixels / 65535).
    config = json.loads((root / "model" / "config.json").read_text())
    pixels = np.concatenate([read_image(p).reshape(-1, BANDS) for p in sorted((root / "train/images").iterdir())])
    pixels = pixels.astype(np.float64) / 65535
    norm = config["normalization"]
    assert norm["mode"] == "mean_std" and norm["source"] == "dataset"
    np.testing.assert_allclose(norm["mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], pixels.std(0), rtol=1e-6)


@pytest.mark.slow
def test_two_training_processes_store_the_statistics_of_the_whole_training_set(tmp_path):
    """As SageMaker runs it (entry/train.py, string hyperparameters), with 2 processes (gloo) that each check half of
    the files: config.json holds the statistics of all the training images, not of rank 0's half."""
    from support import free_port, run_entry, sagemaker_tree

    data = tmp_path / "data"
    multispectral_dataset(data / "train", 6, size=32, seed=2)
    multispectral_dataset(data / "validation", 2, size=32, seed=3)
    hps = {**TINY, "epochs": 1, "num_workers": 2, "in_channels": BANDS}
    env = sagemaker_tree(tmp_path / "ml", hps, {"train": data / "train", "validation": data / "validation"})
    env.update(PYTHONUNBUFFERED="1", UNETSEG_PROCS_PER_HOST="2", UNETSEG_MASTER_PORT=str(free_port()))
    done = run_entry(env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "on 2 x cpu" in done.stdout

    norm = json.loads((tmp_path / "ml/model/config.json").read_text())["normalization"]
    pixels = np.concatenate([read_image(p).reshape(-1, BANDS) for p in sorted((data / "train/images").iterdir())])
    pixels = pixels.astype(np.float64) / 65535
    half = np.concatenate([read_image(p).reshape(-1, BANDS) for p in sorted((data / "train/images").iterdir())[::2]])
    assert not np.allclose(half.mean(0) / 65535, pixels.mean(0), rtol=1e-6)  # a rank's half differs from the whole
    np.testing.assert_allclose(norm["mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], pixels.std(0), rtol=1e-6)


@pytest.mark.slow
def test_predict_writes_masks_for_n_band_tiffs_and_names_an_image_of_other_bands(multispectral_model, tmp_path):
    from PIL import Image

    from unetseg.cli import main as cli

    root, _ = multispectral_model
    source = tmp_path / "images"
    source.mkdir()
    for path in sorted((root / "validation/images").iterdir())[:2]:
        (source / path.name).write_bytes(path.read_bytes())
    write_tiff(source / "rgb.tif", np.zeros((64, 64, 3), np.uint8))
    code = cli(["predict", "--model", str(root / "model"), "--input", str(source), "--output", str(tmp_path / "out"),
                "--device", "cpu"])
    assert code == 2  # the 3-band image, named, after the others' masks
    masks = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert masks == ["s00.png", "s01.png"]
    truth = np.array(Image.open(root / "validation/masks/s00.png"))
    predicted = np.array(Image.open(tmp_path / "out/s00.png"))
    assert (predicted == truth).mean() > 0.9


@pytest.mark.slow
def test_a_3_band_model_refuses_a_7_band_image_naming_the_file_and_both_counts(tmp_path, capsys):
    from unetseg.cli import main as cli
    from unetseg.model import load_model
    from unetseg.synthetic import make_demo_dataset
    from unetseg.training import RunPaths, train

    data = make_demo_dataset(tmp_path / "data", kind="binary", train=8, validation=4, size=32)
    paths = RunPaths(data / "train", data / "validation", tmp_path / "model", tmp_path / "ckpt", tmp_path / "out")
    train(TrainConfig(**{**TINY, "epochs": 1}), paths, progress=False)
    write_tiff(tmp_path / "ms/field.tif", bands(np.random.default_rng(9)))

    assert cli(["predict", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "ms/field.tif"),
                "--output", str(tmp_path / "o"), "--device", "cpu"]) == 2
    said = capsys.readouterr().err
    assert "field.tif: the image has 7 channel(s), but the model takes 3 (RGB)" in said

    segmenter = load_model(tmp_path / "model", device="cpu")
    with pytest.raises(ValueError, match="has 7 channel.*this model takes 3-channel images"):
        segmenter.predict(read_image(tmp_path / "ms/field.tif"))

    from unetseg.container.serving import InferenceApp

    status, _, payload = wsgi_call(InferenceApp(str(tmp_path / "model"), device="cpu"), content_type=codecs.TIFF,
                                   body=codecs.encode_image(bands(np.random.default_rng(9)), codecs.TIFF),
                                   accept=codecs.NPY)
    assert status == 400 and "7 channel(s); this model takes 3" in json.loads(payload)["error"]


@pytest.mark.slow
def test_the_server_takes_n_band_tiff_and_npy_as_predict_reads_them(multispectral_model):
    from unetseg.container.serving import InferenceApp
    from unetseg.model import load_model

    root, _ = multispectral_model
    app = InferenceApp(str(root / "model"), device="cpu")
    path = sorted((root / "validation/images").iterdir())[0]
    expected = load_model(root / "model", device="cpu").predict(read_image(path))
    image = read_image(path)
    for body, kind in ((path.read_bytes(), codecs.TIFF), (codecs.encode_image(image, codecs.NPY), codecs.NPY),
                       (codecs.encode_image(image, codecs.TIFF), codecs.TIFF),
                       (codecs.encode_image(image.astype(np.float32) / 65535, codecs.NPY), codecs.NPY)):
        status, _, payload = wsgi_call(app, body=body, content_type=kind, accept=codecs.NPY)
        assert status == 200, payload[:300]
        np.testing.assert_array_equal(np.load(io.BytesIO(payload)), expected)

    # Floats are taken as they are by a model of measured statistics: raw band values in any range are its data.
    raw = read_image(path).astype(np.float32)
    status, _, _ = wsgi_call(app, body=codecs.encode_image(raw, codecs.NPY), content_type=codecs.NPY, accept=codecs.NPY)
    assert status == 200


def test_the_client_sends_an_n_band_image_as_npy_or_tiff_and_refuses_png(tmp_path):
    from unetseg.client.predictor import ImageSerializer

    image = bands(np.random.default_rng(10))
    write_tiff(tmp_path / "field.tif", image)
    for kind in (codecs.NPY, codecs.TIFF):
        serializer = ImageSerializer(kind)
        for data in (image, tmp_path / "field.tif"):
            np.testing.assert_array_equal(codecs.decode_request(serializer.serialize(data), kind), image)
    with pytest.raises(ValueError, match="7 bands cannot be sent as image/png.*application/x-npy"):
        ImageSerializer(codecs.PNG).serialize(image)


def test_the_server_decoder_checks_a_tiff_body_size_before_decoding(monkeypatch):
    body = codecs.encode_image(np.zeros((256, 256, BANDS), np.uint16), codecs.TIFF)
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "0.5")
    with pytest.raises(codecs.ImageTooLarge, match=f"{BANDS} channel"):
        codecs.decode_request(body, codecs.TIFF)
    with pytest.raises(codecs.CodecError, match="a PNG image, not image/tiff"):
        codecs.decode_request(codecs.encode_image(np.zeros((8, 8), np.uint8), codecs.PNG), codecs.TIFF)
