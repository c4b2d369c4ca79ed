"""Local mode (instance_type 'local' / 'local_gpu'): SageMaker's own Docker Compose runner, made to work today.

The SDK (sagemaker 2.257, sagemaker/local/image.py, `_SageMakerContainer._get_compose_cmd_prefix`) accepts the Compose
plugin only when `docker compose version` prints a string containing "v2", so Compose v3, v4 and v5 ("Docker Compose
version v5.0.0"), and distribution builds that print no "v" ("Docker Compose version 2.26.1"), fall through to the
standalone `docker-compose` or fail with "Docker Compose is not installed". It also lets a missing `docker` binary
escape as FileNotFoundError. `install_compose_detection()` replaces that one static method with a version parse that
accepts Compose 2 and later, and keeps the SDK's fallback to a standalone `docker-compose` (Debian's 1.29 included).

When a local training job fails, the SDK raises only "Failed to run: [docker-compose ...]. Process exited with code:
1", and then tars the containers' /opt/ml/output (where the entry point wrote the `failure` file) into output.tar.gz
and deletes the folders. `install_failure_reporting()` reads each container's failure file before the SDK tars it,
and raises `LocalTrainingError` carrying its first 1024 characters: what SageMaker shows as FailureReason.

A local endpoint or batch transform leaves its container behind, stopped, when it ends: `install_serving_cleanup()`
removes it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from typing import Any

from ..contract.errors import UnetsegError
from ..contract.sagemaker_env import FAILURE_REASON_LIMIT

logger = logging.getLogger(__name__)

_COMPOSE_VERSION = re.compile(r"version\s+v?(\d+)\.(\d+)", re.IGNORECASE)
_NOT_INSTALLED = (
    "Docker Compose is not installed. Local mode (instance_type='local' or 'local_gpu') runs the training image with "
    "Docker Compose: install the Compose plugin (`docker compose version` should print v2 or later) or the "
    "standalone docker-compose. See https://docs.docker.com/compose/install/"
)


sdk_compose_detection = None  # the SDK's own check, once install_compose_detection() has replaced it
LOCAL_OUTPUT_DIR = "unetseg-output"  # local jobs', endpoints' and transforms' default output, under the current folder


class LocalTrainingError(UnetsegError, RuntimeError):
    """A local-mode training job failed; the message carries the container's failure file (RuntimeError, as the
    SDK's own error, so existing handlers still catch it)."""

    def __init__(self, message: str, failures: dict[str, str]):
        super().__init__(message)
        self.failures = failures  # host -> the whole failure file


def compose_plugin_major(output: str) -> int | None:
    """The major version in `docker compose version` output, or None when it names none."""
    match = _COMPOSE_VERSION.search(output or "")
    return int(match.group(1)) if match else None


