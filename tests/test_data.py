"""Pairing, decoding, mask conventions and every bad-data case: one DataError naming the file."""

import numpy as np
import pytest

from support import make_channel, random_pair, save, write_pair
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import DataError
from unetseg.data.checks import check_dataset
from unetseg.data.scan import pair_channel, split_holdout

CFG = TrainConfig(encoder_weights=None, image_size=32)


def check(root, cfg=CFG):
    return check_dataset(pair_channel(root), cfg)


def data_error(root, cfg=CFG) -> str:
    with pytest.raises(DataError) as info:
        check(root, cfg)
    return str(info.value)


# --- pairing ---------------------------------------------------------------------------------------------------

def test_pairs_by_stem_across_formats_not_by_sort_order(tmp_path):
    # Each image's pixels encode its index, and so does its mask: a pairing by position would mix them up.
    rng = np.random.default_rng(0)
    names = [("zeta", ".jpg"), ("alpha", ".png"), ("mid", ".tif"), ("beta", ".jpeg")]
    for value, (stem, ext) in enumerate(names):
        image = np.full((16, 16, 3), 40 * value + 20, np.uint8)
        if ext in (".jpg", ".jpeg"):
            image = image + rng.integers(0, 2, image.shape, dtype=np.uint8)  # JPEG: near, not exact
        write_pair(tmp_path, stem, image, np.full((16, 16), value % 2, np.uint8), image_ext=ext)
    checked = check(tmp_path, CFG.replace(classes=4))
    by_stem = {s.stem: (img, mask) for s, (img, mask) in zip(checked.samples, checked.cached)}
    for value, (stem, _) in enumerate(names):
        img, mask = by_stem[stem]
        assert abs(int(img.mean()) - (40 * value + 20)) <= 2
        assert (mask == value % 2).all()


def test_image_without_mask_and_mask_without_image_are_named(tmp_path):
    make_channel(tmp_path, count=2)
    save(tmp_path / "images" / "lonely.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "masks" / "orphan.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError) as info:
        pair_channel(tmp_path)
    message = str(info.value)
    assert "image(s) without a mask" in message and "lonely.png" in message
    assert "mask(s) without an image" in message and "orphan.png" in message


def test_unknown_extension_duplicate_stem_and_jpeg_mask(tmp_path):
    make_channel(tmp_path, count=2)
    (tmp_path / "images" / "notes.txt").write_text("hello")
    save(tmp_path / "images" / "s00.jpg", np.zeros((32, 32, 3), np.uint8))
    save(tmp_path / "masks" / "extra.jpg", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "images" / ".DS_Store").write_text("ignored")
    with pytest.raises(DataError) as info:
        pair_channel(tmp_path)
    message = str(info.value)
    assert "notes.txt" in message and "unknown image extension" in message
    assert "s00.jpg" in message and "s00.png" in message and "two files with the stem 's00'" in message
    assert "extra.jpg" in message and "JPEG is not accepted" in message
    assert ".DS_Store" not in message


def test_missing_folders_and_empty_channel(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        pair_channel(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"missing masks/"):
        pair_channel(tmp_path)
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"images: no images"):
        pair_channel(tmp_path)


