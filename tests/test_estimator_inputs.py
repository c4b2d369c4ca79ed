"""fit() inputs: S3 prefixes, dicts of channels, and local folders (preflight, upload, re-upload)."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import BUCKET, IMAGE, ROLE
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.contract.errors import ArtifactError, DataError
from unetseg.synthetic import make_demo_dataset


def make(aws, **overrides):
    return UNetEstimator(**{"image_uri": IMAGE, "role": ROLE, "instance_type": "ml.g5.xlarge",
                            "sagemaker_session": aws.session, **overrides})


def put(aws, *keys: str) -> None:
    s3 = aws.boto_session.client("s3")
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    aws.requests.clear()


def channel(prefix: str, *stems: str) -> list[str]:
    stems = stems or ("a",)
    return [f"{prefix}{sub}/{s}.png" for sub in ("images", "masks") for s in stems]


def sent_channels(aws) -> dict[str, str]:
    request = aws.sent("CreateTrainingJob")
    return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}


# --- S3 prefixes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("validation_folder", ["validation", "val"])
def test_prefix_with_train_and_validation(aws, validation_folder):
    put(aws, *channel("ds/train/"), *channel(f"ds/{validation_folder}/"), "ds/README.md")
    make(aws).fit(f"s3://{BUCKET}/ds", wait=False, logs=False)
    assert sent_channels(aws) == {"train": f"s3://{BUCKET}/ds/train/",
                                  "validation": f"s3://{BUCKET}/ds/{validation_folder}/"}


def test_prefix_with_train_only(aws):
    put(aws, *channel("ds/train/"))
    make(aws).fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    assert sent_channels(aws) == {"train": f"s3://{BUCKET}/ds/train/"}


def test_prefix_that_is_itself_a_channel(aws):
    put(aws, *channel("cells/"))
    make(aws).fit(f"s3://{BUCKET}/cells/", wait=False, logs=False)
    assert sent_channels(aws) == {"train": f"s3://{BUCKET}/cells/"}


def test_prefix_without_a_dataset_names_what_it_found(aws):
    put(aws, "ds/pictures/a.png", "ds/labels/a.png", "ds/notes.txt")
    with pytest.raises(DataError) as raised:
        make(aws).fit(f"s3://{BUCKET}/ds/", wait=False)
    assert f"s3://{BUCKET}/ds/: expected train/" in str(raised.value)
    assert "found pictures/, labels/, notes.txt" in str(raised.value) or "found labels/, pictures/, notes.txt" in str(
        raised.value)
    assert "CreateTrainingJob" not in aws.bodies


def test_empty_prefix(aws):
    with pytest.raises(DataError, match=r"found nothing \(is the path right\?\)"):
        make(aws).fit(f"s3://{BUCKET}/typo/", wait=False)


def test_train_channel_without_masks(aws):
    put(aws, "ds/train/images/a.png")
    with pytest.raises(DataError, match="train/: a channel needs images/ and masks/, missing masks/"):
        make(aws).fit(f"s3://{BUCKET}/ds/", wait=False)


def test_both_validation_and_val_is_ambiguous(aws):
    put(aws, *channel("ds/train/"), *channel("ds/validation/"), *channel("ds/val/"))
    with pytest.raises(DataError, match="both validation/ and val/"):
        make(aws).fit(f"s3://{BUCKET}/ds/", wait=False)


# --- dicts of channels ------------------------------------------------------------------------------------------------

def test_dict_of_uris_and_training_inputs_passes_through(aws):
    from sagemaker.inputs import TrainingInput

    put(aws, *channel("a/train/"), *channel("b/val/"))
    given = TrainingInput(f"s3://{BUCKET}/b/val/", input_mode="FastFile", s3_data_type="S3Prefix")
    make(aws).fit({"train": f"s3://{BUCKET}/a/train", "validation": given}, wait=False, logs=False)
    request = aws.sent("CreateTrainingJob")
    by_name = {c["ChannelName"]: c for c in request["InputDataConfig"]}
    assert by_name["train"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/a/train/"
    assert by_name["train"]["InputMode"] == "File"
    assert by_name["validation"]["InputMode"] == "FastFile"
    assert by_name["validation"]["DataSource"]["S3DataSource"]["S3DataDistributionType"] == "FullyReplicated"
    # ShardedByS3Key would split images from their masks across instances: refused (test_estimator_rejections).


def test_single_training_input_is_the_train_channel(aws):
    from sagemaker.inputs import TrainingInput

    make(aws).fit(TrainingInput(f"s3://{BUCKET}/anything/"), wait=False, logs=False)
    assert sent_channels(aws) == {"train": f"s3://{BUCKET}/anything/"}


# --- local folders ----------------------------------------------------------------------------------------------------

def test_local_folder_is_uploaded_with_the_expected_keys(aws, tmp_path):
    root = make_demo_dataset(tmp_path / "cells", train=3, validation=2, size=32)
    (root / "train" / "images" / ".DS_Store").write_bytes(b"junk")  # hidden files are neither paired nor sent
    est = make(aws)
    est.fit(str(root), wait=False, logs=False)

    prefix = "unetseg/datasets/cells/"
    expected = sorted(
        [f"{prefix}train/{sub}/train_{i:04d}.png" for sub in ("images", "masks") for i in range(3)]
        + [f"{prefix}validation/{sub}/validation_{i:04d}.png" for sub in ("images", "masks") for i in range(2)])
    assert aws.s3_keys() == expected
    assert sent_channels(aws) == {"train": f"s3://{BUCKET}/{prefix}train/",
                                  "validation": f"s3://{BUCKET}/{prefix}validation/"}
    body = aws.boto_session.client("s3").get_object(Bucket=BUCKET, Key=f"{prefix}train/masks/train_0000.png")
    assert body["Body"].read() == (root / "train" / "masks" / "train_0000.png").read_bytes()


def test_reupload_skips_unchanged_files_and_removes_stale_ones(aws, tmp_path):
    root = make_demo_dataset(tmp_path / "cells", train=3, validation=1, size=32)
    est = make(aws)
    est.training_inputs(root)
    for sub in ("images", "masks"):
        (root / "train" / sub / "train_0002.png").unlink()
    Image.new("L", (32, 32), 255).save(root / "train" / "masks" / "train_0001.png")
    aws.requests.clear()

    est.training_inputs(root)
    assert aws.requests.count("s3.PutObject") == 1  # only the changed mask
    assert "unetseg/datasets/cells/train/images/train_0002.png" not in aws.s3_keys()
    assert len(aws.s3_keys()) == 2 * 2 + 2


def test_local_folder_that_is_one_channel(aws, tmp_path):
    root = make_demo_dataset(tmp_path / "ds", train=2, validation=0, size=32) / "train"
    make(aws).fit(root, wait=False, logs=False)
    assert sent_channels(aws) == {"train": f"s3://{BUCKET}/unetseg/datasets/train/"}
    assert len(aws.s3_keys()) == 4


def test_unpaired_local_dataset_fails_preflight_and_uploads_nothing(aws, tmp_path):
    root = make_demo_dataset(tmp_path / "cells", train=3, validation=2, size=32)
    (root / "validation" / "masks" / "validation_0001.png").unlink()
    (root / "train" / "masks" / "stray.png").write_bytes((root / "train" / "masks" / "train_0000.png").read_bytes())
    with pytest.raises(DataError) as raised:
        make(aws).fit(str(root), wait=False)
    assert "stray.png" in str(raised.value)
    assert aws.requests == []
    assert aws.s3_keys() == []


def test_local_folder_without_a_dataset_layout(aws, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"expected train/ .* found photos/, notes.txt"):
        make(aws).fit(str(tmp_path), wait=False)
    assert aws.requests == []


def test_local_channel_folders_in_a_dict(aws, tmp_path):
    root = make_demo_dataset(tmp_path / "cells", train=2, validation=1, size=32)
    put(aws, *channel("elsewhere/val/"))
    make(aws).fit({"train": root / "train", "validation": f"s3://{BUCKET}/elsewhere/val/"}, wait=False, logs=False)
    channels = sent_channels(aws)
    assert channels == {"train": f"s3://{BUCKET}/unetseg/datasets/cells-train/",
                        "validation": f"s3://{BUCKET}/elsewhere/val/"}
    assert [k for k in aws.s3_keys() if k.startswith("unetseg/")] == sorted(
        f"unetseg/datasets/cells-train/{sub}/train_{i:04d}.png" for sub in ("images", "masks") for i in range(2))


def test_upload_goes_under_the_output_path(aws, tmp_path):
    root = make_demo_dataset(tmp_path / "cells", train=1, validation=1, size=32)
    make(aws, output_path=f"s3://{BUCKET}/team/exp1").fit(root, wait=False, logs=False)
    assert all(k.startswith("team/exp1/datasets/cells/") for k in aws.s3_keys())


# --- a model to fine-tune from ----------------------------------------------------------------------------------------

def test_init_model_from_another_estimator_becomes_the_init_model_channel(aws):
    put(aws, *channel("ds/train/"))
    first = make(aws)
    first.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False, job_name="first-job")
    artifact = first.model_data  # moto completes the job at once; the artifact is what the job would write
    assert artifact.endswith("/first-job/output/model.tar.gz")
    put(aws, artifact[len(f"s3://{BUCKET}/"):])
    aws.bodies.clear()
    make(aws).fit(f"s3://{BUCKET}/ds/", init_model=first, wait=False, logs=False, job_name="second-job")
    request = aws.sent("CreateTrainingJob")
    assert request["TrainingJobName"] == "second-job"
    by_name = {c["ChannelName"]: c for c in request["InputDataConfig"]}
    assert set(by_name) == {"train", "init_model"}
    source = by_name["init_model"]["DataSource"]["S3DataSource"]
    assert source["S3Uri"] == artifact
    assert source["S3DataDistributionType"] == "FullyReplicated" and by_name["init_model"]["InputMode"] == "File"


def test_init_model_as_a_channel_in_a_dict(aws):
    put(aws, *channel("ds/train/"), "m/model.tar.gz")
    make(aws).fit({"train": f"s3://{BUCKET}/ds/train/", "init_model": f"s3://{BUCKET}/m/model.tar.gz"},
                  wait=False, logs=False)
    assert sent_channels(aws)["init_model"] == f"s3://{BUCKET}/m/model.tar.gz"


@pytest.mark.parametrize("init_model, error, fragment", [
    (f"s3://{BUCKET}/missing/model.tar.gz", DataError, "no such object in S3"),
    ("s3://", JobSettingsError, "init_model"),
    ("/home/me/model.tar.gz", JobSettingsError, "reads its starting model from S3"),
    (3, DataError, "int is not an s3:// URI"),
])
def test_bad_init_model_fails_before_a_job_is_created(aws, init_model, error, fragment):
    put(aws, *channel("ds/train/"))
    with pytest.raises(error, match=fragment):
        make(aws).fit(f"s3://{BUCKET}/ds/", init_model=init_model, wait=False, logs=False)
    assert "CreateTrainingJob" not in aws.requests


def test_init_model_from_an_unfitted_estimator_or_given_twice(aws):
    put(aws, *channel("ds/train/"), "m/model.tar.gz")
    with pytest.raises(ArtifactError, match="no training job yet: init_model needs a trained model"):
        make(aws).fit(f"s3://{BUCKET}/ds/", init_model=make(aws), wait=False, logs=False)
    with pytest.raises(DataError, match="init_model given twice"):
        make(aws).fit({"train": f"s3://{BUCKET}/ds/train/", "init_model": f"s3://{BUCKET}/m/model.tar.gz"},
                      init_model=f"s3://{BUCKET}/m/model.tar.gz", wait=False, logs=False)
    assert "CreateTrainingJob" not in aws.requests
