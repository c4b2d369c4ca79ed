"""Asynchronous inference: `deploy(..., async_inference=True)`, UNetAsyncPredictor's round trip through S3, the
scale-to-zero setup, the local fallback, and the container taking a large body in async mode.

- Requests: under moto, with every SageMaker, SageMaker Runtime, Application Auto Scaling and CloudWatch request checked
  against botocore's service model first (strict_aws). moto keeps no AsyncInferenceConfig (DescribeEndpointConfig
  drops it) and answers InvokeEndpointAsync with locations of its own, so the fields are read from the requests as sent
  (the `aws` fixture's event hook), and InvokeEndpointAsync is answered by `AsyncEndpoint`, which returns the locations
  the real service derives from the endpoint config: <S3OutputPath>/<id>.out and <S3FailurePath>/<id>-error.out.
- The endpoint's side: the test plays the service, as it does for an async endpoint: it reads the input object from
  (moto's) S3, sends it to the real server (`InferenceApp`, called as a WSGI app, with the request's headers), and
  writes the answer (with its Content-Type) or the error body to the output or failure location.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import threading
import uuid
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import BUCKET
from support import wsgi_call

# The model artifact and the docker double that runs the real server (fixtures), and helpers.
from test_predictor import CLASS_NAMES, artifact, local_docker, rgb, trained_estimator  # noqa: F401
from unetseg.client.async_inference import AsyncInferenceFailed, AsyncResultTimeout
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.client.predictor import PayloadTooLarge, UNetAsyncPredictor, UNetPredictor
from unetseg.contract import codecs
from unetseg.contract.sagemaker_env import (
    ASYNC_MAX_PAYLOAD_BYTES,
    MODEL_SERVER_WORKERS_ENV,
    REALTIME_MAX_PAYLOAD_BYTES,
    SERVING_MODE_ENV,
)

# --- the real server, in async mode -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(artifact):  # noqa: F811 - the fixture
    """The server in async mode, as an async endpoint runs it (deploy sets UNETSEG_SERVING_MODE=async)."""
    from unetseg.container.serving import InferenceApp

    mp = pytest.MonkeyPatch()
    mp.setenv(SERVING_MODE_ENV, "async")
    try:
        app = InferenceApp(str(artifact[0]), device="cpu")
    finally:
        mp.undo()
    assert app.model is not None, app.load_error
    assert app.settings.mode == "async"
    return app


# --- an estimator with a job, and the async endpoint's service side ---------------------------------------------------

class AsyncEndpoint:
    """SageMaker's side of InvokeEndpointAsync: answers with the locations the endpoint config names (as the service
    does: <S3OutputPath>/<inference id>.out, <S3FailurePath>/<inference id>-error.out), records each request's
    headers, and can then play the endpoint: run the real server on the input object and write what it writes."""

    def __init__(self, aws, output_path: str, failure_path: str):
        self.aws, self.output_path, self.failure_path = aws, output_path, failure_path
        self.requests: list[dict] = []
        self.s3 = aws.boto_session.client("s3")
        # On the client the SageMaker session already made (a client copies the session's handlers when made).
        aws.session.sagemaker_runtime_client.meta.events.register_first(
            "before-send.sagemaker-runtime.InvokeEndpointAsync", self._answer)

    def _answer(self, request, **_):
        from botocore.awsrequest import AWSResponse

        headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()}
        inference_id = headers.get("x-amzn-sagemaker-inference-id") or str(uuid.uuid4())
        self.requests.append({"url": request.url, **headers})
        response_headers = {
            "X-Amzn-SageMaker-OutputLocation": f"{self.output_path.rstrip('/')}/{inference_id}.out",
            "X-Amzn-SageMaker-FailureLocation": f"{self.failure_path.rstrip('/')}/{inference_id}-error.out"}

        class Raw(io.BytesIO):
            def stream(self, **_):
                yield self.read()

        return AWSResponse(request.url, 202, response_headers, Raw(json.dumps({"InferenceId": inference_id}).encode()))

    def run(self, app, handle) -> int:
        """Be the endpoint for `handle`'s request: the real server's answer to the input object goes to the output
        location with its Content-Type, an error body to the failure location. Returns the server's status."""
        sent = next(r for r in self.requests if r["x-amzn-sagemaker-inputlocation"] == handle.input_location)
        bucket, key = handle.input_location[len("s3://"):].split("/", 1)
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        status, headers, payload = wsgi_call(app, body=body, content_type=sent["x-amzn-sagemaker-content-type"],
                                             accept=sent.get("x-amzn-sagemaker-accept"),
                                             attrs=sent.get("x-amzn-sagemaker-custom-attributes"))
        target = handle.output_location if status == 200 else handle.failure_location
        bucket, key = target[len("s3://"):].split("/", 1)
        self.s3.put_object(Bucket=bucket, Key=key, Body=payload, ContentType=headers["Content-Type"])
        return status


