"""Rasters larger than memory: `unetseg predict` on TIFFs and GeoTIFFs, read and written window by window.

The model is a small untrained one (its weights seeded): what is tested is that the windowed path gives the whole-image
path's answer and writes it where a GIS finds it, not what the model learned. Peak memory is a bench
(bench/large_raster.py), not a test.
"""

import numpy as np
import pytest
import rasterio
import tifffile
import torch
from rasterio.transform import from_origin

from support import TINY
from unetseg.cli import main as cli
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import OutputError
from unetseg.contract.sagemaker_env import MAX_IMAGE_MB_ENV
from unetseg.model import artifact_config, build_model, load_model, save_artifact
from unetseg.raster_io import NODATA_CLASS
from unetseg.segmenter import Segmenter

BACKENDS = ("rasterio", "tifffile")
CRS = "EPSG:32633"
TRANSFORM = from_origin(500000.0, 4000000.0, 0.5, 0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TrainConfig(**{**TINY, "classes": 3, "in_channels": 3})
    folder = tmp_path_factory.mktemp("raster-model")
    save_artifact(folder, build_model(cfg, pretrained=False).state_dict(), artifact_config(cfg, "index"), [])
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, device="cpu")


def pixels(height=200, width=290, bands=3, seed=0, dtype=np.uint8):
    """Smooth shapes with noise: the model's classes change across the image, so the blend matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([np.sin(xx / 17.0 + b) * np.cos(yy / 11.0 - b) for b in range(bands)], -1)
    scale = np.iinfo(dtype).max
    return np.clip((base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape)) * scale, 0, scale).astype(dtype)


def write_geotiff(path, image, nodata=None, overviews=False, block=64):
    with rasterio.open(path, "w", driver="GTiff", width=image.shape[1], height=image.shape[0], count=image.shape[2],
                       dtype=image.dtype, crs=CRS, transform=TRANSFORM, nodata=nodata, tiled=True, blockxsize=block,
                       blockysize=block, compress="deflate") as ds:
        ds.write(np.moveaxis(image, -1, 0))
        if overviews:
            ds.build_overviews([2, 4])
    return path


def whole(model, image, tile):
    """The whole-image path: the image decoded whole and tiled in memory."""
    return model.predict_proba(image, tile=tile)


def windows(model, path, backend, **kwargs):
    from unetseg.predict_raster import probability_windows
    from unetseg.raster_io import open_source

    with open_source(path, backend) as source:
        out = np.full((len(model.class_names), source.height, source.width), np.nan, np.float32)
        for y0, x0, proba in probability_windows(model, source, **kwargs):
            out[:, y0:y0 + proba.shape[1], x0:x0 + proba.shape[2]] = proba
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_give_the_whole_image_answer(model, tmp_path, backend):
    image = pixels()
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib")
    # Stripes of about 100 px with 64 px tiles: every stripe border has a tile on both sides of it.
    for tile, tta in ((64, "none"), (96, "flip")):
        expected = model.predict_proba(image, tile=tile, tta=tta)
        got = windows(model, path, backend, tile=tile, tta=tta, stripe=100)
        assert not np.isnan(got).any()  # every pixel written once
        assert np.abs(got - expected).max() <= 1e-5
        assert np.array_equal(got.argmax(0), expected.argmax(0))
    # No tile given, an image under the tiling size: one pass over the whole image, as predict does it.
    assert np.abs(windows(model, path, backend) - model.predict_proba(image)).max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_16_bit_single_band_raster_is_scaled_as_the_whole_image_path_scales_it(tmp_path, backend):
    torch.manual_seed(1)
    cfg = TrainConfig(**{**TINY, "classes": 2, "in_channels": 1})
    gray = Segmenter(build_model(cfg, pretrained=False), artifact_config(cfg, "binary"), device="cpu")
    image = pixels(150, 170, bands=1, dtype=np.uint16)
    path = tmp_path / "gray16.tif"
    tifffile.imwrite(path, image[..., 0], rowsperstrip=16)  # striped, not tiled
    expected = gray.predict_proba(image, tile=64)
    got = windows(gray, path, backend, tile=64, stripe=64)
    assert np.abs(got - expected).max() <= 1e-5 and np.array_equal(got.argmax(0), expected.argmax(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_geotiff_mask_keeps_crs_transform_and_marks_no_data(model, tmp_path, backend, monkeypatch):
    from unetseg.predict_raster import predict_raster

    image = pixels(180, 230)
    image[:40, :50] = 0  # a corner outside the survey: no data in every band
    image[100, 100] = 0  # one black pixel in band 0..2 alike is void too; a pixel black in one band only is not
    image[120, 120, 0] = 0
    source = write_geotiff(tmp_path / "survey.tif", image, nodata=0)
    out = tmp_path / "masks"
    out.mkdir()
    mask_path, proba_path = predict_raster(model, source, out, tile=64, probabilities=True, backend=backend)
    expected = model.predict_proba(image, tile=64)
    with rasterio.open(mask_path) as ds, rasterio.open(source) as src:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (src.crs, src.transform, src.width, src.height)
        assert ds.nodata == NODATA_CLASS and ds.count == 1 and ds.dtypes[0] == "uint8"
        assert ds.profile["tiled"] and ds.block_shapes == [(256, 256)]
        assert ds.compression.name == "deflate"
        assert ds.colormap(1)[1][:3] == tuple(model.class_colors[1])  # the classes in their colours in a GIS
        mask = ds.read(1)
    void = (image == 0).all(-1)
    assert void[:40, :50].all() and void.sum() == 40 * 50 + 1
    assert (mask[void] == NODATA_CLASS).all()
    assert np.array_equal(mask[~void], expected.argmax(0)[~void])
    assert np.array_equal(tifffile.imread(mask_path), mask)  # plain TIFF readers see the same mask
    with rasterio.open(proba_path) as ds:
        assert ds.count == 3 and ds.crs == ds.crs and ds.transform == TRANSFORM
        proba = ds.read()
    assert np.abs(proba[:, ~void] - np.rint(expected[:, ~void] * 255)).max() <= 1
    assert (proba[:, void] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overviews_are_skipped_the_full_resolution_is_read(model, tmp_path, backend):
    image = pixels(160, 200, seed=3)
    source = write_geotiff(tmp_path / "pyramid.tif", image, overviews=True)
    with rasterio.open(source) as ds:
        assert ds.overviews(1) == [2, 4]
    from unetseg.predict_raster import predict_raster

    (tmp_path / "out").mkdir()
    [mask_path] = predict_raster(model, source, tmp_path / "out", tile=64, backend=backend)
    mask = tifffile.imread(mask_path)
    assert mask.shape == (160, 200)
    assert np.array_equal(mask, model.predict(image, tile=64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bigtiff_output_is_read_by_tifffile_and_rasterio(model, tmp_path, backend, monkeypatch):
    from unetseg import raster_io
    from unetseg.predict_raster import predict_raster

    monkeypatch.setattr(raster_io, "BIGTIFF_ABOVE", 0)  # what a 4 GiB raster gets, on a small one
    image = pixels(150, 260, seed=4)
    source = write_geotiff(tmp_path / "big.tif", image)
    (tmp_path / "out").mkdir()
    mask_path, proba_path = predict_raster(model, source, tmp_path / "out", tile=64, probabilities=True,
                                           backend=backend)
    expected = model.predict(image, tile=64)
    for path in (mask_path, proba_path):
        with tifffile.TiffFile(path) as tif:
            assert tif.is_bigtiff and tif.pages.first.is_tiled and tif.pages.first.tilewidth == 256
            assert tif.pages.first.compression in (8, 32946)  # deflate
    with rasterio.open(mask_path) as ds:
        assert ds.crs == rasterio.crs.CRS.from_string(CRS) and ds.transform == TRANSFORM
        assert np.array_equal(ds.read(1), expected)
    assert np.array_equal(tifffile.imread(mask_path), expected)
    assert tifffile.imread(proba_path).shape == (150, 260, 3)


def test_predict_command_routes_large_tiffs_and_geotiffs_past_the_whole_image_limit(model_dir, model, tmp_path,
                                                                                     monkeypatch, capsys):
    """A TIFF above the tiling size takes the windowed path, which UNETSEG_MAX_IMAGE_MB does not refuse; the same
    pixels as a PNG are still refused by it (decoded whole), and a small plain TIFF still gets a PNG mask."""
    from PIL import Image

    monkeypatch.setattr(Segmenter, "max_pixels", 128 * 128)  # "large" = above 128 x 128 in this test
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "0.05")  # 52 KB decoded: a 200 x 290 RGB image (174 KB) is over it
    folder = tmp_path / "in"
    folder.mkdir()
    image = pixels()
    tifffile.imwrite(folder / "large.tif", image, tile=(32, 32), compression="zlib")
    Image.fromarray(image).save(folder / "large_png.png")
    tifffile.imwrite(folder / "small.tif", image[:100, :100])
    write_geotiff(folder / "field.tif", image[:100, :120], block=32)
    out = tmp_path / "out"
    assert cli(["predict", "--model", str(model_dir), "--input", str(folder), "--output", str(out),
                "--tile", "64", "--overlay"]) == 2
    err = capsys.readouterr().err
    assert "large_png.png" in err and MAX_IMAGE_MB_ENV in err and "large.tif" not in err.split("note:")[0]
    assert "no overlay" in err
    assert sorted(p.name for p in out.iterdir()) == ["field.tif", "large.tif", "small.png", "small_overlay.png"]
    assert np.array_equal(tifffile.imread(out / "large.tif"), model.predict(image, tile=64))
    with rasterio.open(out / "field.tif") as ds:
        assert ds.crs == rasterio.crs.CRS.from_string(CRS) and ds.transform == TRANSFORM


def test_a_mask_never_overwrites_its_image(model, tmp_path):
    from unetseg.predict_raster import predict_raster

    source = write_geotiff(tmp_path / "scene.tif", pixels(64, 64))
    before = source.read_bytes()
    with pytest.raises(OutputError, match="would overwrite the image"):
        predict_raster(model, source, tmp_path)
    assert source.read_bytes() == before


def test_no_data_pixels_get_the_no_data_class_on_the_whole_image_path_as_on_the_windowed_one(model_dir, model,
                                                                                             tmp_path):
    """A small image goes whole to the model and gets a PNG mask; where it holds no data (a float pixel NaN in every
    band, a plain TIFF's GDAL_NODATA value in every band) that mask says NODATA_CLASS, as the windowed GeoTIFF mask
    does, instead of whatever class the zeroed pixels looked like."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    image = pixels(48, 64, dtype=np.uint8)
    floats = image.astype(np.float32) / 255
    floats[:10, :20] = np.nan  # no data: NaN in every band
    np.save(folder / "scene.npy", floats)
    sentinel = image.copy()
    sentinel[40:, 50:] = 7  # the declared no-data value in every band
    tifffile.imwrite(folder / "plain.tif", sentinel, extratags=[(42113, "s", 0, "7", True)])  # GDAL_NODATA, no geo
    out = tmp_path / "out"
    assert cli(["predict", "--model", str(model_dir), "--input", str(folder), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["plain.png", "scene.png"]
    for name, void in (("scene.png", np.s_[:10, :20]), ("plain.png", np.s_[40:, 50:])):
        mask = np.array(Image.open(out / name))
        assert (mask[void] == NODATA_CLASS).all(), name
        rest = np.ones(mask.shape, bool)
        rest[void] = False
        assert (mask[rest] < 3).all(), name
