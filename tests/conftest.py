"""Shared test fixtures: no test may reach real AWS, and SageMaker SDK calls can be counted and read.

- `_offline_aws` (autouse): fake credentials and region, no instance-metadata lookups, the SDK's v2 notice off, and
  the SDK's telemetry opted out through its own config file (SageMaker.PythonSDK.Modules.TelemetryOptOut). Without
  the opt-out every Estimator.fit() sends a GET to an S3 telemetry bucket and an STS GetCallerIdentity call
  (sagemaker/telemetry/telemetry_logging.py).
- SDK config validation memoised: the SDK re-validates its whole config against the JSON schema on every config
  lookup (sagemaker/utils.py, get_sagemaker_config_value), about 0.2 s each and ~20 per fit() once a config file
  exists. Each distinct config is still validated once.
- `aws`: the one offline AWS of the suite: moto's mock_aws with a boto3 session whose every request is recorded
  (service, operation, parsed JSON body for SageMaker), a test bucket, and a SageMaker Session bound to both. Any
  other boto3 session made meanwhile (`unetseg image push`, the SDK's own) records into the same lists. Every
  SageMaker, ECR and STS request is first checked against botocore's service model as the real service checks it
  (strict_aws): one that the service would refuse raises its ValidationException here, instead of being accepted by
  moto.
- A test not marked `slow` (or `docker`) may start no process: `make test-fast` runs the rest, and stays fast only
  while the tests that start interpreters, servers or DataLoader workers are marked. One that starts a process fails
  with a line saying to mark it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.process
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import botocore.session
import pytest

import strict_aws

REGION = "us-east-1"
BUCKET = "unetseg-test-bucket"
ROLE = "arn:aws:iam::111122223333:role/SageMakerRole"
IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/unetseg:1.0"

# Set before any test module imports the SDK, whose import warns unless this is set.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")

_SDK_CONFIG = """\
SchemaVersion: '1.0'
SageMaker:
  PythonSDK:
    Modules:
      TelemetryOptOut: true
