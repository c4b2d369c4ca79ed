"""Every rejected configuration raises one clear error before a single AWS request is sent."""

from __future__ import annotations

import pytest

from conftest import BUCKET, IMAGE, ROLE
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.contract.errors import ConfigError, DataError
from unetseg.contract.sagemaker_env import IMAGE_URI_ENV

BASE = dict(image_uri=IMAGE, role=ROLE, instance_type="ml.g5.xlarge")


def construct(**overrides):
    def run(aws):
        kwargs = {**BASE, "sagemaker_session": aws.session, **overrides}
        if kwargs["instance_type"] in ("local", "local_gpu"):
            kwargs.pop("sagemaker_session")  # local mode makes its own LocalSession
        return UNetEstimator(**kwargs)
    return run


def after_construct(action, **overrides):
    def run(aws):
        est = construct(**overrides)(aws)
        aws.requests.clear()
        action(est)
    return run


def fit(inputs, **fit_kwargs):
    return after_construct(lambda est: est.fit(inputs, wait=False, logs=False, **fit_kwargs))


def _pipe_input():
    from sagemaker.inputs import TrainingInput

    return {"train": TrainingInput(f"s3://{BUCKET}/ds/train/", input_mode="Pipe")}


def _sharded_input():
    from sagemaker.inputs import TrainingInput

    return {"train": TrainingInput(f"s3://{BUCKET}/ds/train/", distribution="ShardedByS3Key")}


def _colors(n):
    return [[i, (i * 7) % 256, (i * 13) % 256] for i in range(n)]


