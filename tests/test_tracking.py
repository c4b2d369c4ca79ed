"""Experiment tracking against a real `mlflow server` (SQLite backend, artifacts proxied to a local folder), started by
the tests on a free loopback port: what a run records, a resumed run, a server that dies or never answers, two
processes, `unetseg train`, and the notebook's comparison of runs.

The server is full mlflow 3.x in a venv of its own (.venv-mlflow: it needs gunicorn<27, the serving image 27):
$UNETSEG_MLFLOW_SERVER names its `mlflow` command, else <repo>/.venv-mlflow/bin/mlflow. Without it these tests skip,
unless UNETSEG_REQUIRE_MLFLOW=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import process_tree
from readiness import first_answer
from support import REPO, TINY, free_port, sagemaker_tree
from unetseg.contract.config import TrainConfig
from unetseg.contract.metrics_log import EPOCH_METRICS, per_class_names
from unetseg.contract.sagemaker_env import (
    JOB_NAME_ENV,
    MLFLOW_EXPERIMENT_ENV,
    MLFLOW_TIMEOUT_ENV,
    MLFLOW_TRACKING_URI_ENV,
    TRACKING_FLUSH_ENV,
)
from unetseg.synthetic import make_demo_dataset

pytestmark = pytest.mark.slow

HPS = {**TINY, "epochs": 3, "seed": 3, "num_workers": 2, "classes": 3}
TRACKING_ENV = (MLFLOW_TRACKING_URI_ENV, MLFLOW_EXPERIMENT_ENV, JOB_NAME_ENV, MLFLOW_TIMEOUT_ENV, TRACKING_FLUSH_ENV)


def mlflow_command() -> Path:
    command = Path(os.environ.get("UNETSEG_MLFLOW_SERVER") or REPO / ".venv-mlflow" / "bin" / "mlflow")
    if not command.exists():
        message = f"no MLflow server at {command} (make .venv-mlflow/.installed, or set UNETSEG_MLFLOW_SERVER)"
        if os.environ.get("UNETSEG_REQUIRE_MLFLOW") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return command


class Server:
    def __init__(self, folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "mlflow-server.log"
        folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:  # a session of its own: the server's workers die with it (kill)
            self.proc = subprocess.Popen(
                [str(mlflow_command()), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", (folder / "artifacts").as_uri(), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                # no job runner (a few dozen huey workers the tests never use) on a machine of two cores
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        first_answer(f"{self.url}/health", timeout=300, alive=lambda: self.proc.poll() is None,
                     logs=lambda: self.log.read_text(errors="replace"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("mlflow"))
    yield running
    running.kill()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data"), kind="multiclass", train=12, validation=4, size=32)


@pytest.fixture
def tracked(monkeypatch):
    """Set the tracking environment for one test; `tracked(url, experiment, job)`."""
    for name in TRACKING_ENV:
        monkeypatch.delenv(name, raising=False)

    def set_env(url: str, experiment: str, job: str | None = None, **more: str) -> None:
        monkeypatch.setenv(MLFLOW_TRACKING_URI_ENV, url)
        monkeypatch.setenv(MLFLOW_EXPERIMENT_ENV, experiment)
        if job:
            monkeypatch.setenv(JOB_NAME_ENV, job)
        for name, value in more.items():
            monkeypatch.setenv(name, value)

    return set_env


def train_in_process(data: Path, run: Path, hps: dict = HPS):
    from unetseg.training import RunPaths, train

    paths = RunPaths(data / "train", data / "validation", run / "model", run / "checkpoints", run / "output")
    return train(TrainConfig(**hps), paths, progress=False)


def only_run(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} on the server: nothing was logged"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"{len(runs)} runs in {experiment!r}: {[r.info.run_name for r in runs]}"
    return runs[0]


def vocabulary(hps: dict) -> list[str]:
    return [*EPOCH_METRICS, *per_class_names(TrainConfig(**hps).resolved_class_names)]


def steps(client, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def test_a_run_records_hyperparameters_data_facts_every_epoch_metric_and_the_model(server, data, tmp_path, tracked):
    hps = HPS
    tracked(server.url, "records", job="unet-records-2026-01-01-00-00-00-001")
    result = train_in_process(data, tmp_path, hps)
    assert not result.interrupted and len(result.history) == hps["epochs"]

    client = server.client()
    run = only_run(client, "records")
    assert run.info.run_name == "unet-records-2026-01-01-00-00-00-001" and run.info.status == "FINISHED"
    params = run.data.params
    hyperparameters = TrainConfig(**hps).to_hyperparameters()
    assert {k: params.get(k) for k in hyperparameters} == hyperparameters
    assert (params["data.train_images"], params["data.validation_images"], params["data.mask_mode"]) == (
        "12", "4", "index")
    shares = {k: float(v) for k, v in params.items() if k.startswith("data.class_share.")}
    assert len(shares) == 3 and sum(shares.values()) == pytest.approx(1, abs=1e-4)
    assert run.data.tags["unetseg.version"] and run.data.tags["sagemaker.training_job_name"] == run.info.run_name
    for name in vocabulary(hps):  # one point per epoch, the step being the epoch, for every metric of the vocabulary
        assert steps(client, run.info.run_id, name) == [1, 2, 3], name
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_miou")}
    assert logged == {e["epoch"]: pytest.approx(e["val_miou"]) for e in result.history}

    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/history.json"} <= artifacts
    assert "predictions.png" in {f.path for f in client.list_artifacts(run.info.run_id)}
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["mlflow"]["run_id"] == run.info.run_id and config["mlflow"]["tracking_uri"] == server.url
    uploaded = Path(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / "dl")))
    assert uploaded.read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()


def test_a_run_resumed_from_its_checkpoint_continues_the_same_mlflow_run(server, data, tmp_path, tracked, monkeypatch):
    from unetseg import training

    tracked(server.url, "resumed", job="unet-spot-1")
    agreed = training.StopSignal.agreed

    def sigterm_in_epoch_2(self, ctx, step, force=False):  # as SageMaker's SIGTERM on a spot reclaim, at a known step
        if step == 4:
            self.name = "SIGTERM"
        return agreed(self, ctx, step, force)

    monkeypatch.setattr(training.StopSignal, "agreed", sigterm_in_epoch_2)
    first = train_in_process(data, tmp_path)
    assert first.interrupted == "SIGTERM" and len(first.history) == 1
    client = server.client()
    run = only_run(client, "resumed")
    assert run.info.status == "KILLED"

    monkeypatch.setattr(training.StopSignal, "agreed", agreed)
    second = train_in_process(data, tmp_path)  # the restart: same job name, the checkpoint folder restored
    assert not second.interrupted and len(second.history) == 3
    resumed = only_run(client, "resumed")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    for name in vocabulary(HPS):
        assert steps(client, run.info.run_id, name) == [1, 2, 3], name
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["mlflow"]["run_id"] == run.info.run_id

    # The notebook's view of the experiment: one row per run, its hyperparameters and final metrics, its curves.
    from unetseg.client.tracking import compare_runs

    table = compare_runs("resumed", tracking_uri=server.url)
    assert [row["run"] for row in table.rows] == ["unet-spot-1"]
    row = table.rows[0]
    assert row["val_miou"] == pytest.approx(second.history[-1]["val_miou"]) and row["epochs_logged"] == 3
    assert row["best_val_miou"] == pytest.approx(max(e["val_miou"] for e in second.history))
    assert row["lr"] == str(HPS["lr"]) and "unet-spot-1" in table._repr_html_()
    curves = table.curves("val_miou")
    assert [epoch for epoch, _ in curves["unet-spot-1"]] == [1, 2, 3]


def test_epochs_the_server_missed_before_a_restart_are_sent_by_the_resumed_run(server, data, tmp_path, tracked,
                                                                               monkeypatch, capfd):
    # The first attempt's server is unreachable (nothing listens on the port): its run never exists. The restart,
    # with the server back, sends the checkpoint's epoch 1 before its own 2 and 3.
    from unetseg import training

    tracked(f"http://127.0.0.1:{free_port()}", "missed", job="unet-missed", **{TRACKING_FLUSH_ENV: "2"})
    agreed = training.StopSignal.agreed

    def sigterm_in_epoch_2(self, ctx, step, force=False):
        if step == 4:
            self.name = "SIGTERM"
        return agreed(self, ctx, step, force)

    monkeypatch.setattr(training.StopSignal, "agreed", sigterm_in_epoch_2)
    assert train_in_process(data, tmp_path).interrupted == "SIGTERM"
    assert "mlflow: cannot reach" in capfd.readouterr().err
    monkeypatch.setattr(training.StopSignal, "agreed", agreed)
    monkeypatch.setenv(MLFLOW_TRACKING_URI_ENV, server.url)
    second = train_in_process(data, tmp_path)
    client = server.client()
    run = only_run(client, "missed")
    for name in vocabulary(HPS):
        assert steps(client, run.info.run_id, name) == [1, 2, 3], name
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")} == {
        e["epoch"]: pytest.approx(e["train_loss"]) for e in second.history}


def test_a_server_killed_mid_run_does_not_stop_training(data, tmp_path, tracked, monkeypatch, capfd):
    from unetseg import tracking

    own = Server(tmp_path / "server")
    tracked(own.url, "killed", job="unet-killed", **{TRACKING_FLUSH_ENV: "5"})
    log_epoch = tracking.Tracker.log_epoch

    def kill_after_epoch_1(self, entry):
        log_epoch(self, entry)
        if entry["epoch"] == 1:
            own.kill()

    monkeypatch.setattr(tracking.Tracker, "log_epoch", kill_after_epoch_1)
    try:
        result = train_in_process(data, tmp_path)
    finally:
        own.kill()
    err = capfd.readouterr().err
    assert not result.interrupted and len(result.history) == HPS["epochs"]
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "config.json").is_file()
    unreachable = [line for line in err.splitlines() if line.startswith(f"mlflow: cannot reach {own.url}")]
    assert len(unreachable) == 1, err[-3000:]  # one line, once, however many requests failed


def test_a_server_that_never_answers_does_not_stall_training(data, tmp_path, tracked, capfd):
    # It accepts connections (the kernel completes them into the backlog) and never replies to a request.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        tracked(url, "silent", job="unet-silent", **{MLFLOW_TIMEOUT_ENV: "2", TRACKING_FLUSH_ENV: "3"})
        result = train_in_process(data, tmp_path, {**HPS, "epochs": 2})
    err = capfd.readouterr().err
    assert not result.interrupted and len(result.history) == 2
    assert (tmp_path / "model" / "model.safetensors").is_file()
    warning = [line for line in err.splitlines() if line.startswith(f"mlflow: cannot reach {url}")]
    assert len(warning) == 1 and f"no answer within 2 s, {MLFLOW_TIMEOUT_ENV}" in warning[0], err[-3000:]
    assert f"not sent to {url} within 3 s" in err  # the end gave up at its deadline, after the model was written
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["mlflow"]["run_id"] is None and config["mlflow"]["tracking_uri"] == url


def test_a_tracking_uri_mlflow_cannot_use_is_said_once_and_training_goes_on(data, tmp_path, tracked, capfd):
    from unetseg import tracking
    from unetseg.data.checks import check_dataset
    from unetseg.data.scan import pair_channel
    from unetseg.training import RunPaths

    tracked("ftp://mlflow.example.com", "unusable")
    cfg = TrainConfig(**HPS)
    checked = check_dataset(pair_channel(data / "train"), cfg)
    paths = RunPaths(data / "train", None, tmp_path / "model", tmp_path / "checkpoints", tmp_path / "output")
    assert tracking.start(cfg, paths, checked, checked, []) is tracking.NO_TRACKING
    err = capfd.readouterr().err
    assert f"mlflow: cannot use {MLFLOW_TRACKING_URI_ENV}=ftp://mlflow.example.com" in err
    assert "training without tracking" in err


def test_two_processes_log_one_run_from_rank_0(server, data, tmp_path):
    env = sagemaker_tree(tmp_path, {**HPS, "epochs": 2}, {"train": data / "train", "validation": data / "validation"})
    env = {k: v for k, v in env.items() if k not in TRACKING_ENV}
    env.update(PYTHONUNBUFFERED="1", UNETSEG_PROCS_PER_HOST="2", UNETSEG_MASTER_PORT=str(free_port()),
               **{MLFLOW_TRACKING_URI_ENV: server.url, MLFLOW_EXPERIMENT_ENV: "ddp", JOB_NAME_ENV: "unet-ddp-1"})
    done = process_tree.run([sys.executable, str(REPO / "entry" / "train.py")], env, timeout=420)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "on 2 x cpu" in done.stdout
    client = server.client()
    run = only_run(client, "ddp")
    assert run.info.run_name == "unet-ddp-1" and run.info.status == "FINISHED"
    for name in vocabulary(HPS):
        assert steps(client, run.info.run_id, name) == [1, 2], name
    assert json.loads((tmp_path / "model" / "config.json").read_text())["mlflow"]["run_id"] == run.info.run_id


def test_unetseg_train_logs_with_mlflow_uri(server, data, tmp_path, tracked):
    from unetseg.cli import main

    tracked(server.url, "cli")
    os.environ.pop(MLFLOW_TRACKING_URI_ENV)  # the flag alone names the server
    hps = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in {**HPS, "epochs": 1}.items()]
    code = main(["train", "--data", str(data), "--output", str(tmp_path / "run-42"), "--mlflow-uri", server.url,
                 *[h.replace("None", "none") for h in hps]])
    assert code == 0
    run = only_run(server.client(), "cli")
    assert run.info.run_name == "run-42" and run.info.status == "FINISHED"
    config = json.loads((tmp_path / "run-42" / "model" / "config.json").read_text())
    assert config["mlflow"]["run_id"] == run.info.run_id
