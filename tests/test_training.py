"""The engine end to end on the CPU: it learns, its artifact reproduces its metrics, resume is exact, DDP works,
and the SageMaker entry contract (string hyperparameters in, artifacts or a failure file out) holds."""

import json
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from support import REPO, TINY, free_port, run_entry, sagemaker_tree, write_pair
from unetseg.contract.config import TrainConfig
from unetseg.contract.metrics_log import EPOCH_METRICS, SELECTION_METRIC, metric_definitions, parse_line
from unetseg.metrics import confusion, summarize
from unetseg.model import artifact_train_config, load_model
from unetseg.synthetic import demo_hyperparameters, make_demo_dataset
from unetseg.training import RunPaths, train

pytestmark = pytest.mark.slow

# Small enough for a few seconds per run on one CPU thread: 16 train / 8 validation images of 32 px, 4 steps an epoch.
HPS = {**TINY, "epochs": 3, "log_every": 1, "seed": 7}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("small"), kind="binary", train=16, validation=8, size=32)


def test_model_learns_and_its_artifact_reproduces_the_best_metric(tmp_path):
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=48, validation=16, size=64)
    cfg = TrainConfig(**{**demo_hyperparameters("binary"), "epochs": 6, "seed": 0})
    paths = RunPaths(data / "train", data / "validation", tmp_path / "model", tmp_path / "ckpt", tmp_path / "out")
    result = train(cfg, paths, progress=False)

    steps = result.history[-1]["step"]
    assert steps == 6 * 6  # 48 images / batch 8, six epochs: the bound on steps
    assert result.best[SELECTION_METRIC] >= 0.85, result.history  # learned within 36 steps
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] / 2

    # The saved model is the best epoch's: recomputing its metric from predictions gives the logged number.
    model = load_model(paths.model_dir, device="cpu")
    from unetseg.data.checks import check_dataset
    from unetseg.data.scan import pair_channel

    val = check_dataset(pair_channel(data / "validation"), cfg)
    matrix = sum(confusion(torch.from_numpy(model.predict(img)), torch.from_numpy(mask), 2) for img, mask in val.cached)
    score = summarize(matrix, cfg.resolved_class_names)[SELECTION_METRIC]
    assert score == pytest.approx(result.best[SELECTION_METRIC], abs=1e-6)
    assert json.loads((paths.model_dir / "history.json").read_text()) == result.history
    assert (paths.output_data_dir / "predictions.png").stat().st_size > 1000