def async_endpoint(aws, est: UNetEstimator) -> tuple[UNetAsyncPredictor, AsyncEndpoint, dict]:
    predictor = est.deploy(instance_type="ml.g4dn.xlarge", endpoint_name="big-cells", async_inference=True,
                           wait=False)
    config = aws.sent("CreateEndpointConfig")["AsyncInferenceConfig"]["OutputConfig"]
    aws.requests.clear()
    return predictor, AsyncEndpoint(aws, config["S3OutputPath"], config["S3FailurePath"]), config


# --- deploy -----------------------------------------------------------------------------------------------------------

def test_async_deploy_sends_the_async_config_and_sets_the_servers_mode(aws):
    est = trained_estimator(aws)
    job = est.latest_training_job.name
    prefix = f"s3://{BUCKET}/unetseg/{job}"
    assert est.model_data == f"{prefix}/output/model.tar.gz"  # the job's own prefix: the async objects go beside it

    predictor = est.deploy(instance_type="ml.g4dn.xlarge", endpoint_name="big-cells", async_inference=True,
                           wait=False)
    model = aws.sent("CreateModel")
    # SageMaker does not tell a container that it serves asynchronously: the model's environment does.
    assert model["PrimaryContainer"]["Environment"] == {SERVING_MODE_ENV: "async"}
    config = aws.sent("CreateEndpointConfig")
    assert config["AsyncInferenceConfig"] == {
        "OutputConfig": {"S3OutputPath": f"{prefix}/async-output/", "S3FailurePath": f"{prefix}/async-failures/"},
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 1}}
    assert config["ProductionVariants"] == [{
        "VariantName": "AllTraffic", "ModelName": model["ModelName"], "InitialVariantWeight": 1,
        "InitialInstanceCount": 1, "InstanceType": "ml.g4dn.xlarge"}]
    assert aws.sent("CreateEndpoint")["EndpointName"] == "big-cells"
    assert isinstance(predictor, UNetAsyncPredictor) and predictor.endpoint_name == "big-cells"
    assert predictor.input_path == f"{prefix}/async-input/"
    assert predictor.classes == 3 and predictor.sagemaker_session is est.sagemaker_session


def test_async_config_given_is_kept_and_completed(aws):
    from sagemaker.async_inference import AsyncInferenceConfig

    est = trained_estimator(aws)
    topic = "arn:aws:sns:us-east-1:111122223333:segmentation-done"
    est.deploy(instance_type="ml.g4dn.12xlarge", wait=False, model_server_workers=4, async_inference_config=(
        AsyncInferenceConfig(output_path=f"s3://{BUCKET}/answers/", notification_config={
            "SuccessTopic": topic, "ErrorTopic": topic, "IncludeInferenceResponseIn": ["ERROR_NOTIFICATION_TOPIC"]})))
    config = aws.sent("CreateEndpointConfig")["AsyncInferenceConfig"]
    assert config == {
        "OutputConfig": {"S3OutputPath": f"s3://{BUCKET}/answers/",
                         "S3FailurePath": f"s3://{BUCKET}/unetseg/{est.latest_training_job.name}/async-failures/",
                         "NotificationConfig": {"SuccessTopic": topic, "ErrorTopic": topic,
                                                "IncludeInferenceResponseIn": ["ERROR_NOTIFICATION_TOPIC"]}},
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4}}  # one request per server worker
    assert aws.sent("CreateModel")["PrimaryContainer"]["Environment"] == {
        SERVING_MODE_ENV: "async", MODEL_SERVER_WORKERS_ENV: "4"}


