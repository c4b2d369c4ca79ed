import ast
import io
import json
import re
import signal
import tokenize
from pathlib import Path

import pytest

from support import REPO
from unetseg.container.training_job import pick_channels
from unetseg.contract.errors import DataError
from unetseg.contract.sagemaker_env import TrainingEnv


def test_reads_the_toolkit_environment(tmp_path):
    env = TrainingEnv.from_environ({
        "SM_HPS": json.dumps({"epochs": 3, "channels_last": True}),
        "SM_CHANNELS": json.dumps(["train", "validation"]),
        "SM_CHANNEL_TRAIN": "/data/train", "SM_CHANNEL_VALIDATION": "/data/val",
        "SM_MODEL_DIR": "/m", "SM_OUTPUT_DATA_DIR": "/o/data", "SM_OUTPUT_DIR": "/o",
        "SM_HOSTS": json.dumps(["algo-1-abcde", "algo-2-abcde"]), "SM_CURRENT_HOST": "algo-2-abcde", "SM_NUM_GPUS": "4",
        "UNETSEG_OPT_ML": str(tmp_path),
    })
    assert env.hyperparameters == {"epochs": 3, "channels_last": True}
    assert {k: str(v) for k, v in env.channels.items()} == {"train": "/data/train", "validation": "/data/val"}
    assert (str(env.model_dir), str(env.output_data_dir), str(env.failure_file)) == ("/m", "/o/data", "/o/failure")
    assert env.host_rank == 1 and env.master_host == "algo-1-abcde" and env.num_gpus == 4
    assert env.checkpoint_dir == tmp_path / "checkpoints"


def test_falls_back_to_the_opt_ml_files(tmp_path):
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps({"lr": "0.01"}))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    (tmp_path / "input" / "data" / "train").mkdir(parents=True)
    env = TrainingEnv.from_environ({"UNETSEG_OPT_ML": str(tmp_path), "SM_NUM_GPUS": "0"})
    assert env.hyperparameters == {"lr": "0.01"}
    assert env.channels == {"train": tmp_path / "input" / "data" / "train"}
    assert env.model_dir == tmp_path / "model" and env.failure_file == tmp_path / "output" / "failure"
    assert env.num_gpus is None  # "0" where nvidia-smi is missing: the engine asks torch instead


def test_channel_names():
    a, b, m = Path("/in/a"), Path("/in/b"), Path("/in/m")
    assert pick_channels({"train": a, "validation": b}) == (a, b)
    assert pick_channels({"training": a, "val": b, "init_model": m}) == (a, b)
    assert pick_channels({"images": Path("/in/images"), "masks": Path("/in/masks")}) == (Path("/in"), None)
    # A lone channel of another name is refused, as the same folder would be by fit() and `unetseg train`: it may be
    # a folder of channels (a dataset root one level up) as well as a channel.
    for channels, found in (({"x": a, "y": b}, "x/, y/"), ({"cells": a}, "cells/")):
        with pytest.raises(DataError, match=rf"expected train/ .* found {found}"):
            pick_channels(channels)


def test_a_tuning_trial_keeps_its_checkpoints_under_its_job_name(tmp_path):
    # A tuning job hands all its trials one checkpoint_s3_uri; each trial must resume only its own state.
    base = {"UNETSEG_OPT_ML": str(tmp_path), "TRAINING_JOB_NAME": "unet-hpo-240101-0001-003-4f2a1b9c"}
    trial = TrainingEnv.from_environ({**base,
                                      "SM_HPS": json.dumps({"lr": 0.01, "_tuning_objective_metric": "val_miou"})})
    assert trial.checkpoint_dir == tmp_path / "checkpoints" / "unet-hpo-240101-0001-003-4f2a1b9c"
    assert trial.job_name == "unet-hpo-240101-0001-003-4f2a1b9c"
    # A plain job keeps the flat layout: rerunning with the same checkpoint_s3_uri resumes it (SageMaker's documented
    # way).
    plain = TrainingEnv.from_environ({**base, "SM_HPS": json.dumps({"lr": 0.01})})
    assert plain.checkpoint_dir == tmp_path / "checkpoints"
    moved = TrainingEnv.from_environ({**base, "UNETSEG_CHECKPOINT_DIR": "/ck",
                                      "SM_HPS": json.dumps({"_tuning_objective_metric": "x"})})
    assert moved.checkpoint_dir == Path("/ck") / base["TRAINING_JOB_NAME"]