def compose_command() -> list[str]:
    """The command prefix that runs Docker Compose: `docker compose` (v2+), else `docker-compose`."""
    try:
        output = subprocess.check_output(["docker", "compose", "version"], stderr=subprocess.DEVNULL,
                                         encoding="utf-8", timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        output = ""
    major = compose_plugin_major(output)
    if major is not None and major >= 2:
        logger.info("Docker Compose plugin v%d found", major)
        return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        logger.info("using the standalone docker-compose")
        return ["docker-compose"]
    raise ImportError(_NOT_INSTALLED)  # the type the SDK raises here, so callers' handling stays the same


def install_compose_detection() -> None:
    """Make the SDK's local mode use `compose_command` (idempotent)."""
    from sagemaker.local.image import _SageMakerContainer

    if getattr(_SageMakerContainer._get_compose_cmd_prefix, "__unetseg__", False):
        return

    def _get_compose_cmd_prefix() -> list[str]:
        return compose_command()  # looked up at call time, so tests can observe it

    global sdk_compose_detection
    sdk_compose_detection = _SageMakerContainer._get_compose_cmd_prefix  # kept for comparison and tests
    _get_compose_cmd_prefix.__unetseg__ = True  # type: ignore[attr-defined]
    _get_compose_cmd_prefix.__doc__ = compose_command.__doc__
    _SageMakerContainer._get_compose_cmd_prefix = staticmethod(_get_compose_cmd_prefix)


def read_failures(container_root: str, hosts: list[str]) -> dict[str, str]:
    """host -> the text of <container_root>/<host>/output/failure (the container's /opt/ml/output/failure)."""
    found = {}
    for host in hosts:
        path = os.path.join(container_root, host, "output", "failure")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if text.strip():
            found[host] = text
    return found


def failure_message(job_name: str, failures: dict[str, str], sdk_error: BaseException) -> str:
    host, text = next(iter(failures.items()))  # hosts in order: algo-1 first
    others = f" (and {len(failures) - 1} more host(s))" if len(failures) > 1 else ""
    return (f"local training job {job_name} failed on {host}{others}: {text[:FAILURE_REASON_LIMIT].rstrip()}\n"
            f"({sdk_error})")


def install_failure_reporting() -> None:
    """Make a failed local training job raise LocalTrainingError with its failure file (idempotent)."""
    from sagemaker.local.image import _SageMakerContainer

    if getattr(_SageMakerContainer.train, "__unetseg__", False):
        return
    sdk_train = _SageMakerContainer.train
    sdk_retrieve_artifacts = _SageMakerContainer.retrieve_artifacts

    def retrieve_artifacts(self, compose_data, output_data_config, job_name):
        # Runs in the SDK's `finally` after the containers exit, before it tars and deletes their output folders.
        self._unetseg_failures = read_failures(self.container_root, list(self.hosts))
        return sdk_retrieve_artifacts(self, compose_data, output_data_config, job_name)

    def train(self, input_data_config, output_data_config, hyperparameters, environment, job_name):
        self._unetseg_failures = {}
        try:
            return sdk_train(self, input_data_config, output_data_config, hyperparameters, environment, job_name)
        except RuntimeError as exc:
            failures = getattr(self, "_unetseg_failures", {})
            if not failures:
                raise
            raise LocalTrainingError(failure_message(job_name, failures, exc), failures) from exc

    _wrap(_SageMakerContainer, train=train, retrieve_artifacts=retrieve_artifacts)


def _wrap(owner: type, **wrappers: Any) -> None:
    """Put each wrapper in place of the SDK method of its name, marked so that installing again does nothing."""
    for name, new in wrappers.items():
        old = getattr(owner, name)
        new.__unetseg__ = True
        new.__doc__ = old.__doc__
        new.__wrapped__ = old
        setattr(owner, name, new)


# --- local endpoints and batch transforms ----------------------------------------------------------------------
# Stopping a local endpoint or finishing a local batch transform terminates `docker compose up`, which stops the
# container but leaves it behind (the SDK never runs `compose down`): one more stopped container each time.
# install_serving_cleanup() wraps the SDK's stop_serving: it notes the container names from the compose file the SDK
# wrote (which stop_serving deletes), lets the SDK stop them, then removes them.

def compose_container_names(container_root: str) -> list[str]:
    """The container names in <container_root>/docker-compose.yaml, or [] when there is none to read."""
    try:
        import yaml

        with open(os.path.join(container_root, "docker-compose.yaml")) as handle:
            services = (yaml.safe_load(handle) or {}).get("services", {})
        return [s["container_name"] for s in services.values() if s.get("container_name")]
    except Exception:  # noqa: BLE001 - tidying up must never break stopping
        return []


def remove_containers(names: list[str]) -> None:
    if names and shutil.which("docker"):
        done = subprocess.run(["docker", "rm", "-f", *names], capture_output=True, text=True)
        if done.returncode != 0:
            logger.warning("could not remove the local containers %s: %s", names, done.stderr.strip())


def install_serving_cleanup() -> None:
    """Make local endpoints and batch transforms remove their stopped containers (idempotent)."""
    from sagemaker.local.image import _SageMakerContainer

    if getattr(_SageMakerContainer.stop_serving, "__unetseg__", False):
        return
    sdk_stop_serving = _SageMakerContainer.stop_serving

    def stop_serving(self):
        names = compose_container_names(getattr(self, "container_root", None) or "")
        sdk_stop_serving(self)
        remove_containers(names)  # looked up at call time, so tests can observe it

    _wrap(_SageMakerContainer, stop_serving=stop_serving)
