"""Serving from the training image on a real Docker engine: SageMaker's local endpoint and batch transform, and the
image's `serve` command run directly.

A tiny model is trained once for the module with the SDK's own local mode (`UNetEstimator(instance_type="local")`,
Docker Compose); then:

1. `est.deploy(instance_type="local")`: the SDK starts `<image> serve` through Compose, publishes it on the host's
   port 8080 and waits for /ping; `predictor.predict(image)` gives the mask that `est.load_model().predict(image)`
   gives on this machine (probabilities and the JSON summary too); `delete_model()` / `delete_endpoint()` stop the
   container and free the port.
2. `est.transformer(instance_type="local").transform(<folder of PNGs>)`: one `<name>.png.out` per image, each the
   palette PNG of that image's mask.
3. `docker run <image> serve` with /opt/ml/model mounted (one on SAGEMAKER_BIND_TO_PORT=9090, as an inference
   pipeline runs it): /ping, a PNG in and a mask out, a bad body answered 400 in
   JSON with no stack trace; with an empty /opt/ml/model /ping answers 500 with the reason; `docker stop` ends both
   promptly and cleanly (entry/init.py passes SIGTERM to gunicorn, which stops gracefully).

The SDK's local endpoint and transform publish port 8080 on the host (its default `local.serving_port`, what a
notebook user gets): it must be free, and the tests fail saying what holds it otherwise. Docker publishes no ports
from an `--internal` network, so `sagemaker-local` is a plain bridge here (docker_support.bridge_network); the
engine's DOCKER-USER rule (ci/start-dockerd.sh) still keeps every container from reaching beyond this machine.
Containers, the network and the SDK's container roots are removed afterwards. Without an engine these tests skip
with the reason; UNETSEG_REQUIRE_DOCKER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REGION
from docker_support import (
    LOCAL_NETWORK,
    containers_on,
    docker,
    port_in_use,
    remove_containers,
    require_free_port,
    sagemaker_local_network,
    training_image,
)
from readiness import NotReady, first_answer
from support import TINY, free_port
from unetseg.client.predictor import decode_response
from unetseg.contract import codecs
from unetseg.synthetic import make_demo_dataset

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HPS = {**TINY, "epochs": 2, "seed": 3}  # resnet18, depth 3, decoder [32, 16, 8], no pretrained weights, 32 px, batch 4
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 cores here: one torch thread per container
SERVING_PORT = 8080  # the SDK's default local.serving_port: where a notebook's local endpoint listens
AGREEMENT = 0.999  # the same torch build in the image and here; this much slack absorbs a tie broken differently


@dataclass
class Trained:
    estimator: object  # UNetEstimator after fit()
    model: object  # est.load_model(): the reference, on this machine's CPU
    image: str  # the image it was trained with, and serves from


# --- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_bridge():
    """`sagemaker-local` as a plain bridge (ports can be published); its new containers and itself removed after."""
    image = training_image()
    with sagemaker_local_network(internal=False) as info:
        yield image, info


@pytest.fixture(scope="module")
def offline_aws(_sdk_config_file):
    """conftest's `_offline_aws` for this module's fixtures (that one is per test): fake credentials and region, no
    instance metadata, the SDK's telemetry off; and moto, so nothing reaches AWS even if something tried."""
    from moto import mock_aws

    with pytest.MonkeyPatch.context() as patch, mock_aws():
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            patch.delenv(name, raising=False)
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                            "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": _sdk_config_file,
                            "SAGEMAKER_USER_CONFIG_OVERRIDE": _sdk_config_file}.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def trained(local_bridge, offline_aws, tmp_path_factory):
    """One tiny local-mode training job for the module."""
    from sagemaker.local import LocalSession

    from unetseg.client.estimator import UNetEstimator

    image, _ = local_bridge
    root = tmp_path_factory.mktemp("serving")
    (root / "containers").mkdir()
    session = LocalSession()
    session.config = {"local": {"container_root": str(root / "containers")}}
    data = make_demo_dataset(root / "data", kind="binary", train=8, validation=4, size=32)
    est = UNetEstimator(image_uri=image, instance_type="local", sagemaker_session=session, hyperparameters=HPS,
                        environment=ONE_THREAD, output_path=(root / "out").as_uri())
    started = time.monotonic()
    est.fit(data.as_uri(), job_name=f"unetseg-ci-serve-{uuid.uuid4().hex[:8]}", logs=False)
    print(f"local training job: {time.monotonic() - started:.0f}s")
    yield Trained(est, est.load_model(device="cpu"), image)
    shutil.rmtree(root / "containers", ignore_errors=True)


