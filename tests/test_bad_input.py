"""The probe suite: bad input and faults, attacked the way a demanding user would (issue 9).

Four classes, each with more cases than the issue lists:
- silent data loss: masks that mix conventions, a hand-edited config.json that contradicts the weights, two
  validation folders (or channels) at once;
- untrusted sizes: decompression bombs made from headers (PNG with a valid IHDR CRC, TIFF, JPEG, .npy), refused
  before decoding, with the peak memory of the real command measured in a child process; parallel decoding (the
  data check, predict's read-ahead) bounded by bytes, not by files;
- tracebacks where a message belongs: disk full and read-only outputs (also in the container, where the failure
  file's first line says it), Ctrl-C during the data check (also in the container, where it is a stop), damaged
  checkpoints, broken and unsafe model archives (also as the init model of a job), bad arguments, unreadable images
  in a folder. Each is one message naming the file or value, exit code 2, no traceback;
- the limit itself: a real image over it gets a message that says how to raise it, and raising it works.

Tiny images and a tiny untrained model: the whole file runs in under two minutes on two shared CPU cores (about 100 s
measured); the cases that start the real command in a child process are marked slow.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from bombs import jpeg_bomb, npy_bomb, png_bomb, tiff_bomb
from support import TINY, make_channel, random_pair, save, write_pair
from unetseg.cli import main as cli
from unetseg.contract import codecs
from unetseg.contract.config import TrainConfig
from unetseg.contract.errors import ArtifactError, DataError, UnetsegError
from unetseg.contract.sagemaker_env import MAX_IMAGE_MB_ENV
from unetseg.data.checks import check_dataset
from unetseg.data.io import read_image, read_mask
from unetseg.data.scan import pair_channel

CFG = TrainConfig(encoder_weights=None, image_size=32)
PY = sys.executable
# The stated bound: on bombs, the data check and predict peak at most 256 MiB above the same command without them
# (measured in the same test: the imports alone take ~800 MiB here), and under 1.5 GiB in all.
BOMB_EXTRA_MIB, BOMB_TOTAL_MIB = 256, 1536


# --- helpers ---------------------------------------------------------------------------------------------------

def cli_error(capsys, argv: list[str]) -> str:
    """Run the real CLI entry in this process; it must answer exit code 2 and one `error:` message."""
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def run_cli(argv: list[str], env: dict | None = None, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([PY, "-m", "unetseg.cli", *map(str, argv)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, **kwargs)


def assert_clean_exit(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, f"exit code {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in done.stderr, f"{fragment!r} not in:\n{done.stderr[-3000:]}"
    return done.stderr


# Linux carries a process's peak RSS across fork and exec (the child's mm starts as a copy of the parent's, and exec
# keeps the old mm's high-water mark), so a child of a pytest process that has grown to 1.5 GiB reports at least that.
# A small launcher forks the command instead: its child starts from the launcher's few MiB, and the launcher reports
# the child's own wait4 figure on stdout.
_LAUNCHER = """
import os, resource, subprocess, sys
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, preexec_fn=cap)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_mib(argv: list[str], env: dict | None = None, timeout: int = 300) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MiB) of the real CLI in a child process, measured by wait4 on that child
    alone, forked from a small launcher (see _LAUNCHER). The child's address space is capped at 12 GiB so that a
    regression fails the test, not the machine."""
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        done = subprocess.run([PY, "-c", _LAUNCHER, PY, "-m", "unetseg.cli", *map(str, argv)], capture_output=True,
                              env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("the command did not finish") from None
    code, maxrss_kib = done.stdout.decode().split()
    return int(code), done.stderr.decode(), int(maxrss_kib) / 1024


def _tiny_args(**extra) -> list[str]:
    """A one-epoch TINY run's hyperparameters as `unetseg train` arguments."""
    hps = {**TINY, "epochs": 1, "num_workers": 0, **extra}

    def text(v):
        return ",".join(map(str, v)) if isinstance(v, list) else "none" if v is None else str(v)

    return [f"{k}={text(v)}" for k, v in hps.items()]


def _set(path: str, value):
    """A config.json edit that sets a dotted path (`normalization.std`) to `value`."""
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


