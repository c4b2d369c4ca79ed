"""Stopping a job as SageMaker stops it, with production's process tree: SIGTERM to PID 1 (entry/init.py), which runs
the training toolkit, which runs entry/train.py; DataLoader workers on; one process, or two under torchrun (gloo).

A stop must end in a checkpoint at a step boundary, exit code 128 + SIGTERM and no failure file; the next run resumes
from the checkpoint and ends with the same weights as a run that was never stopped.
"""

import json
import math
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import process_tree
from support import REPO, TINY, free_port, sagemaker_tree
from unetseg.contract.metrics_log import parse_line
from unetseg.contract.sagemaker_env import MASTER_PORT_ENV
from unetseg.synthetic import make_demo_dataset

pytestmark = pytest.mark.slow

INIT = [sys.executable, str(REPO / "entry" / "init.py")]
# The SageMaker training toolkit's part: it runs train.py as its child and has no SIGTERM handler, so it dies of one.
TOOLKIT = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]
TRAIN = [sys.executable, str(REPO / "entry" / "train.py")]
TIMING = ("epoch_time", "images_per_sec")


def job_env(root, data, hps, **extra):
    env = sagemaker_tree(root, hps, {"train": data / "train", "validation": data / "validation"})
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run_entry(env, timeout: float = 600) -> subprocess.CompletedProcess:
    return process_tree.run(TRAIN, env, timeout)


