"""The training image on a real Docker engine: SageMaker's own local mode (Docker Compose), and spot semantics.

1. `UNetEstimator(instance_type="local").fit("file://...")`: one container trains; model.tar.gz holds the artifact,
   `load_model()` predicts, and the metric lines SageMaker's regexes read are in the streamed log.
2. `instance_count=2`: two containers train one model with DDP over gloo (hosts from SM_HOSTS); rank 0 writes it once.
3. A mask that only the container can find broken: `fit` raises with the failure file's message naming the file.
4. `docker run <image> train` with /opt/ml mounted, `docker stop` mid-epoch, run again: it resumes from
   /opt/ml/checkpoints and ends with the same model, bit for bit, as an uninterrupted run; with one training process,
   and with two under torchrun in the one container, each with DataLoader workers. entry/init.py (PID 1) is what gets
   SIGTERM, and passes it to the training processes (not to their workers) past the training toolkit.

The image is built here (`unetseg:ci`) from the CI base ($UNETSEG_CI_BASE, else the newest unetseg-ci-base:<hash>;
ci/build-base-image.sh), offline; seconds when Docker's cache has it. Local-mode containers join `sagemaker-local`,
pre-created `--internal`, so they reach nothing beyond this machine; containers, the network and the SDK's container
roots are removed afterwards. Without an engine these tests skip with the reason; UNETSEG_REQUIRE_DOCKER=1 (CI)
makes that a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import docker_support
from docker_support import LOCAL_NETWORK, docker, network_info
from support import TINY, opt_ml_tree
from unetseg.contract.metrics_log import EPOCH_METRICS, parse_line, regex_for
from unetseg.contract.sagemaker_env import PROCS_PER_HOST_ENV
from unetseg.synthetic import make_demo_dataset

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "unetseg:ci"
HPS = {**TINY, "epochs": 2, "seed": 3}  # resnet18, depth 3, decoder [32, 16, 8], no pretrained weights, 32 px, batch 4
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 cores here: one torch thread per container
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def training_image() -> str:
    """unetseg:ci, built from entry/Dockerfile on the CI base with no network (once per session)."""
    return docker_support.training_image(IMAGE)


@pytest.fixture(scope="module")
def local_network(training_image):
    """`sagemaker-local` as an internal network for the SDK's compose file; removed with its containers after."""
    with docker_support.sagemaker_local_network(internal=True) as info:
        yield info


@pytest.fixture
def local_session(local_network, tmp_path_factory):
    """A LocalSession whose container roots live in a folder of ours (removed after), under moto: nothing reaches
    AWS even if something tried."""
    from moto import mock_aws
    from sagemaker.local import LocalSession

    root = tmp_path_factory.mktemp("container-root")
    with mock_aws():
        session = LocalSession()
        session.config = {"local": {"container_root": str(root)}}
        yield session
    shutil.rmtree(root, ignore_errors=True)


def estimator(image: str, session, tmp_path: Path, **kwargs):
    from unetseg.client.estimator import UNetEstimator

    return UNetEstimator(image_uri=image, instance_type="local", sagemaker_session=session,
                         hyperparameters=kwargs.pop("hyperparameters", HPS), environment=ONE_THREAD,
                         output_path=(tmp_path / "out").as_uri(), **kwargs)


def job_name(kind: str) -> str:
    return f"unetseg-ci-{kind}-{uuid.uuid4().hex[:8]}"


def fit(est, data: Path, capfd, name: str) -> tuple[str, float]:
    """Run the job, and return what the SDK streamed from the containers and the seconds it took."""
    started = time.monotonic()
    try:
        est.fit(data.as_uri(), job_name=name)
    finally:
        out, err = capfd.readouterr()
        log = ANSI.sub("", out + err).replace("\r\n", "\n")  # Compose colours each container's prefix
        print(log[-6000:])  # shown by pytest when the test fails
    return log, time.monotonic() - started


def artifact_names(est) -> list[str]:
    assert est.model_data.startswith("file://"), est.model_data
    with tarfile.open(est.model_data[len("file://"):]) as tar:
        return sorted(tar.getnames())


def history(est) -> list[dict]:
    with tarfile.open(est.model_data[len("file://"):]) as tar:
        return json.load(tar.extractfile("history.json"))