def rare_class_dataset(root, size=64, seed=0):
    """One small square (about 1% of the pixels) per image on a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (("train", 48), ("validation", 16)):
        for i in range(count):
            r = rng.uniform(2.0, 3.5)
            cy, cx = rng.uniform(r + 1, size - r - 1, 2)
            mask = ((np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)).astype(np.uint8)
            base = rng.uniform(0.35, 0.65)
            gray = np.where(mask > 0, base + 0.15, base + 0.1 * rng.standard_normal((size, size)))
            image = (np.clip(np.repeat(gray[..., None], 3, axis=2), 0, 1) * 255).astype(np.uint8)
            write_pair(root / split, f"{split}{i:03d}", image, mask * 255)
    return root


def test_auto_class_weights_find_a_rare_class_that_plain_cross_entropy_ignores(tmp_path):
    data = rare_class_dataset(tmp_path / "data")
    rare = {}
    for setting in (None, "auto"):
        cfg = TrainConfig(**{**TINY, "image_size": 64, "batch_size": 8, "epochs": 4, "loss": "ce", "seed": 0,
                             "class_weights": setting})
        run = tmp_path / str(setting)
        paths = RunPaths(data / "train", data / "validation", run / "model", run / "ckpt", run / "out")
        rare[setting] = train(cfg, paths, progress=False).history[-1]["val_iou_class_1"]
    # 24 steps: plain CE still predicts background everywhere; weighted CE already finds the squares.
    assert rare["auto"] >= 0.05 and rare["auto"] >= rare[None] + 0.05, rare


def test_auto_class_weights_from_pixel_counts():
    from unetseg.losses import AUTO_WEIGHT_RATIO, class_weights

    assert class_weights(None, np.array([5, 5])) is None
    assert class_weights([1, 3], np.array([5, 5])) == [1.0, 3.0]
    w = class_weights("auto", np.array([9900, 100]))  # 1 % foreground: 1/sqrt(share) gives 10x, mean 1
    assert w[1] / w[0] == pytest.approx(np.sqrt(99), rel=1e-3) and np.mean(w) == pytest.approx(1, rel=1e-3)
    w = class_weights("auto", np.array([10**9, 1, 0]))  # capped ratio; an absent class gets 1
    assert w[1] / w[0] == pytest.approx(AUTO_WEIGHT_RATIO, rel=1e-3) and w[2] == 1.0


def entry_env(tmp_path, data, hps=HPS, **extra):
    env = sagemaker_tree(tmp_path, hps, {"train": data / "train", "validation": data / "validation"})
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_entry_contract_writes_artifacts_and_metric_lines(small_data, tmp_path):
    done = run_entry(entry_env(tmp_path, small_data))
    assert done.returncode == 0, done.stderr[-3000:]
    model_dir = tmp_path / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "history.json", "model.safetensors"]
    config = json.loads((model_dir / "config.json").read_text())
    assert artifact_train_config(config) == TrainConfig.from_hyperparameters(
        {k: json.dumps(v) if not isinstance(v, str) else v for k, v in HPS.items()})
    assert (tmp_path / "output" / "data" / "predictions.png").is_file()
    assert not (tmp_path / "output" / "failure").exists()
    # What SageMaker's metric regexes will find in this log: every epoch metric, three times (three epochs).
    for definition in metric_definitions(config["class_names"]):
        found = re.findall(definition["Regex"], done.stdout)
        expected = 12 if definition["Name"] == "step_loss" else 3
        assert len(found) == expected, definition
    epoch_lines = [parse_line(line) for line in done.stdout.splitlines() if line.startswith("epoch=")]
    assert [line["epoch"] for line in epoch_lines] == [1, 2, 3]
    assert all(set(EPOCH_METRICS) <= set(line) for line in epoch_lines)


def test_entry_contract_bad_dataset_writes_a_failure_file_naming_the_file(small_data, tmp_path):
    bad = tmp_path / "bad"
    write_pair(bad / "train", "good", np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8))
    write_pair(bad / "train", "broken", np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8))
    (bad / "train" / "masks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    env = sagemaker_tree(tmp_path / "ml", HPS, {"train": bad / "train"})
    done = run_entry(env)
    assert done.returncode != 0
    failure = (tmp_path / "ml" / "output" / "failure").read_text()
    first = failure[:1024]  # what SageMaker shows as FailureReason
    assert first.startswith("DataError: ") and "masks/broken.png" in first
    assert "Traceback" in failure


def test_bad_hyperparameter_fails_with_the_key_named(small_data, tmp_path):
    done = run_entry(sagemaker_tree(tmp_path, {**HPS, "optimiser": "sgd"}, {"train": small_data / "train"}))
    assert done.returncode != 0
    failure = (tmp_path / "output" / "failure").read_text()
    assert failure.startswith("ConfigError: unknown hyperparameter 'optimiser' (did you mean 'optimizer'?)")


def test_sigterm_then_resume_matches_an_uninterrupted_run(small_data, tmp_path):
    hps = {**HPS, "num_workers": 2}  # as on a GPU job; a SIGTERM to the training process alone spares its workers
    straight = run_entry(entry_env(tmp_path / "straight", small_data, hps))
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = entry_env(tmp_path / "spot", small_data, hps)
    proc = subprocess.Popen([sys.executable, str(REPO / "entry" / "train.py")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("step=6 "):  # mid-way through epoch 2 of 3
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, "".join(log)
    text = "".join(log)
    stopped = re.search(r"stopping on SIGTERM at epoch (\d+), batch (\d+)", text)
    assert stopped and stopped.group(1) == "2" and 1 <= int(stopped.group(2)) < 4, text  # inside an epoch
    assert "epoch=3 " not in text
    assert not (tmp_path / "spot" / "output" / "failure").exists()  # a stop, not a failure
    # The model of the epochs done is written; the picture of predictions, optional, waits for the end.
    assert (tmp_path / "spot" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "spot" / "output" / "data" / "predictions.png").exists()

    resumed = run_entry(env)  # same checkpoint dir, as after a spot restart
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert (tmp_path / "spot" / "output" / "data" / "predictions.png").is_file()

    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "spot" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(tmp_path / "spot" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    timing = ("epoch_time", "images_per_sec")

    def strip(history):
        return [{k: v for k, v in r.items() if k not in timing} for r in history]

    assert strip(last_a["history"]) == strip(last_b["history"])


def test_tuning_trials_sharing_a_checkpoint_uri_do_not_resume_each_other(small_data, tmp_path):
    # SageMaker gives every trial of a tuning job the same checkpoint location: trial 2 must not pick up trial 1's
    # finished state (it would report trial 1's metrics for its own hyperparameters), but its spot restart must resume.
    shared = tmp_path / "shared-checkpoints"
    hps = {**HPS, "epochs": 1, "_tuning_objective_metric": "val_miou"}

    def trial(name, lr, attempt=1):
        env = entry_env(tmp_path / f"{name}-{attempt}", small_data, {**hps, "lr": lr},
                        TRAINING_JOB_NAME=name, UNETSEG_CHECKPOINT_DIR=str(shared))
        done = run_entry(env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first = trial("hpo-001-aaaa", 0.01)
    second = trial("hpo-002-bbbb", 0.002)
    assert "resumed from" not in first and "resumed from" not in second, second
    assert "step=4 " in second  # trained its own 4 steps
    assert sorted(p.name for p in shared.iterdir()) == ["hpo-001-aaaa", "hpo-002-bbbb"]
    assert (shared / "hpo-002-bbbb" / "last.pt").is_file()
    restarted = trial("hpo-002-bbbb", 0.002, attempt=2)  # a spot restart keeps the job's name
    assert f"resumed from {shared / 'hpo-002-bbbb' / 'last.pt'}" in restarted


def test_fine_tuning_from_a_trained_model_through_the_init_model_channel(small_data, tmp_path):
    # Model A trains; job B gets A's model.tar.gz as the init_model channel (how UNetEstimator.fit(init_model=...)
    # delivers it) and, at a learning rate of ~0, scores what A scored, far above a fresh start.
    a_cfg = TrainConfig(**{**HPS, "epochs": 6})
    a = train(a_cfg, RunPaths(small_data / "train", small_data / "validation", tmp_path / "a" / "model",
                              tmp_path / "a" / "ckpt", tmp_path / "a" / "out"), progress=False)
    channel = tmp_path / "init"
    channel.mkdir()
    with tarfile.open(channel / "model.tar.gz", "w:gz") as tar:
        for path in (tmp_path / "a" / "model").iterdir():
            tar.add(path, arcname=path.name)

    frozen = {**HPS, "epochs": 1, "lr": 1e-9, "augment": "none"}
    channels = {"train": small_data / "train", "validation": small_data / "validation", "init_model": channel}
    env = sagemaker_tree(tmp_path / "b", frozen, channels)
    done = run_entry(env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"initialized from {channel}: " in done.stdout
    tuned = json.loads((tmp_path / "b" / "model" / "history.json").read_text())[0]["val_miou"]
    fresh = train(TrainConfig(**frozen), RunPaths(small_data / "train", small_data / "validation",
                                                  tmp_path / "c" / "model", tmp_path / "c" / "ckpt",
                                                  tmp_path / "c" / "out"), progress=False)
    assert abs(tuned - a.best["val_miou"]) < 0.05, (tuned, a.best)  # BatchNorm statistics still move a little
    assert tuned > fresh.history[0]["val_miou"] + 0.2, (tuned, fresh.history)
    assert json.loads((tmp_path / "b" / "model" / "config.json").read_text())["init_model"] == str(channel)


def test_two_process_ddp_on_cpu_trains_and_writes_artifacts_once(small_data, tmp_path):
    env = entry_env(tmp_path, small_data, {**HPS, "epochs": 2, "log_every": 0},
                    UNETSEG_PROCS_PER_HOST="2", UNETSEG_MASTER_PORT=str(free_port()))
    done = run_entry(env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "on 2 x cpu" in done.stdout
    assert "cached in memory, each of 2 processes its own shard" in done.stdout
    epochs = [parse_line(line)["epoch"] for line in done.stdout.splitlines() if line.startswith("epoch=")]
    assert epochs == [1, 2]  # rank 0 only
    assert sum(line.startswith("model: ") for line in done.stdout.splitlines()) == 1  # only rank 0 saves
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    # 16 images over 2 ranks x batch 4: 2 steps per epoch, each step seeing 8 images.
    assert [h["step"] for h in history] == [2, 4]
    assert load_model(tmp_path / "model", device="cpu").predict(np.zeros((32, 32, 3), np.uint8)).shape == (32, 32)


def test_the_predictions_picture_draws_small_crops_of_large_images(tmp_path, monkeypatch):
    # The other ranks wait in a barrier while rank 0 draws: each prediction must be bounded, whatever the image size.
    from unetseg.data.checks import check_dataset
    from unetseg.data.scan import pair_channel
    from unetseg.model import artifact_config, build_model
    from unetseg.segmenter import Segmenter
    from unetseg.training import PICTURE_CROP, draw_predictions

    rng = np.random.default_rng(0)
    for i in range(2):
        write_pair(tmp_path / "val", f"big{i}", rng.integers(0, 256, (600, 900, 3), dtype=np.uint8),
                   rng.integers(0, 2, (600, 900), dtype=np.uint8))
    cfg = TrainConfig(**TINY)
    data = check_dataset(pair_channel(tmp_path / "val"), cfg)
    model = build_model(cfg, pretrained=False)
    shapes, predict = [], Segmenter.predict

    def recording(self, image, **kwargs):
        shapes.append(image.shape)
        return predict(self, image, **kwargs)

    monkeypatch.setattr(Segmenter, "predict", recording)
    draw_predictions(model, model.state_dict(), artifact_config(cfg, data.codec.mode), data, tmp_path / "p.png")
    assert shapes == [(PICTURE_CROP, PICTURE_CROP, 3)] * 2
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_resuming_refuses_another_model_and_names_changed_hyperparameters(tmp_path):
    from unetseg.contract.errors import ConfigError
    from unetseg.training import check_resumable

    saved = TrainConfig(**TINY).to_hyperparameters()
    said = []
    check_resumable(TrainConfig(**{**TINY, "lr": 0.01, "epochs": 9}), saved, tmp_path, said.append)
    assert said == ["resuming with changed hyperparameters: epochs, lr"]
    with pytest.raises(ConfigError) as info:
        check_resumable(TrainConfig(**{**TINY, "classes": 3}), saved, tmp_path, said.append)
    assert f"{tmp_path / 'last.pt'} was trained with a different model (classes: 2 there, 3 now)" in str(info.value)


# --- validation of images larger than a tile -------------------------------------------------------------------------

def big_validation_pair(size: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image of the demo's kind (discs on a textured background) and its 0/255 mask, `size` = (height, width)."""
    height, width = size
    side = max(size)
    demo = make_demo_dataset(Path(tempfile.mkdtemp(prefix="unetseg-big-")), kind="binary", train=1, validation=0,
                             size=side, seed=seed)
    image = np.asarray(Image.open(demo / "train" / "images" / "train_0000.png"))[:height, :width]
    mask = np.asarray(Image.open(demo / "train" / "masks" / "train_0000.png"))[:height, :width]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def scored_by_predict(model_dir, pairs, class_names) -> dict:
    """The validation metrics of `pairs` computed from `unetseg predict`'s masks."""
    model = load_model(model_dir, device="cpu")
    matrix = sum(confusion(torch.from_numpy(model.predict(image)), torch.from_numpy((mask > 0).astype(np.uint8)), 2)
                 for image, mask in pairs)
    return summarize(matrix, class_names)