def stop_after(env, step: int, timeout: float = 600) -> tuple[int, str]:
    """Start init -> toolkit -> train.py, send SIGTERM to init once `step=<step>` is logged; (exit code, log)."""
    proc = subprocess.Popen([*INIT, *TOOLKIT, *TRAIN], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = []
    with process_tree.deadline(proc, timeout) as expired:
        for line in proc.stdout:
            log.append(line)
            if line.startswith(f"step={step} "):
                proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    assert not expired.is_set(), f"no end after {timeout} s\n" + "".join(log)[-4000:]
    return code, "".join(log)


def history_without_timing(root) -> list[dict]:
    last = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    return [{k: v for k, v in record.items() if k not in TIMING} for record in last["history"]]


def assert_same_weights(a_root, b_root) -> None:
    a = load_file(str(a_root / "model" / "model.safetensors"))
    b = load_file(str(b_root / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    last_a = torch.load(a_root / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(b_root / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    assert (last_a["epoch"], last_a["step"]) == (last_b["epoch"], last_b["step"])


def assert_stopped_inside_an_epoch(code: int, log: str, root, steps_per_epoch: int) -> tuple[int, int]:
    failure = root / "output" / "failure"
    assert not failure.exists(), failure.read_text()[:2000] + "\n---\n" + log[-3000:]
    assert code == 128 + signal.SIGTERM, (code, log[-4000:])
    stopped = re.search(r"stopping on SIGTERM at epoch (\d+), batch (\d+)", log)
    assert stopped, log[-4000:]
    epoch, batch = int(stopped.group(1)), int(stopped.group(2))
    assert 1 <= batch < steps_per_epoch, log[-4000:]  # at a step boundary inside an epoch, not at its end
    return epoch, batch


def test_sigterm_to_pid1_with_loader_workers_checkpoints_and_resumes_exactly(tmp_path):
    # 64 training images, batch 4: 16 steps an epoch, 2 epochs; two loader workers, as on every GPU job. SIGTERM once
    # step 18 (epoch 2) is logged: the stop lands at a step boundary soon after, well before the epoch ends.
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=64, validation=8, size=32)
    hps = {**TINY, "epochs": 2, "log_every": 1, "seed": 7, "num_workers": 2}
    straight = run_entry(job_env(tmp_path / "straight", data, hps))
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = job_env(tmp_path / "spot", data, hps)
    code, log = stop_after(env, step=18)
    epoch, batch = assert_stopped_inside_an_epoch(code, log, tmp_path / "spot", steps_per_epoch=16)
    assert epoch == 2 and "\nepoch=2 " not in log, log[-3000:]  # no line for epoch 2: it did not end
    # The model of the epoch done is written; the picture of predictions waits for the end.
    assert (tmp_path / "spot" / "model" / "model.safetensors").is_file()

    resumed = run_entry(env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = tmp_path / "spot" / "checkpoints" / "last.pt"
    assert f"resumed from {last}: epoch {epoch}, batch {batch}" in resumed.stdout
    assert_same_weights(tmp_path / "straight", tmp_path / "spot")
    assert history_without_timing(tmp_path / "straight") == history_without_timing(tmp_path / "spot")


def test_two_processes_stop_with_loader_workers_and_resume_exactly(tmp_path):
    # 2 ranks x batch 4 x 16 steps an epoch, 2 epochs. The ranks agree on a stop every 10 steps, so the stop lands at
    # step 10, 20 or 30: inside an epoch, whichever it is.
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=128, validation=8, size=32)
    hps = {**TINY, "epochs": 2, "log_every": 1, "seed": 11, "num_workers": 2}

    def env(name):
        return job_env(tmp_path / name, data, hps, UNETSEG_PROCS_PER_HOST="2", UNETSEG_MASTER_PORT=str(free_port()))

    straight = run_entry(env("straight"))
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-4000:]
    assert "on 2 x cpu" in straight.stdout and "2 loader workers" in straight.stdout

    spot = env("spot")
    code, log = stop_after(spot, step=3)
    epoch, batch = assert_stopped_inside_an_epoch(code, log, tmp_path / "spot", steps_per_epoch=16)

    spot[MASTER_PORT_ENV] = str(free_port())
    resumed = run_entry(spot)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"epoch {epoch}, batch {batch}" in resumed.stdout, resumed.stdout[-3000:]
    assert_same_weights(tmp_path / "straight", tmp_path / "spot")
    # The epoch that the stop cut in two reports the loss over all of its steps on both ranks, as the straight run does.
    a, b = history_without_timing(tmp_path / "straight"), history_without_timing(tmp_path / "spot")
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=1e-5, abs=0)
    assert [{k: v for k, v in r.items() if k != "train_loss"} for r in a] == \
        [{k: v for k, v in r.items() if k != "train_loss"} for r in b]
    assert json.loads((tmp_path / "spot" / "model" / "history.json").read_text())[-1]["epoch"] == 2


# --- checkpoint files: the synced folder holds finished files only --------------------------------------------------

KILLED_MID_WRITE = """
import os, signal, sys, torch
from pathlib import Path
from unetseg import checkpoint
folder = Path(sys.argv[1])
checkpoint.save_state(folder, {"step": 1, "weights": torch.zeros(1000)})
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):  # half the file written, then SIGKILL: SageMaker's 120 s are up
    real_save(obj, f, *args, **kwargs)
    os.truncate(f, os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
checkpoint.save_state(folder, {"step": 2, "weights": torch.ones(1000)})
"""


def test_a_kill_mid_write_leaves_nothing_half_written_in_the_synced_checkpoint_folder(tmp_path):
    # SageMaker uploads whatever appears in the checkpoint folder and restores all of it on a restart: a temporary file
    # there, orphaned by a kill, would come back (model and optimizer in size) after every restart.
    folder = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 1  # the previous checkpoint, intact


def test_checkpoint_files_staged_on_another_filesystem_still_arrive_whole(tmp_path, monkeypatch):
    # Staged in /dev/shm (tmpfs) for a checkpoint folder on disk: a rename cannot cross filesystems (EXDEV).
    import os
    import tempfile

    from unetseg import checkpoint

    staging = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    if staging is None or os.stat(staging).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here to stage on")
    monkeypatch.setattr(tempfile, "tempdir", staging)
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_state(folder, {"step": step, "weights": torch.full((1000,), float(step))})
    checkpoint.save_best(folder, {"w": torch.ones(3)})
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors", "last.pt"]
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 2
    assert os.listdir(staging) == []
    os.rmdir(staging)


# --- resuming after the training set changed -------------------------------------------------------------------------

def _keep_training_images(data, count: int, seed: int = 5) -> None:
    """Make the training channel hold `count` images: drop the last ones, or add new ones of the same kind."""
    images = sorted((data / "train" / "images").iterdir())
    for image in images[count:]:
        image.unlink()
        (data / "train" / "masks" / f"{image.stem}.png").unlink()
    if count > len(images):
        extra = make_demo_dataset(data.parent / "extra", kind="binary", train=count - len(images), validation=0,
                                  size=32, seed=seed)
        for image in sorted((extra / "train" / "images").iterdir()):
            image.rename(data / "train" / "images" / f"new-{image.name}")
            (extra / "train" / "masks" / f"{image.stem}.png").rename(data / "train" / "masks" / f"new-{image.stem}.png")


@pytest.mark.parametrize("before, after, stop_at", [
    (32, 8, 10),  # shrank: 8 -> 2 steps an epoch; stopped 2 steps into epoch 2 of 4
    (24, 72, 8),  # grew: 6 -> 18 steps an epoch
])
def test_a_resume_on_a_changed_training_set_continues_the_schedule_where_it_stopped_and_says_so(
        tmp_path, before, after, stop_at):
    # Cosine over 4 epochs, batch 4, loader workers on. The schedule is a function of the optimizer step: rebuilt for
    # the new steps per epoch but resumed at the old step, it had passed its end (shrunk: lr=0 for the rest of training)
    # or had most of it still ahead (grew: the run ended at a high lr), without a word.
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=before, validation=8, size=32)
    epochs, lr = 4, TINY["lr"]
    hps = {**TINY, "epochs": epochs, "log_every": 1, "seed": 7, "num_workers": 2}
    env = job_env(tmp_path / "spot", data, hps)
    code, log = stop_after(env, step=stop_at)
    epoch, batch = assert_stopped_inside_an_epoch(code, log, tmp_path / "spot", steps_per_epoch=before // 4)
    assert epoch == 2, log[-3000:]

    _keep_training_images(data, after)
    resumed = run_entry(env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stdout.splitlines() if f"{before} training images then, {after} now" in line]
    assert len(said) == 1, resumed.stdout[-3000:]
    assert f"steps per epoch {before // 4} -> {after // 4}" in said[0], said[0]

    # The schedule continues from the same fraction of training: each epoch ends at the learning rate that epoch's
    # end has in a 4-epoch cosine schedule, whatever the steps per epoch; and every epoch after the stop trains.
    lines = {int(parse_line(line)["epoch"]): parse_line(line) for line in resumed.stdout.splitlines()
             if line.startswith("epoch=")}
    assert sorted(lines) == list(range(epoch, epochs + 1)), resumed.stdout[-3000:]
    for e, line in lines.items():
        assert line["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * e / epochs)) / 2, rel=1e-4, abs=1e-9), (e, line)
    history = torch.load(tmp_path / "spot" / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert [h["step"] for h in history][epoch - 1:] == [e * (after // 4) for e in range(epoch, epochs + 1)], history
