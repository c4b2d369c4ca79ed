"""DDP as production runs it: several processes in one container under torchrun (UNETSEG_PROCS_PER_HOST=2, gloo),
DataLoader workers on. Every run has a subprocess timeout, so that a hang fails the test instead of hanging it."""

import os
import subprocess
import sys

import pytest
import torch

import process_tree
from support import REPO, TINY, free_port, sagemaker_tree
from unetseg.contract.config import TrainConfig
from unetseg.contract.metrics_log import SELECTION_METRIC
from unetseg.metrics import confusion, summarize
from unetseg.synthetic import make_demo_dataset

pytestmark = pytest.mark.slow

HPS = {**TINY, "epochs": 2, "seed": 5, "num_workers": 2}
RUN_TIMEOUT = 420  # s: a 2-process run here takes well under a minute; gloo's own collective timeout is 30 min


def ddp_env(root, data, hps=HPS):
    env = sagemaker_tree(root, hps, {"train": data / "train", "validation": data / "validation"})
    env.update(PYTHONUNBUFFERED="1", UNETSEG_PROCS_PER_HOST="2", UNETSEG_MASTER_PORT=str(free_port()))
    return env


TRAIN = [sys.executable, str(REPO / "entry" / "train.py")]


def run_or_fail(env, what: str) -> subprocess.CompletedProcess:
    try:
        return process_tree.run(TRAIN, env, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what}: no result after {RUN_TIMEOUT} s (a collective that one rank never joins?)\n"
                    + (exc.stdout or "")[-3000:] + (exc.stderr or "")[-3000:])


@pytest.mark.parametrize("validation", [1, 3])
def test_validation_with_fewer_images_than_processes_finishes_and_matches_the_saved_model(tmp_path, validation):
    # With 1 image, rank 1's validation shard is empty: it must not wait in a forward pass rank 0 alone makes. With 3,
    # both ranks validate; either way the metrics logged are those of the model saved (rank 0's BatchNorm statistics).
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=16, validation=validation, size=32)
    done = run_or_fail(ddp_env(tmp_path, data), f"2 processes, {validation} validation image(s)")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "on 2 x cpu" in done.stdout

    from unetseg.data.checks import check_dataset
    from unetseg.data.scan import pair_channel
    from unetseg.model import load_model

    model = load_model(tmp_path / "model", device="cpu")
    cfg = TrainConfig(**HPS)
    best = model.config["best"]
    val = check_dataset(pair_channel(data / "validation"), cfg)
    matrix = sum(confusion(torch.from_numpy(model.predict(img)), torch.from_numpy(mask), 2) for img, mask in val.cached)
    score = summarize(matrix, cfg.resolved_class_names)[SELECTION_METRIC]
    assert score == pytest.approx(best[SELECTION_METRIC], abs=1e-6)


def test_a_failing_rank_s_own_error_reaches_the_failure_file(tmp_path):
    # Files are read from disk at every epoch (cache off). Once epoch 1 is logged, rank 1's training images (odd
    # indices: each rank reads index % 2) disappear: rank 1 fails reading one in a later epoch. Rank 0 then fails
    # too, secondarily (its peer gone, or torchrun's SIGTERM): the failure file must carry rank 1's error.
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=32, validation=4, size=32)
    hps = {**HPS, "epochs": 3, "cache_images": "off"}
    env = ddp_env(tmp_path / "job", data, hps)
    rank1_images = sorted((data / "train" / "images").iterdir())[1::2]
    proc = subprocess.Popen(TRAIN, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    with process_tree.deadline(proc, RUN_TIMEOUT) as expired:
        for line in proc.stdout:
            log.append(line)
            if line.startswith("epoch=1 "):
                for path in rank1_images:
                    os.unlink(path)
        code = proc.wait()
    assert not expired.is_set(), "".join(log)[-4000:]
    text = "".join(log)
    assert code not in (0, 143), (code, text[-4000:])
    failure = (tmp_path / "job" / "output" / "failure").read_text()
    summary = failure.splitlines()[0]
    assert summary.startswith("DataError: "), failure[:3000]
    assert "file not found" in failure and any(p.name in failure for p in rank1_images), failure[:3000]
    assert "distributed training exited with code" not in failure, failure[:3000]


# torch's own reading of a torchrun command line and environment (torch/distributed/run.py, launcher/api.py).
SHUTDOWN_TIMEOUT_PROBE = """
import sys
from torch.distributed.run import config_from_args, parse_args
config, _, _ = config_from_args(parse_args(sys.argv[1:]))
print(config.shutdown_timeout)
"""


def test_torchrun_gives_the_ranks_sagemakers_grace_period_before_it_kills_them(tmp_path, monkeypatch):
    # torchrun SIGKILLs its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s by default) after it SIGTERMs them; SageMaker
    # allows 120 s between its SIGTERM and its SIGKILL. What the supervisor launches must ask for more than 30 s, and
    # less than SageMaker's 120 s, so that the supervisor can still report before SageMaker's SIGKILL.
    from unetseg.container import training_job
    from unetseg.contract.sagemaker_env import STOP_GRACE_S, TrainingEnv
    from unetseg.distributed import torchrun_command

    launched = {}

    class Launch:  # stands in for torchrun: records what the supervisor would start
        def __init__(self, command, env=None, **kwargs):
            launched.update(command=command, env=dict(os.environ if env is None else env))

        def wait(self):
            return 0

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    job = TrainingEnv.from_environ(sagemaker_tree(tmp_path, TINY, {"train": tmp_path}))
    command = torchrun_command(job, 2, module="unetseg.container.training_job")
    with monkeypatch.context() as patch:
        patch.setattr(training_job.subprocess, "Popen", Launch)
        assert training_job.supervise(command, job.failure_file) == 0
    assert launched["command"][1:3] == ["-m", "torch.distributed.run"]
    probe = subprocess.run([sys.executable, "-c", SHUTDOWN_TIMEOUT_PROBE, *launched["command"][3:]],
                           env=launched["env"], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    seconds = int(probe.stdout.split()[-1])
    assert 30 < seconds <= STOP_GRACE_S - 10, f"torchrun would SIGKILL the ranks {seconds} s after its SIGTERM"
