"""The strict stand-in (strict_aws, installed on the `aws` fixture's session): a request real SageMaker would refuse
is refused here too, before moto sees it, with the service's ValidationException naming the field."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from conftest import BUCKET, IMAGE, ROLE


def training_job(**changes):
    request = {
        "TrainingJobName": "unetseg-2024-01-01-00-00-00-000",
        "AlgorithmSpecification": {"TrainingImage": IMAGE, "TrainingInputMode": "File"},
        "RoleArn": ROLE,
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/out/"},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "HyperParameters": {"epochs": "3"},
    }
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target = request
        for key in parents:
            target = target[key]
        target[leaf] = value
    return request


def refused(aws, operation: str, request: dict) -> str:
    client = aws.session.sagemaker_client
    with pytest.raises(ClientError) as raised:
        getattr(client, operation)(**request)
    error = raised.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert aws.requests == [], "a refused request must not reach moto"
    return error["Message"]


def test_a_valid_request_passes(aws):
    aws.session.sagemaker_client.create_training_job(**training_job())
    assert aws.requests == ["sagemaker.CreateTrainingJob"]


@pytest.mark.parametrize("changes, field, rule", [
    ({"TrainingJobName": "unet_seg-2024-01-01"}, "trainingJobName", "regular expression pattern"),
    ({"TrainingJobName": "a" * 64}, "trainingJobName", "length less than or equal to 63"),
    ({"HyperParameters": {"class_colors": "x" * 2501}}, "hyperParameters.class_colors",
     "length less than or equal to 2500"),
    ({"ResourceConfig.InstanceType": "ml.g5.huge"}, "resourceConfig.instanceType", "enum value set"),
    ({"ResourceConfig.KeepAlivePeriodInSeconds": 99999}, "resourceConfig.keepAlivePeriodInSeconds",
     "value less than or equal to 21600"),
    ({"AlgorithmSpecification.MetricDefinitions": [{"Name": "val_miou", "Regex": "x" * 501}]},
     "algorithmSpecification.metricDefinitions.1.member.regex", "length less than or equal to 500"),
    ({"Environment": {"MY-VAR": "1"}}, "environment.MY-VAR", "regular expression pattern"),
    ({"Tags": [{"Key": "team#1", "Value": "x"}]}, "tags.1.member.key", "regular expression pattern"),  # Java \p{L}
    ({"RoleArn": "arn:aws:iam::1234:role/R"}, "roleArn", "regular expression pattern"),
])
def test_a_request_the_service_would_refuse_names_the_field(aws, changes, field, rule):
    message = refused(aws, "create_training_job", training_job(**changes))
    assert f"at '{field}' failed to satisfy constraint" in message and rule in message, message


def test_patterns_are_full_matches(aws):
    # Unanchored in botocore's model, yet the service refuses a name that only starts right.
    message = refused(aws, "create_endpoint", {"EndpointName": "cells.v2", "EndpointConfigName": "cells"})
    assert "'cells.v2' at 'endpointName'" in message


def test_every_problem_is_listed(aws):
    request = training_job(**{"TrainingJobName": "my_job", "ResourceConfig.KeepAlivePeriodInSeconds": 99999})
    message = refused(aws, "create_training_job", request)
    assert message.startswith("2 validation errors detected: ")
    assert "'trainingJobName'" in message and "'resourceConfig.keepAlivePeriodInSeconds'" in message


def test_tuning_job_names_are_limited_to_32_characters(aws):
    message = refused(aws, "describe_hyper_parameter_tuning_job", {"HyperParameterTuningJobName": "t" * 33})
    assert "at 'hyperParameterTuningJobName'" in message and "less than or equal to 32" in message