def test_the_checkpoint_dir_is_the_jobs_checkpoint_local_path(tmp_path):
    # SageMaker writes the job's CheckpointConfig to input/config/checkpointconfig.json and syncs only LocalPath with
    # S3: a job made by any client (a plain Estimator, the console) must checkpoint there.
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "checkpointconfig.json").write_text(json.dumps({"LocalPath": "/opt/ml/my-ck", "S3Uri": "s3://b/ck"}))
    base = {"UNETSEG_OPT_ML": str(tmp_path), "TRAINING_JOB_NAME": "hpo-001-abc"}
    assert TrainingEnv.from_environ(base).checkpoint_dir == Path("/opt/ml/my-ck")
    trial = TrainingEnv.from_environ({**base, "SM_HPS": json.dumps({"_tuning_objective_metric": "val_miou"})})
    assert trial.checkpoint_dir == Path("/opt/ml/my-ck/hpo-001-abc")
    # UNETSEG_CHECKPOINT_DIR (what UNetEstimator sends for checkpoint_local_path) says the same and comes first.
    assert TrainingEnv.from_environ({**base, "UNETSEG_CHECKPOINT_DIR": "/ck"}).checkpoint_dir == Path("/ck")
    (config / "checkpointconfig.json").unlink()
    assert TrainingEnv.from_environ(base).checkpoint_dir == tmp_path / "checkpoints"


@pytest.mark.slow
def test_a_finished_tuning_trial_removes_its_state_from_the_synced_folder(tmp_path):
    # SageMaker restores a tuning job's whole checkpoint prefix into every trial, and deletes from S3 what the
    # container deletes from the synced folder. A trial that finished removes its own state, so later trials fetch
    # only the state of trials still running; another trial's state (restored here) is left alone.
    from support import TINY, make_channel, run_entry, sagemaker_tree

    data = make_channel(tmp_path / "data", count=4)
    hps = {**TINY, "epochs": 1, "num_workers": 0, "_tuning_objective_metric": "val_miou"}
    env = sagemaker_tree(tmp_path / "ml", hps, {"train": data})
    checkpoints = tmp_path / "ml" / "checkpoints"
    (tmp_path / "ml" / "input" / "config" / "checkpointconfig.json").write_text(
        json.dumps({"LocalPath": str(checkpoints), "S3Uri": "s3://b/hpo-1/checkpoints"}))
    other = checkpoints / "hpo-1-001-aaaa"
    other.mkdir(parents=True)
    (other / "last.pt").write_bytes(b"another trial, still running")
    done = run_entry({**env, "TRAINING_JOB_NAME": "hpo-1-002-bbbb"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ml" / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["hpo-1-001-aaaa"]
    assert (other / "last.pt").read_bytes() == b"another trial, still running"


# --- every name of the contract, once -------------------------------------------------------------------------------

CONTRACT_NAME = re.compile(r"\b(?:SM|SAGEMAKER|UNETSEG)_[A-Z0-9_]*")


def _code_strings(path: Path):
    """(line, text) of each string literal in a Python file that is not a docstring."""
    source = path.read_text()
    docstring_lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                   str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.STRING, getattr(tokenize, "FSTRING_START", -1)) and \
                token.start[0] not in docstring_lines:
            yield token.start[0], token.string


def test_every_contract_name_is_spelled_once_in_sagemaker_env():
    """The names of SageMaker's contract and unetseg's own variables are constants of contract/sagemaker_env.py,
    as the training toolkit keeps its names in params.py: code (and its messages) uses the constants, so a name is
    spelled in one place. Docstrings and comments may name them."""
    home = REPO / "unetseg" / "contract" / "sagemaker_env.py"
    files = sorted((REPO / "unetseg").rglob("*.py")) + sorted((REPO / "entry").glob("*.py"))
    spelled = [f"{path.relative_to(REPO)}:{line}: {text[:80]}" for path in files if path != home
               for line, text in _code_strings(path) if CONTRACT_NAME.search(text)]
    assert not spelled, "spelled outside contract/sagemaker_env.py:\n" + "\n".join(spelled)


def test_the_training_environment_names_the_network_interface(tmp_path):
    # Multi-host NCCL and gloo must use the interface SageMaker names: the toolkit exports SM_NETWORK_INTERFACE_NAME
    # from resourceconfig.json's network_interface_name, and a job started without the toolkit has only the file.
    assert TrainingEnv.from_environ({"SM_NETWORK_INTERFACE_NAME": "eth1", "UNETSEG_OPT_ML": str(tmp_path)}
                                    ).network_interface == "eth1"
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"],
                                                            "network_interface_name": "ethwe"}))
    env = TrainingEnv.from_environ({"UNETSEG_OPT_ML": str(tmp_path)})
    assert (env.network_interface, env.current_host, env.host_rank) == ("ethwe", "algo-2", 1)
    assert TrainingEnv.from_environ({"UNETSEG_OPT_ML": str(tmp_path / "none")}).network_interface is None


