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
from PIL import Image

from conftest import BUCKET, IMAGE, REGION, ROLE
from support import make_channel, random_pair, save, write_pair
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.contract.errors import ConfigError, DataError
from unetseg.contract.sagemaker_env import IMAGE_URI_ENV, MAX_IMAGE_MB_ENV

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


# --- data: a local folder is checked as the container checks it, before anything is sent -----------------------------

def _truncated(root):
    path = root / "train" / "images" / "s01.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["s01.png", "truncated"]


def _mask_value_out_of_range(root):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:8, 4:8] = 7
    save(root / "train" / "masks" / "s02.png", mask)
    return ["s02.png", "mask values outside the class range: 7"]


def _rgba_image(root):
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(root / "train" / "images" / "s00.png")
    return ["s00.png", "alpha channel"]


def _grayscale_image_among_rgb(root):
    save(root / "validation" / "images" / "s01.png", np.full((32, 32), 9, np.uint8))
    return ["validation/images/s01.png", "1 channel(s), but in_channels=3"]


def _mask_of_another_size(root):
    save(root / "train" / "masks" / "s03.png", np.zeros((16, 32), np.uint8))
    return ["s03.png", "mask size 32x16 differs from image size 32x32"]


def _text_named_png(root):
    (root / "train" / "images" / "s00.png").write_text("not an image")
    return ["s00.png", "not a readable image"]


def _mask_with_alpha(root):
    Image.new("LA", (32, 32), (1, 255)).save(root / "validation" / "masks" / "s00.png")
    return ["validation/masks/s00.png", "alpha channel"]


def _rgb_mask_without_class_colors(root):
    save(root / "train" / "masks" / "s01.png", np.dstack([np.full((32, 32), v, np.uint8) for v in (10, 200, 30)]))
    return ["s01.png", "RGB colour mask, but no class_colors"]


def _sixteen_bit_mask_values(root):
    save(root / "train" / "masks" / "s00.png", np.full((32, 32), 1000, np.uint16))
    return ["s00.png", "1000"]


def _mixed_mask_conventions(root):
    # 0/255 masks in validation/ next to 0/1 masks in train/: read as index masks, the 255s would become "ignore".
    stripes = (np.arange(32 * 32).reshape(32, 32) % 2 * 255).astype(np.uint8)
    for stem in ("s00", "s01"):
        save(root / "validation" / "masks" / f"{stem}.png", stripes)
    return ["masks mix two conventions", "validation/masks/s00.png", "train/masks/s00.png"]


def _decompression_bomb(root):
    from bombs import png_bomb

    (root / "train" / "images" / "s01.png").write_bytes(png_bomb(40000, 40000))  # a few hundred bytes
    return ["s01.png", "40000x40000"]


def _several_bad_files(root):
    return _truncated(root) + _rgba_image(root) + _mask_value_out_of_range(root)


DATA_CASES = {
    "truncated image": _truncated,
    "mask value beyond the classes": _mask_value_out_of_range,
    "RGBA image": _rgba_image,
    "grayscale image in an RGB dataset": _grayscale_image_among_rgb,
    "mask of another size than its image": _mask_of_another_size,
    "text file named .png": _text_named_png,
    "mask with an alpha channel": _mask_with_alpha,
    "RGB mask without class_colors": _rgb_mask_without_class_colors,
    "16-bit mask values": _sixteen_bit_mask_values,
    "0/255 and 0/1 masks mixed across channels": _mixed_mask_conventions,
    "a header that declares 40000 x 40000": _decompression_bomb,
    "several bad files, each named": _several_bad_files,
}


@pytest.mark.parametrize("case", list(DATA_CASES), ids=list(DATA_CASES))
def test_bad_data_in_a_local_folder_is_refused_before_anything_is_sent(aws, tmp_path, case):
    root = folder(tmp_path)
    fragments = DATA_CASES[case](root)
    with pytest.raises(DataError) as raised:
        make(aws).fit(str(root), wait=False, logs=False)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)
    assert aws.requests == []  # nothing uploaded, no job
    assert aws.s3_keys() == []


def test_class_indices_beyond_classes_in_a_multiclass_dataset(aws, tmp_path):
    root = folder(tmp_path, classes=3)
    mask = np.zeros((32, 32), np.uint8)
    mask[0, 0] = 3  # classes=3: indices 0..2, and 255 = ignore
    save(root / "validation" / "masks" / "s00.png", mask)
    with pytest.raises(DataError, match=r"validation/masks/s00.png: mask values outside the class range: 3"):
        make(aws, hyperparameters={"classes": 3}).fit(str(root), wait=False, logs=False)
    assert aws.requests == []


