"""The estimator attacked the way a demanding user would, before any instance (or local container) starts.

Four classes of bad input, each refused in the notebook with one message naming the thing at fault:
- data: a local folder is read as the container reads it (every file decoded, one mask convention for all files),
  and nothing is uploaded when it is not usable;
- buckets: one that does not exist, or lies in another region than the job (SageMaker fails such a job only after
  its instances started), found with one HeadBucket per bucket;
- encoders: names and pretrained weights that segmentation-models-pytorch would refuse inside the container;
- image references: a training image that is no registry/repository[:tag][@digest], or an ECR image in another
  region.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import BUCKET, IMAGE, REGION, ROLE
from PIL import Image
from support import make_channel, random_pair, save, write_pair

from unetseg.errors import ConfigError, DataError
from unetseg.estimator import UNetEstimator
from unetseg.job_rules import JobSettingsError

OTHER_REGION = "eu-west-1"
EU_BUCKET = "unetseg-test-eu-bucket"
MISSING = "unetseg-no-such-bucket"


def make(aws, **overrides):
    return UNetEstimator(**{"image_uri": IMAGE, "role": ROLE, "instance_type": "ml.g5.xlarge",
                            "sagemaker_session": aws.session, **overrides})


def put(aws, *keys: str, bucket: str = BUCKET) -> None:
    s3 = aws.boto_session.client("s3")
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    aws.requests.clear()


def s3_dataset(aws, prefix: str = "ds/", bucket: str = BUCKET) -> str:
    put(aws, *[f"{prefix}{split}/{sub}/a.png" for split in ("train", "validation") for sub in ("images", "masks")],
        bucket=bucket)
    return f"s3://{bucket}/{prefix}"


def eu_bucket(aws) -> None:
    aws.boto_session.client("s3", region_name=OTHER_REGION).create_bucket(
        Bucket=EU_BUCKET, CreateBucketConfiguration={"LocationConstraint": OTHER_REGION})
    aws.requests.clear()


def folder(tmp_path, train: int = 4, validation: int = 2, classes: int = 2):
    root = tmp_path / "cells"
    make_channel(root / "train", count=train, classes=classes, seed=1)
    if validation:
        make_channel(root / "validation", count=validation, classes=classes, seed=2)
    return root


# --- encoders -------------------------------------------------------------------------------------------------------

ENCODER_CASES = {
    "misspelt resnet": ({"encoder": "resnet43"}, "'encoder' = 'resnet43': not an encoder of "
                                                 "segmentation-models-pytorch; did you mean 'resnet34'?"),
    "underscore for hyphen": ({"encoder": "efficientnet_b4"}, "did you mean 'efficientnet-b4'?"),
    "capitals": ({"encoder": "ResNet50"}, "did you mean 'resnet50'?"),
    "hyphenated": ({"encoder": "mobilenet-v2"}, "did you mean 'mobilenet_v2'?"),
    "an architecture, not an encoder": ({"encoder": "unet"}, "not an encoder of segmentation-models-pytorch"),
    "timm name in capitals": ({"encoder": "tu-ConvNeXt_Tiny"}, "did you mean 'tu-convnext_tiny'?"),
    "tu- without a model": ({"encoder": "tu-"}, "not a timm model name"),
    "timm name with a space": ({"encoder": "tu-convnext tiny"}, "not a timm model name"),
    "hub source without a repository": ({"encoder": "tu-hf-hub:"}, "names no model after 'hf-hub:'"),
    "encoder without imagenet weights": ({"encoder": "resnext101_32x16d"},
                                         "resnext101_32x16d has no imagenet weights"),
    "misspelt imagenet": ({"encoder_weights": "imagnet"}, "did you mean 'imagenet'?"),
    "weights smp has but unetseg does not load": ({"encoder": "resnet50", "encoder_weights": "ssl"},
                                                  "by the name 'imagenet' only"),
}


@pytest.mark.parametrize("case", list(ENCODER_CASES), ids=list(ENCODER_CASES))
def test_encoders_smp_would_refuse_are_refused_in_the_notebook(aws, case):
    hyperparameters, message = ENCODER_CASES[case]
    with pytest.raises(ConfigError) as raised:
        make(aws, hyperparameters=hyperparameters)
    assert message in str(raised.value)
    assert aws.requests == []


@pytest.mark.parametrize("hyperparameters", [
    {"encoder": "tu-convnext_tiny"}, {"encoder": "tu-resnet50.a1_in1k"}, {"encoder": "tu-hf-hub:timm/resnet18.a1_in1k"},
    {"encoder": "timm-regnetx_002"}, {"encoder": "mit_b2"}, {"encoder": "resnext101_32x16d", "encoder_weights": None},
    {"encoder_weights": "/opt/ml/input/data/weights/encoder.safetensors"}, {"encoder_weights": "encoder.pth"},
])
def test_encoders_smp_accepts_pass(aws, hyperparameters):
    assert make(aws, hyperparameters=hyperparameters).config.encoder == hyperparameters.get("encoder", "resnet34")


def test_an_encoder_set_later_or_tuned_is_checked(aws):
    from sagemaker.parameter import CategoricalParameter

    est = make(aws)
    with pytest.raises(ConfigError, match="did you mean 'resnet50'"):
        est.set_hyperparameters(encoder="resnet-50")
    with pytest.raises(ConfigError, match="'resnet43'.*did you mean 'resnet34'"):
        est.tuner({"encoder": CategoricalParameter(["resnet34", "resnet43"])})
    assert aws.requests == []


# --- the training image ---------------------------------------------------------------------------------------------

ECR = "111122223333.dkr.ecr.us-east-1.amazonaws.com"

IMAGE_CASES = {
    "capitals in the repository": (f"{ECR}/UNetSeg:1.0", "repository"),
    "a space in the tag": (f"{ECR}/unetseg:1.0 beta", "tag"),
    "an empty tag": (f"{ECR}/unetseg:", "tag"),
    "a tag too long": (f"{ECR}/unetseg:{'v' * 129}", "tag"),
    "a URL scheme": (f"https://{ECR}/unetseg:1.0", "without a scheme"),
    "a short digest": (f"{ECR}/unetseg@sha256:abc123", "digest"),
    "an empty path segment": (f"{ECR}//unetseg:1.0", "repository"),
    "a trailing slash": (f"{ECR}/unetseg/", "repository"),
    "leading whitespace": (f" {ECR}/unetseg:1.0", "whitespace"),
    "no registry outside local mode": ("unetseg:1.0", "registry"),
    "ECR in another region": ("111122223333.dkr.ecr.eu-west-1.amazonaws.com/unetseg:1.0", "eu-west-1"),
    "ECR host with a short account": ("11112222333.dkr.ecr.us-east-1.amazonaws.com/unetseg:1.0", "12-digit account"),
    "longer than SageMaker takes": (f"{ECR}/{'a' * 250}:1", "255"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES), ids=list(IMAGE_CASES))
def test_image_uris_sagemaker_cannot_pull_are_refused(aws, case):
    image_uri, fragment = IMAGE_CASES[case]
    with pytest.raises(JobSettingsError) as raised:
        make(aws, image_uri=image_uri)
    assert "image_uri" in str(raised.value) and fragment in str(raised.value), str(raised.value)
    assert aws.requests == []


@pytest.mark.parametrize("image_uri", [
    IMAGE, f"{ECR}/team/unet_seg.v2:1", f"{ECR}/unetseg@sha256:" + "0" * 64, f"{ECR}/unetseg:1.0@sha256:" + "a" * 64,
    f"{ECR}/unetseg", "registry.example.com:5000/seg/unet:2024-01-01_rc.1",
])
def test_image_references_sagemaker_takes_pass(aws, image_uri):
    assert make(aws, image_uri=image_uri).image_uri == image_uri


def test_the_length_limit_is_sagemakers():
    import botocore.session

    from unetseg.job_rules import IMAGE_URI_LIMIT

    shapes = botocore.session.get_session().get_service_model("sagemaker")
    assert shapes.shape_for("AlgorithmImage").metadata["max"] == IMAGE_URI_LIMIT  # TrainingImage
    assert shapes.shape_for("ContainerImage").metadata["max"] == IMAGE_URI_LIMIT  # a model's Image


def test_local_mode_takes_a_local_image_name_and_checks_its_form(tmp_path):
    out = (tmp_path / "out").as_uri()
    assert UNetEstimator(image_uri="unetseg:ci", instance_type="local", output_path=out).image_uri == "unetseg:ci"
    with pytest.raises(JobSettingsError, match="image_uri='UNetSeg:ci'.*repository"):
        UNetEstimator(image_uri="UNetSeg:ci", instance_type="local", output_path=out)


def test_an_image_from_the_environment_is_checked(aws, monkeypatch):
    monkeypatch.setenv("UNETSEG_IMAGE_URI", f"{ECR}/unetseg:latest ")
    with pytest.raises(JobSettingsError, match="image_uri=.*whitespace"):
        make(aws, image_uri=None)
