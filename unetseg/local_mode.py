"""Local mode (instance_type 'local' / 'local_gpu'): SageMaker's own Docker Compose runner, made to work today.

The SDK (sagemaker 2.257, sagemaker/local/image.py, `_SageMakerContainer._get_compose_cmd_prefix`) accepts the Compose
plugin only when `docker compose version` prints a string containing "v2", so Compose v3, v4 and v5 ("Docker Compose
version v5.0.0"), and distribution builds that print no "v" ("Docker Compose version 2.26.1"), fall through to the
standalone `docker-compose` or fail with "Docker Compose is not installed". It also lets a missing `docker` binary
escape as FileNotFoundError. `install_compose_detection()` replaces that one static method with a version parse that
accepts Compose 2 and later, and keeps the SDK's fallback to a standalone `docker-compose` (Debian's 1.29 included).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

logger = logging.getLogger(__name__)

_COMPOSE_VERSION = re.compile(r"version\s+v?(\d+)\.(\d+)", re.IGNORECASE)
_NOT_INSTALLED = (
    "Docker Compose is not installed. Local mode (instance_type='local' or 'local_gpu') runs the training image with "
    "Docker Compose: install the Compose plugin (`docker compose version` should print v2 or later) or the "
    "standalone docker-compose. See https://docs.docker.com/compose/install/"
)


sdk_compose_detection = None  # the SDK's own check, once install_compose_detection() has replaced it


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