def test_a_validation_image_larger_than_a_tile_is_scored_as_predict_scores_it(small_data, tmp_path, monkeypatch):
    # Predict tiles images above Segmenter.max_pixels (256 px tiles here, to keep it small on a CPU); validation must
    # too, with the same code: scoring one 1300x1500 image whole gave other metrics than its predicted mask has, and at
    # 20000 x 20000 the whole-image pass was OOM-killed.
    from unetseg.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "max_pixels", 256 * 256)
    monkeypatch.setattr(Segmenter, "default_tile", 256)
    big = big_validation_pair((1300, 1500))
    write_pair(tmp_path / "validation", "big", *big)
    cfg = TrainConfig(**{**HPS, "epochs": 1})
    paths = RunPaths(small_data / "train", tmp_path / "validation", tmp_path / "model", tmp_path / "ckpt",
                     tmp_path / "out")
    logged = train(cfg, paths, progress=False).history[0]

    expected = scored_by_predict(paths.model_dir, [big], cfg.resolved_class_names)
    assert 0 < expected["val_iou_class_1"] < 1, expected  # a mask with both classes, and errors to score
    assert {k: logged[k] for k in expected} == pytest.approx(expected, rel=0, abs=1e-12)
    assert np.isfinite(logged["val_loss"]) and logged["val_loss"] > 0