def test_palette_masks_are_checked_against_class_colors(aws, tmp_path):
    colours = [[0, 0, 0], [255, 0, 0]]
    root = tmp_path / "palette"
    rng = np.random.default_rng(0)
    for i in range(3):
        image, labels = random_pair(rng)
        write_pair(root / "train", f"p{i}", image, np.asarray(colours, np.uint8)[labels])
    stray = np.zeros((32, 32, 3), np.uint8)
    stray[..., 1] = 255  # green: not a class colour
    save(root / "train" / "masks" / "p1.png", stray)
    with pytest.raises(DataError, match=r"p1.png: mask values outside the class range: \[0, 255, 0\]"):
        make(aws, hyperparameters={"class_colors": colours}).fit(str(root), wait=False, logs=False)
    assert aws.requests == []


def test_a_dict_of_local_channels_is_checked_as_one_dataset(aws, tmp_path):
    root = folder(tmp_path)
    _rgba_image(root)
    with pytest.raises(DataError, match="s00.png: .*alpha channel"):
        make(aws).fit({"train": root / "validation", "validation": root / "train"}, wait=False, logs=False)
    assert aws.requests == []


def test_one_sample_without_a_validation_channel_cannot_be_split(aws, tmp_path):
    root = folder(tmp_path, train=1, validation=0)
    with pytest.raises(DataError, match="1 sample.* cannot be split into train and validation"):
        make(aws).fit(str(root), wait=False, logs=False)
    assert aws.requests == []


@pytest.mark.parametrize("layout, message", [
    ("empty folder", r"expected train/ .* found nothing"),
    ("only images", r"expected train/ .* found images/"),
    ("empty images and masks", r"images: no images"),
    ("images without masks", r"2 image\(s\) without a mask"),
])
def test_folders_that_hold_no_dataset(aws, tmp_path, layout, message):
    root = tmp_path / "ds"
    root.mkdir()
    if layout in ("only images", "images without masks"):
        make_channel(root, count=2)
        for path in (root / "masks").iterdir():
            path.unlink()
        if layout == "only images":
            (root / "masks").rmdir()
    elif layout == "empty images and masks":
        (root / "images").mkdir()
        (root / "masks").mkdir()
    with pytest.raises(DataError, match=message):
        make(aws).fit(str(root), wait=False, logs=False)
    assert aws.requests == []


def test_local_mode_checks_the_data_before_the_container_starts(tmp_path, monkeypatch):
    from sagemaker.local import image

    def started(*args, **kwargs):
        raise AssertionError("the container was started")

    monkeypatch.setattr(image._SageMakerContainer, "train", started)
    root = folder(tmp_path)
    _mask_value_out_of_range(root)
    est = UNetEstimator(image_uri="unetseg:ci", instance_type="local", output_path=(tmp_path / "out").as_uri())
    with pytest.raises(DataError, match="s02.png: mask values outside the class range"):
        est.fit(str(root), wait=False, logs=False)


def test_the_check_keeps_no_pixels_and_a_good_folder_is_uploaded(aws, tmp_path, monkeypatch):
    # The container caches decoded images when they fit its memory; a notebook checking a large folder must not.
    from unetseg.data import checks

    results = []
    real = checks.check_dataset

    def spy(samples, cfg, **kwargs):
        results.append(real(samples, cfg, **kwargs))
        return results[-1]

    monkeypatch.setattr(checks, "check_dataset", spy)
    root = folder(tmp_path, train=5, validation=3)
    make(aws, hyperparameters={"cache_images": "on"}).fit(str(root), wait=False, logs=False)
    assert len(results) == 1  # train and validation together: one mask convention, as in the container
    assert len(results[0].samples) == 8 and results[0].cached is None
    assert len(aws.s3_keys()) == 16
    assert aws.sent("CreateTrainingJob")["HyperParameters"]["cache_images"] == "on"  # the job's own setting stays


def test_a_long_check_shows_a_progress_bar(aws, tmp_path, monkeypatch, capsys):
    from unetseg.client import fit_inputs

    monkeypatch.setattr(fit_inputs, "CHECK_PROGRESS_DELAY_S", 0)  # else shown only once a check takes a second
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    root = folder(tmp_path, train=5, validation=2)
    make(aws).training_inputs(str(root))
    err = capsys.readouterr().err
    assert f"check {root}" in err and "7/7" in err


# --- buckets: one that is missing or in another region is named before any job is created ------------------------

def test_a_missing_data_bucket_is_named(aws):
    with pytest.raises(JobSettingsError) as raised:
        make(aws).fit(f"s3://{MISSING}/ds/", wait=False, logs=False)
    assert f"bucket {MISSING!r} does not exist" in str(raised.value)
    assert aws.requests == ["s3.HeadBucket"]


