"""SageMaker's contract in one place: every environment variable's name (SageMaker's and unetseg's own, for training
and for serving), the /opt/ml tree, and the service's limits. Code uses the constants below, never the spelled names,
as the training toolkit keeps its names in params.py (tests/test_sagemaker_env.py checks that no other module spells
one); `TrainingEnv` reads a training job's environment, as the toolkit's environment.py does.

SageMaker (and the sagemaker-training toolkit) hands a job its inputs as environment variables and files:

- hyperparameters: SM_HPS (JSON, values decoded by the toolkit) or /opt/ml/input/config/hyperparameters.json
  (every value a string);
- channels: SM_CHANNELS + SM_CHANNEL_<NAME>, else the folders under /opt/ml/input/data;
- SM_MODEL_DIR (/opt/ml/model, tarred to model.tar.gz), SM_OUTPUT_DATA_DIR (/opt/ml/output/data, tarred to
  output.tar.gz), SM_OUTPUT_DIR (/opt/ml/output; the `failure` file lives there);
- SM_HOSTS / SM_CURRENT_HOST, else /opt/ml/input/config/resourceconfig.json;
- SM_NUM_GPUS, which reads 0 where nvidia-smi is missing: the engine falls back to torch.cuda.device_count();
- SM_NETWORK_INTERFACE_NAME (the toolkit's copy of resourceconfig.json's network_interface_name): the interface that
  NCCL and gloo must use between hosts.

The job's CheckpointConfig.LocalPath (default /opt/ml/checkpoints) is what SageMaker syncs with checkpoint_s3_uri; it
is in /opt/ml/input/config/checkpointconfig.json, and UNetEstimator also passes it as UNETSEG_CHECKPOINT_DIR.
UNETSEG_OPT_ML moves the whole tree (tests, local runs); UNETSEG_CHECKPOINT_DIR moves only the checkpoints. This module
must not import torch.

A tuning job gives every trial the same checkpoint_s3_uri (sagemaker/tuner.py copies the estimator's into the one
training job definition), so a trial would resume from whichever trial wrote last.pt before it. A trial (its
hyperparameters carry `_tuning_objective_metric`) therefore keeps its state under checkpoints/<TRAINING_JOB_NAME>:
a spot restart of that trial keeps its name and resumes; another trial starts fresh.

SageMaker also restores the whole prefix into every trial (there is one CheckpointConfig per tuning job and no
per-trial prefix), and deletes from S3 what the container deletes from the synced folder. A trial that finished
therefore removes its own state (`discard_finished_trial_state`), so that a later trial fetches only the state of
trials still running or interrupted, not of every trial before it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

DEFAULT_ROOT = Path("/opt/ml")
TUNING_MARKER = "_tuning_objective_metric"  # the hyperparameter SageMaker adds to every trial of a tuning job

# --- a training job's environment, as SageMaker and its training toolkit set it ------------------------------------
HPS_ENV = "SM_HPS"
CHANNELS_ENV = "SM_CHANNELS"
CHANNEL_ENV_PREFIX = "SM_CHANNEL_"  # + the channel's name in upper case: its folder
HOSTS_ENV, CURRENT_HOST_ENV = "SM_HOSTS", "SM_CURRENT_HOST"
NUM_GPUS_ENV = "SM_NUM_GPUS"
NETWORK_INTERFACE_ENV = "SM_NETWORK_INTERFACE_NAME"
MODEL_DIR_ENV, OUTPUT_DIR_ENV, OUTPUT_DATA_DIR_ENV = "SM_MODEL_DIR", "SM_OUTPUT_DIR", "SM_OUTPUT_DATA_DIR"
INPUT_DATA_DIR_ENV, INPUT_CONFIG_DIR_ENV = "SM_INPUT_DATA_DIR", "SM_INPUT_CONFIG_DIR"
JOB_NAME_ENV = "TRAINING_JOB_NAME"
JOB_ARN_ENV = "TRAINING_JOB_ARN"  # set by SageMaker in a training job's container
CURRENT_INSTANCE_TYPE_ENV = "SM_CURRENT_INSTANCE_TYPE"

# --- unetseg's own, in the container ------------------------------------------------------------------------------
OPT_ML_ENV = "UNETSEG_OPT_ML"  # moves the whole /opt/ml tree (tests, local runs)
CHECKPOINT_DIR_ENV = "UNETSEG_CHECKPOINT_DIR"  # where checkpoints go instead of <root>/checkpoints
PROCS_PER_HOST_ENV = "UNETSEG_PROCS_PER_HOST"  # training processes per host instead of one per GPU (CPU tests)
MASTER_PORT_ENV = "UNETSEG_MASTER_PORT"  # torchrun's rendezvous port
RANK_REPORTS_ENV = "UNETSEG_RANK_REPORTS"  # supervisor -> ranks: the folder for each rank's stop or failure
MAX_IMAGE_MB_ENV = "UNETSEG_MAX_IMAGE_MB"  # the largest decoded image, in training, predict and serving
LOADER_START_ENV = "UNETSEG_LOADER_START"  # fork | forkserver: how loader workers start (data/loader_workers.py)

# --- experiment tracking: MLflow's own names (its client reads them too), and unetseg's ----------------------------
MLFLOW_TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # an http(s) server or a SageMaker MLflow tracking server's ARN
MLFLOW_EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
MLFLOW_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"  # seconds per request (MLflow's default: 120)
MLFLOW_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"  # the client's own retries (MLflow's default: 7, with backoff)
TRACKING_FLUSH_ENV = "UNETSEG_MLFLOW_FLUSH_S"  # seconds the end of training waits for tracking to catch up

# --- serving: SageMaker's settings of an inference container, and unetseg's ---------------------------------------
MODEL_SERVER_WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
MODEL_SERVER_TIMEOUT_ENV = "SAGEMAKER_MODEL_SERVER_TIMEOUT"  # seconds per request
BIND_TO_PORT_ENV = "SAGEMAKER_BIND_TO_PORT"  # an inference pipeline's container listens here instead of on 8080
BATCH_ENV = "SAGEMAKER_BATCH"  # set (true) in a batch transform's container
MAX_PAYLOAD_IN_MB_ENV = "SAGEMAKER_MAX_PAYLOAD_IN_MB"  # a batch transform's MaxPayloadInMB
SERVING_MODE_ENV = "UNETSEG_SERVING_MODE"  # realtime, batch or async: the limits to serve by
MAX_BODY_MB_ENV = "UNETSEG_MAX_BODY_MB"
MAX_PIXELS_ENV = "UNETSEG_MAX_PIXELS"
TTA_ENV = "UNETSEG_TTA"  # the test-time augmentation of requests that name none
SERVING_MODEL_DIR_ENV = "UNETSEG_MODEL_DIR"  # instead of /opt/ml/model
# The model runtime: torch, onnx (onnxruntime on the model dir's model.onnx, which training's export_onnx writes) or
# auto: onnx on a CPU instance whose model dir has a model.onnx (faster there: bench/onnx_runtime.py), else torch.
RUNTIME_ENV = "UNETSEG_RUNTIME"
SERVING_RUNTIMES = ("auto", "torch", "onnx")

# --- the notebook's -----------------------------------------------------------------------------------------------
IMAGE_URI_ENV = "UNETSEG_IMAGE_URI"  # UNetEstimator's image when none is given

# Payload and time limits of SageMaker inference, which only the real service enforces (the SDK and moto do not):
# the predictor checks requests against them before sending, and the server's defaults follow the mode it serves.
REALTIME_MAX_PAYLOAD_BYTES = 6 * 2**20  # InvokeEndpoint: 6 MB each way (6,291,456 bytes)
REALTIME_TIMEOUT_S = 60  # a real-time endpoint must answer within 60 s
BATCH_MAX_PAYLOAD_MB = 100  # CreateTransformJob MaxPayloadInMB: at most 100
ASYNC_MAX_PAYLOAD_BYTES = 2**30  # InvokeEndpointAsync: S3 input up to 1 GB
BATCH_TIMEOUT_S = 600  # CreateTransformJob ModelClientConfig.InvocationsTimeoutInSeconds: default 600 (at most 3600)
ASYNC_TIMEOUT_S = 900  # InvokeEndpointAsync InvocationTimeoutSeconds: default 900 (at most 3600)
ASYNC_MAX_TIMEOUT_S = 3600  # InvokeEndpointAsync InvocationTimeoutSeconds: at most 1 hour
ASYNC_MAX_REQUEST_TTL_S = 6 * 3600  # InvokeEndpointAsync RequestTTLSeconds: a queued request lives 6 h at most
CUSTOM_ATTRIBUTES_MAX_CHARS = 1024  # InvokeEndpoint CustomAttributes: at most 1024 visible ASCII characters

# A failed job writes its error to <output dir>/failure; SageMaker shows this many characters of it as FailureReason.
FAILURE_REASON_LIMIT = 1024

# Stopping a job (spot reclaim, StopTrainingJob, MaxRuntime reached): SageMaker sends SIGTERM to the container's PID 1,
# then SIGKILL this many seconds later.
STOP_GRACE_S = 120


def stopped_exit_code(sig: int | str) -> int:
    """How a run stopped by signal `sig` (its number, or its name: "SIGTERM") exits: 128 + the number, as a shell
    reports a process killed by it. PID 1, the training job and `unetseg train` answer a stop alike."""
    return 128 + int(signal.Signals[sig] if isinstance(sig, str) else sig)
# The folder where each process that must hear a stop request registers (container/stop_registry.py). entry/init.py
# (PID 1) creates it and hands its path down in this variable, and passes SIGTERM on to those processes only.
STOP_REGISTRY_ENV = "UNETSEG_STOP_REGISTRY"


@dataclass(frozen=True)
class TrainingEnv:
    hyperparameters: dict[str, Any]
    channels: dict[str, Path]
    model_dir: Path
    output_data_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    hosts: list[str] = field(default_factory=lambda: ["algo-1"])
    current_host: str = "algo-1"
    num_gpus: Optional[int] = None  # None: unknown here, the engine asks torch
    network_interface: Optional[str] = None  # the interface between hosts; None: not named (one host, or not SageMaker)
    job_name: Optional[str] = None
    tuning_trial: bool = False  # a training job of a hyperparameter tuning job
    checkpoints_synced: bool = False  # SageMaker syncs the checkpoint folder with S3 (the job has a CheckpointConfig)

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    def discard_finished_trial_state(self) -> None:
        """After a tuning trial finished (not on a stop: a spot restart resumes from it), remove its state from the
        synced folder, and so from S3. Only its own folder: the others hold running trials' state, and deleting a
        restored copy here would delete it from S3 too. Once per host (local rank 0): each host syncs its folder."""
        if (self.tuning_trial and self.checkpoints_synced and self.job_name
                and os.environ.get("LOCAL_RANK", "0") == "0" and self.checkpoint_dir.name == self.job_name):
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    @property
    def host_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master_host(self) -> str:
        return self.hosts[0]

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> TrainingEnv:
        env = os.environ if environ is None else environ
        root = Path(env.get(OPT_ML_ENV, DEFAULT_ROOT))
        config_dir = Path(env.get(INPUT_CONFIG_DIR_ENV, root / "input" / "config"))

        resource = _read_json(config_dir / "resourceconfig.json") or {}
        hosts = json.loads(env[HOSTS_ENV]) if env.get(HOSTS_ENV) else resource.get("hosts", ["algo-1"])
        current = env.get(CURRENT_HOST_ENV) or resource.get("current_host", hosts[0])

        gpus = env.get(NUM_GPUS_ENV)
        hyperparameters = _hyperparameters(env, config_dir)
        job_name = env.get(JOB_NAME_ENV) or None
        checkpoint_config = _read_json(config_dir / "checkpointconfig.json")  # SageMaker's, for a CheckpointConfig
        synced = (checkpoint_config or {}).get("LocalPath")
        checkpoint_dir = Path(env.get(CHECKPOINT_DIR_ENV) or synced or root / "checkpoints")
        tuning_trial = TUNING_MARKER in hyperparameters
        if tuning_trial and job_name:
            checkpoint_dir = checkpoint_dir / job_name
        return cls(
            hyperparameters=hyperparameters,
            channels=_channels(env, Path(env.get(INPUT_DATA_DIR_ENV, root / "input" / "data"))),
            model_dir=Path(env.get(MODEL_DIR_ENV, root / "model")),
            output_data_dir=Path(env.get(OUTPUT_DATA_DIR_ENV, root / "output" / "data")),
            output_dir=Path(env.get(OUTPUT_DIR_ENV, root / "output")),
            checkpoint_dir=checkpoint_dir,
            hosts=list(hosts),
            current_host=current,
            num_gpus=int(gpus) if gpus not in (None, "") and int(gpus) > 0 else None,
            network_interface=env.get(NETWORK_INTERFACE_ENV) or resource.get("network_interface_name") or None,
            job_name=job_name,
            tuning_trial=tuning_trial,
            checkpoints_synced=checkpoint_config is not None,
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _hyperparameters(env: Mapping[str, str], config_dir: Path) -> dict[str, Any]:
    if env.get(HPS_ENV):
        return json.loads(env[HPS_ENV])
    return _read_json(config_dir / "hyperparameters.json") or {}


def _channels(env: Mapping[str, str], data_dir: Path) -> dict[str, Path]:
    if env.get(CHANNELS_ENV):
        names = json.loads(env[CHANNELS_ENV])
        return {name: Path(env.get(CHANNEL_ENV_PREFIX + name.upper(), data_dir / name)) for name in names}
    found = {key[len(CHANNEL_ENV_PREFIX):].lower(): Path(value) for key, value in env.items()
             if key.startswith(CHANNEL_ENV_PREFIX)}
    if found:
        return found
    if data_dir.is_dir():
        return {p.name: p for p in sorted(data_dir.iterdir()) if p.is_dir()}
    return {}