def test_the_names_are_sagemakers():
    """The one place the names are spelled outside sagemaker_env.py: as SageMaker, its SDK and its training toolkit
    spell them (the other tests use the constants, so a typo there would go unnoticed but for this)."""
    from sagemaker.model import MODEL_SERVER_WORKERS_PARAM_NAME

    from unetseg.contract import sagemaker_env as env

    assert (env.HPS_ENV, env.CHANNELS_ENV, env.CHANNEL_ENV_PREFIX, env.HOSTS_ENV, env.CURRENT_HOST_ENV) == (
        "SM_HPS", "SM_CHANNELS", "SM_CHANNEL_", "SM_HOSTS", "SM_CURRENT_HOST")
    assert (env.NUM_GPUS_ENV, env.NETWORK_INTERFACE_ENV, env.JOB_NAME_ENV) == (
        "SM_NUM_GPUS", "SM_NETWORK_INTERFACE_NAME", "TRAINING_JOB_NAME")
    assert (env.MODEL_DIR_ENV, env.OUTPUT_DIR_ENV, env.OUTPUT_DATA_DIR_ENV, env.INPUT_DATA_DIR_ENV,
            env.INPUT_CONFIG_DIR_ENV) == ("SM_MODEL_DIR", "SM_OUTPUT_DIR", "SM_OUTPUT_DATA_DIR", "SM_INPUT_DATA_DIR",
                                          "SM_INPUT_CONFIG_DIR")
    assert env.MODEL_SERVER_WORKERS_ENV == MODEL_SERVER_WORKERS_PARAM_NAME.upper() == "SAGEMAKER_MODEL_SERVER_WORKERS"
    assert (env.MODEL_SERVER_TIMEOUT_ENV, env.BIND_TO_PORT_ENV, env.BATCH_ENV, env.MAX_PAYLOAD_IN_MB_ENV) == (
        "SAGEMAKER_MODEL_SERVER_TIMEOUT", "SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_BATCH", "SAGEMAKER_MAX_PAYLOAD_IN_MB")
    # unetseg's own, as the README documents them for users
    assert (env.MAX_IMAGE_MB_ENV, env.SERVING_MODE_ENV, env.MAX_BODY_MB_ENV, env.MAX_PIXELS_ENV, env.TTA_ENV,
            env.SERVING_MODEL_DIR_ENV, env.IMAGE_URI_ENV, env.CHECKPOINT_DIR_ENV) == (
        "UNETSEG_MAX_IMAGE_MB", "UNETSEG_SERVING_MODE", "UNETSEG_MAX_BODY_MB", "UNETSEG_MAX_PIXELS", "UNETSEG_TTA",
        "UNETSEG_MODEL_DIR", "UNETSEG_IMAGE_URI", "UNETSEG_CHECKPOINT_DIR")


def test_a_stop_exits_128_plus_the_signal():
    # One rule for PID 1 (a signal number from waitpid), the training job and `unetseg train` (a signal's name).
    from unetseg.contract.sagemaker_env import stopped_exit_code

    assert stopped_exit_code("SIGTERM") == stopped_exit_code(signal.SIGTERM) == stopped_exit_code(15) == 143
    assert stopped_exit_code("SIGINT") == 130