def test_a_model_made_for_an_async_endpoint_serves_in_async_mode(aws):
    """est.create_model(async_inference=True), deployed by the SDK's own Model.deploy with an AsyncInferenceConfig."""
    from sagemaker.async_inference import AsyncInferenceConfig

    est = trained_estimator(aws)
    model = est.create_model(async_inference=True)
    assert model.predictor_cls is UNetAsyncPredictor
    model.deploy(1, "ml.g4dn.xlarge", wait=False, async_inference_config=AsyncInferenceConfig(
        output_path=f"s3://{BUCKET}/answers/", failure_path=f"s3://{BUCKET}/failures/"))
    assert aws.sent("CreateModel")["PrimaryContainer"]["Environment"] == {SERVING_MODE_ENV: "async"}
    assert aws.sent("CreateEndpointConfig")["AsyncInferenceConfig"]["OutputConfig"] == {
        "S3OutputPath": f"s3://{BUCKET}/answers/", "S3FailurePath": f"s3://{BUCKET}/failures/"}


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(env={SERVING_MODE_ENV: "realtime"}), JobSettingsError, "UNETSEG_SERVING_MODE='realtime' with async"),
    (dict(serverless_inference_config=object()), JobSettingsError, "exclude each other"),
    (dict(async_inference_config={"output_path": "s3://b/o/"}), JobSettingsError, "AsyncInferenceConfig"),
])
def test_async_deploy_mistakes_are_named_before_any_request(aws, kwargs, error, message):
    est = trained_estimator(aws)
    with pytest.raises(error, match=message):
        est.deploy(instance_type="ml.g4dn.xlarge", async_inference=True, wait=False, **kwargs)
    assert [r for r in aws.requests if r.startswith("sagemaker.Create")] == []


def test_a_bad_sns_topic_is_refused_as_the_service_refuses_it(aws):
    from botocore.exceptions import ClientError
    from sagemaker.async_inference import AsyncInferenceConfig

    est = trained_estimator(aws)
    with pytest.raises(ClientError, match=r"asyncInferenceConfig\.outputConfig\.notificationConfig\.successTopic"):
        est.deploy(instance_type="ml.g4dn.xlarge", wait=False, async_inference_config=AsyncInferenceConfig(
            notification_config={"SuccessTopic": "segmentation-done"}))


# --- the predictor's round trip through S3 ----------------------------------------------------------------------------

def test_predict_async_uploads_the_image_and_decodes_the_servers_answer(aws, app):
    est = trained_estimator(aws)
    predictor, endpoint, config = async_endpoint(aws, est)
    image = rgb(1, (48, 64, 3))

    handle = predictor.predict_async(image)
    request = endpoint.requests[-1]
    assert request["url"].endswith("/endpoints/big-cells/async-invocations")
    uploaded = handle.input_location
    assert uploaded.startswith(predictor.input_path) and uploaded.endswith(".png")
    assert (request["x-amzn-sagemaker-content-type"], request["x-amzn-sagemaker-accept"]) == (codecs.PNG, codecs.PNG)
    assert "x-amzn-sagemaker-custom-attributes" not in request
    bucket, key = uploaded[len("s3://"):].split("/", 1)
    stored = aws.boto_session.client("s3").get_object(Bucket=bucket, Key=key)
    assert stored["ContentType"] == codecs.PNG and np.array_equal(np.array(Image.open(stored["Body"])), image)
    assert handle.output_location.startswith(config["S3OutputPath"]) and not handle.done()

    assert endpoint.run(app, handle) == 200
    assert handle.done()
    assert np.array_equal(handle.result(timeout=5), app.model.predict(image))

    # Probabilities (no 6 MB limit through S3) and the JSON summary, with the request options the server reads.
    probs = predictor.predict_async(image, output="probabilities", tile=32, tta="flip")
    request = endpoint.requests[-1]
    assert request["x-amzn-sagemaker-accept"] == codecs.NPY
    assert request["x-amzn-sagemaker-custom-attributes"] == "output=probabilities; tile=32; tta=flip"
    endpoint.run(app, probs)
    np.testing.assert_allclose(probs.result(timeout=5), app.model.predict_proba(image, tile=32, tta="flip"),
                               atol=1e-3)
    summary = predictor.predict_async(image, output="json")
    endpoint.run(app, summary)
    assert set(summary.result(timeout=5)["pixel_counts"]) == set(CLASS_NAMES)