@pytest.fixture(scope="module")
def images(trained) -> dict[str, np.ndarray]:
    """RGB images of sizes off the encoder stride (padded and cropped back); the reference masks must not be constant,
    or agreeing with them would prove little."""
    rng = np.random.default_rng(11)
    found = {f"img{i}.png": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
             for i, (h, w) in enumerate([(32, 32), (45, 61), (70, 38)])}
    masks = [trained.model.predict(image) for image in found.values()]
    assert len(np.unique(np.concatenate([m.ravel() for m in masks]))) > 1, "the reference masks are all one class"
    return found


def agreement(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape and got.dtype == np.uint8, (got.shape, got.dtype, expected.shape)
    return float((got == expected).mean())


def running(container: str) -> bool:
    state = docker("inspect", "--format", "{{.State.Running}}", container, check=False)
    return state.returncode == 0 and state.stdout.strip() == "true"


# --- 1. a local endpoint -------------------------------------------------------------------------------------------

@pytest.fixture
def removed(monkeypatch):
    """name -> state of each container that unetseg removes after the SDK stopped it, as it was just before."""
    from unetseg.client import local_mode

    states = {}
    real_remove = local_mode.remove_containers

    def inspect_then_remove(names):
        for name in names:
            states[name] = json.loads(docker("inspect", name).stdout)[0]["State"]
        real_remove(names)

    monkeypatch.setattr(local_mode, "remove_containers", inspect_then_remove)
    return states


def test_local_endpoint_predicts_what_the_model_predicts(trained, images, capfd, removed):
    from sagemaker.local import LocalSession

    from unetseg.client.predictor import UNetPredictor

    require_free_port(SERVING_PORT, "a local endpoint (the SDK publishes its container on the host)")
    est, model = trained.estimator, trained.model
    before = set(containers_on())
    started = time.monotonic()
    predictor = est.deploy(instance_type="local", initial_instance_count=1)
    up_seconds = time.monotonic() - started
    try:
        assert isinstance(predictor, UNetPredictor) and isinstance(predictor.sagemaker_session, LocalSession)
        new = [c for c in containers_on() if c not in before]
        assert len(new) == 1, new
        container = json.loads(docker("inspect", new[0]).stdout)[0]
        container_name = container["Name"].lstrip("/")
        assert container["State"]["Running"] and container["Config"]["Image"] == trained.image
        assert container["Args"] == ["serve"]  # after the image's ENTRYPOINT (entry/init.py)
        assert container["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostPort"] == str(SERVING_PORT)
        assert list(container["NetworkSettings"]["Networks"]) == [LOCAL_NETWORK]

        started, agreed = time.monotonic(), []
        for name, image in images.items():
            agreed.append(agreement(predictor.predict(image), model.predict(image)))
            assert agreed[-1] >= AGREEMENT, (name, agreed[-1])
        predict_seconds = (time.monotonic() - started) / len(images)

        image = images["img1.png"]
        probs = predictor.predict_proba(image)
        assert probs.shape == (2, *image.shape[:2]) and probs.dtype == np.float32
        np.testing.assert_allclose(probs, model.predict_proba(image), atol=2e-3)  # sent as float16
        summary = predictor.predict_json(image)
        assert agreement(summary["mask"], model.predict(image)) >= AGREEMENT
        assert set(summary["pixel_counts"]) == set(model.class_names)
        assert sum(summary["pixel_counts"].values()) == image.shape[0] * image.shape[1]
    finally:
        try:
            predictor.delete_model()  # first: it finds the model through the endpoint config that delete_endpoint drops
        finally:
            predictor.delete_endpoint()
    out, err = capfd.readouterr()
    print((out + err)[-4000:])  # the container's log, shown by pytest when the test fails

    # The endpoint's container stopped cleanly with it (SIGTERM, not killed: 137), was then removed (the SDK would
    # leave it behind), and the port is free again for the next one.
    state = removed.get(container_name, {})
    assert list(removed) == [container_name] and not state["Running"] and state["ExitCode"] in (0, 143), removed
    assert docker("inspect", container_name, check=False).returncode != 0, docker("ps", "-a").stdout
    assert port_in_use(SERVING_PORT) is None, port_in_use(SERVING_PORT)
    masks = "identical to" if min(agreed) == 1 else f"{min(agreed):.2%} equal to"
    print(f"local endpoint: up in {up_seconds:.0f}s, {predict_seconds * 1000:.0f} ms per predict; masks {masks} "
          f"load_model().predict; stopped with exit code {state['ExitCode']}, then removed")


# --- 2. a local batch transform ------------------------------------------------------------------------------------

def test_local_batch_transform_over_a_folder(trained, images, tmp_path, monkeypatch, capfd, removed):
    require_free_port(SERVING_PORT, "a local batch transform (the SDK publishes its container on the host)")
    monkeypatch.chdir(tmp_path)  # the default output: ./unetseg-output/<job name>/
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in images.items():
        Image.fromarray(image).save(folder / name)

    before = set(containers_on())
    started = time.monotonic()
    transformer = trained.estimator.transformer(instance_count=1, instance_type="local")
    transformer.transform(str(folder), content_type="image/png")
    seconds = time.monotonic() - started

    def no_cloudwatch(*args, **kwargs):
        raise AssertionError("a local transform job has no CloudWatch logs to tail")

    monkeypatch.setattr(transformer.sagemaker_session, "logs_for_transform_job", no_cloudwatch)
    waited = time.monotonic()
    transformer.wait()  # the job ran inside transform(): this returns at once, asking nothing of AWS
    assert time.monotonic() - waited < 1
    out, err = capfd.readouterr()
    print((out + err)[-4000:])

    assert transformer.sagemaker_session.describe_transform_job(transformer.latest_transform_job.name)[
        "TransformJobStatus"] == "Completed"
    output = Path(transformer.output_path[len("file://"):])
    assert output.parent == tmp_path / "unetseg-output"
    assert sorted(p.name for p in output.iterdir()) == sorted(f"{name}.out" for name in images)
    for name, image in images.items():
        mask = decode_response((output / f"{name}.out").read_bytes(), codecs.PNG)
        assert agreement(mask, trained.model.predict(image)) >= AGREEMENT, name
    # One serving container did the job, stopped cleanly at its end, and was removed (the SDK leaves it behind).
    assert len(removed) == 1 and all(not s["Running"] and s["ExitCode"] in (0, 143) for s in removed.values()), removed
    assert [c for c in containers_on() if c not in before] == []
    assert port_in_use(SERVING_PORT) is None
    print(f"local batch transform of {len(images)} images: {seconds:.0f}s")


# --- 3. `docker run <image> serve` ---------------------------------------------------------------------------------

def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def serve(image: str, model_dir: Path, name: str, container_port: int = 8080) -> str:
    """`docker run -d <image> serve` with `model_dir` as /opt/ml/model, published on a free loopback port; the URL.
    Another `container_port` is given to the server as SAGEMAKER_BIND_TO_PORT, as an inference pipeline does."""
    port = free_port()
    bind = ["-e", f"SAGEMAKER_BIND_TO_PORT={container_port}"] if container_port != 8080 else []
    docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:{container_port}",
           "-v", f"{model_dir}:/opt/ml/model:ro", "-e", "OMP_NUM_THREADS=1", *bind, image, "serve")
    return f"http://127.0.0.1:{port}"