def test_a_data_bucket_in_another_region_is_refused(aws):
    eu_bucket(aws)
    uri = s3_dataset(aws, bucket=EU_BUCKET)
    with pytest.raises(JobSettingsError) as raised:
        make(aws).fit(uri, wait=False, logs=False)
    text = str(raised.value)
    assert f"bucket {EU_BUCKET!r} is in {OTHER_REGION}" in text and REGION in text
    assert aws.requests == ["s3.HeadBucket"]


@pytest.mark.parametrize("setting", ["output_path", "checkpoint_s3_uri"])
@pytest.mark.parametrize("where", ["missing", "other region"])
def test_output_and_checkpoint_buckets_are_checked_before_the_job(aws, setting, where):
    uri = s3_dataset(aws)
    if where == "other region":
        eu_bucket(aws)
    bucket = MISSING if where == "missing" else EU_BUCKET
    est = make(aws, use_spot_instances=True, **{setting: f"s3://{bucket}/unetseg/"})
    with pytest.raises(JobSettingsError) as raised:
        est.fit(uri, wait=False, logs=False)
    assert setting in str(raised.value)
    assert (f"bucket {bucket!r} does not exist" if where == "missing" else f"is in {OTHER_REGION}") in str(raised.value)
    assert "sagemaker.CreateTrainingJob" not in aws.requests


def test_channels_given_as_training_inputs_and_init_model_are_checked(aws):
    from sagemaker.inputs import TrainingInput

    uri = s3_dataset(aws)
    with pytest.raises(JobSettingsError, match=f"bucket '{MISSING}' does not exist"):
        make(aws).fit({"train": f"{uri}train/", "validation": TrainingInput(f"s3://{MISSING}/val/")},
                      wait=False, logs=False)
    with pytest.raises(JobSettingsError, match=f"init_model.*bucket '{MISSING}' does not exist"):
        make(aws).fit(uri, init_model=f"s3://{MISSING}/job/output/model.tar.gz", wait=False, logs=False)
    assert "sagemaker.CreateTrainingJob" not in aws.requests


@pytest.mark.parametrize("where", ["missing", "other region"])
def test_the_upload_bucket_is_checked_before_the_upload(aws, tmp_path, where):
    root = folder(tmp_path)
    if where == "other region":
        eu_bucket(aws)
    bucket = MISSING if where == "missing" else EU_BUCKET
    with pytest.raises(JobSettingsError, match=f"bucket '{bucket}'"):
        make(aws, output_path=f"s3://{bucket}/exp/").fit(str(root), wait=False, logs=False)
    assert aws.requests == ["s3.HeadBucket"]  # no listing, no upload


def test_a_tuning_job_checks_its_buckets(aws):
    from sagemaker.parameter import ContinuousParameter

    uri = s3_dataset(aws)
    tuner = make(aws, output_path=f"s3://{MISSING}/out/").tuner({"lr": ContinuousParameter(1e-4, 1e-2)})
    with pytest.raises(JobSettingsError, match=f"output_path.*bucket '{MISSING}' does not exist"):
        tuner.fit(uri, wait=False)
    assert "sagemaker.CreateHyperParameterTuningJob" not in aws.requests


def test_each_bucket_costs_one_request(aws):
    eu_bucket(aws)
    s3_dataset(aws, bucket=EU_BUCKET)  # a second bucket that exists
    uri = s3_dataset(aws)
    est = make(aws, use_spot_instances=True, output_path=f"s3://{BUCKET}/out/", checkpoint_s3_uri=f"s3://{BUCKET}/ck/")
    est.fit(uri, wait=False, logs=False)
    est.fit(uri, wait=False, logs=False)
    assert aws.requests.count("s3.HeadBucket") == 1  # data, output and checkpoints share one bucket; cached
    assert aws.requests.index("s3.HeadBucket") < aws.requests.index("s3.ListObjectsV2")
    with pytest.raises(JobSettingsError):
        est.fit({"train": f"{uri}train/", "validation": f"s3://{EU_BUCKET}/ds/validation/"}, wait=False, logs=False)
    assert aws.requests.count("s3.HeadBucket") == 2


@pytest.mark.parametrize("inputs, message", [
    (f"s3://{BUCKET}/ds/train/images/a.png", "is an object, not a prefix"),
    ({"train": f"s3://{BUCKET}/ds/train/images/a.png"}, "is an object, not a prefix"),
])
def test_an_s3_uri_of_a_file_instead_of_a_folder(aws, inputs, message):
    s3_dataset(aws)
    with pytest.raises(DataError, match=message):
        make(aws).fit(inputs, wait=False, logs=False)
    assert "sagemaker.CreateTrainingJob" not in aws.requests