def test_an_answer_that_appears_while_waiting_is_returned(aws, app):
    est = trained_estimator(aws)
    predictor, endpoint, _ = async_endpoint(aws, est)
    image = rgb(2)
    handle = predictor.predict_async(image)
    # The endpoint answers a little later, from another thread, as S3 sees it appear.
    writer = threading.Timer(0.5, endpoint.run, (app, handle))
    writer.start()
    try:
        assert np.array_equal(handle.result(timeout=60, poll_s=0.05), app.model.predict(image))
    finally:
        writer.join()


def test_an_answer_stored_without_its_content_type_is_told_by_its_bytes(aws, app):
    """S3 keeps the Content-Type the endpoint's answer came with; an object copied or rewritten by other tools may carry
    none (binary/octet-stream). PNG, .npy and JSON cannot be mistaken for one another by their first bytes."""
    est = trained_estimator(aws)
    predictor, endpoint, _ = async_endpoint(aws, est)
    s3 = aws.boto_session.client("s3")
    image = rgb(12)
    expected = {"mask": app.model.predict(image), "probabilities": app.model.predict_proba(image)}
    for output in ("mask", "probabilities", "json"):
        handle = predictor.predict_async(image, output=output)
        endpoint.run(app, handle)
        bucket, key = handle.output_location[len("s3://"):].split("/", 1)
        s3.put_object(Bucket=bucket, Key=key, Body=s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert s3.head_object(Bucket=bucket, Key=key)["ContentType"] == "binary/octet-stream"
        answer = handle.result(timeout=5)
        if output == "json":
            assert np.array_equal(answer["mask"], expected["mask"])
        else:
            np.testing.assert_allclose(answer, expected[output], atol=1e-3)


def test_an_s3_image_is_sent_as_it_is_and_a_file_is_streamed(aws, app, tmp_path):
    est = trained_estimator(aws)
    predictor, endpoint, _ = async_endpoint(aws, est)
    s3 = aws.boto_session.client("s3")
    image = rgb(3, (40, 40, 3))
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, format="JPEG")
    s3.put_object(Bucket=BUCKET, Key="scans/tile-7.jpg", Body=jpeg.getvalue())
    keys = aws.s3_keys()

    handle = predictor.predict_async(f"s3://{BUCKET}/scans/tile-7.jpg")
    assert aws.s3_keys() == keys  # nothing uploaded
    assert handle.input_location == f"s3://{BUCKET}/scans/tile-7.jpg"
    assert endpoint.requests[-1]["x-amzn-sagemaker-content-type"] == codecs.JPEG
    endpoint.run(app, handle)
    decoded = codecs.decode_image(jpeg.getvalue(), codecs.JPEG)
    assert np.array_equal(handle.result(timeout=5), app.model.predict(decoded))

    # A file of a format the server reads goes as it is, with its extension's content type: never decoded here.
    for name, content_type in (("slide.png", codecs.PNG), ("scene.tif", codecs.TIFF)):
        path = tmp_path / name
        Image.fromarray(image).save(path)
        handle = predictor.predict_async(path)
        bucket, key = handle.input_location[len("s3://"):].split("/", 1)
        stored = s3.get_object(Bucket=bucket, Key=key)
        assert stored["Body"].read() == path.read_bytes() and stored["ContentType"] == content_type
        assert endpoint.requests[-1]["x-amzn-sagemaker-content-type"] == content_type
        endpoint.run(app, handle)
        assert np.array_equal(handle.result(timeout=5), app.model.predict(image))
    s3.upload_file(str(path), BUCKET, "scans/scene.tif")
    predictor.predict_async(f"s3://{BUCKET}/scans/scene.tif")
    assert endpoint.requests[-1]["x-amzn-sagemaker-content-type"] == codecs.TIFF


def test_a_failure_object_is_an_error_carrying_the_servers_reason(aws, app):
    est = trained_estimator(aws)
    predictor, endpoint, config = async_endpoint(aws, est)
    gray = rgb(4, (40, 56))  # one channel: this model takes three

    handle = predictor.predict_async(gray)
    assert endpoint.run(app, handle) == 400  # the real server's refusal, written where SageMaker writes failures
    with pytest.raises(AsyncInferenceFailed) as raised:
        handle.result(timeout=5)
    message = str(raised.value)
    assert "image of shape 40x56 has 1 channel(s); this model takes 3" in message
    assert handle.failure_location in message and handle.input_location in message
    assert raised.value.failure_location.startswith(config["S3FailurePath"])
    with pytest.raises(AsyncInferenceFailed):  # the handle keeps its outcome
        handle.result(timeout=5)

    # A failure the service writes itself (not the container's JSON) is quoted as it is.
    other = predictor.predict_async(rgb(5))
    bucket, key = other.failure_location[len("s3://"):].split("/", 1)
    aws.boto_session.client("s3").put_object(Bucket=bucket, Key=key, Body=b"Inference timed out after 900 seconds")
    with pytest.raises(AsyncInferenceFailed, match="failed on the endpoint: Inference timed out after 900 seconds"):
        other.result(timeout=5)