def _drop(key: str):
    return lambda config: config.pop(key)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained TINY model artifact (RGB, 2 classes): what predict reads, without training for it."""
    return _artifact(tmp_path_factory.mktemp("model") / "rgb", in_channels=3)


def _artifact(folder: Path, in_channels: int) -> Path:
    import torch

    from unetseg.model import artifact_config, build_model, save_artifact

    cfg = TrainConfig(**TINY, in_channels=in_channels, classes=2, class_names=["background", "cell"])
    torch.manual_seed(0)
    save_artifact(folder, build_model(cfg).state_dict(), artifact_config(cfg, "binary"), [])
    return folder


def tar_of(folder: Path, target: Path, extra=None) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
        if extra:
            extra(tar)
    return target


def edited_copy(model_dir: Path, target: Path, edit) -> Path:
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def images_folder(root: Path, count: int = 2, channels: int = 3, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        save(root / f"good{i}.png", rng.integers(0, 256, (size, size, channels), dtype=np.uint8))
    return root


def binary_pair(root: Path, stem: str, foreground: int, size: int = 16) -> None:
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = foreground
    write_pair(root, stem, np.full((size, size, 3), 100, np.uint8), mask)


# =================================================================================================================
# 1. Silent data loss
# =================================================================================================================

# --- mask conventions decided from all files together ------------------------------------------------------------

def _both_channels(tmp_path: Path, train: dict[str, int], validation: dict[str, int]) -> list:
    for stem, fg in train.items():
        binary_pair(tmp_path / "train", stem, fg)
    for stem, fg in validation.items():
        binary_pair(tmp_path / "validation", stem, fg)
    return pair_channel(tmp_path / "train") + pair_channel(tmp_path / "validation")


@pytest.mark.parametrize("train, validation", [
    ({"a": 255, "b": 255}, {"v": 1}),  # 0/255 training masks, 0/1 validation masks
    ({"a": 1, "b": 1}, {"v": 255}),  # the other way round
    ({"a": 255, "b": 1}, {"v": 255}),  # mixed within train
])
def test_binary_masks_mixing_255_and_1_are_refused_naming_files_of_each_kind(tmp_path, train, validation):
    samples = _both_channels(tmp_path, train, validation)
    with pytest.raises(DataError) as info:
        check_dataset(samples, CFG)
    message = str(info.value)
    ones = [s.mask for s in samples if (train | validation)[s.stem] == 1]
    full = [s.mask for s in samples if (train | validation)[s.stem] == 255]
    assert all(str(p) in message for p in ones + full), message
    assert "mask_mode=binary" in message and "mask_mode=index" in message


def test_index_masks_with_ignore_next_to_0_255_masks_are_refused(tmp_path):
    # {0,1,255}: index masks whose 255 means ignore; {0,255}: looks like a binary mask. One reading loses pixels.
    mask = np.zeros((16, 16), np.uint8)
    mask[:4], mask[4:8] = 1, 255
    write_pair(tmp_path, "index", np.zeros((16, 16, 3), np.uint8), mask)
    binary_pair(tmp_path, "binary", 255)
    with pytest.raises(DataError, match=r"(?s)binary\.png.*index\.png|index\.png.*binary\.png"):
        check_dataset(pair_channel(tmp_path), CFG)


def test_multiclass_masks_next_to_0_255_masks_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    write_pair(tmp_path, "classes", *random_pair(rng, size=16, classes=3))
    binary_pair(tmp_path, "binary", 255)
    with pytest.raises(DataError, match="binary.png"):
        check_dataset(pair_channel(tmp_path), CFG.replace(classes=3))


@pytest.mark.parametrize("mode, foreground_pixels", [("binary", 2 * 128), ("index", 128)])
def test_an_explicit_mask_mode_reads_a_mix_as_asked(tmp_path, mode, foreground_pixels):
    samples = _both_channels(tmp_path, {"a": 255}, {"v": 1})
    checked = check_dataset(samples, CFG.replace(mask_mode=mode))
    assert checked.codec.mode == mode
    assert int(checked.class_pixels[1]) == foreground_pixels  # index: the 255 half is ignore, as asked


@pytest.mark.parametrize("masks, mode", [
    ([{255}, {255}], "binary"),  # 0/255 everywhere
    ([{1}, {1}], "index"),  # 0/1 everywhere
    ([{1, 255}, {1, 255}, {1}], "index"),  # index masks with an ignore band (255) in some
])
def test_consistent_mask_sets_are_still_read_without_asking(tmp_path, masks, mode):
    for i, values in enumerate(masks):
        mask = np.zeros((16, 16), np.uint8)
        mask[:8] = min(values)  # the foreground: 1 or 255
        if len(values) > 1:
            mask[8:10] = 255  # and an ignore band
        write_pair(tmp_path, f"m{i}", np.zeros((16, 16, 3), np.uint8), mask)
    checked = check_dataset(pair_channel(tmp_path), CFG)
    assert checked.codec.mode == mode and checked.class_pixels[1] == len(masks) * 128


def test_mixed_masks_stop_the_train_command_before_training(tmp_path, capsys):
    _both_channels(tmp_path, {"a": 255, "b": 255}, {"v": 1})
    err = cli_error(capsys, ["train", "--data", tmp_path, "--output", tmp_path / "run", *_tiny_args()])
    assert "validation/masks/v.png" in err and "train/masks/a.png" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# --- a hand-edited config.json is checked against the weights ----------------------------------------------------

CONFIG_EDITS = [
    ("std-zero", _set("normalization.std", [0.0, 0.224, 0.225]), "std"),
    ("std-negative", _set("normalization.std", [-0.2, 0.2, 0.2]), "std"),
    ("std-nan", _set("normalization.std", [float("nan"), 0.2, 0.2]), "std"),
    ("mean-short", _set("normalization.mean", [0.5]), "mean"),
    ("mean-text", _set("normalization.mean", ["a", "b", "c"]), "mean"),
    ("norm-mode", _set("normalization.mode", "zscore"), "normalization"),
    ("classes", _set("classes", 5), "classes"),
    ("in-channels", _set("in_channels", 1), "in_channels"),
    ("encoder", _set("encoder", "resnet50"), "encoder"),
    ("class-names", _set("class_names", ["background"]), "class_names"),
    ("class-colors-short", _set("class_colors", [[0, 0, 0]]), "class_colors"),
    ("class-colors-range", _set("class_colors", [[0, 0, 0], [300, 0, 0]]), "class_colors"),
    ("stride-zero", _set("input.stride", 0), "stride"),
    ("stride-wrong", _set("input.stride", 16), "stride"),
    ("no-input", _drop("input"), "input"),
    ("no-hyperparameters", _drop("hyperparameters"), "hyperparameters"),
    ("hyperparameters-text", _set("hyperparameters", "lr=0.1"), "hyperparameters"),
    ("hyperparameters-bad", _set("hyperparameters.optimizer", "adamx"), "optimizer"),
    ("hp-classes", _set("hyperparameters.classes", "3"), "classes"),
    ("mask-mode", _set("mask_mode", "rgb"), "mask_mode"),
    ("no-class-names", _drop("class_names"), "class_names"),
]


@pytest.mark.parametrize("name, edit, field", CONFIG_EDITS, ids=[c[0] for c in CONFIG_EDITS])
def test_a_config_that_contradicts_itself_or_the_weights_is_refused(model_dir, tmp_path, name, edit, field):
    from unetseg.model import load_model

    bad = edited_copy(model_dir, tmp_path / name, edit)
    with pytest.raises(ArtifactError) as info:
        load_model(bad, device="cpu")
    message = str(info.value)
    assert str(bad / "config.json") in message or str(bad) in message
    assert field in message, message


def test_a_config_that_is_not_an_object_and_a_broken_history_are_named(model_dir, tmp_path):
    from unetseg.model import load_model

    listed = shutil.copytree(model_dir, tmp_path / "list")
    (listed / "config.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="config.json"):
        load_model(listed, device="cpu")
    history = shutil.copytree(model_dir, tmp_path / "history")
    (history / "history.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="history.json"):
        load_model(history, device="cpu")


def test_weights_with_nan_are_refused(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from unetseg.model import load_model

    bad = shutil.copytree(model_dir, tmp_path / "nan")
    weights = load_file(str(bad / "model.safetensors"))
    name = sorted(k for k in weights if k.endswith("weight"))[0]
    weights[name][0].fill_(float("nan"))
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        load_model(bad, device="cpu")


def test_a_fine_tuning_source_is_checked_the_same_way(model_dir, tmp_path):
    from unetseg.model import read_init_model

    bad = edited_copy(model_dir, tmp_path / "init", _set("classes", 7))
    with pytest.raises(ArtifactError, match="classes"):
        read_init_model(bad, TrainConfig(**TINY))


# --- two validation folders or channels ----------------------------------------------------------------------------

def test_val_and_validation_folders_together_are_refused_by_train(tmp_path, capsys):
    for name in ("train", "val", "validation"):
        make_channel(tmp_path / name, count=2, size=16)
    err = cli_error(capsys, ["train", "--data", tmp_path, "--output", tmp_path / "run", *_tiny_args()])
    assert "val/" in err and "validation/" in err and "--validation" in err


def test_a_folder_that_is_both_a_channel_and_a_dataset_root_is_refused(tmp_path, capsys):
    make_channel(tmp_path, count=2, size=16)
    make_channel(tmp_path / "train", count=2, size=16)
    err = cli_error(capsys, ["train", "--data", tmp_path, "--output", tmp_path / "run", *_tiny_args()])
    assert "images/" in err and "train/" in err


def test_an_explicit_validation_folder_settles_it(tmp_path):
    from unetseg.cli import _split_layout

    for name in ("train", "val", "validation"):
        (tmp_path / name).mkdir()
    assert _split_layout(tmp_path, tmp_path / "val") == (tmp_path / "train", tmp_path / "val")


@pytest.mark.parametrize("channels, named", [
    ({"train": "t", "val": "a", "validation": "b"}, ("val/", "validation/")),
    ({"train": "t", "training": "u"}, ("train/", "training/")),
])
def test_two_channels_for_one_role_are_refused_in_the_container(channels, named):
    from unetseg.container.training_job import pick_channels

    with pytest.raises(DataError) as info:
        pick_channels({k: Path(v) for k, v in channels.items()})
    assert all(n in str(info.value) for n in named)


# =================================================================================================================
# 2. Untrusted sizes: bombs from headers
# =================================================================================================================

BOMBS = {  # name: (file name, bytes); each declares gigabytes in at most a few hundred bytes
    "png-rgb-40k": ("bomb.png", lambda: png_bomb(40000, 40000, 3)),
    "png-gray-40k": ("bomb.png", lambda: png_bomb(40000, 40000, 1)),
    "png-16bit-30k": ("bomb.png", lambda: png_bomb(30000, 30000, 3, bit_depth=16)),
    "png-100k": ("bomb.png", lambda: png_bomb(100000, 100000, 3)),
    "png-max": ("bomb.png", lambda: png_bomb(2**31 - 1, 2**31 - 1, 1)),
    "tiff-100k": ("bomb.tif", lambda: tiff_bomb(100000, 100000, 1)),
    "tiff-rgb-40k": ("bomb.tiff", lambda: tiff_bomb(40000, 40000, 3)),
    "jpeg-rgb-40k": ("bomb.jpg", lambda: jpeg_bomb(40000, 40000, 3)),
    "jpeg-gray-65k": ("bomb.jpg", lambda: jpeg_bomb(65000, 65000, 1)),
}


@pytest.mark.parametrize("kind", BOMBS)
def test_a_bomb_is_refused_from_its_header_when_read_as_image_or_mask(tmp_path, kind):
    name, make = BOMBS[kind]
    path = tmp_path / name
    path.write_bytes(make())
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        for reader in (read_image, read_mask):
            with pytest.raises(DataError) as info:
                reader(path)
            assert str(path) in str(info.value)
            assert MAX_IMAGE_MB_ENV in str(info.value) or "forged" in str(info.value), str(info.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated for a header"  # numpy and PIL report to tracemalloc


@pytest.mark.slow  # starts the real command in a child process
def test_the_data_check_names_every_bomb_and_stays_small(tmp_path):
    root = make_channel(tmp_path / "train", count=3, size=16)
    (root / "masks" / "orphan.png").write_bytes((root / "masks" / "s00.png").read_bytes())
    argv = ["train", "--data", root, "--output", tmp_path / "run", *_tiny_args()]
    code, err, baseline = peak_rss_mib(argv)  # the same command, stopped by a cheap problem before any decoding
    assert code == 2 and "orphan.png" in err, err[-3000:]
    (root / "masks" / "orphan.png").unlink()
    for i, kind in enumerate(("png-rgb-40k", "png-gray-40k", "tiff-100k", "jpeg-rgb-40k")):
        name, make = BOMBS[kind]
        image = root / "images" / f"b{i}{Path(name).suffix}"
        image.write_bytes(make())
        save(root / "masks" / f"b{i}.png", np.zeros((16, 16), np.uint8))
    (root / "masks" / "s00.png").write_bytes(png_bomb(40000, 40000, 1))  # a mask can be a bomb too
    code, err, peak = peak_rss_mib(argv)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    for name in ("images/b0.png", "images/b1.png", "images/b2.tif", "images/b3.jpg", "masks/s00.png"):
        assert name in err, err
    assert peak < baseline + BOMB_EXTRA_MIB and peak < BOMB_TOTAL_MIB, f"{peak:.0f} MiB, {baseline:.0f} without bombs"


@pytest.mark.slow  # starts the real command in a child process
def test_predict_names_every_bomb_writes_the_good_masks_and_stays_small(model_dir, tmp_path):
    folder = images_folder(tmp_path / "in", count=2)
    argv = ["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out", "--device", "cpu"]
    code, err, baseline = peak_rss_mib(argv)  # the good images alone
    assert code == 0, err[-3000:]
    for kind in ("png-rgb-40k", "png-100k", "tiff-rgb-40k", "jpeg-gray-65k"):
        name, make = BOMBS[kind]
        (folder / f"{kind}{Path(name).suffix}").write_bytes(make())
    shutil.rmtree(tmp_path / "out")
    code, err, peak = peak_rss_mib(argv)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert all(kind in err for kind in ("png-rgb-40k", "png-100k", "tiff-rgb-40k", "jpeg-gray-65k")), err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good0.png", "good1.png"]
    assert peak < baseline + BOMB_EXTRA_MIB and peak < BOMB_TOTAL_MIB, f"{peak:.0f} MiB, {baseline:.0f} without bombs"


NPY_BOMBS = {  # the header claims what the body does not hold
    "27.9GiB": ((100000, 100000, 3), "<f4"),
    "2GiB": ((32768, 32768, 2), "<u1"),
    "64MiB": ((4096, 4096, 1), "<f4"),  # allocatable, but a 200-byte body cannot hold it
    "overflow": ((2**62, 2**62), "<u1"),
}


@pytest.mark.parametrize("kind", NPY_BOMBS)
def test_the_server_decoder_refuses_npy_headers_without_allocating(kind):
    shape, dtype = NPY_BOMBS[kind]
    body = npy_bomb(shape, dtype)
    tracemalloc.start()
    try:
        with pytest.raises(codecs.CodecError) as info:
            codecs.decode_image(body, codecs.NPY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "x".join(map(str, shape)) in str(info.value) or "shape" in str(info.value), str(info.value)
    assert peak < 1 << 20, f"{peak / 2**20:.0f} MiB allocated for a {len(body)}-byte request"


@pytest.mark.parametrize("kind", ["png-rgb-40k", "png-gray-40k", "png-100k", "png-16bit-30k", "jpeg-rgb-40k",
                                  "jpeg-gray-65k"])
def test_the_server_decoder_refuses_image_bombs_before_decoding(kind):
    name, make = BOMBS[kind]
    content_type = codecs.PNG if name.endswith(".png") else codecs.JPEG
    tracemalloc.start()
    try:
        with pytest.raises(codecs.CodecError) as info:
            codecs.decode_image(make(), content_type)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status in (400, 413)
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated for a header"


def test_the_server_decoder_checks_a_pixel_limit_from_the_header():
    body = codecs.encode_image(np.zeros((300, 200, 3), np.uint8))
    assert codecs.decode_image(body, codecs.PNG, max_pixels=60000).shape == (300, 200, 3)
    with pytest.raises(codecs.CodecError, match="200x300") as info:
        codecs.decode_image(body, codecs.PNG, max_pixels=59999)
    assert info.value.status == 413


def test_a_real_image_over_the_limit_says_how_to_raise_it_and_raising_it_works(tmp_path, monkeypatch):
    root = tmp_path / "big"
    rng = np.random.default_rng(0)
    write_pair(root, "a", rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8), np.zeros((1024, 1024), np.uint8))
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "2")
    with pytest.raises(DataError) as info:
        check_dataset(pair_channel(root), CFG)
    message = str(info.value)
    assert "images/a.png" in message and "1024x1024" in message and "UNETSEG_MAX_IMAGE_MB=3" in message
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "3")
    assert check_dataset(pair_channel(root), CFG).sizes == [(1024, 1024)]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_a_bad_limit_setting_is_named(tmp_path, monkeypatch, value):
    make_channel(tmp_path, count=2, size=16)
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, value)
    with pytest.raises(UnetsegError) as info:
        check_dataset(pair_channel(tmp_path), CFG)
    assert f"UNETSEG_MAX_IMAGE_MB={value!r}" in str(info.value) and "MiB" in str(info.value)


def test_predict_decodes_only_a_bounded_number_of_images_ahead(model_dir, tmp_path, monkeypatch):
    import unetseg.predict as predict
    from unetseg.model import load_model

    folder = images_folder(tmp_path / "in", count=24, size=16)
    decoded, ahead = [], []
    real_read = predict.read_image_valid
    monkeypatch.setattr(predict, "read_image_valid", lambda path: decoded.append(path) or real_read(path))
    model = load_model(model_dir, device="cpu")
    real_chunk = predict._predict_chunk

    def chunk(*args, **kwargs):
        time.sleep(0.05)  # a slow model: decoding must not run through the whole folder meanwhile
        ahead.append(len(decoded) - 2 * len(ahead))  # decoded, less those already predicted
        yield from real_chunk(*args, **kwargs)

    monkeypatch.setattr(predict, "_predict_chunk", chunk)
    predict.predict_files(model, sorted(folder.iterdir()), tmp_path / "out", batch_size=2, progress=False)
    assert len(decoded) == 24 and len(ahead) == 12
    assert max(ahead) <= 3 * 2, ahead  # this chunk and two more


def test_the_data_check_decodes_in_parallel_only_up_to_a_byte_budget(tmp_path, monkeypatch):
    # It decoded up to 8 files at once: near the size limit for one image (2 GiB by default) that was 16 GiB in
    # flight. The decoded bytes in flight, known from the headers, now stay within that limit (one file over it still
    # decodes, alone). 12 samples of 3 MiB image + 1 MiB mask, a 6 MiB limit: one sample at a time, not 8.
    rng = np.random.default_rng(0)
    for i in range(12):
        write_pair(tmp_path, f"s{i:02d}", rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8),
                   np.zeros((1024, 1024), np.uint8))
    monkeypatch.setenv("UNETSEG_MAX_IMAGE_MB", "6")

    def peak_mib(threads: int) -> float:
        tracemalloc.start()  # numpy's (and so OpenCV's) arrays report to tracemalloc
        try:
            checked = check_dataset(pair_channel(tmp_path), CFG.replace(cache_images="off"), threads=threads)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(checked.samples) == 12 and checked.cached is None
        return peak / 2**20

    alone, parallel = peak_mib(threads=1), peak_mib(threads=8)  # one file's decoding (with its buffers), then 8 threads
    assert parallel < 1.5 * alone, f"{parallel:.0f} MiB with 8 threads, {alone:.0f} MiB decoding one sample at a time"


def test_predict_decodes_ahead_only_up_to_a_byte_budget(model_dir, tmp_path, monkeypatch):
    # Two batches ahead is 16 images at the default batch size: 32 GiB of images near the size limit. The decoded
    # bytes not yet predicted stay within the limit for one image (plus the image that goes over it).
    import threading

    import unetseg.predict as predict
    from unetseg.model import load_model

    folder = images_folder(tmp_path / "in", count=12, size=512)  # 768 KiB each, decoded
    monkeypatch.setenv("UNETSEG_MAX_IMAGE_MB", "2")
    lock, held, peak = threading.Lock(), [0], [0]
    real_read, real_chunk = predict.read_image_valid, predict._predict_chunk

    def reading(path):
        image, valid = real_read(path)
        with lock:
            held[0] += image.nbytes
            peak[0] = max(peak[0], held[0])
        return image, valid

    def predicting(model, chunk, *args, **kwargs):
        time.sleep(0.05)  # a slow model: decoding must not run through the whole folder meanwhile
        yield from real_chunk(model, chunk, *args, **kwargs)
        with lock:
            held[0] -= sum(image.nbytes for _, image, _ in chunk)

    monkeypatch.setattr(predict, "read_image_valid", reading)
    monkeypatch.setattr(predict, "_predict_chunk", predicting)
    written = predict.predict_files(load_model(model_dir, device="cpu"), sorted(folder.iterdir()), tmp_path / "out",
                                    progress=False)
    assert len(written) == 12 and held[0] == 0
    image_bytes = 512 * 512 * 3
    assert peak[0] <= (2 << 20) + image_bytes, f"{peak[0] / image_bytes:.0f} images decoded and not yet predicted"


# =================================================================================================================
# 3. Tracebacks where a message belongs
# =================================================================================================================

# --- the output: full, read-only, a file ----------------------------------------------------------------------------

def _namespace_prefix() -> list[str]:
    """A private mount namespace (root: plain unshare; others: a user namespace), or skip where neither works."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1): a private tmpfs needs a mount namespace")
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("mount namespaces are not allowed here")
    return prefix