def test_holdout_split_is_deterministic_and_stable_when_files_are_added(tmp_path):
    make_channel(tmp_path, count=20, size=8)
    samples = pair_channel(tmp_path)
    train, val = split_holdout(samples, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16 and not {s.stem for s in train} & {s.stem for s in val}
    assert split_holdout(samples, 0.2, seed=1) == (train, val)
    make_channel(tmp_path / "more", count=1, size=8)
    grown = samples + pair_channel(tmp_path / "more")
    _, val_grown = split_holdout(grown, 0.2, seed=1)
    assert len({s.stem for s in val} - {s.stem for s in val_grown}) <= 1  # a hash split, not a reshuffle
    with pytest.raises(DataError, match="cannot be split"):
        split_holdout(samples[:1], 0.2, seed=1)


# --- decoding and checks -----------------------------------------------------------------------------------------

def test_truncated_and_unreadable_files_are_named(tmp_path):
    make_channel(tmp_path, count=3)
    png = tmp_path / "images" / "s01.png"
    png.write_bytes(png.read_bytes()[:200])
    jpg_image = tmp_path / "images" / "s02.png"
    jpg_image.unlink()
    save(tmp_path / "images" / "s02.jpg", np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    data = (tmp_path / "images" / "s02.jpg").read_bytes()
    (tmp_path / "images" / "s02.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "masks" / "s00.png").write_bytes(b"this is not a png")
    message = data_error(tmp_path)
    assert "s01.png" in message and "s02.jpg" in message and "masks/s00.png" in message
    assert "truncated" in message or "unreadable" in message


def test_mask_values_outside_the_class_range(tmp_path):
    rng = np.random.default_rng(0)
    write_pair(tmp_path, "ok", *random_pair(rng, classes=3))
    image, mask = random_pair(rng, classes=3)
    mask[0, :3] = [7, 9, 255]  # 255 is ignore, 7 and 9 are not classes
    write_pair(tmp_path, "bad", image, mask)
    message = data_error(tmp_path, CFG.replace(classes=3))
    assert "masks/bad.png" in message and "7, 9" in message and "0..2" in message


def test_mask_size_differs_from_image(tmp_path):
    rng = np.random.default_rng(0)
    image, _ = random_pair(rng, size=32)
    write_pair(tmp_path, "a", image, np.zeros((30, 32), np.uint8))
    message = data_error(tmp_path)
    assert "masks/a.png" in message and "32x30" in message and "32x32" in message


def test_wrong_channel_count_and_rgba(tmp_path):
    rng = np.random.default_rng(0)
    write_pair(tmp_path, "gray", rng.integers(0, 255, (32, 32, 1), dtype=np.uint8), np.zeros((32, 32), np.uint8))
    write_pair(tmp_path, "rgba", rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), np.zeros((32, 32), np.uint8))
    message = data_error(tmp_path)
    assert "images/gray.png" in message and "1 channel(s), but in_channels=3" in message and "in_channels=1" in message
    assert "images/rgba.png" in message and "alpha" in message


def test_sixteen_bit_images_keep_their_depth(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65535, (32, 32, 1), dtype=np.uint16)
    rgb16 = rng.integers(0, 65535, (32, 32, 3), dtype=np.uint16)
    write_pair(tmp_path / "g", "a", gray16, np.zeros((32, 32), np.uint8))
    write_pair(tmp_path / "g", "b", gray16, np.zeros((32, 32), np.uint8), image_ext=".tif")
    write_pair(tmp_path / "c", "a", rgb16, np.zeros((32, 32), np.uint8))
    write_pair(tmp_path / "c", "b", rgb16, np.zeros((32, 32), np.uint8), image_ext=".tiff", mask_ext=".tif")
    for folder, channels, expected in (("g", 1, gray16), ("c", 3, rgb16)):
        checked = check(tmp_path / folder, CFG.replace(in_channels=channels))
        for image, _ in checked.cached:
            assert image.dtype == np.uint16 and np.array_equal(image, expected)


def test_mixed_bit_depths_are_rejected(tmp_path):
    write_pair(tmp_path, "a", np.zeros((8, 8, 1), np.uint8), np.zeros((8, 8), np.uint8))
    write_pair(tmp_path, "b", np.zeros((8, 8, 1), np.uint16), np.zeros((8, 8), np.uint8))
    assert "mix bit depths" in data_error(tmp_path, CFG.replace(in_channels=1))


@pytest.mark.parametrize("values, classes, mode, expected", [
    ((0, 255), 2, "binary", (0, 1)),   # {0,255} binary
    ((0, 1), 2, "index", (0, 1)),      # {0,1} binary is also index 0..1
    ((0, 1, 2, 255), 3, "index", (0, 1, 2, 255)),  # 255 = ignore in multi-class
])
def test_mask_conventions(tmp_path, values, classes, mode, expected):
    mask = np.resize(np.array(values, np.uint8).repeat(16), 16 * 16).reshape(16, 16)
    write_pair(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), mask)
    checked = check(tmp_path, CFG.replace(classes=classes))
    assert checked.codec.mode == mode
    assert tuple(np.unique(checked.cached[0][1])) == expected


def test_palette_png_masks_use_their_indices(tmp_path):
    from PIL import Image

    mask = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8).repeat(8, 0).repeat(8, 1), mode="P")
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    write_pair(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8))
    mask.save(tmp_path / "masks" / "a.png")
    checked = check(tmp_path, CFG.replace(classes=3))
    assert sorted(np.unique(checked.cached[0][1])) == [0, 1, 2]