def test_no_answer_in_time_is_a_timeout_and_the_handle_can_wait_again(aws, app):
    est = trained_estimator(aws)
    predictor, endpoint, _ = async_endpoint(aws, est)
    image = rgb(6)
    handle = predictor.predict_async(image)
    with pytest.raises(AsyncResultTimeout) as raised:
        handle.result(timeout=0.3, poll_s=0.05)
    message = str(raised.value)
    assert handle.output_location in message and handle.failure_location in message
    assert "call result() again" in message
    from sagemaker.async_inference import WaiterConfig

    with pytest.raises(AsyncResultTimeout, match="after 0.1 s"):  # the SDK's waiter settings: 2 looks, 0.1 s apart
        handle.result(waiter_config=WaiterConfig(max_attempts=2, delay=0.1))
    endpoint.run(app, handle)
    assert np.array_equal(handle.result(timeout=5), app.model.predict(image))


def test_async_request_settings_are_checked_before_anything_is_sent(aws, tmp_path):
    est = trained_estimator(aws)
    predictor, endpoint, _ = async_endpoint(aws, est)
    keys = aws.s3_keys()
    for kwargs, message in ((dict(invocation_timeout_s=3601), "invocation_timeout_s=3601"),
                            (dict(request_ttl_s=30), "request_ttl_s=30"), (dict(output="mask+probs"), "output=")):
        with pytest.raises(ValueError, match=message):
            predictor.predict_async(rgb(7), **kwargs)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(ASYNC_MAX_PAYLOAD_BYTES + 1)  # sparse: no disk, no memory
    with pytest.raises(PayloadTooLarge, match=r"1,073,741,825 bytes.*at most 1,073,741,824 bytes \(1 GiB\)"):
        predictor.predict_async(huge)
    assert endpoint.requests == [] and aws.s3_keys() == keys

    predictor.predict_async(rgb(7), invocation_timeout_s=3600, request_ttl_s=60, inference_id="slide-7")
    sent = endpoint.requests[-1]
    assert (sent["x-amzn-sagemaker-invocationtimeoutseconds"], sent["x-amzn-sagemaker-requestttlseconds"],
            sent["x-amzn-sagemaker-inference-id"]) == ("3600", "60", "slide-7")


def test_the_realtime_predictor_points_to_an_async_endpoint_for_large_images(aws):
    predictor = UNetPredictor("cells", sagemaker_session=aws.session, content_type=codecs.NPY)
    with pytest.raises(PayloadTooLarge, match=r"at most 6,291,456 bytes.*async_inference=True\): up to 1 GB"):
        predictor.predict(np.zeros((1500, 1500, 3), np.uint8))  # 6.75 MB as .npy
    assert aws.requests == []


def test_the_realtime_predictor_is_unchanged_by_async(aws):
    est = trained_estimator(aws)
    predictor = est.deploy(instance_type="ml.c5.xlarge", wait=False)
    assert type(predictor) is UNetPredictor and not hasattr(predictor, "predict_async")
    environment = aws.sent("CreateModel")["PrimaryContainer"].get("Environment") or {}
    assert SERVING_MODE_ENV not in environment
    assert "AsyncInferenceConfig" not in aws.sent("CreateEndpointConfig")


# --- scale to zero ----------------------------------------------------------------------------------------------------

def record_params(aws, services=("application-auto-scaling", "cloudwatch")) -> list[tuple[str, dict]]:
    """(operation, parameters) of every request to `services`, as sent (after strict_aws checked them)."""
    sent: list[tuple[str, dict]] = []

    def record(params, model, event_name, **_):
        sent.append((model.name, json.loads(json.dumps(params))))

    for service in services:
        aws.boto_session.events.register(f"before-parameter-build.{service}", record)
    return sent