def run_with_mounts(mounts: list[tuple[Path, str]], argv: list[str], listing: Path | None = None,
                    timeout: int = 300, command: list[str] | None = None, env: dict | None = None
                    ) -> subprocess.CompletedProcess:
    """The CLI (or `command`) in a mount namespace where each (folder, options) is a tmpfs (e.g. "size=20m", "ro");
    afterwards the names in `listing` are printed to stdout (the tmpfs is gone once the namespace ends)."""
    prefix = _namespace_prefix()
    script = " && ".join(f"mount -t tmpfs -o {opts} tmpfs '{folder}'" for folder, opts in mounts)
    command = " ".join(f"'{a}'" for a in command or [PY, "-m", "unetseg.cli", *map(str, argv)])
    script += f"; {command}; rc=$?; " + (f"ls -A '{listing}'; " if listing else "") + "exit $rc"
    env = {**(env or os.environ), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    make_channel(tmp_path / "data" / "train", count=4, size=32)
    make_channel(tmp_path / "data" / "validation", count=2, size=32, seed=1)
    return tmp_path / "data"


@pytest.mark.slow  # starts the real command in a child process
@pytest.mark.parametrize("where, size, target", [
    ("checkpoints", "20m", "best.safetensors"),  # safetensors' writer: "No space left on device (os error 28)"
    ("checkpoints", "60m", "last.pt"),  # best.safetensors fits, torch.save's writer fails: "unexpected pos"
    ("model", "20m", "model.safetensors"),  # training done, the model does not fit
])
def test_disk_full_names_the_file_and_leaves_no_partial_file(tiny_dataset, tmp_path, where, size, target):
    run = tmp_path / "run"
    (run / where).mkdir(parents=True)
    done = run_with_mounts([(run / where, f"size={size}")], ["train", "--data", tiny_dataset, "--output", run,
                                                             *_tiny_args(num_workers=2)], listing=run / where)
    err = assert_clean_exit(done, str(run / where / target), "no space left")
    assert f"error: disk full writing {run / where / target}: no space left on device" in err, err
    # The partial files (the temporary file, the copy beside the target) were removed: the space is free again.
    assert ".tmp." not in done.stdout and ".partial" not in done.stdout, done.stdout
    assert "resume" in err or where == "model"


@pytest.mark.slow  # starts the real command in a child process
@pytest.mark.parametrize("where, size, target", [
    ("checkpoints", "60m", "last.pt"),  # staged in $TMPDIR, copied beside it: the copy fails
    ("model", "20m", "model.safetensors"),  # written beside it: the write fails
])
def test_disk_full_in_the_container_is_the_failure_file_first_line(tiny_dataset, tmp_path, where, size, target):
    # SageMaker shows the failure file's first 1024 characters as the job's FailureReason: the file and the reason
    # must be there, not a torch or safetensors traceback.
    from support import sagemaker_tree

    root = tmp_path / "ml"
    env = sagemaker_tree(root, {**TINY, "epochs": 1, "num_workers": 2},
                         {"train": tiny_dataset / "train", "validation": tiny_dataset / "validation"})
    (root / where).mkdir(parents=True, exist_ok=True)  # SageMaker makes model/ and checkpoints/ beforehand
    done = run_with_mounts([(root / where, f"size={size}")], [], listing=root / where, env=env,
                           command=[PY, str(Path(__file__).resolve().parents[1] / "entry" / "train.py")])
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    first = (root / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith(f"disk full writing {root / where / target}: no space left on device"), first
    # The folder after the failure (listed last): finished files only, no temporary file or partial copy.
    assert ".partial" not in done.stdout and ".tmp." not in done.stdout, done.stdout[-2000:]


ATOMIC_UNDER_A_FILE_SIZE_LIMIT = """
import json, resource, signal, sys, tempfile, torch
from pathlib import Path
from unetseg import checkpoint
from unetseg.model import save_artifact
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
folder, tempfile.tempdir = Path(sys.argv[1]), sys.argv[2]
weights = {"w": torch.zeros(1 << 19)}  # 2 MiB
for name, save in (("last.pt", lambda: checkpoint.save_state(folder, {"model": weights})),
                   ("best.safetensors", lambda: checkpoint.save_best(folder, weights)),
                   ("model.safetensors", lambda: save_artifact(folder / "model", weights, {}, []))):
    try:
        save()
        print(json.dumps({"name": name, "raised": None}))
    except Exception as exc:
        print(json.dumps({"name": name, "raised": type(exc).__name__, "oserror": isinstance(exc, OSError),
                          "errno": getattr(exc, "errno", None), "text": str(exc)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("staged", [False, True])
def test_every_file_write_fails_with_one_error_naming_the_file_and_leaves_no_partial_file(tmp_path, staged):
    # torch.save says "unexpected pos" and safetensors "os error 27": a file size limit (EFBIG) behaves as a quota does
    # and needs no privileges. Staged: the checkpoint's temporary file lives on another folder ($TMPDIR).
    import errno

    folder, staging = tmp_path / "checkpoints", tmp_path / ("staging" if staged else "checkpoints")
    staging.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([PY, "-c", ATOMIC_UNDER_A_FILE_SIZE_LIMIT, str(folder), str(staging)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    for name, target in (("last.pt", folder / "last.pt"), ("best.safetensors", folder / "best.safetensors"),
                         ("model.safetensors", folder / "model" / "model.safetensors")):
        result = results[name]
        assert result["raised"] == "WriteFailed" and result["oserror"] and result["errno"] == errno.EFBIG, result
        assert result["text"].startswith(f"file too large writing {target}"), result
        assert result["text"].endswith(": file too large (a file size limit applies)"), result
        # Where the failed write was, when not beside the file: the staging folder is the one to make room in.
        via = f"(through its temporary copy in {staging})"
        assert (via in result["text"]) == (staged and name != "model.safetensors"), result
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # no temporary file, no partial copy: the space is free again


@pytest.mark.slow  # starts the real command in a child process
def test_a_file_size_limit_names_the_file(tiny_dataset, tmp_path):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as a quota-like limit behaves
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    done = run_cli(["train", "--data", tiny_dataset, "--output", tmp_path / "run", *_tiny_args(num_workers=2)],
                   preexec_fn=limit_file_size)
    assert_clean_exit(done, str(tmp_path / "run" / "checkpoints" / "best.safetensors"), "file too large")


@pytest.mark.slow  # starts the real command in a child process
def test_a_read_only_output_is_refused_before_the_data_is_read(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tiny_dataset / "train" / "masks" / "s00.png").write_bytes(b"broken")  # the output's error must come first
    done = run_with_mounts([(run, "ro")], ["train", "--data", tiny_dataset, "--output", run, *_tiny_args()])
    assert_clean_exit(done, f"--output {run}", "read-only")
    assert "s00.png" not in done.stderr and "data:" not in done.stdout


def test_an_output_that_is_a_file_is_refused_before_the_data_is_read(tiny_dataset, tmp_path, capsys):
    (tiny_dataset / "train" / "masks" / "s00.png").write_bytes(b"broken")
    (tmp_path / "run").write_text("a file")
    err = cli_error(capsys, ["train", "--data", tiny_dataset, "--output", tmp_path / "run", *_tiny_args()])
    assert f"--output {tmp_path / 'run'}" in err and "file" in err and "s00.png" not in err
    (tmp_path / "run2" / "model").parent.mkdir()
    (tmp_path / "run2" / "model").write_text("a file where model/ goes")
    err = cli_error(capsys, ["train", "--data", tiny_dataset, "--output", tmp_path / "run2", *_tiny_args()])
    assert str(tmp_path / "run2" / "model") in err and "s00.png" not in err


@pytest.mark.slow  # starts the real command in a child process
def test_predict_output_that_is_a_file_or_read_only(model_dir, tmp_path, capsys):
    folder = images_folder(tmp_path / "in")
    (tmp_path / "out").write_text("a file")
    err = cli_error(capsys, ["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out"])
    assert f"--output {tmp_path / 'out'}" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    done = run_with_mounts([(ro, "ro")], ["predict", "--model", model_dir, "--input", folder, "--output", ro / "masks"])
    assert_clean_exit(done, str(ro / "masks"), "read-only")


@pytest.mark.slow  # starts the real command in a child process
def test_predict_disk_full_names_the_mask_file(model_dir, tmp_path):
    folder = images_folder(tmp_path / "in", count=3, size=64)
    out = tmp_path / "out"
    out.mkdir()
    done = run_with_mounts([(out, "size=4k")], ["predict", "--model", model_dir, "--input", folder, "--output", out,
                                                "--probabilities", "--device", "cpu"], listing=out)
    assert_clean_exit(done, str(out), "no space left")


# --- Ctrl-C while the data is checked ------------------------------------------------------------------------------

@pytest.mark.slow  # starts the real command in a child process
def test_ctrl_c_during_the_data_check_is_one_line(tmp_path):
    root = make_channel(tmp_path / "data", count=300, size=16)
    fifo = root / "masks" / "s150.png"
    fifo.unlink()
    os.mkfifo(fifo)  # a slow file: opening it blocks until the test writes, so the check is surely under way
    proc = subprocess.Popen([PY, "-m", "unetseg.cli", "train", "--data", str(root), "--output", str(tmp_path / "run"),
                             *_tiny_args()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})

    def serve_reader() -> bool:
        """Give a reader that has opened the FIFO a few bytes and an end of file; False while none has."""
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return False
        _serve(writer)
        return True

    deadline = time.monotonic() + 120
    writer = None
    while writer is None:  # a reader has opened the slow file: the data check is under way, and waits for it
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    # The check cannot end while its reader waits on the slow file, so the signal is taken before the check's own
    # error can win (served first, a slow signal on a loaded machine landed after the check had read everything).
    # When a pool thread reads the file, the main thread says the stop at once; when the main thread itself is the
    # reader, blocked in the read, the signal stays pending until the file is served: so serve it after the stop is
    # said, or after a few seconds, by which time the signal is surely pending.
    said = b""
    os.set_blocking(proc.stderr.fileno(), False)
    pending_by = min(deadline, time.monotonic() + 5)
    while b"interrupted" not in said and proc.poll() is None and time.monotonic() < pending_by:
        try:
            said += os.read(proc.stderr.fileno(), 65536)
        except BlockingIOError:
            time.sleep(0.02)
    os.set_blocking(proc.stderr.fileno(), True)
    _serve(writer)
    while proc.poll() is None and time.monotonic() < deadline:  # any later reader of the slow file gets its bytes too
        serve_reader()
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, said.decode() + err)
    assert_clean_exit(done, "interrupted")
    assert "data:" not in out  # stopped in the data check, not after it


@pytest.mark.slow  # starts the real container entry in a child process
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_the_data_check_in_the_container_is_a_stop_not_a_failure(tmp_path, sig):
    # `docker run` passes Ctrl-C to PID 1 as SIGINT, SageMaker stops with SIGTERM: either is a stop, also before
    # training starts (the data check of a large dataset takes minutes): exit 128 + the signal, no failure file.
    from support import REPO, sagemaker_tree

    root = make_channel(tmp_path / "data", count=300, size=16)
    fifo = root / "masks" / "s150.png"
    fifo.unlink()
    os.mkfifo(fifo)  # opening it blocks until the test writes: the data check is surely under way
    env = sagemaker_tree(tmp_path / "ml", {**TINY, "epochs": 1}, {"train": root})
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    # The training toolkit's part: it has no handler for either signal and dies of it (Python's own SIGINT handler,
    # with its KeyboardInterrupt traceback, is the stand-in's, not the toolkit's).
    toolkit = [PY, "-c", "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                         "sys.exit(subprocess.call(sys.argv[1:]))"]
    proc = subprocess.Popen([PY, str(REPO / "entry" / "init.py"), *toolkit, PY, str(REPO / "entry" / "train.py")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _interrupt_when_the_fifo_is_read(proc, fifo, sig)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    failure = tmp_path / "ml" / "output" / "failure"
    assert not failure.exists(), failure.read_text()[:3000]
    assert "Traceback" not in err and "data:" not in out, err[-3000:]


def _serve(writer: int) -> None:
    """A few bytes that are not an image, then an end of file, to the slow file's reader. A reader that is being
    stopped may close the file between our open and our write (a broken pipe): then there is nothing to serve."""
    try:
        os.write(writer, b"not a png")
    except BrokenPipeError:
        pass
    finally:
        os.close(writer)


def _interrupt_when_the_fifo_is_read(proc: subprocess.Popen, fifo: Path, sig: int) -> tuple[str, str]:
    def serve_reader() -> bool:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return False
        _serve(writer)
        return True

    deadline = time.monotonic() + 120
    while not serve_reader():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    while proc.poll() is None and time.monotonic() < deadline:
        serve_reader()
        time.sleep(0.02)
    return proc.communicate(timeout=60)


# --- a bad init model in the container --------------------------------------------------------------------------------

@pytest.mark.slow  # starts the real container entry in a child process
@pytest.mark.parametrize("kind", ["truncated", "other-architecture", "two-archives"])
def test_a_bad_init_model_channel_is_the_failure_file_first_line_before_the_data_check(model_dir, tmp_path, kind):
    # The archive checks themselves (NaN weights, unsafe members, edited configs) are probed in-process above; here
    # the container's answer: the failure file's first line, before a data check that would fail too.
    from support import run_entry, sagemaker_tree

    channel = tmp_path / "init"
    channel.mkdir()
    archive = tar_of(model_dir, channel / "model.tar.gz")
    hps, named = {**TINY, "epochs": 1}, str(archive)
    if kind == "truncated":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif kind == "other-architecture":
        hps["encoder_depth"] = 4
        named = "encoder_depth"
    else:  # two archives, neither model.tar.gz: which one is meant is not clear
        shutil.copy(archive, channel / "a.tar.gz")
        archive.rename(channel / "b.tar.gz")
        named = str(channel)
    data = make_channel(tmp_path / "data", count=2, size=32)
    (data / "masks" / "s00.png").write_bytes(b"broken")  # the init model's error must come first
    done = run_entry(sagemaker_tree(tmp_path / "ml", hps, {"train": data, "init_model": channel}))
    assert done.returncode == 1, done.stderr[-3000:]
    first = (tmp_path / "ml" / "output" / "failure").read_text().splitlines()[0]
    assert named in first and "s00.png" not in first and "Traceback" not in first, first


# --- a checkpoint folder that holds something else than a whole checkpoint -----------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run folder) of a finished one-epoch TINY run: checkpoints/last.pt and best.safetensors."""
    root = tmp_path_factory.mktemp("trained")
    make_channel(root / "data" / "train", count=4, size=32)
    make_channel(root / "data" / "validation", count=2, size=32, seed=1)
    done = run_cli(["train", "--data", root / "data", "--output", root / "run", *_tiny_args()])
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "data", root / "run"


def _damage_last(transform):
    def damage(folder: Path) -> Path:
        path = folder / "last.pt"
        path.write_bytes(transform(path.read_bytes()))
        return path
    return damage


def _drop_field(field: str):
    def damage(folder: Path) -> Path:
        import torch

        state = torch.load(folder / "last.pt", weights_only=True)
        del state[field]
        torch.save(state, folder / "last.pt")
        return folder / "last.pt"
    return damage


def _damage_best(folder: Path) -> Path:
    path = folder / "best.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return path


DAMAGED_CHECKPOINTS = {
    "truncated": (_damage_last(lambda data: data[: len(data) // 2]), "last.pt"),
    "empty": (_damage_last(lambda data: b""), "last.pt"),
    "text": (_damage_last(lambda data: b"not a checkpoint\n" * 20), "last.pt"),
    "pickle": (_damage_last(lambda data: pickle.dumps({"model": object})), "last.pt"),  # never unpickled
    "no-partial": (_drop_field("partial"), "last.pt"),  # another version's layout
    "no-model": (_drop_field("model"), "last.pt"),
    "best-truncated": (_damage_best, "best.safetensors"),
}


@pytest.mark.slow  # trains a model (once, for the module)
@pytest.mark.parametrize("kind", DAMAGED_CHECKPOINTS)
def test_a_damaged_checkpoint_is_named_before_training_resumes(trained_run, tmp_path, capsys, kind):
    data, trained = trained_run
    run = shutil.copytree(trained, tmp_path / "run")
    damage, name = DAMAGED_CHECKPOINTS[kind]
    damaged = damage(run / "checkpoints")
    err = cli_error(capsys, ["train", "--data", data, "--output", run, *_tiny_args(epochs=2)])
    assert str(damaged) in err and "fresh" in err, err
    assert name in err and "epoch=" not in capsys.readouterr().out


@pytest.mark.slow  # trains a model (once, for the module)
def test_a_damaged_checkpoint_in_the_container_is_the_failure_file_first_line(trained_run, tmp_path):
    from support import run_entry, sagemaker_tree

    data, trained = trained_run
    env = sagemaker_tree(tmp_path / "ml", {**TINY, "epochs": 2}, {"train": data / "train",
                                                                  "validation": data / "validation"})
    # restored into the checkpoints/ folder that is already there, as SageMaker restores checkpoint_s3_uri
    shutil.copytree(trained / "checkpoints", tmp_path / "ml" / "checkpoints", dirs_exist_ok=True)
    damaged = _damage_last(lambda data: data[: len(data) // 2])(tmp_path / "ml" / "checkpoints")
    done = run_entry(env)
    assert done.returncode == 1, done.stderr[-3000:]
    first = (tmp_path / "ml" / "output" / "failure").read_text().splitlines()[0]
    assert str(damaged) in first and "checkpoint" in first and "PytorchStreamReader" not in first, first


@pytest.mark.slow  # trains a model (once, for the module)
def test_an_init_model_that_a_resume_does_not_use_is_said(trained_run, tmp_path, capsys):
    # A checkpoint wins over --init-model (a spot restart must not start over from the init model); the user who
    # gives one and sees a resume must be told that it was not used.
    data, trained = trained_run
    run = shutil.copytree(trained, tmp_path / "run")
    code = cli(["train", "--data", str(data), "--output", str(run), "--init-model", str(trained / "model"),
                *_tiny_args(epochs=2)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    said = [line for line in out.splitlines() if str(trained / "model") in line]
    assert len(said) == 1 and "not used" in said[0] and "resum" in said[0], out[-3000:]


# --- model artifacts: broken, unsafe, not what they claim ----------------------------------------------------------

def _predict_error(capsys, model, tmp_path) -> str:
    folder = images_folder(tmp_path / "in", count=1)
    return cli_error(capsys, ["predict", "--model", model, "--input", folder, "--output", tmp_path / "out"])


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_a_truncated_model_tarball(model_dir, tmp_path, capsys, cut):
    whole = tar_of(model_dir, tmp_path / "whole.tar.gz").read_bytes()
    cut_file = tmp_path / "model.tar.gz"
    cut_file.write_bytes(whole[: int(len(whole) * cut)])
    err = _predict_error(capsys, cut_file, tmp_path)
    assert str(cut_file) in err and ("truncated" in err or "corrupt" in err)


def _add_bytes(name: str, data: bytes = b"x", kind=tarfile.REGTYPE, link: str = ""):
    def extra(tar):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return extra


UNSAFE_MEMBERS = {
    "dotdot": _add_bytes("../escaped.txt"),
    "deep-dotdot": _add_bytes("code/../../escaped.txt"),
    "absolute-symlink": _add_bytes("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd"),
    "relative-symlink-out": _add_bytes("up", kind=tarfile.SYMTYPE, link="../../outside"),
    "hardlink-out": _add_bytes("hard", kind=tarfile.LNKTYPE, link="/etc/hostname"),
    "device": _add_bytes("dev", kind=tarfile.CHRTYPE),
}


@pytest.mark.parametrize("kind", UNSAFE_MEMBERS)
def test_unsafe_tar_members_are_refused(model_dir, tmp_path, capsys, kind):
    archive = tar_of(model_dir, tmp_path / "model.tar.gz", UNSAFE_MEMBERS[kind])
    err = _predict_error(capsys, archive, tmp_path)
    assert str(archive) in err and "unsafe" in err
    assert not (tmp_path / "escaped.txt").exists()


WEIGHTS = {
    "zero-bytes": b"",
    "pickle": pickle.dumps({"weight": [1.0, 2.0]}),
    "torch-zip": b"PK\x03\x04" + b"\x00" * 200,
    "text": b"not weights at all\n" * 10,
    "huge-header": (2**40).to_bytes(8, "little") + b"{}",
}


@pytest.mark.parametrize("kind", [*WEIGHTS, "truncated"])
def test_a_weights_file_that_is_not_safetensors(model_dir, tmp_path, capsys, kind):
    bad = shutil.copytree(model_dir, tmp_path / "m")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000] if kind == "truncated" else WEIGHTS[kind])
    err = _predict_error(capsys, bad, tmp_path)
    assert str(weights) in err and "safetensors" in err


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b\x08garbage", b"PK\x03\x04zip"])
def test_a_model_file_that_is_not_a_tarball(tmp_path, capsys, content):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(content)
    err = _predict_error(capsys, archive, tmp_path)
    assert str(archive) in err and ("not a tar archive" in err or "an empty file" in err)


def test_config_without_hyperparameters_or_with_stride_zero_in_predict(model_dir, tmp_path, capsys):
    for name, edit, field in (("nohp", _drop("hyperparameters"), "hyperparameters"),
                              ("stride", _set("input.stride", 0), "stride")):
        bad = edited_copy(model_dir, tmp_path / name, edit)
        err = _predict_error(capsys, bad, tmp_path / f"{name}-run")
        assert str(bad / "config.json") in err and field in err


# --- predict's arguments and images ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--tile", "0"], "--tile 0"),
    (["--tile", "-64"], "--tile -64"),
    (["--tile", "4"], "--tile 4"),  # below the model's stride
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "-2"], "--batch-size -2"),
    (["--device", "banana"], "--device banana"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "cuda:-1"], "--device cuda:-1"),
])
def test_bad_predict_arguments_are_named(model_dir, tmp_path, capsys, args, fragment):
    folder = images_folder(tmp_path / "in", count=1)
    err = cli_error(capsys, ["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out", *args])
    assert fragment in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cuda_without_a_gpu_is_named(model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda is a valid device here (cuda:99 covers the absent one)")
    folder = images_folder(tmp_path / "in", count=1)
    err = cli_error(capsys, ["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out",
                             "--device", "cuda"])
    assert "--device cuda" in err and "cpu" in err


def test_a_grayscale_image_for_an_rgb_model_and_the_reverse_name_the_file(model_dir, tmp_path, capsys):
    folder = images_folder(tmp_path / "in", count=2)
    save(folder / "gray.png", np.zeros((24, 24), np.uint8))
    err = cli_error(capsys, ["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out"])
    assert str(folder / "gray.png") in err and "1 channel" in err and "3" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good0.png", "good1.png"]
    gray_model = _artifact(tmp_path / "gray-model", in_channels=1)
    err = cli_error(capsys, ["predict", "--model", gray_model, "--input", folder / "good0.png",
                             "--output", tmp_path / "out2"])
    assert str(folder / "good0.png") in err and "3 channel" in err


def test_every_unreadable_image_in_a_folder_is_named_and_the_good_ones_get_masks(model_dir, tmp_path, capsys):
    folder = images_folder(tmp_path / "in", count=3)
    good = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    save(folder / "rgba.png", np.zeros((24, 24, 4), np.uint8))
    (folder / "bomb.png").write_bytes(png_bomb(40000, 40000))
    save(folder / "float.tif", np.zeros((24, 24), np.float32) + 0.5)
    err = cli_error(capsys, ["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out"])
    for name in ("truncated.png", "text.png", "empty.jpg", "rgba.png", "bomb.png", "float.tif"):
        assert str(folder / name) in err, err
    assert "6 of 9 images" in err and "wrote 3 mask(s)" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good0.png", "good1.png", "good2.png"]


@pytest.mark.slow  # starts the real command in a child process
def test_a_predict_problem_is_one_line_without_traceback_in_the_real_command(model_dir, tmp_path):
    folder = images_folder(tmp_path / "in", count=1)
    save(folder / "gray.png", np.zeros((24, 24), np.uint8))
    done = run_cli(["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out",
                    "--tile", "0"])
    assert_clean_exit(done, "--tile 0")
    done = run_cli(["predict", "--model", model_dir, "--input", folder, "--output", tmp_path / "out"])
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(folder / "gray.png") in done.stderr