def epoch_lines(log: str) -> list[dict]:
    # Compose prefixes each line with the container: "abc-algo-1-x7k2p  | epoch=1 train_loss=...".
    return [parse_line(line.split("|", 1)[-1]) for line in log.splitlines() if re.search(r"\|\s*epoch=\d", line)]


# --- 1. SageMaker local mode, one container ---------------------------------------------------------------------

def test_local_mode_trains_in_one_container(training_image, local_session, tmp_path, capfd):
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=8, validation=4, size=32)
    est = estimator(training_image, local_session, tmp_path)
    log, seconds = fit(est, data, capfd, job_name("one"))

    assert est.latest_training_job.describe()["TrainingJobStatus"] == "Completed"
    assert artifact_names(est) == ["config.json", "history.json", "model.safetensors"]
    assert [h["epoch"] for h in history(est)] == [1, 2]
    mask = est.load_model().predict(np.zeros((32, 32, 3), np.uint8))
    assert mask.shape == (32, 32)

    assert "on 1 x cpu" in log
    # What SageMaker's metric regexes (the estimator's metric_definitions) read from this log: each epoch metric, twice.
    sent = {d["Name"]: d["Regex"] for d in est.metric_definitions}
    for name in EPOCH_METRICS:
        assert sent[name] == regex_for(name)
        assert len(re.findall(sent[name], log)) == 2, (name, log[-3000:])
    assert [line["epoch"] for line in epoch_lines(log)] == [1, 2]
    assert 0.0 <= epoch_lines(log)[-1]["val_miou"] <= 1.0
    # The job's container joined our internal network (Compose found it by name), so it could reach nothing outside.
    assert network_info()["Internal"]
    names = re.search(r"Attaching to (.+)", log).group(1).replace(",", " ").split()
    assert len(names) == 1 and names[0].endswith(tuple(re.findall(r"algo-1-[a-z0-9]{5}", log)))
    joined = json.loads(docker("inspect", names[0]).stdout)[0]["NetworkSettings"]["Networks"]
    assert list(joined) == [LOCAL_NETWORK], joined
    print(f"one-container local job: {seconds:.0f}s")


# --- 2. two containers, one model ---------------------------------------------------------------------------------

def test_local_mode_two_containers_train_one_model_with_ddp(training_image, local_session, tmp_path, capfd):
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=16, validation=4, size=32)
    est = estimator(training_image, local_session, tmp_path, instance_count=2)
    log, seconds = fit(est, data, capfd, job_name("ddp"))

    assert est.latest_training_job.describe()["TrainingJobStatus"] == "Completed"
    hosts = set(re.findall(r"\b(algo-[12]-[a-z0-9]{5})\b", log))
    assert {h[:6] for h in hosts} == {"algo-1", "algo-2"}, log[-3000:]  # both containers ran (random suffixes)
    assert "on 2 x cpu" in log  # world size 2: one process per container
    assert [line["epoch"] for line in epoch_lines(log)] == [1, 2]  # rank 0 alone prints
    assert sum(bool(re.search(r"\|\s*model: ", line)) for line in log.splitlines()) == 1  # and saves, once
    # 16 images over 2 ranks x batch 4: 2 steps per epoch, each seeing 8 images, so both ranks trained together.
    assert [h["step"] for h in history(est)] == [2, 4]
    assert artifact_names(est) == ["config.json", "history.json", "model.safetensors"]
    assert est.load_model().predict(np.zeros((32, 32, 3), np.uint8)).shape == (32, 32)
    print(f"two-container local job: {seconds:.0f}s")


# --- 3. a dataset that only the container finds broken --------------------------------------------------------------