def test_scale_to_zero_registers_the_target_policies_and_alarm(aws):
    est = trained_estimator(aws)
    predictor, _, _ = async_endpoint(aws, est)
    sent = record_params(aws)
    setup = predictor.enable_scale_to_zero(max_instances=3)

    target = {"ServiceNamespace": "sagemaker", "ResourceId": "endpoint/big-cells/variant/AllTraffic",
              "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
    dimensions = [{"Name": "EndpointName", "Value": "big-cells"}]
    assert [operation for operation, _ in sent] == [
        "RegisterScalableTarget", "PutScalingPolicy", "PutScalingPolicy", "PutMetricAlarm"]
    assert sent[0][1] == {**target, "MinCapacity": 0, "MaxCapacity": 3}
    assert sent[1][1] == {**target, "PolicyName": "big-cells-backlog-per-instance",
                          "PolicyType": "TargetTrackingScaling", "TargetTrackingScalingPolicyConfiguration": {
                              "TargetValue": 5.0, "CustomizedMetricSpecification": {
                                  "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker",
                                  "Dimensions": dimensions, "Statistic": "Average"},
                              "ScaleInCooldown": 600, "ScaleOutCooldown": 300}}
    assert sent[2][1] == {**target, "PolicyName": "big-cells-scale-out-from-zero", "PolicyType": "StepScaling",
                          "StepScalingPolicyConfiguration": {
                              "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average",
                              "Cooldown": 300, "StepAdjustments": [{"MetricIntervalLowerBound": 0,
                                                                    "ScalingAdjustment": 1}]}}
    alarm = sent[3][1]
    assert alarm.pop("AlarmDescription").startswith("Scale big-cells out from 0")
    assert alarm == {"AlarmName": "big-cells-backlog-without-capacity", "MetricName": "HasBacklogWithoutCapacity",
                     "Namespace": "AWS/SageMaker", "Dimensions": dimensions, "Statistic": "Average", "Period": 60,
                     "EvaluationPeriods": 2, "DatapointsToAlarm": 2, "Threshold": 1,
                     "ComparisonOperator": "GreaterThanOrEqualToThreshold", "TreatMissingData": "missing",
                     "AlarmActions": [setup.step_policy_arn]}
    # moto kept them: the alarm triggers the step policy that scales out from zero.
    scaling = aws.boto_session.client("application-autoscaling")
    (registered,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (registered["MinCapacity"], registered["MaxCapacity"]) == (0, 3)
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert {p["PolicyName"]: p["PolicyARN"] for p in policies}["big-cells-scale-out-from-zero"] == setup.step_policy_arn

    predictor.delete_endpoint()  # removes the alarm and the target first
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aws.boto_session.client("cloudwatch").describe_alarms()["MetricAlarms"] == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_instances=0), "max_instances=0"),
    (dict(max_instances=2, backlog_per_instance=0), "backlog_per_instance=0"),
    (dict(max_instances=2, scale_in_cooldown_s=-1), "scale_in_cooldown_s=-1"),
])
def test_scale_to_zero_settings_are_checked_before_any_request(aws, kwargs, message):
    est = trained_estimator(aws)
    predictor, _, _ = async_endpoint(aws, est)
    sent = record_params(aws)
    with pytest.raises(JobSettingsError, match=message):
        predictor.enable_scale_to_zero(**kwargs)
    assert sent == []


