"""HyperparameterTuner on a UNetEstimator: the CreateHyperParameterTuningJob request, and the tuner() helper."""

from __future__ import annotations

import pytest
from sagemaker.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
from sagemaker.tuner import HyperparameterTuner

from conftest import BUCKET, IMAGE, ROLE
from unetseg import TrainConfig
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.contract.metrics_log import SELECTION_METRIC, metric_definitions
from unetseg.contract.sagemaker_env import CHECKPOINT_DIR_ENV

HPS = {"classes": 3, "epochs": 30, "class_names": ["bg", "nucleus", "membrane"]}
RANGES = {"lr": ContinuousParameter(1e-4, 1e-2, scaling_type="Logarithmic"), "batch_size": IntegerParameter(4, 32)}


def make(aws, **overrides):
    return UNetEstimator(**{"image_uri": IMAGE, "role": ROLE, "instance_type": "ml.g5.xlarge",
                            "sagemaker_session": aws.session, "hyperparameters": HPS, **overrides})


def put_dataset(aws):
    s3 = aws.boto_session.client("s3")
    for key in ("ds/train/images/a.png", "ds/train/masks/a.png", "ds/validation/images/b.png",
                "ds/validation/masks/b.png"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    aws.requests.clear()


def check_tuning_request(request, est):
    definition = request["TrainingJobDefinition"]
    static = definition["StaticHyperParameters"]
    assert "lr" not in static and "batch_size" not in static
    # The container parses the static values plus the tuned ones (and ignores _tuning_objective_metric, which
    # SageMaker adds to each training job's hyperparameters).
    per_job = {**static, "lr": "0.0031", "batch_size": "16", "_tuning_objective_metric": SELECTION_METRIC}
    assert TrainConfig.from_hyperparameters(per_job) == TrainConfig(**HPS, lr=0.0031, batch_size=16)
    assert {k: v for k, v in static.items()} == {k: v for k, v in est.hyperparameters().items()
                                                 if k not in ("lr", "batch_size")}
    algorithm = definition["AlgorithmSpecification"]
    assert algorithm["TrainingImage"] == IMAGE
    assert algorithm["MetricDefinitions"] == metric_definitions(HPS["class_names"])
    config = request["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": SELECTION_METRIC}
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [{"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.01",
                                                    "ScalingType": "Logarithmic"}]
    assert ranges["IntegerParameterRanges"] == [{"Name": "batch_size", "MinValue": "4", "MaxValue": "32",
                                                 "ScalingType": "Auto"}]
    assert "DebugHookConfig" not in definition
    return definition


def test_plain_hyperparameter_tuner_request(aws):
    put_dataset(aws)
    est = make(aws, use_spot_instances=True, max_run=3600)
    tuner = HyperparameterTuner(est, SELECTION_METRIC, RANGES, metric_definitions=est.metric_definitions,
                                objective_type="Maximize", max_jobs=4, max_parallel_jobs=2)
    tuner.fit(est.training_inputs(f"s3://{BUCKET}/ds/"), job_name="unetseg-hpo-1", wait=False)
    request = aws.sent("CreateHyperParameterTuningJob")
    definition = check_tuning_request(request, est)
    assert request["HyperParameterTuningJobName"] == "unetseg-hpo-1"
    assert definition["EnableManagedSpotTraining"] is True
    assert definition["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert definition["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/unetseg/unetseg-hpo-1/checkpoints"}
    assert [c["ChannelName"] for c in definition["InputDataConfig"]] == ["train", "validation"]
    assert definition["OutputDataConfig"] == {"S3OutputPath": f"s3://{BUCKET}/unetseg/"}
    assert request["HyperParameterTuningJobConfig"]["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4,
                                                                          "MaxParallelTrainingJobs": 2}


def test_tuner_helper_fills_metric_definitions_and_resolves_inputs(aws):
    put_dataset(aws)
    est = make(aws)
    tuner = est.tuner(RANGES, max_jobs=2, max_parallel_jobs=1)
    tuner.fit(f"s3://{BUCKET}/ds/", wait=False)  # a bare prefix: the helper finds train/ and validation/
    definition = check_tuning_request(aws.sent("CreateHyperParameterTuningJob"), est)
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in definition["InputDataConfig"]}
    assert channels == {"train": f"s3://{BUCKET}/ds/train/", "validation": f"s3://{BUCKET}/ds/validation/"}


@pytest.mark.parametrize("ranges, objective, message", [
    ({"learning_rate": ContinuousParameter(1e-4, 1e-2)}, None, "unknown hyperparameter 'learning_rate'"),
    ({"lr": ContinuousParameter(0, 1e-2)}, None, "tuning range lr: 0"),
    ({"optimizer": CategoricalParameter(["adamw", "lion"])}, None, "tuning range optimizer: 'lion'"),
    ({"amp": CategoricalParameter(["off", "bf16"])}, None, "needs an Ampere"),
    ({"lr": ContinuousParameter(1e-4, 1e-2)}, "val_iou", "not a metric this job records"),
])
def test_tuner_helper_rejects_bad_ranges_before_any_request(aws, ranges, objective, message):
    est = make(aws, instance_type="ml.g4dn.xlarge")
    with pytest.raises(JobSettingsError, match=message):
        est.tuner(ranges, objective_metric_name=objective)
    assert aws.requests == []


def test_a_tuning_job_named_after_an_image_with_underscores_is_valid(aws):
    # Tuning job names: the same pattern as job names, but at most 32 characters.
    put_dataset(aws)
    est = make(aws, image_uri="111122223333.dkr.ecr.us-east-1.amazonaws.com/team/unet_seg_models_for_cells:3")
    est.tuner(RANGES, max_jobs=2, max_parallel_jobs=1).fit(f"s3://{BUCKET}/ds/", wait=False)
    name = aws.sent("CreateHyperParameterTuningJob")["HyperParameterTuningJobName"]
    assert name.startswith("unet-seg-models-for-") and len(name) <= 32


def test_a_base_tuning_job_name_is_checked_before_any_request(aws):
    with pytest.raises(JobSettingsError, match="base_tuning_job_name='hpo_1'"):
        make(aws).tuner(RANGES, base_tuning_job_name="hpo_1")
    assert aws.requests == []


def test_a_tuning_job_name_given_to_fit_is_checked(aws):
    put_dataset(aws)
    tuner = make(aws).tuner(RANGES)
    with pytest.raises(JobSettingsError, match="job_name='hpo-for-the-cells-dataset-of-2024'.*32"):
        tuner.fit(f"s3://{BUCKET}/ds/", job_name="hpo-for-the-cells-dataset-of-2024", wait=False)
    assert "sagemaker.CreateHyperParameterTuningJob" not in aws.requests


def test_each_tuning_job_has_a_checkpoint_prefix_of_its_own(aws):
    # SageMaker gives all trials of a tuning job one CheckpointConfig and restores the whole prefix into each trial:
    # the prefix must hold this tuning job's trials only, never another tuning job's or a plain job's state.
    put_dataset(aws)
    est = make(aws, use_spot_instances=True, checkpoint_local_path="/opt/ml/ck")
    tuner = est.tuner(RANGES, max_jobs=4, max_parallel_jobs=2)
    tuner.fit(f"s3://{BUCKET}/ds/", wait=False)
    tuner.fit(f"s3://{BUCKET}/ds/", job_name="cells-hpo-2", wait=False)
    given = make(aws, use_spot_instances=True, checkpoint_s3_uri=f"s3://{BUCKET}/ck/")
    given.tuner(RANGES).fit(f"s3://{BUCKET}/ds/", job_name="cells-hpo-3", wait=False)
    prefixes = []
    for body in aws.bodies["CreateHyperParameterTuningJob"]:
        definition = body["TrainingJobDefinition"]
        prefixes.append(definition["CheckpointConfig"]["S3Uri"])
        assert definition["EnableManagedSpotTraining"] is True
    name = aws.bodies["CreateHyperParameterTuningJob"][0]["HyperParameterTuningJobName"]
    assert prefixes == [f"s3://{BUCKET}/unetseg/{name}/checkpoints", f"s3://{BUCKET}/unetseg/cells-hpo-2/checkpoints",
                        f"s3://{BUCKET}/ck/cells-hpo-3"]
    first = aws.bodies["CreateHyperParameterTuningJob"][0]["TrainingJobDefinition"]
    assert first["CheckpointConfig"]["LocalPath"] == first["Environment"][CHECKPOINT_DIR_ENV] == "/opt/ml/ck"
    assert given.checkpoint_s3_uri == f"s3://{BUCKET}/ck/"  # the estimator's own jobs keep the URI given