def test_local_mode_failure_carries_the_failure_file(training_image, local_session, tmp_path, capfd):
    from unetseg.client.local_mode import LocalTrainingError

    data = make_demo_dataset(tmp_path / "data", kind="binary", train=4, validation=2, size=32)
    broken = sorted((data / "train" / "masks").iterdir())[1]
    # fit() reads every file before the container starts; a link to a file outside the folder bound into the
    # container reads well here and is missing there.
    outside = tmp_path / "elsewhere" / broken.name
    outside.parent.mkdir()
    broken.rename(outside)
    broken.symlink_to(outside)
    est = estimator(training_image, local_session, tmp_path)
    with pytest.raises(RuntimeError) as info:  # the SDK's type, so existing handlers still catch it
        fit(est, data, capfd, job_name("bad"))

    error = info.value
    assert isinstance(error, LocalTrainingError), repr(error)
    message = str(error)
    assert f"masks/{broken.name}" in message and "DataError: " in message, message
    (host, failure), = error.failures.items()
    assert host.startswith("algo-1-")
    assert failure.startswith("DataError: ") and "Traceback" in failure
    assert failure[:1024].rstrip() in message  # what SageMaker would show as FailureReason
    assert "Failed to run" in message  # and the SDK's own line, for the compose command and exit code
    print(f"the error fit() raised:\n{message}")


# --- 3b. a Ground Truth manifest -------------------------------------------------------------------------------------

def test_local_mode_trains_from_a_ground_truth_manifest(training_image, local_session, tmp_path, capfd):
    """A labelling job's output manifest with local paths (local mode's form of its s3:// URIs): images and colour
    masks in different folders, bound as three channels; the colour map becomes the model's classes."""
    from PIL import Image

    from test_ground_truth import RGB, gt_pairs, line

    lines = []
    for i, (image, mask, _) in enumerate(gt_pairs(10, seed=4)):
        image_path = tmp_path / "street-images" / f"frame{i}.png"
        mask_path = tmp_path / "labels" / "annotations" / "consolidated-annotation" / "output" / f"{i}_2024.png"
        for path, array in ((image_path, image), (mask_path, mask)):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
        lines.append(line(str(image_path), mask_path.as_uri()))
    manifest = tmp_path / "labels" / "manifests" / "output" / "output.manifest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("\n".join(lines) + "\n" + json.dumps({"source-ref": str(tmp_path / "unlabelled.png")}))
    est = estimator(training_image, local_session, tmp_path, hyperparameters={**HPS, "val_fraction": 0.3})
    started = time.monotonic()
    try:
        with pytest.warns(UserWarning, match=r"1 object\(s\) without a city-streets-ref"):
            est.fit(manifest.as_uri(), job_name=job_name("gt"))
    finally:
        out, err = capfd.readouterr()
        print(ANSI.sub("", out + err)[-6000:])
    assert est.latest_training_job.describe()["TrainingJobStatus"] == "Completed"
    with tarfile.open(est.model_data[len("file://"):]) as tar:
        config = json.load(tar.extractfile("config.json"))
    assert config["class_names"] == ["BACKGROUND", "buildings", "road"] and config["mask_mode"] == "palette"
    assert config["class_colors"] == [list(RGB[i]) for i in range(3)]
    assert [h["epoch"] for h in history(est)] == [1, 2]
    print(f"local job from a manifest: {time.monotonic() - started:.0f}s")


# --- 4. spot: SIGTERM mid-epoch, then resume ----------------------------------------------------------------------

# Two DataLoader workers per training process, as on every GPU job: a stop must reach the training processes and not
# their workers (a worker that anyone but its parent signals makes the training process fail).
SPOT_HPS = {**TINY, "epochs": 2, "seed": 5, "log_every": 1, "num_workers": 2}
SPOT_STOP_AT = 3  # stop once step 3 is logged; the SIGTERM lands some steps later, still inside epoch 1 of 2
# Steps per epoch: with 1 process, 96 images of batch 4; with 2 (torchrun in one container, gloo), 256 images, 32 steps
# each: the ranks agree on a stop every 10 steps, so it lands at step 10, 20 or 30, inside epoch 1. (With 12 steps, a
# `docker stop` slowed by a loaded CI machine once reached the process only after step 12, at the epoch's end.)
SPOT_STEPS = {1: 24, 2: 32}


