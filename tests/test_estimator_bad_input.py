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