def first_ping(url: str, name: str, timeout: float = 120) -> tuple[int, bytes, float]:
    """The first answer /ping gives (the server up), and the seconds it took; no answer yet, or a slow one while the
    workers load the model, is "not ready yet" (tests/readiness.py)."""
    def logs() -> str:
        proc = docker("logs", name, check=False)
        return proc.stdout + proc.stderr

    try:
        return first_answer(f"{url}/ping", timeout=timeout, alive=lambda: running(name), logs=logs)
    except NotReady as exc:
        pytest.fail(f"{name}: {exc}")


def stop(name: str) -> tuple[int, float, str]:
    """`docker stop -t 30` (SIGTERM, SIGKILL 30 s later): the exit code, the seconds it took, and the log."""
    started = time.monotonic()
    docker("stop", "-t", "30", name, timeout=90)
    seconds = time.monotonic() - started
    code = int(docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout)
    logs = docker("logs", name, check=False)
    return code, seconds, logs.stdout + logs.stderr


def test_serve_command_answers_the_inference_contract_and_stops_on_sigterm(trained, images, tmp_path):
    model_dir, empty = tmp_path / "model", tmp_path / "empty"
    model_dir.mkdir()
    empty.mkdir()
    with tarfile.open(trained.estimator.model_data[len("file://"):]) as tar:
        tar.extractall(model_dir, filter="data")  # as SageMaker extracts model.tar.gz into /opt/ml/model
    tag = uuid.uuid4().hex[:8]
    good, broken = f"unetseg-ci-serve-{tag}", f"unetseg-ci-serve-empty-{tag}"
    try:
        good_url = serve(trained.image, model_dir, good, container_port=9090)  # an inference pipeline's port
        broken_url = serve(trained.image, empty, broken)

        status, body, up_seconds = first_ping(good_url, good)
        assert status == 200, body
        assert json.loads(body) == {"status": "healthy"}

        for name, image in images.items():
            status, content_type, body = http("POST", f"{good_url}/invocations", codecs.encode_image(image, codecs.PNG),
                                              {"Content-Type": "image/png", "Accept": "image/png"})
            assert (status, content_type) == (200, "image/png"), body[:500]
            assert agreement(decode_response(body, content_type), trained.model.predict(image)) >= AGREEMENT, name

        status, content_type, body = http("POST", f"{good_url}/invocations", b"\x89PNG\r\n\x1a\n this is no image",
                                          {"Content-Type": "image/png"})
        assert (status, content_type) == (400, "application/json"), (status, content_type, body[:500])
        error = json.loads(body)["error"]
        assert error and "Traceback" not in error and 'File "' not in error, error

        # The health check is honest: no model, no 200.
        status, body, _ = first_ping(broken_url, broken)
        assert status == 500, body
        reason = json.loads(body)["error"]
        assert reason.startswith("model not loaded: ") and len(reason) > len("model not loaded: ") + 10, reason
        assert "Traceback" not in reason
        print(f"/ping with an empty /opt/ml/model: 500 {reason!r}")
        status, _, body = http("POST", f"{broken_url}/invocations", codecs.encode_image(images["img0.png"], codecs.PNG),
                               {"Content-Type": "image/png"})
        assert status == 500 and json.loads(body)["error"] == reason

        # SIGTERM, as SageMaker (and `docker stop`) sends it: init passes it to gunicorn, which stops gracefully.
        for name in (good, broken):
            code, seconds, logs = stop(name)
            assert code in (0, 143), (name, code, logs[-3000:])  # not 137: nothing had to be killed
            assert seconds < 20, (name, seconds, logs[-3000:])
            assert "Handling signal: term" in logs or "Shutting down" in logs, logs[-3000:]
            assert f"Listening at: http://0.0.0.0:{9090 if name == good else 8080}" in logs, logs[-3000:]
            print(f"{name}: docker stop took {seconds:.1f}s, exit code {code}")
        print(f"serve: /ping answered 200 {up_seconds:.1f}s after docker run")
    finally:
        remove_containers([good, broken])