def run_train(image: str, tree: Path, name: str, stop_after_step: int | None = None,
              timeout: float = 150, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`docker run <image> train` as SageMaker starts a job: hostname algo-1, the /opt/ml tree mounted, no network. With
    `stop_after_step`, `docker stop -t 60` (SIGTERM, SIGKILL 60 s later) once that step's line is logged."""
    # SageMaker mounts /opt/ml's parts, not /opt/ml itself, which would hide the image's /opt/ml/code/train.py.
    mounts = [arg for sub in ("input", "model", "output", "checkpoints")
              for arg in ("-v", f"{tree / sub}:/opt/ml/{sub}")]
    extra = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
    # With no network Docker writes no /etc/hosts line for the hostname, and the toolkit waits (15 min) until its host
    # name resolves.
    cmd = ["docker", "run", "--name", name, "--hostname", "algo-1", "--network", "none",
           "--add-host", "algo-1:127.0.0.1", "-e", "OMP_NUM_THREADS=1", *extra, *mounts, image, "train"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stopper = [], None
    timer = threading.Timer(timeout, lambda: docker("kill", name, check=False))
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stop_after_step is not None and stopper is None and line.startswith(f"step={stop_after_step} "):
                stopper = threading.Thread(target=docker, args=("stop", "-t", "60", name), kwargs={"timeout": 120})
                stopper.start()
        proc.wait(30)
        if stopper is not None:
            stopper.join(120)
    finally:
        timer.cancel()
        code = json.loads(docker("inspect", name).stdout)[0]["State"]["ExitCode"]
        docker("rm", "-f", name, check=False)
    return code, "".join(lines)


@pytest.mark.parametrize("procs", [1, 2], ids=["1-process", "2-processes"])
def test_docker_stop_mid_epoch_then_resume_gives_the_same_model(training_image, tmp_path, procs):
    import torch
    from safetensors.torch import load_file

    steps = SPOT_STEPS[procs]
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=4 * procs * steps, validation=4, size=32)
    channels = {"train": data / "train", "validation": data / "validation"}
    spot = opt_ml_tree(tmp_path / "spot", SPOT_HPS, channels)
    straight = tmp_path / "straight"
    shutil.copytree(spot, straight)  # the same tree, before anything ran on it
    tag = uuid.uuid4().hex[:8]
    env = {PROCS_PER_HOST_ENV: str(procs)}

    started = time.monotonic()
    code, log = run_train(training_image, straight, f"unetseg-ci-straight-{tag}", env=env)
    assert code == 0, log[-4000:]
    assert f"on {procs} x cpu" in log and "2 loader workers" in log, log[-4000:]
    straight_seconds = time.monotonic() - started

    code, log = run_train(training_image, spot, f"unetseg-ci-spot-{tag}", stop_after_step=SPOT_STOP_AT, env=env)
    stopped = re.search(r"stopping on SIGTERM at epoch (\d+), batch (\d+)", log)
    assert not (spot / "output" / "failure").exists(), (spot / "output" / "failure").read_text()[:2000] + log[-3000:]
    assert stopped, log[-4000:]  # the SIGTERM reached the training process(es) through init and the toolkit
    epoch, batch = int(stopped.group(1)), int(stopped.group(2))
    assert epoch == 1 and SPOT_STOP_AT <= batch < steps, log[-4000:]  # at a step boundary inside an epoch
    assert "epoch=2 " not in log
    assert code == 128 + 15, (code, log[-4000:])  # stopped by SIGTERM, not killed (137) and not failed (1)
    assert (spot / "checkpoints" / "last.pt").is_file()

    code, resumed = run_train(training_image, spot, f"unetseg-ci-resume-{tag}", env=env)
    assert code == 0, resumed[-4000:]
    assert f"resumed from /opt/ml/checkpoints/last.pt: epoch 1, batch {batch}" in resumed, resumed[-4000:]
    assert [parse_line(line)["epoch"] for line in resumed.splitlines() if line.startswith("epoch=")] == [1, 2]

    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(spot / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(spot / "checkpoints" / "last.pt", weights_only=True)
    assert last_a["model"].keys() == last_b["model"].keys()
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    assert (last_a["epoch"], last_a["step"]) == (last_b["epoch"], last_b["step"]) == (2, 2 * steps)
    # The epoch cut in two reports the loss of all its steps over all ranks, as the uninterrupted run does.

    def loss(last):
        return [h["train_loss"] for h in last["history"]]

    assert loss(last_b) == pytest.approx(loss(last_a), rel=1e-5, abs=0)
    print(f"uninterrupted container run ({procs} process(es)): {straight_seconds:.0f}s; SIGTERM after step "
          f"{SPOT_STOP_AT} stopped it at epoch 1, batch {batch} of {steps}")