def test_the_resume_position_is_exact_on_unchanged_data_and_re_expressed_in_epochs_otherwise():
    from unetseg.training import resume_position

    data = {"train": {"images": 32, "files": "aaaa"}, "validation": {"images": 8, "files": "bbbb"},
            "steps_per_epoch": 8, "processes": 1}
    state = {"epoch": 2, "batch": 0, "step": 16, "data": data}
    said = []
    assert resume_position(state, data, 4, said.append) == (2, 0, 16) and said == []  # nothing changed: exact
    assert resume_position({**state, "batch": 3, "step": 19}, data, 4, said.append) == (2, 3, 19) and said == []
    assert resume_position({k: v for k, v in state.items() if k != "data"}, data, 4, said.append) == (2, 0, 16)

    # Two processes now: 4 steps an epoch. At an epoch boundary the position is exact in epochs: step 2 x 4.
    assert resume_position(state, {**data, "steps_per_epoch": 4, "processes": 2}, 4, said.append) == (2, 0, 8)
    assert said[-1] == ("resuming with changes since the checkpoint: 1 processes then, 2 now; steps per epoch 8 -> 4: "
                        "the learning-rate schedule continues from the same point of training (50% done), step 8 "
                        "(was 16)")
    # Other files, as many: the position stays, and it is said; another validation set: the best epoch is old news.
    other = {**data, "train": {"images": 32, "files": "cccc"}, "validation": {"images": 9, "files": "dddd"}}
    assert resume_position({**state, "batch": 5, "step": 21}, other, 4, said.append) == (2, 5, 21)
    assert "the 32 training images are not the same files" in said[-1]
    assert "8 validation images then, 9 now (the best epoch so far was scored on the old ones)" in said[-1]


