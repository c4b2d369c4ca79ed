"""Batch transform of large TIFFs within SageMaker's payload limit: an object over MaxPayloadInMB (at most 100) would
fail inside the job after the instances start; it is named before CreateTransformJob, with what to do instead."""

from __future__ import annotations

import pytest

from conftest import BUCKET, IMAGE, ROLE
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.contract.sagemaker_env import BATCH_MAX_PAYLOAD_MB

MB = 2**20


def estimator(aws) -> UNetEstimator:
    s3 = aws.boto_session.client("s3")
    for channel in ("train", "validation"):
        s3.put_object(Bucket=BUCKET, Key=f"ds/{channel}/images/a.png", Body=b"i")
        s3.put_object(Bucket=BUCKET, Key=f"ds/{channel}/masks/a.png", Body=b"m")
    est = UNetEstimator(image_uri=IMAGE, role=ROLE, instance_type="ml.g5.2xlarge", sagemaker_session=aws.session,
                        hyperparameters={"classes": 2})
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    aws.requests.clear()
    aws.bodies.clear()
    return est


def put_sized(aws, key: str, size: int) -> None:
    """An object of `size` bytes (a TIFF header, then zeros) without holding it twice."""
    aws.boto_session.client("s3").put_object(Bucket=BUCKET, Key=key, Body=b"II*\x00" + bytes(size - 4))


def test_a_tiff_over_the_payload_limit_is_named_before_the_job_is_created(aws):
    est = estimator(aws)
    put_sized(aws, "scenes/small.tif", 3 * MB)
    put_sized(aws, "scenes/deep/huge.tif", 12 * MB + 1)
    transformer = est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/masks/", max_payload=12)
    with pytest.raises(JobSettingsError) as caught:
        transformer.transform(f"s3://{BUCKET}/scenes/", content_type="image/tiff", wait=False, logs=False)
    message = str(caught.value)
    assert f"s3://{BUCKET}/scenes/deep/huge.tif" in message and "12.0 MiB" in message and "small.tif" not in message
    assert "MaxPayloadInMB" in message and "unetseg predict" in message
    assert "CreateTransformJob" not in " ".join(aws.requests)
    assert "s3.ListObjectsV2" in aws.requests

    # Within the limit: the job is created, for image/tiff, with the payload limit asked for.
    transformer.transform(f"s3://{BUCKET}/scenes/small", content_type="image/tiff", wait=False, logs=False)
    job = aws.sent("CreateTransformJob")
    assert job["TransformInput"]["ContentType"] == "image/tiff" and job["MaxPayloadInMB"] == 12


def test_without_max_payload_the_service_limit_applies(aws):
    est = estimator(aws)
    put_sized(aws, "big/a.tif", BATCH_MAX_PAYLOAD_MB * MB + 1)
    transformer = est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/masks/")
    with pytest.raises(JobSettingsError, match=rf"s3://{BUCKET}/big/a.tif.*100.0 MiB.*at most {BATCH_MAX_PAYLOAD_MB}"):
        transformer.transform(f"s3://{BUCKET}/big/", wait=False, logs=False)  # any content type: the size is the limit


def test_a_payload_limit_above_the_service_maximum_is_refused(aws):
    est = estimator(aws)
    with pytest.raises(JobSettingsError, match=r"max_payload=200: .*MaxPayloadInMB is 0 to 100"):
        est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/masks/", max_payload=200)
    assert "sagemaker.CreateModel" not in aws.requests


def test_payload_times_concurrency_above_the_service_maximum_is_refused(aws):
    est = estimator(aws)
    with pytest.raises(JobSettingsError, match=r"max_payload=30 x max_concurrent_transforms=4.*at most 100"):
        est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/masks/", max_payload=30,
                        max_concurrent_transforms=4)


def test_the_server_reads_a_tiff_request_as_the_image():
    import io

    import numpy as np
    import tifffile

    from unetseg.contract import codecs

    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 65536, (30, 20), dtype=np.uint16)):
        body = io.BytesIO()
        tifffile.imwrite(body, image, compression="zlib")
        assert np.array_equal(codecs.decode_request(body.getvalue(), "image/tiff"), image)
    with pytest.raises(codecs.CodecError, match="not image/tiff"):
        codecs.decode_request(codecs.encode_image(image.astype(np.uint8), codecs.PNG), "image/tiff")