@pytest.mark.parametrize("kwargs, inputs, message", [
    ({"output_path": "s3://Team-Bucket/out/"}, None, "'Team-Bucket' is not a valid bucket name"),
    ({"use_spot_instances": True, "checkpoint_s3_uri": "s3://team_bucket/ck"}, None, "not a valid bucket name"),
    ({}, {"train": "s3://Data.Bucket/ds/train/"}, "not a valid bucket name"),
    ({}, "s3://192.168.5.4/ds/", "formatted as an IP address"),
    ({}, "s3://xn--cells/ds/", "'xn--'"),
    ({"output_path": "s3://sthree-cells/out/"}, None, "'sthree-'"),
    ({}, "s3://cells..data/ds/", "not a valid bucket name"),
])
def test_bucket_names_s3_refuses_are_refused_before_any_request(aws, kwargs, inputs, message):
    with pytest.raises(JobSettingsError, match=message):
        est = make(aws, **kwargs)
        est.fit(inputs or f"s3://{BUCKET}/ds/", wait=False, logs=False)
    assert aws.requests == []


def test_local_mode_with_data_in_a_missing_bucket(aws, tmp_path, monkeypatch):
    from sagemaker.local import LocalSession, image

    monkeypatch.setattr(image._SageMakerContainer, "train", lambda *a, **k: pytest.fail("container started"))
    est = UNetEstimator(image_uri="unetseg:ci", instance_type="local", output_path=(tmp_path / "out").as_uri(),
                        sagemaker_session=LocalSession(boto_session=aws.boto_session))
    with pytest.raises(JobSettingsError, match=f"bucket '{MISSING}' does not exist"):
        est.fit(f"s3://{MISSING}/ds/", wait=False, logs=False)


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

    from unetseg.client.job_rules import IMAGE_URI_LIMIT

    shapes = botocore.session.get_session().get_service_model("sagemaker")
    assert shapes.shape_for("AlgorithmImage").metadata["max"] == IMAGE_URI_LIMIT  # TrainingImage
    assert shapes.shape_for("ContainerImage").metadata["max"] == IMAGE_URI_LIMIT  # a model's Image


def test_local_mode_takes_a_local_image_name_and_checks_its_form(tmp_path):
    out = (tmp_path / "out").as_uri()
    assert UNetEstimator(image_uri="unetseg:ci", instance_type="local", output_path=out).image_uri == "unetseg:ci"
    with pytest.raises(JobSettingsError, match="image_uri='UNetSeg:ci'.*repository"):
        UNetEstimator(image_uri="UNetSeg:ci", instance_type="local", output_path=out)


def test_an_image_from_the_environment_is_checked(aws, monkeypatch):
    monkeypatch.setenv(IMAGE_URI_ENV, f"{ECR}/unetseg:latest ")
    with pytest.raises(JobSettingsError, match="image_uri=.*whitespace"):
        make(aws, image_uri=None)


# --- the image size limit: the job's, not the notebook's -------------------------------------------------------------
# The container reads UNETSEG_MAX_IMAGE_MB from the job's environment, so the notebook's check of the data it sends
# must too: a job that raised the limit for whole slides was refused in the notebook (where the variable is unset),
# and one that lowered it passed the notebook, was uploaded, and failed in the container.

def test_a_job_that_raises_the_size_limit_is_not_refused_by_the_notebooks(aws, tmp_path, monkeypatch):
    root = folder(tmp_path)  # 32 x 32 RGB images: 3 KiB decoded each
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "0.001")  # the notebook's own limit (1 KiB) is not the job's
    make(aws, environment={MAX_IMAGE_MB_ENV: "1"}).fit(str(root), wait=False, logs=False)
    assert aws.sent("CreateTrainingJob")["Environment"] == {MAX_IMAGE_MB_ENV: "1"}


def test_without_a_limit_of_its_own_the_job_has_the_default_whatever_the_notebook_sets(aws, tmp_path, monkeypatch):
    root = folder(tmp_path)
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "0.001")
    make(aws).fit(str(root), wait=False, logs=False)
    assert aws.sent("CreateTrainingJob")


def test_a_job_that_lowers_the_size_limit_is_refused_in_the_notebook(aws, tmp_path):
    root = folder(tmp_path)
    with pytest.raises(DataError) as info:  # one error for all files, each refused as ImageTooLargeError
        make(aws, environment={MAX_IMAGE_MB_ENV: "0.001"}).fit(str(root), wait=False, logs=False)
    message = str(info.value)
    assert "s00.png" in message and f"environment={{'{MAX_IMAGE_MB_ENV}': '1'}}" in message, message
    assert aws.requests == [] and aws.s3_keys() == []


@pytest.mark.parametrize("value", ["lots", "0", "-5", "nan"])
def test_a_bad_size_limit_in_the_jobs_environment_is_refused_before_any_request(aws, value):
    with pytest.raises(JobSettingsError, match=f"{MAX_IMAGE_MB_ENV}={value!r}"):
        make(aws, environment={MAX_IMAGE_MB_ENV: value})
    assert aws.requests == []