def test_two_processes_validate_large_images_each_its_own_tiled_and_sum_them(small_data, tmp_path):
    # One image above predict's tiling size (2048 x 2048) per rank: each rank tiles its own, the confusion matrices are
    # summed, and the logged metrics are those of predict's masks for both images.
    pairs = [big_validation_pair((2049, 2049), seed=seed) for seed in (1, 2)]
    for i, pair in enumerate(pairs):
        write_pair(tmp_path / "validation", f"big{i}", *pair)
    env = sagemaker_tree(tmp_path / "ml", {**HPS, "epochs": 1, "num_workers": 2},
                         {"train": small_data / "train", "validation": tmp_path / "validation"})
    env.update(PYTHONUNBUFFERED="1", UNETSEG_PROCS_PER_HOST="2", UNETSEG_MASTER_PORT=str(free_port()))
    done = run_entry(env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    logged = json.loads((tmp_path / "ml" / "model" / "history.json").read_text())[0]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank computed (OMP_NUM_THREADS=1)
    try:
        expected = scored_by_predict(tmp_path / "ml" / "model", pairs, ["class_0", "class_1"])
    finally:
        torch.set_num_threads(threads)
    assert {k: logged[k] for k in expected} == pytest.approx(expected, rel=0, abs=1e-12)
    assert "2 image(s) over 2048x2048 validated in 1024 px tiles as predict tiles them" in done.stdout, done.stdout