def test_rgb_palette_masks_through_class_colors(tmp_path):
    colours = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    labels = np.array([[0, 1], [2, 0]]).repeat(8, 0).repeat(8, 1)
    rgb = np.asarray(colours, np.uint8)[labels]
    write_pair(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), rgb)
    cfg = CFG.replace(classes=3, class_colors=colours)
    checked = check(tmp_path, cfg)
    assert checked.codec.mode == "palette" and np.array_equal(checked.cached[0][1], labels)
    assert list(checked.class_pixels) == [128, 64, 64]
    rgb[0, 0] = [1, 2, 3]
    save(tmp_path / "masks" / "a.png", rgb)
    message = data_error(tmp_path, cfg)
    assert "masks/a.png" in message and "[1, 2, 3]" in message
    assert "class_colors" in data_error(tmp_path, CFG.replace(classes=3))  # RGB masks without colours


def test_grayscale_masks_saved_as_rgb_are_accepted(tmp_path):
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[4:8] = 255
    write_pair(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), mask)
    checked = check(tmp_path)
    assert checked.codec.mode == "binary" and checked.cached[0][1].sum() == 4 * 16


def test_uncached_dataset_reads_the_same_pixels(tmp_path):
    from unetseg.data.dataset import SegmentationDataset

    make_channel(tmp_path, count=3, classes=2)
    cached = check(tmp_path, CFG.replace(cache_images="on"))
    lazy = check(tmp_path, CFG.replace(cache_images="off"))
    assert lazy.cached is None and list(lazy.class_pixels) == list(cached.class_pixels)
    for i in range(3):
        a, b = SegmentationDataset(cached)[i], SegmentationDataset(lazy)[i]
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b))


def test_many_files_with_one_problem_are_summarised(tmp_path):
    make_channel(tmp_path, count=12, channels=1, size=8)
    message = data_error(tmp_path)
    assert "12 files: image has 1 channel(s)" in message and "and 9 more" in message


# --- several training processes: each reads its shard -----------------------------------------------------------------

def check_as_ranks(samples, cfg, world):
    """check_dataset run by `world` threads standing in for ranks, with an all-gather made of a barrier."""
    import threading

    barrier, slots, results = threading.Barrier(world), {}, {}

    def gather_for(rank):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            everyone = [slots[r] for r in range(world)]
            barrier.wait()  # everyone has read before the next round overwrites
            return everyone
        return gather

    def run(rank):
        try:
            results[rank] = check_dataset(samples, cfg, rank=rank, owners=[i % world for i in range(len(samples))],
                                          gather=gather_for(rank), threads=1)
        except DataError as exc:
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return [results[r] for r in range(world)]


