"""The notebook's side of MLflow tracking, without a server: the estimator's mlflow_tracking_uri reaches the job's
environment (the CreateTrainingJob request, checked against the service model), and a URI the job could not log to is
refused before any AWS call; the client module imports neither torch nor mlflow; `unetseg train --mlflow-uri` checks
its URI before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import BUCKET, IMAGE, REGION, ROLE
from support import ENGINE_ONLY_MODULES, REPO
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.contract.sagemaker_env import IMAGE_URI_ENV, MLFLOW_EXPERIMENT_ENV, MLFLOW_TRACKING_URI_ENV

ARN = f"arn:aws:sagemaker:{REGION}:111122223333:mlflow-tracking-server/team-experiments"


def make(aws, **overrides):
    kwargs = dict(image_uri=IMAGE, role=ROLE, instance_type="ml.g5.2xlarge", sagemaker_session=aws.session)
    kwargs.update(overrides)
    return UNetEstimator(**kwargs)


@pytest.mark.parametrize("uri", [ARN, "https://mlflow.example.com:8443/"])
def test_the_tracking_uri_and_experiment_reach_the_jobs_environment(aws, uri):
    s3 = aws.boto_session.client("s3")
    for channel in ("train", "validation"):
        s3.put_object(Bucket=BUCKET, Key=f"ds/{channel}/images/a.png", Body=b"i" * 100)
        s3.put_object(Bucket=BUCKET, Key=f"ds/{channel}/masks/a.png", Body=b"m" * 50)
    aws.requests.clear()
    est = make(aws, mlflow_tracking_uri=uri, mlflow_experiment="cells-v2", environment={"NCCL_DEBUG": "WARN"})
    assert aws.requests == []
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    assert aws.sent("CreateTrainingJob")["Environment"] == {
        MLFLOW_TRACKING_URI_ENV: uri, MLFLOW_EXPERIMENT_ENV: "cells-v2", IMAGE_URI_ENV: IMAGE, "NCCL_DEBUG": "WARN"}


@pytest.mark.parametrize("uri, says", [
    ("arn:aws:sagemaker:eu-west-1:111122223333:mlflow-tracking-server/x",
     "is in eu-west-1, but the job runs in us-east-1"),
    ("arn:aws:sagemaker:us-east-1:1111:mlflow-tracking-server/x", "is not a SageMaker MLflow ARN"),
    ("arn:aws:s3:::bucket", "is not a SageMaker MLflow ARN"),
    ("file:///tmp/mlruns", "a local store (file:, sqlite:) is not reachable from the job"),
    ("mlflow.example.com", "give an http(s) MLflow server URL"),
    ("http://localhost:5000", "localhost inside the job's container is the container itself"),
    ("", "give an http(s) MLflow server URL or a SageMaker MLflow tracking server ARN"),
])
def test_a_tracking_uri_the_job_could_not_log_to_is_refused_before_any_request(aws, uri, says):
    with pytest.raises(JobSettingsError, match="mlflow_tracking_uri=") as caught:
        make(aws, mlflow_tracking_uri=uri)
    assert says in str(caught.value)
    assert aws.requests == []


def test_an_experiment_without_a_server_and_a_disagreeing_environment_are_refused(aws):
    with pytest.raises(JobSettingsError, match="mlflow_experiment needs mlflow_tracking_uri"):
        make(aws, mlflow_experiment="cells")
    with pytest.raises(JobSettingsError, match="disagree"):
        make(aws, mlflow_tracking_uri=ARN, environment={MLFLOW_TRACKING_URI_ENV: "https://other.example.com"})


@pytest.mark.slow  # starts a fresh interpreter
def test_the_client_module_imports_neither_torch_nor_mlflow():
    probe = "import json, sys, unetseg.client.tracking; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}
    assert not loaded & {*ENGINE_ONLY_MODULES, "mlflow", "sagemaker_mlflow"}


def test_unetseg_train_checks_its_mlflow_uri_before_training(tmp_path, capsys):
    from unetseg.cli import main

    code = main(["train", "--data", str(tmp_path / "absent"), "--output", str(tmp_path / "run"),
                 "--mlflow-uri", "ftp://mlflow.example.com"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --mlflow-uri='ftp://mlflow.example.com': give an http(s) MLflow server URL" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # starts a fresh interpreter
def test_the_names_are_mlflows_and_sagemakers():
    """The variables MLflow's client reads, and those SageMaker sets in a training job's container, as they spell them
    (the other tests use the constants)."""
    from mlflow import environment_variables as mlflow_env
    from sagemaker.experiments._environment import TRAINING_JOB_ARN_ENV

    from unetseg.contract import sagemaker_env as env

    assert (env.MLFLOW_TRACKING_URI_ENV, env.MLFLOW_EXPERIMENT_ENV, env.MLFLOW_TIMEOUT_ENV, env.MLFLOW_RETRIES_ENV) == (
        mlflow_env.MLFLOW_TRACKING_URI.name, mlflow_env.MLFLOW_EXPERIMENT_NAME.name,
        mlflow_env.MLFLOW_HTTP_REQUEST_TIMEOUT.name, mlflow_env.MLFLOW_HTTP_REQUEST_MAX_RETRIES.name)
    assert (env.JOB_ARN_ENV, env.CURRENT_INSTANCE_TYPE_ENV, env.TRACKING_FLUSH_ENV) == (
        TRAINING_JOB_ARN_ENV, "SM_CURRENT_INSTANCE_TYPE", "UNETSEG_MLFLOW_FLUSH_S")
