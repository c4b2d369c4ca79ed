"""The client half of inference: UNetPredictor's serializer and deserializer against the real server, and the
requests UNetEstimator.deploy() / transformer() send.

- Wire formats: the bytes ImageSerializer produces go through the real `unetseg.container.serving.InferenceApp`
  (called as a WSGI app, or behind the SDK's own `Predictor.predict` with a botocore hook answering InvokeEndpoint), and
  MaskDeserializer turns the response into what `Segmenter.predict` / `predict_proba` give for the same image.
- Requests: under moto, the CreateModel / CreateEndpointConfig / CreateEndpoint and CreateTransformJob bodies.
- Local mode (slow): `deploy(instance_type="local")` and a local batch transform through the SDK's real local-mode
  code, with a `docker` test double whose `compose up` starts the real server on a loopback port instead of a
  container. The real Docker run belongs to the container's tests.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BUCKET, IMAGE, ROLE
from support import ENGINE_ONLY_MODULES, wsgi_call
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.client.predictor import (
    ImageSerializer,
    MaskDeserializer,
    UNetPredictor,
    UNetTransformer,
    decode_response,
    request_options,
)
from unetseg.contract import codecs
from unetseg.contract.sagemaker_env import MAX_BODY_MB_ENV, MAX_PIXELS_ENV, MODEL_SERVER_WORKERS_ENV, TTA_ENV

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["background", "disc", "square"]


# --- a tiny model artifact and the server around it ---------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """(model folder, model.tar.gz) of a small untrained 3-class model: predictions are arbitrary but exact."""
    torch = pytest.importorskip("torch")
    from support import TINY
    from unetseg.contract.config import TrainConfig
    from unetseg.model import artifact_config, build_model, save_artifact

    cfg = TrainConfig(**TINY, classes=3, class_names=CLASS_NAMES)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("artifact") / "model"
    save_artifact(folder, build_model(cfg).state_dict(), artifact_config(cfg, "index"), [{"epoch": 1}])
    archive = folder.parent / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return folder, archive


@pytest.fixture(scope="module")
def app(artifact):
    from unetseg.container.serving import InferenceApp

    app = InferenceApp(str(artifact[0]), device="cpu")
    assert app.model is not None, app.load_error
    return app


@pytest.fixture(scope="module")
def segmenter(app):
    return app.model


def rgb(seed: int = 0, shape=(40, 56, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- wire formats against the real server ----------------------------------------------------------------------------

@pytest.mark.parametrize("content_type,image", [
    (codecs.PNG, rgb(0)),
    (codecs.PNG, rgb(1, (37, 45, 3)).astype(np.uint16) * 257),  # 16-bit colour PNG
    (codecs.NPY, rgb(2)),
    (codecs.NPY, rgb(3).astype(np.float32) / 255),
])
def test_mask_round_trip_matches_segmenter(app, segmenter, content_type, image):
    serializer, deserializer = ImageSerializer(content_type), MaskDeserializer()
    body = serializer.serialize(image)
    status, headers, payload = wsgi_call(app, body=body, content_type=serializer.CONTENT_TYPE,
                                     accept=", ".join(deserializer.ACCEPT))
    assert status == 200 and headers["Content-Type"] == codecs.PNG
    mask = deserializer.deserialize(io.BytesIO(payload), headers["Content-Type"])
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
    assert np.array_equal(mask, segmenter.predict(image))


def test_jpeg_is_lossy_but_the_server_sees_what_was_sent(app, segmenter):
    image = rgb(4)
    body = ImageSerializer(codecs.JPEG).serialize(image)
    assert body[:2] == b"\xff\xd8"
    status, headers, payload = wsgi_call(app, body=body, content_type=codecs.JPEG)
    mask = MaskDeserializer().deserialize(io.BytesIO(payload), headers["Content-Type"])
    assert status == 200
    assert np.array_equal(mask, segmenter.predict(codecs.decode_image(body, codecs.JPEG)))


def test_probabilities_and_npy_mask(app, segmenter):
    image = rgb(5)
    body = ImageSerializer().serialize(image)
    status, headers, payload = wsgi_call(app, body=body, content_type=codecs.PNG, accept=codecs.NPY,
                                     attrs=request_options(output="probabilities"))
    assert status == 200 and headers["Content-Type"] == codecs.NPY
    probs = MaskDeserializer(codecs.NPY).deserialize(io.BytesIO(payload), headers["Content-Type"])
    assert probs.dtype == np.float32 and probs.shape == (3, *image.shape[:2])
    np.testing.assert_allclose(probs, segmenter.predict_proba(image), atol=1e-3)  # float16 on the wire

    status, headers, payload = wsgi_call(app, body=body, content_type=codecs.PNG, accept=codecs.NPY)
    assert np.array_equal(decode_response(payload, headers["Content-Type"]), segmenter.predict(image))


def test_json_gives_pixel_counts_and_the_mask(app, segmenter):
    image = rgb(6)
    status, headers, payload = wsgi_call(app, body=ImageSerializer().serialize(image), content_type=codecs.PNG,
                                     accept=codecs.JSON)
    result = MaskDeserializer(codecs.JSON).deserialize(io.BytesIO(payload), headers["Content-Type"])
    expected = segmenter.predict(image)
    assert np.array_equal(result["mask"], expected)
    assert result["class_names"] == CLASS_NAMES
    assert result["pixel_counts"] == {name: int((expected == i).sum()) for i, name in enumerate(CLASS_NAMES)}
    assert sum(result["pixel_counts"].values()) == image.shape[0] * image.shape[1]


def test_tiles_travel_as_a_custom_attribute(app, segmenter):
    image = rgb(7, (80, 96, 3))
    status, headers, payload = wsgi_call(app, body=ImageSerializer().serialize(image), content_type=codecs.PNG,
                                     attrs=request_options(tile=48))
    assert status == 200
    assert np.array_equal(decode_response(payload, headers["Content-Type"]), segmenter.predict(image, tile=48))


def test_serializer_accepts_files_pil_images_and_encoded_bytes(app, segmenter, tmp_path):
    image = rgb(8)
    png, jpg, npy = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.npy"
    Image.fromarray(image).save(png)
    Image.fromarray(image).save(jpg, quality=95)
    np.save(npy, image)
    serializer = ImageSerializer()
    assert serializer.serialize(png) == png.read_bytes()  # already PNG: sent as it is
    assert serializer.serialize(str(png)) == png.read_bytes()
    assert ImageSerializer(codecs.JPEG).serialize(jpg) == jpg.read_bytes()
    for source in (jpg, npy, Image.fromarray(image), png.read_bytes()):
        body = serializer.serialize(source)
        status, headers, payload = wsgi_call(app, body=body, content_type=codecs.PNG)
        assert status == 200
        assert np.array_equal(decode_response(payload, headers["Content-Type"]),
                              segmenter.predict(codecs.decode_image(body, codecs.PNG)))
    gray = rgb(9, (24, 24, 1))
    assert np.array_equal(codecs.decode_image(serializer.serialize(gray), codecs.PNG), gray[..., 0])


@pytest.mark.parametrize("make,message", [
    (lambda: ImageSerializer("text/csv"), "use one of image/png"),
    (lambda: MaskDeserializer("image/jpeg"), "use one of image/png"),
    (lambda: ImageSerializer().serialize(np.zeros((8, 8, 3), np.float32)), "cannot be sent as image/png"),
    (lambda: ImageSerializer(codecs.JPEG).serialize(np.zeros((8, 8), np.uint16)), "JPEG carries 8-bit"),
    (lambda: ImageSerializer().serialize([1, 2, 3]), "pass an HxW or HxWxC image"),
    (lambda: ImageSerializer().serialize({"a": 1}), "pass an HxW or HxWxC image"),
    (lambda: decode_response(b"{}", "text/plain"), "unexpected response content type"),
    (lambda: decode_response(b'{"error": "boom"}', codecs.JSON), "answered with an error: boom"),
    (lambda: request_options(tile=16), "32 pixels or more"),
    (lambda: request_options(tta="rot90"), "use one of none, flip, d4"),
])
def test_client_side_mistakes_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_request_options_join_the_callers_own():
    assert request_options() is None
    assert request_options("trace=abc") == "trace=abc"
    assert request_options("trace=abc", tile=256, output="probabilities") == "trace=abc; output=probabilities; tile=256"
    assert request_options(tta="d4") == "tta=d4" and request_options(tta="none") is None


# --- the SDK's Predictor.predict, with InvokeEndpoint answered by the real server -------------------------------------

def endpoint_session(app, sent: list[dict]):
    """A sagemaker.Session whose InvokeEndpoint calls `app`, as an endpoint would (headers and body as sent).

    Not under moto: botocore calls every before-send handler, and moto's would try to read the image body as UTF-8.
    Any other request fails the test instead of leaving this machine.
    """
    import boto3
    import sagemaker
    from botocore.awsrequest import AWSResponse

    class Raw(io.BytesIO):
        def stream(self, **_):
            yield self.read()

    def answer(request, event_name, **_):
        if not event_name.endswith(".sagemaker-runtime.InvokeEndpoint"):
            raise AssertionError(f"unexpected request {event_name} to {request.url}")
        headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()}
        sent.append({"url": request.url, **headers})
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        status, answered, payload = wsgi_call(app, body=body, content_type=headers.get("content-type"),
                                              accept=headers.get("accept"),
                                              attrs=headers.get("x-amzn-sagemaker-custom-attributes"))
        return AWSResponse(request.url, status, {"Content-Type": answered["Content-Type"],
                                                 "x-Amzn-Invoked-Production-Variant": "AllTraffic"}, Raw(payload))

    boto_session = boto3.Session(region_name="us-east-1")
    boto_session.events.register_first("before-send", answer)  # before any client copies the handlers
    return sagemaker.Session(boto_session=boto_session, default_bucket=BUCKET)


def test_predictor_predict_goes_through_the_sdk(app, segmenter):
    sent: list[dict] = []
    session = endpoint_session(app, sent)
    predictor = UNetPredictor("seg-endpoint", sagemaker_session=session)
    image = rgb(10)

    mask = predictor.predict(image)
    assert np.array_equal(mask, segmenter.predict(image))
    assert sent[-1]["url"].endswith("/endpoints/seg-endpoint/invocations")
    assert (sent[-1]["content-type"], sent[-1]["accept"]) == (codecs.PNG, codecs.PNG)
    assert "x-amzn-sagemaker-custom-attributes" not in sent[-1]

    probs = predictor.predict_proba(image)
    np.testing.assert_allclose(probs, segmenter.predict_proba(image), atol=1e-3)
    assert (sent[-1]["accept"], sent[-1]["x-amzn-sagemaker-custom-attributes"]) == (codecs.NPY, "output=probabilities")

    summary = predictor.predict_json(image, tile=32)
    assert np.array_equal(summary["mask"], segmenter.predict(image, tile=32))
    assert set(summary["pixel_counts"]) == set(CLASS_NAMES)
    assert (sent[-1]["accept"], sent[-1]["x-amzn-sagemaker-custom-attributes"]) == (codecs.JSON, "tile=32")

    mask = predictor.predict(image, tta="flip")
    assert np.array_equal(mask, segmenter.predict(image, tta="flip"))
    assert sent[-1]["x-amzn-sagemaker-custom-attributes"] == "tta=flip"

    assert predictor.predict(image).shape == image.shape[:2]  # the mode of one call does not stick
    assert sent[-1]["accept"] == codecs.PNG

    as_npy = UNetPredictor("seg-endpoint", sagemaker_session=session, content_type=codecs.NPY)
    floats = image.astype(np.float32) / 255
    assert np.array_equal(as_npy.predict(floats), segmenter.predict(floats))
    assert sent[-1]["content-type"] == codecs.NPY
    assert [np.array_equal(m, segmenter.predict(i)) for m, i in
            zip(predictor.predict_many([image, rgb(11)]), [image, rgb(11)])] == [True, True]
    assert len(sent) == 8


# --- real-time payload limits: 6 MB each way, checked before sending ------------------------------------------------

def test_a_request_over_the_realtime_limit_is_refused_before_sending(app):
    from unetseg.contract.sagemaker_env import REALTIME_MAX_PAYLOAD_BYTES

    sent: list[dict] = []
    predictor = UNetPredictor("seg-endpoint", sagemaker_session=endpoint_session(app, sent), content_type=codecs.NPY)
    image = np.zeros((1500, 1500, 3), np.uint8)  # 6.75 MB as .npy
    assert len(ImageSerializer(codecs.NPY).serialize(image)) > REALTIME_MAX_PAYLOAD_BYTES
    with pytest.raises(ValueError, match=r"6,750,128 bytes.*at most 6,291,456 bytes.*batch transform") as raised:
        predictor.predict(image)
    assert "image/jpeg" in str(raised.value)
    assert sent == []  # SageMaker would have refused it after the upload


def test_probabilities_over_the_realtime_limit_are_refused_before_sending(app, segmenter):
    sent: list[dict] = []
    predictor = UNetPredictor("seg-endpoint", sagemaker_session=endpoint_session(app, sent), classes=3)
    image = np.zeros((1024, 1024, 3), np.uint8)  # 3 x 1024 x 1024 float16 = 6,291,456 bytes + the .npy header
    expected = r"1024x1024 image with 3 classes.*6,291,584 bytes.*predict_json.*crops"
    with pytest.raises(ValueError, match=expected) as raised:
        predictor.predict_proba(image)
    assert "predict(" in str(raised.value)
    assert sent == []
    assert predictor.predict(image).shape == (1024, 1024)  # the mask is small: no refusal
    # One row less fits, and the estimate is exactly what the server sends.
    assert predictor.response_bytes((1024, 1023), accept=codecs.NPY, probabilities=True) == \
        len(codecs.encode_npy(np.zeros((3, 1024, 1023), np.float16)))
    probabilities = predictor.predict_proba(image[:, :1023])
    assert probabilities.shape == (3, 1024, 1023)
    # A predictor that does not know the class count assumes the fewest a model has (2).
    with pytest.raises(ValueError, match="with 2 classes"):
        UNetPredictor("seg-endpoint", sagemaker_session=endpoint_session(app, sent)).predict_proba(
            np.zeros((1500, 1500), np.uint8))


# --- deploy() and transformer() requests under moto -------------------------------------------------------------------

def trained_estimator(aws, **overrides) -> UNetEstimator:
    """An estimator with a training job in moto (which reports it Completed)."""
    s3 = aws.boto_session.client("s3")
    for channel in ("train", "validation"):
        s3.put_object(Bucket=BUCKET, Key=f"ds/{channel}/images/a.png", Body=b"i")
        s3.put_object(Bucket=BUCKET, Key=f"ds/{channel}/masks/a.png", Body=b"m")
    kwargs = dict(image_uri=IMAGE, role=ROLE, instance_type="ml.g5.2xlarge", sagemaker_session=aws.session,
                  hyperparameters={"classes": 3, "class_names": CLASS_NAMES})
    kwargs.update(overrides)
    est = UNetEstimator(**kwargs)
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    aws.requests.clear()
    aws.bodies.clear()
    return est


def test_deploy_creates_model_config_and_endpoint_with_the_training_image(aws):
    est = trained_estimator(aws)
    model_data = est.model_data
    assert model_data == f"s3://{BUCKET}/unetseg/{est.latest_training_job.name}/output/model.tar.gz"

    predictor = est.deploy(instance_type="ml.c5.xlarge", endpoint_name="cells", wait=False,
                           model_server_workers=2, env={MAX_PIXELS_ENV: "20000000"})
    model = aws.sent("CreateModel")
    assert model["PrimaryContainer"] == {
        "Image": IMAGE, "ModelDataUrl": model_data,
        "Environment": {MODEL_SERVER_WORKERS_ENV: "2", MAX_PIXELS_ENV: "20000000"}}
    assert model["ExecutionRoleArn"] == ROLE
    config = aws.sent("CreateEndpointConfig")
    assert config["ProductionVariants"] == [{
        "VariantName": "AllTraffic", "ModelName": model["ModelName"], "InitialVariantWeight": 1,
        "InitialInstanceCount": 1, "InstanceType": "ml.c5.xlarge"}]
    endpoint = aws.sent("CreateEndpoint")
    assert endpoint["EndpointName"] == "cells" and endpoint["EndpointConfigName"] == config["EndpointConfigName"]
    assert [r for r in aws.requests if r != "sagemaker.DescribeTrainingJob"] == [
        "sagemaker.CreateModel", "sagemaker.CreateEndpointConfig", "sagemaker.CreateEndpoint"]

    assert isinstance(predictor, UNetPredictor) and predictor.endpoint_name == "cells"
    assert predictor.classes == 3  # for the size of its probabilities
    assert isinstance(predictor.serializer, ImageSerializer) and isinstance(predictor.deserializer, MaskDeserializer)
    assert (predictor.content_type, predictor.accept) == (codecs.PNG, (codecs.PNG,))
    assert predictor.sagemaker_session is est.sagemaker_session


def test_names_of_models_endpoints_and_transforms_from_an_underscored_image_are_valid(aws):
    # The SDK names models, endpoint configs, endpoints and transform jobs after the image's repository; the strict
    # stand-in refuses unet_seg.v2-... as SageMaker does.
    est = trained_estimator(aws, image_uri="111122223333.dkr.ecr.us-east-1.amazonaws.com/team/unet_seg.v2:1")
    est.deploy(instance_type="ml.c5.xlarge", wait=False)
    est.create_model().deploy(1, "ml.c5.xlarge", wait=False)
    est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/o/").transform(
        f"s3://{BUCKET}/images/", wait=False, logs=False)
    est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/o/", model_name="cells-model")
    UNetTransformer("cells-model", 1, "ml.c5.xlarge", output_path=f"s3://{BUCKET}/o2/",
                    sagemaker_session=aws.session).transform(f"s3://{BUCKET}/images/", wait=False, logs=False)
    names = [body["ModelName"] for body in aws.bodies["CreateModel"]]
    names += [body[key] for operation, key in (("CreateEndpointConfig", "EndpointConfigName"),
                                               ("CreateEndpoint", "EndpointName"),
                                               ("CreateTransformJob", "TransformJobName"))
              for body in aws.bodies[operation]]
    assert len(names) == 10 and "cells-model" in names
    assert all(name.startswith(("unet-seg-v2-", "cells-model")) for name in names), names


@pytest.mark.parametrize("act, message", [
    (lambda est: est.deploy(instance_type="ml.c5.xlarge", endpoint_name="cells_v2"), "endpoint_name='cells_v2'"),
    (lambda est: est.deploy(instance_type="ml.c5.xlarge", model_name="m.1"), "model_name='m.1'"),
    (lambda est: est.transformer(instance_type="ml.c5.xlarge", model_name="m_1"), "model_name='m_1'"),
    (lambda est: est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/o/").transform(
        f"s3://{BUCKET}/i/", job_name="batch_1"), "job_name='batch_1'"),
])
def test_names_given_for_inference_are_checked_before_any_request(aws, act, message):
    est = trained_estimator(aws)
    with pytest.raises(JobSettingsError, match=message):
        act(est)
    assert [r for r in aws.requests if r not in ("sagemaker.DescribeTrainingJob", "sagemaker.CreateModel")] == []


def test_deploy_passes_gpu_instances_counts_and_custom_codecs_through(aws):
    est = trained_estimator(aws)
    predictor = est.deploy(2, "ml.g4dn.xlarge", serializer=ImageSerializer(codecs.JPEG),
                           deserializer=MaskDeserializer(codecs.JSON), wait=False)
    variant = aws.sent("CreateEndpointConfig")["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.g4dn.xlarge", 2)
    assert "Environment" not in aws.sent("CreateModel")["PrimaryContainer"] or \
        aws.sent("CreateModel")["PrimaryContainer"]["Environment"] == {}
    assert (predictor.content_type, predictor.accept) == (codecs.JPEG, (codecs.JSON,))


def test_transformer_runs_a_folder_of_images(aws):
    est = trained_estimator(aws)
    transformer = est.transformer(instance_type="ml.g4dn.xlarge", output_path=f"s3://{BUCKET}/masks/")
    assert isinstance(transformer, UNetTransformer)
    model = aws.sent("CreateModel")
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == est.model_data

    transformer.transform(f"s3://{BUCKET}/images/", content_type="image/png", wait=False, logs=False)
    job = aws.sent("CreateTransformJob")
    assert job["ModelName"] == model["ModelName"]
    assert job["BatchStrategy"] == "SingleRecord"
    assert job["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/images/"}},
        "ContentType": "image/png"}
    assert job["TransformOutput"] == {"S3OutputPath": f"s3://{BUCKET}/masks/", "Accept": "image/png"}
    assert job["TransformResources"] == {"InstanceCount": 1, "InstanceType": "ml.g4dn.xlarge"}
    assert "MaxPayloadInMB" not in job and "MaxConcurrentTransforms" not in job  # the server's /execution-parameters
    assert [r for r in aws.requests if r != "sagemaker.DescribeTrainingJob"] == [  # the listing: sizes under the limit
        "sagemaker.CreateModel", "s3.ListObjectsV2", "sagemaker.CreateTransformJob"]


def test_transform_defaults_to_png_and_takes_jpeg_and_other_outputs(aws):
    est = trained_estimator(aws)
    transformer = est.transformer(2, "ml.c5.2xlarge", accept=codecs.JSON, output_path=f"s3://{BUCKET}/out/",
                                  max_payload=20, env={MAX_BODY_MB_ENV: "20", TTA_ENV: "flip"})
    transformer.transform(f"s3://{BUCKET}/images/", wait=False, logs=False)
    transformer.transform(f"s3://{BUCKET}/photos/", content_type="image/jpeg", wait=False, logs=False)
    first, second = aws.bodies["CreateTransformJob"]
    assert first["TransformInput"]["ContentType"] == "image/png"
    assert second["TransformInput"]["ContentType"] == "image/jpeg"
    assert first["TransformOutput"]["Accept"] == codecs.JSON
    assert (first["MaxPayloadInMB"], first["Environment"]) == (20, {MAX_BODY_MB_ENV: "20", TTA_ENV: "flip"})
    assert first["TransformResources"] == {"InstanceCount": 2, "InstanceType": "ml.c5.2xlarge"}


@pytest.mark.parametrize("act,error,message", [
    (lambda est: est.deploy(instance_type="c5.xlarge"), JobSettingsError, "did you mean 'ml.c5.xlarge'"),
    (lambda est: est.deploy(), JobSettingsError, "instance_type is required"),
    (lambda est: est.deploy(0, "ml.c5.xlarge"), JobSettingsError, "initial_instance_count=0"),
    (lambda est: est.deploy(instance_type="ml.p2.xlarge"), JobSettingsError, "K80"),
    (lambda est: est.deploy(instance_type="ml.c7g.xlarge"), JobSettingsError, "Arm"),
    (lambda est: est.transformer(instance_type="ml.p6-b200.48xlarge", output_path=f"s3://{BUCKET}/o/"),
     JobSettingsError, "B200"),
    (lambda est: est.deploy(instance_type="ml.c5.xlarge", model_server_workers=0), JobSettingsError,
     "model_server_workers=0"),
    (lambda est: est.deploy(instance_type="ml.c5.xlarge", env={"1BAD": "x"}), JobSettingsError, "1BAD"),
    (lambda est: est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/o/",
                                 env={TTA_ENV: "rot90"}), JobSettingsError, "UNETSEG_TTA='rot90'"),
    (lambda est: est.transformer(instance_type="ml.c5.xlarge", output_path="/tmp/x"), JobSettingsError,
     "output_path"),
    (lambda est: est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/o/").transform(
        f"s3://{BUCKET}/i/", content_type="text/csv"), ValueError, "content_type='text/csv'"),
    (lambda est: est.transformer(instance_type="ml.c5.xlarge", output_path=f"s3://{BUCKET}/o/").transform(
        f"s3://{BUCKET}/i/", split_type="Line"), ValueError, "cannot be split"),
])
def test_inference_settings_rejected_before_any_request(aws, act, error, message):
    est = trained_estimator(aws)
    with pytest.raises(error, match=message):
        act(est)
    assert [r for r in aws.requests if r not in ("sagemaker.DescribeTrainingJob", "sagemaker.CreateModel")] == []


def test_deploy_without_a_training_job_says_so(aws):
    est = UNetEstimator(image_uri=IMAGE, role=ROLE, instance_type="ml.g5.xlarge", sagemaker_session=aws.session)
    with pytest.raises(ValueError, match="not associated with a training job"):
        est.deploy(instance_type="ml.c5.xlarge")
    assert aws.requests == []


def test_a_local_mode_model_is_not_sent_to_sagemaker(aws, monkeypatch):
    from sagemaker.local import LocalSession

    est = UNetEstimator(image_uri=IMAGE, instance_type="local",
                        sagemaker_session=LocalSession(boto_session=aws.boto_session))
    monkeypatch.setattr(est, "latest_training_job", object())  # as after a local fit()
    monkeypatch.setattr(UNetEstimator, "model_data", property(lambda self: "file:///tmp/out/job/model.tar.gz"))
    with pytest.raises(JobSettingsError, match="trained in local mode"):
        est.deploy(instance_type="ml.c5.xlarge")
    assert aws.requests == []


@pytest.mark.slow
def test_deploy_and_transformer_import_no_torch():
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from moto import mock_aws
        with mock_aws():
            import boto3, sagemaker
            import numpy as np
            import strict_aws  # SageMaker's own request validation, as in every moto-backed test
            boto3.setup_default_session(region_name="us-east-1")
            strict_aws.install(boto3.DEFAULT_SESSION.events)
            from unetseg.client.estimator import UNetEstimator
            s3 = boto3.client("s3", region_name="us-east-1")
            s3.create_bucket(Bucket={BUCKET!r})
            for channel in ("train", "validation"):
                s3.put_object(Bucket={BUCKET!r}, Key=f"ds/{{channel}}/images/a.png", Body=b"i")
                s3.put_object(Bucket={BUCKET!r}, Key=f"ds/{{channel}}/masks/a.png", Body=b"m")
            est = UNetEstimator(image_uri={IMAGE!r}, role={ROLE!r}, instance_type="ml.g5.xlarge",
                                sagemaker_session=sagemaker.Session(default_bucket={BUCKET!r}))
            est.fit("s3://{BUCKET}/ds/", wait=False, logs=False)
            predictor = est.deploy(instance_type="ml.c5.xlarge", wait=False)
            predictor.serializer.serialize(np.zeros((16, 16, 3), np.uint8))
            est.transformer(instance_type="ml.c5.xlarge", output_path="s3://{BUCKET}/o/").transform(
                "s3://{BUCKET}/images/", wait=False, logs=False)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {ENGINE_ONLY_MODULES!r})
        assert not heavy, heavy
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# --- local mode through the SDK, with the server in place of the container --------------------------------------------

FAKE_DOCKER = textwrap.dedent("""\
    #!{python}
    # A `docker` stand-in: `compose ... up` of a serving compose file runs the unetseg server on the host port
    # it maps to 8080, on 127.0.0.1, with /opt/ml/model's host folder. No container, no Docker daemon.
    import json, os, shutil, sys
    import yaml

    args = sys.argv[1:]
    record = os.environ["FAKE_DOCKER_RECORD"]
    with open(os.path.join(record, "calls.jsonl"), "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[:2] == ["compose", "version"]:
        print("Docker Compose version v2.29.7")
        sys.exit(0)
    if args[:2] == ["images", "-q"]:
        print("0123456789ab")  # the image is present: no ECR login, no pull
        sys.exit(0)
    if args[:1] in (["info"], ["context"]):
        print("Cannot connect to the Docker daemon", file=sys.stderr)  # the SDK then talks to localhost
        sys.exit(1)
    if args[:1] == ["compose"] and "-f" in args and "up" in args:
        path = args[args.index("-f") + 1]
        shutil.copy(path, os.path.join(record, "docker-compose-%d.yaml" % len(os.listdir(record))))
        (host, service), = yaml.safe_load(open(path))["services"].items()
        assert service["command"] == "serve", service["command"]
        volumes = dict(v.split(":")[1::-1] for v in service["volumes"])
        port = service["ports"][0].split(":")[0]
        env = dict(item.split("=", 1) for item in service["environment"])
        os.environ.update({{k: v for k, v in env.items() if k.startswith(("SAGEMAKER_", "UNETSEG_"))}})
        os.execv(sys.executable, [sys.executable, "-c", {server!r}, volumes["/opt/ml/model"], port])
    print("fake docker: unexpected call", args, file=sys.stderr)
    sys.exit(2)
""")

SERVER = textwrap.dedent("""\
    import os, signal, sys
    from wsgiref.simple_server import WSGIRequestHandler, make_server
    from unetseg.container.serving import InferenceApp

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # as a container that stops cleanly
    app = InferenceApp(sys.argv[1], device="cpu")
    print("batch" if os.environ.get("SAGEMAKER_BATCH") else "endpoint", "server up", flush=True)
    make_server("127.0.0.1", int(sys.argv[2]), app, handler_class=Quiet).serve_forever()
""")


@pytest.fixture
def local_docker(tmp_path, monkeypatch):
    """A docker double on PATH and the SDK's local mode pointed at a free loopback port."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable, server=SERVER))
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    if shutil.which("pgrep") is None:  # the SDK lists a container's child processes with it; ours has none
        (bin_dir / "pgrep").write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / "pgrep").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # pgrep and friends stay reachable
    monkeypatch.setenv("FAKE_DOCKER_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    import sagemaker.local.local_session as local_session

    config = {"local": {"serving_port": port, "container_root": str(tmp_path / "containers")}}
    (tmp_path / "containers").mkdir()
    monkeypatch.setattr(local_session, "load_local_mode_config", lambda: json.loads(json.dumps(config)))
    import sagemaker.local.entities as entities

    monkeypatch.setattr(entities, "HEALTH_CHECK_TIMEOUT_LIMIT", 120)
    return record


def upload_artifact(aws, est, archive: Path) -> None:
    key = est.model_data[len(f"s3://{BUCKET}/"):]
    aws.boto_session.client("s3").upload_file(str(archive), BUCKET, key)


@pytest.mark.slow
def test_local_deploy_serves_the_trained_model(aws, artifact, segmenter, local_docker):
    from sagemaker.local import LocalSession

    est = trained_estimator(aws)
    upload_artifact(aws, est, artifact[1])
    predictor = est.deploy(instance_type="local", endpoint_name="local-cells")
    try:
        assert isinstance(predictor, UNetPredictor)
        assert isinstance(predictor.sagemaker_session, LocalSession)
        image = rgb(12)
        assert np.array_equal(predictor.predict(image), segmenter.predict(image))
        np.testing.assert_allclose(predictor.predict_proba(image), segmenter.predict_proba(image), atol=1e-3)
        assert predictor.predict_json(image)["pixel_counts"].keys() == set(CLASS_NAMES)
    finally:
        predictor.delete_endpoint()
    compose = next(local_docker.glob("docker-compose-*.yaml")).read_text()
    assert f"image: {IMAGE}" in compose and "command: serve" in compose
    # Everything went to the local session: SageMaker itself got no model, endpoint config or endpoint.
    assert not [r for r in aws.requests if r.startswith("sagemaker.Create")]


@pytest.mark.slow
def test_local_batch_transform_over_a_folder(aws, artifact, segmenter, local_docker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    est = trained_estimator(aws)
    upload_artifact(aws, est, artifact[1])
    folder = tmp_path / "images"
    folder.mkdir()
    images = {f"img{i}.png": rgb(20 + i, (32 + 8 * i, 48, 3)) for i in range(3)}
    for name, image in images.items():
        Image.fromarray(image).save(folder / name)

    transformer = est.transformer(instance_type="local")
    transformer.transform(str(folder), wait=True, logs=False)
    out = Path(transformer.output_path[len("file://"):])
    assert out.parent == tmp_path / "unetseg-output"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.out" for name in images)
    for name, image in images.items():
        mask = decode_response((out / f"{name}.out").read_bytes(), codecs.PNG)
        assert np.array_equal(mask, segmenter.predict(image))
    assert not [r for r in aws.requests if r.startswith("sagemaker.Create")]


@pytest.mark.slow
def test_local_deploy_of_a_local_training_run(aws, artifact, segmenter, local_docker, tmp_path, monkeypatch):
    """Local training leaves file://.../<job>/model.tar.gz; the SDK extracts it beside itself and mounts that."""
    from sagemaker.local import LocalSession

    job_dir = tmp_path / "unetseg-output" / "unetseg-local-job"
    job_dir.mkdir(parents=True)
    (job_dir / "model.tar.gz").write_bytes(artifact[1].read_bytes())
    est = UNetEstimator(image_uri=IMAGE, instance_type="local", output_path=(tmp_path / "unetseg-output").as_uri(),
                        sagemaker_session=LocalSession(boto_session=aws.boto_session))
    monkeypatch.setattr(est, "latest_training_job", types.SimpleNamespace(name="unetseg-local-job"))
    monkeypatch.setattr(UNetEstimator, "model_data", property(lambda self: (job_dir / "model.tar.gz").as_uri()))
    predictor = est.deploy(instance_type="local")
    try:
        assert predictor.sagemaker_session is est.sagemaker_session
        assert isinstance(predictor.sagemaker_session, LocalSession)
        image = rgb(30, (64, 64, 3))
        assert np.array_equal(predictor.predict(image), segmenter.predict(image))
    finally:
        predictor.delete_endpoint()