def test_the_strict_validator_covers_autoscaling_and_cloudwatch(aws):
    from botocore.exceptions import ClientError

    scaling = aws.boto_session.client("application-autoscaling")
    with pytest.raises(ClientError, match="scalableDimension.*enum value set"):
        scaling.register_scalable_target(ServiceNamespace="sagemaker", ResourceId="endpoint/e/variant/AllTraffic",
                                         ScalableDimension="sagemaker:variant:InstanceCount", MinCapacity=0,
                                         MaxCapacity=1)
    with pytest.raises(ClientError, match="alarmName.*length less than or equal to 255"):
        aws.boto_session.client("cloudwatch").put_metric_alarm(
            AlarmName="a" * 256, MetricName="HasBacklogWithoutCapacity", Namespace="AWS/SageMaker", Period=60,
            EvaluationPeriods=2, Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold", Statistic="Average")
    assert aws.requests == []


# --- local mode: no async there ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_async_deploy_warns_and_answers_at_once(aws, artifact, app, local_docker):  # noqa: F811
    est = trained_estimator(aws)
    key = est.model_data[len(f"s3://{BUCKET}/"):]
    aws.boto_session.client("s3").upload_file(str(artifact[1]), BUCKET, key)
    with pytest.warns(UserWarning, match="local mode has no asynchronous inference"):
        predictor = est.deploy(instance_type="local", async_inference=True, endpoint_name="local-big")
    try:
        assert isinstance(predictor, UNetAsyncPredictor)
        image = rgb(8, (48, 48, 3))
        handle = predictor.predict_async(image)
        assert handle.done()  # answered at once, synchronously
        assert np.array_equal(handle.result(timeout=0), app.model.predict(image))
        np.testing.assert_allclose(predictor.predict_proba(image), app.model.predict_proba(image), atol=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.array_equal(predictor.predict(image), app.model.predict(image))
    finally:
        predictor.delete_endpoint()
    compose = next(local_docker.glob("docker-compose-*.yaml")).read_text()
    assert f"{SERVING_MODE_ENV}=async" in compose  # the local server runs with the async limits too
    assert not [r for r in aws.requests if r.startswith(("sagemaker.Create", "sagemaker-runtime."))]


# --- the container: a 200 MB body in async mode, real gunicorn --------------------------------------------------------

@pytest.mark.slow
def test_the_server_in_async_mode_takes_a_200_mb_body(artifact, tmp_path):  # noqa: F811 - the fixture
    """A float64 image of 2900 x 2900 x 3 (201,840,128 bytes as .npy: over the 6 MB real-time and 100 MB batch limits)
    through real gunicorn in async mode. The body is streamed from a file, so that the test holds none of it."""
    from support import free_port
    from test_inference import start_server, stop_server, wait_healthy
    from unetseg.container.serving import InferenceApp

    side = 2900
    path = tmp_path / "big.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(side, side, 3))
    rng = np.random.default_rng(0)
    for row in range(0, side, 256):  # a smooth picture with noise, a block of rows at a time
        rows = np.arange(row, min(side, row + 256))[:, None, None] / side
        array[row:row + len(rows)] = np.clip(rows * 0.8 + rng.random((len(rows), side, 3)) * 0.2, 0, 1)
    array.flush()
    del array
    size = os.path.getsize(path)
    assert size > 200_000_000 and size > REALTIME_MAX_PAYLOAD_BYTES

    # The same body is refused in real-time mode, from its Content-Length alone.
    realtime = InferenceApp(str(artifact[0]), device="cpu")
    status, _, refusal = wsgi_call(realtime, content_type=codecs.NPY, environ={"CONTENT_LENGTH": str(size)})
    assert status == 413 and "async_inference=True" in json.loads(refusal)["error"]

    port = free_port()
    proc = start_server(artifact[0], {SERVING_MODE_ENV: "async", MODEL_SERVER_WORKERS_ENV: "1"}, "--port", str(port))
    try:
        wait_healthy(proc, port)
        (worker,) = [int(pid) for pid in os.popen(f"pgrep -P {proc.pid}").read().split()]
        # The baseline: a small body of the size the model runs in one pass (its largest tile), whose activations
        # are most of the worker's memory.
        small = codecs.encode_npy(rgb(9, (2048, 2048, 3)))
        status, _, _ = _post(port, io.BytesIO(small), len(small))
        assert status == 200
        baseline = _peak_rss(worker)
        with open(path, "rb") as body:
            status, content_type, payload = _post(port, body, size)
        assert status == 200, payload[:500]
        peak = _peak_rss(worker)
    finally:
        log = stop_server(proc)
    assert content_type == codecs.PNG
    mask = np.array(Image.open(io.BytesIO(payload)))
    assert mask.shape == (side, side) and mask.max() < len(CLASS_NAMES)
    assert re.search(r"async limits: 1073741824 bytes a request, 900 s", log), log[-2000:]
    # Beyond the model's own working memory, the worker holds the body, the decoded image and the probabilities, not
    # copies of each: a few bodies' worth.
    print(f"body {size:,} bytes; the worker's peak RSS {baseline:,} bytes after a 2048x2048 image, {peak:,} after "
          f"the large body: {(peak - baseline) / size:.1f}x the body more")
    assert peak - baseline < 6 * size


def _post(port: int, body, size: int) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900, blocksize=1 << 20)
    try:
        connection.request("POST", "/invocations", body=body, headers={
            "Content-Type": codecs.NPY, "Accept": codecs.PNG, "Content-Length": str(size)})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