def test_each_rank_reads_and_keeps_only_its_shard_but_knows_the_whole_dataset(tmp_path, monkeypatch):
    import unetseg.data.checks as checks

    samples = pair_channel(make_channel(tmp_path, count=7, classes=3))
    alone = check_dataset(samples, CFG.replace(classes=3))
    reads = []
    real_read = checks.read_image_valid
    monkeypatch.setattr(checks, "read_image_valid", lambda path: reads.append(path.name) or real_read(path))
    ranks = check_as_ranks(samples, CFG.replace(classes=3), world=3)
    assert sorted(reads) == sorted(s.image.name for s in samples)  # every file decoded once, by one rank
    for rank, checked in enumerate(ranks):
        assert np.array_equal(checked.sample_class_pixels, alone.sample_class_pixels)
        assert checked.sizes == alone.sizes and checked.codec == alone.codec
        kept = [i for i, item in enumerate(checked.cached) if item is not None]
        assert kept == [i for i in range(7) if i % 3 == rank]
        for i in range(7):  # its own shard from memory, another's decoded on demand: the same pixels
            assert all(np.array_equal(a, b) for a, b in zip(checked.load(i), alone.load(i)))


def test_a_bad_file_in_one_shard_stops_every_rank_with_the_same_error(tmp_path):
    root = make_channel(tmp_path, count=6)
    (root / "masks" / "s03.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    errors = check_as_ranks(pair_channel(root), CFG, world=2)
    assert all(isinstance(e, DataError) for e in errors), errors
    assert str(errors[0]) == str(errors[1]) and "s03.png" in str(errors[0])


def test_epoch_sampler_gives_each_rank_its_shard_and_every_rank_as_many_steps():
    from unetseg.data.dataset import EpochSampler

    for epoch in (0, 1):
        per_rank = []
        for rank in range(3):
            sampler = EpochSampler(10, batch_size=2, seed=5, rank=rank, world=3)
            sampler.set_epoch(epoch)
            per_rank.append([i for _, i in sampler])
        assert [len(p) for p in per_rank] == [4, 4, 4]  # ceil(10 / 3) = 4 per rank: two batches of 2
        assert all(i % 3 == rank for rank, p in enumerate(per_rank) for i in p)
        assert set().union(*per_rank) == set(range(10))  # shards of 4, 3, 3: the short ones repeat one sample
    one = EpochSampler(10, batch_size=2, seed=5)
    one.set_epoch(1)
    assert [i for _, i in one] == list(np.random.default_rng([5, 1]).permutation(10))  # one process: unchanged order


@pytest.mark.parametrize("stored", ["P", "RGBA"])
def test_colour_masks_stored_as_palette_or_opaque_rgba_are_read_by_colour(tmp_path, stored):
    """Ground Truth's colour masks (mask_mode=palette) decode by colour however the PNG stores them: a palette image
    whose index order is not the class order, or RGBA with every pixel opaque. A transparent pixel is refused."""
    from PIL import Image

    colours = [[255, 255, 255], [255, 0, 0], [0, 0, 255]]
    labels = np.array([[0, 1], [2, 0]]).repeat(8, 0).repeat(8, 1)
    write_pair(tmp_path, "a", np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8))
    if stored == "P":
        indices = np.array([1, 2, 0], np.uint8)[labels]  # palette order: blue, white, red
        mask = Image.fromarray(indices, mode="P")
        mask.putpalette([0, 0, 255, 255, 255, 255, 255, 0, 0] + [0] * 759)
    else:
        rgba = np.concatenate([np.asarray(colours, np.uint8)[labels], np.full((16, 16, 1), 255, np.uint8)], 2)
        mask = Image.fromarray(rgba, mode="RGBA")
    mask.save(tmp_path / "masks" / "a.png")
    cfg = CFG.replace(classes=3, class_colors=colours, mask_mode="palette")
    checked = check(tmp_path, cfg)
    assert np.array_equal(checked.cached[0][1], labels) and list(checked.class_pixels) == [128, 64, 64]
    if stored == "RGBA":
        rgba[0, 0, 3] = 0
        Image.fromarray(rgba, mode="RGBA").save(tmp_path / "masks" / "a.png")
        message = data_error(tmp_path, cfg)
        assert "masks/a.png" in message and "transparent" in message