"""


@pytest.fixture(scope="session")
def _sdk_config_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sagemaker-config") / "config.yaml"
    path.write_text(_SDK_CONFIG)
    return str(path)


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch: pytest.MonkeyPatch, _sdk_config_file: str) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "UNETSEG_IMAGE_URI",
                 "AWS_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    monkeypatch.setenv("SAGEMAKER_ADMIN_CONFIG_OVERRIDE", _sdk_config_file)
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", _sdk_config_file)
    _memoise_sdk_config_validation(monkeypatch)


# Where the SDK looks the validator up by name (sagemaker 2.257): each is patched with the same memoised one.
_VALIDATOR_HOMES = ("sagemaker.config.config", "sagemaker.utils", "sagemaker.session", "sagemaker.local.local_session")
_VALIDATED_CONFIGS: set[str] = set()


def _memoise_sdk_config_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    config_module = sys.modules.get("sagemaker.config.config")
    if config_module is None:  # this test does not use the SDK
        return
    validate = config_module.validate_sagemaker_config  # the original: monkeypatch restored it after the last test

    def validate_once(sagemaker_config: Optional[dict] = None) -> None:
        key = json.dumps(sagemaker_config, sort_keys=True, default=str)
        if key not in _VALIDATED_CONFIGS:
            validate(sagemaker_config)
            _VALIDATED_CONFIGS.add(key)

    for name in _VALIDATOR_HOMES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "validate_sagemaker_config"):
            monkeypatch.setattr(module, "validate_sagemaker_config", validate_once)


def _watch_processes(started: list[str]) -> contextlib.ExitStack:
    """Notes in `started` every process started by subprocess, multiprocessing or os.fork/system/posix_spawn, and lets
    it start: the test runs as it would, and fails afterwards (the code under test may catch an exception)."""
    stack = contextlib.ExitStack()
    targets = [(subprocess.Popen, "_execute_child", "subprocess"),
               (multiprocessing.process.BaseProcess, "start", "multiprocessing"),
               *((os, name, f"os.{name}") for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp"))]
    for owner, name, what in targets:
        original = getattr(owner, name)

        def noted(*args: Any, _original: Any = original, _what: str = what, **kwargs: Any) -> Any:
            if not _library_probe(_what, args):
                started.append(_what)
            return _original(*args, **kwargs)

        setattr(owner, name, noted)
        stack.callback(setattr, owner, name, original)
    return stack


def _library_probe(what: str, args: tuple) -> bool:
    """ctypes.util.find_library runs `ldconfig -p` when torch's CUDA loader is first imported in the process: a side
    effect of whichever test imports it first (in a subset of the suite), not a process the test starts."""
    command = args[1] if what == "subprocess" and len(args) > 1 else None
    return isinstance(command, (list, tuple)) and bool(command) and os.path.basename(str(command[0])) == "ldconfig"


@contextlib.contextmanager
def _no_process_unless_slow(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("slow") or item.get_closest_marker("docker"):
        yield
        return
    started: list[str] = []
    try:
        with _watch_processes(started):
            yield
    finally:
        if started:
            pytest.fail(f"{item.nodeid} starts a process ({', '.join(sorted(set(started)))}) but is not marked slow: "
                        "mark it @pytest.mark.slow, so that make test-fast stays fast", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _no_process_unless_slow(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _no_process_unless_slow(item):
        return (yield)


@dataclass
class RecordingAWS:
    """A moto-backed boto3 session that records every request it sends."""

    boto_session: Any
    session: Any  # sagemaker.Session with BUCKET as its default bucket
    requests: list[str] = field(default_factory=list)  # "service.Operation", in order
    bodies: dict[str, list[dict]] = field(default_factory=dict)  # "Operation" -> JSON bodies sent (SageMaker)

    def sent(self, operation: str) -> dict:
        """The one request body sent for `operation`."""
        assert len(self.bodies.get(operation, [])) == 1, f"{operation} sent {len(self.bodies.get(operation, []))} times"
        return self.bodies[operation][0]

    def s3_keys(self, bucket: str = BUCKET) -> list[str]:
        s3 = self.boto_session.client("s3")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = sorted(item["Key"] for page in pages for item in page.get("Contents", ()))
        return keys

    def new_session(self, **kwargs: Any) -> Any:
        import sagemaker

        return sagemaker.Session(boto_session=self.boto_session, **kwargs)


_SHARED_LOADER: list[Any] = []
_GET_SESSION = botocore.session.get_session  # the original, which `aws` replaces with one that records


def recording_boto_session(requests: list[str], bodies: dict[str, list[dict]]) -> Any:
    import boto3

    return boto3.Session(botocore_session=_recording_core(requests, bodies), region_name=REGION)


def _recording_core(requests: list[str], bodies: dict[str, list[dict]], env_vars: Optional[dict] = None) -> Any:
    """A botocore session whose requests are checked by strict_aws and recorded in `requests` and `bodies`."""
    core = _GET_SESSION(env_vars)
    # One service-model loader for all tests: each new session would re-read the JSON models (~0.3 s a test).
    if not _SHARED_LOADER:
        _SHARED_LOADER.append(core.get_component("data_loader"))
    core.register_component("data_loader", _SHARED_LOADER[0])
    events = core.get_component("event_emitter")
    strict_aws.install(events)

    def on_send(event_name: str, **_: Any) -> None:
        requests.append(".".join(event_name.split(".")[1:3]))  # before-send.<service>.<Operation>

    def on_call(event_name: str, params: dict, **_: Any) -> None:
        body = params.get("body")
        if event_name.startswith("before-call.sagemaker.") and body:
            bodies.setdefault(event_name.split(".")[2], []).append(json.loads(body))

    # register_first: moto answers in before-send, and the first handler to answer ends the event.
    events.register_first("before-send", on_send)
    events.register("before-call", on_call)
    return core


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto answers, strict_aws checks, and `requests` records every AWS call, from this session and from any other
    boto3 session the code under test makes (docker_image's push, the SDK's defaults)."""
    from moto import mock_aws

    with mock_aws():
        import sagemaker

        requests: list[str] = []
        bodies: dict[str, list[dict]] = {}
        monkeypatch.setattr(botocore.session, "get_session",
                            lambda env_vars=None: _recording_core(requests, bodies, env_vars))
        boto_session = recording_boto_session(requests, bodies)
        boto_session.client("s3").create_bucket(Bucket=BUCKET)
        session = sagemaker.Session(boto_session=boto_session, default_bucket=BUCKET)
        requests.clear()
        yield RecordingAWS(boto_session, session, requests, bodies)