CASES = {
    # spot and runtimes
    "max_wait without spot": (construct(max_wait=7200), JobSettingsError, "only used with use_spot_instances=True"),
    "max_wait shorter than max_run": (construct(use_spot_instances=True, max_run=7200, max_wait=3600),
                                      JobSettingsError, "max_wait=3600 is shorter than max_run=7200"),
    "max_run zero": (construct(max_run=0), JobSettingsError, "max_run=0 must be"),
    "max_run beyond 28 days": (construct(max_run=29 * 24 * 3600), JobSettingsError, "28 days"),
    "max_run as a string": (construct(max_run="3600"), JobSettingsError, "max_run='3600'"),
    "keep-alive beyond the limit": (construct(keep_alive_period_in_seconds=99999), JobSettingsError, "0 to 21600"),
    "spot with a warm pool": (construct(use_spot_instances=True, keep_alive_period_in_seconds=600), JobSettingsError,
                              "warm pools cannot use spot capacity"),
    # instances
    "instance_count zero": (construct(instance_count=0), JobSettingsError, "instance_count=0 must be"),
    "local_gpu with two instances": (construct(instance_type="local_gpu", instance_count=2), JobSettingsError,
                                     "must be 1"),
    "instance type without ml. prefix": (construct(instance_type="g5.xlarge"), JobSettingsError,
                                         "did you mean 'ml.g5.xlarge'"),
    "misspelt instance size": (construct(instance_type="ml.g5.xlrge"), JobSettingsError,
                               "did you mean 'ml.g5.xlarge'"),
    "instance type without size": (construct(instance_type="ml.g5"), JobSettingsError, "ml.<family>.<size>"),
    "no instance type": (construct(instance_type=None), JobSettingsError, "instance_type is required"),
    "Kepler GPU": (construct(instance_type="ml.p2.xlarge"), JobSettingsError, "K80"),
    "Trainium": (construct(instance_type="ml.trn1.2xlarge"), JobSettingsError, "not a CUDA GPU"),
    "Arm host (GB200)": (construct(instance_type="ml.p6e-gb200.36xlarge"), JobSettingsError, "Arm"),
    "Blackwell B200 with the CUDA 12.6 image": (construct(instance_type="ml.p6-b200.48xlarge"), JobSettingsError,
                                                "CUDA 12.8 or later"),
    "Blackwell RTX PRO 6000 with the CUDA 12.6 image": (construct(instance_type="ml.g7e.2xlarge"), JobSettingsError,
                                                        "image_cuda='12.8'"),
    "an image CUDA version unknown to the check": (construct(image_cuda="11.0"), JobSettingsError, "image_cuda='11.0'"),
    "volume larger than the NVMe instance storage": (construct(instance_type="ml.g4dn.xlarge", volume_size=200),
                                                     JobSettingsError, "125 GB of NVMe instance storage"),
    "volume of zero GB": (construct(volume_size=0), JobSettingsError, "volume_size=0"),
    "Pipe input mode": (construct(input_mode="Pipe"), JobSettingsError, "Pipe mode is not supported"),
    # GPU-only settings
    "bf16 on a CPU instance": (construct(instance_type="ml.m5.xlarge", hyperparameters={"amp": "bf16"}),
                               JobSettingsError, "amp='bf16' needs a CUDA GPU but ml.m5.xlarge"),
    "fp16 on a compute instance": (construct(instance_type="ml.c5.2xlarge", hyperparameters={"amp": "fp16"}),
                                   JobSettingsError, "amp='fp16' needs a CUDA GPU"),
    "compile on a CPU instance": (construct(instance_type="ml.m5.xlarge", hyperparameters={"compile": True}),
                                  JobSettingsError, "compile=True"),
    "bf16 on a T4": (construct(instance_type="ml.g4dn.xlarge", hyperparameters={"amp": "bf16"}), JobSettingsError,
                     "Ampere"),
    "bf16 on a V100": (construct(instance_type="ml.p3.2xlarge", hyperparameters={"amp": "bf16"}), JobSettingsError,
                       "V100"),
    "bf16 in CPU local mode": (construct(instance_type="local", hyperparameters={"amp": "bf16"}), JobSettingsError,
                               "local mode without a GPU"),
    "bf16 set later on a CPU instance": (after_construct(lambda est: est.set_hyperparameters(amp="bf16"),
                                                         instance_type="ml.m5.xlarge"),
                                         JobSettingsError, "amp='bf16'"),
    # role, image, names
    "no role outside local mode": (construct(role=None), JobSettingsError, "get_execution_role()"),
    "malformed role ARN": (construct(role="arn:aws:iam::1234:role/R"), JobSettingsError, "not an IAM role ARN"),
    "no image": (construct(image_uri=None), JobSettingsError, IMAGE_URI_ENV),
    "region differs from session": (construct(region="eu-west-1"), JobSettingsError, "differs"),
    "base_job_name with underscore": (construct(base_job_name="my_job"), JobSettingsError, "no underscores"),
    "environment name with a dash": (construct(environment={"MY-VAR": "1"}), JobSettingsError, "MY-VAR"),
    # S3 URIs
    "output_path missing a slash": (construct(output_path="s3:/bucket/out"), JobSettingsError, "not an S3 URI"),
    "output_path with a bad bucket": (construct(output_path="s3://My_Bucket/out"), JobSettingsError,
                                      "not a valid bucket name"),
    "file output outside local mode": (construct(output_path="file:///tmp/out"), JobSettingsError,
                                       "only for local mode"),
    "checkpoint over https": (construct(use_spot_instances=True, checkpoint_s3_uri="https://example.com/ck"),
                              JobSettingsError, "checkpoint_s3_uri"),
    "fit on a malformed S3 URI": (fit("s3://"), JobSettingsError, "not an S3 URI"),
    "fit on a bucket with capitals": (fit("s3://Bad.Bucket/ds/"), JobSettingsError, "bucket name"),
    "fit on a channel URI with a bad bucket": (fit({"train": "s3://a/ds/"}), JobSettingsError, "bucket name"),
    "fit on file:// outside local mode": (fit("file:///tmp/ds"), JobSettingsError, "local mode"),
    "fit on an unknown channel": (fit({"train": f"s3://{BUCKET}/a/", "val": f"s3://{BUCKET}/b/"}), DataError,
                                  "use 'validation'"),
    "fit without a train channel": (fit({"validation": f"s3://{BUCKET}/b/"}), DataError, "no 'train' channel"),
    "fit with a Pipe channel": (after_construct(lambda est: est.fit(_pipe_input(), wait=False)), JobSettingsError,
                                "Pipe"),
    "fit with a sharded channel": (after_construct(lambda est: est.fit(_sharded_input(), wait=False)),
                                   JobSettingsError, "ShardedByS3Key"),
    "fit without network access to ImageNet weights": (
        after_construct(lambda est: est.fit(f"s3://{BUCKET}/ds/", wait=False), enable_network_isolation=True),
        JobSettingsError, "enable_network_isolation=True"),
    "fit with a bad job name": (fit(f"s3://{BUCKET}/ds/", job_name="run.1"), JobSettingsError, "job_name='run.1'"),
    "fit on nothing": (fit(None), DataError, "needs training data"),
    "fit on a missing local folder": (fit("/no/such/folder"), DataError, "neither an s3:// prefix"),
    # hyperparameters
    "unknown hyperparameter": (construct(hyperparameters={"epoch": 3}), ConfigError, "did you mean 'epochs'"),
    "class names with one metric name": (
        construct(hyperparameters={"classes": 3, "class_names": ["bg", "Cell Nucleus", "cell-nucleus"]}), ConfigError,
        "val_iou_cell_nucleus"),
    "hyperparameter over SageMaker's length limit": (
        construct(hyperparameters={"classes": 200, "class_colors": _colors(200)}), JobSettingsError, "limit is 2500"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rejected_before_any_aws_request(aws, case):
    action, error, message = CASES[case]
    with pytest.raises(error) as raised:
        action(aws)
    assert message in str(raised.value)
    assert aws.requests == [], f"{case}: sent {aws.requests} before failing"


def test_there_are_enough_distinct_cases():
    assert len(CASES) >= 20


def test_job_settings_error_is_a_config_error():
    assert issubclass(JobSettingsError, ConfigError) and issubclass(JobSettingsError, ValueError)


def test_several_problems_are_reported_together(aws):
    with pytest.raises(JobSettingsError) as raised:
        construct(instance_count=0, max_wait=10, output_path="s3://x")(aws)
    text = str(raised.value)
    assert text.startswith("invalid training job settings:")
    assert "instance_count=0" in text and "max_wait=10" in text and "output_path" in text
