"""Helpers for the tests that drive a real Docker engine with the unetseg training image.

- `engine_or_skip()`: the docker CLI, after checking an engine answers; a skip with the reason otherwise, or a failure
  under UNETSEG_REQUIRE_DOCKER=1 (CI), where a skip would hide a broken setup.
- `ci_base_image()`: the registry-free CI base (ci/build-base-image.sh): $UNETSEG_CI_BASE, else the newest
  `unetseg-ci-base:<hash>` tag.
- `training_image()`: `unetseg:ci` built from entry/Dockerfile on the CI base, offline; once per test session.
- `internal_network()` / `remove_network()`: the `sagemaker-local` network that the SDK's local mode joins, made
  `--internal` so that no container reaches beyond this machine.
- `bridge_network()`: the same network as a plain bridge, for local endpoints and batch transform: Docker publishes
  no ports from an internal network, and the SDK reaches the serving container on the host's port 8080. The engine's
  DOCKER-USER rule (ci/start-dockerd.sh) still refuses traffic beyond this machine.
- `require_free_port()`: fails naming what holds a host port that a container must publish.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

import pytest

REQUIRE_ENV = "UNETSEG_REQUIRE_DOCKER"
BASE_ENV = "UNETSEG_CI_BASE"
BASE_REPOSITORY = "unetseg-ci-base"
LOCAL_NETWORK = "sagemaker-local"  # sagemaker/local/image.py: the compose file's network, `name: sagemaker-local`


def unavailable(why: str) -> None:
    """Skip with `why`, or fail where CI requires Docker."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {why}")
    pytest.skip(f"{why} (CI sets {REQUIRE_ENV}=1 and makes this a failure)")


def engine_or_skip() -> str:
    exe = shutil.which("docker")
    if not exe:
        unavailable("no docker command on PATH: install Docker, or start CI's engine with ci/start-dockerd.sh")
    proc = subprocess.run([exe, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        detail = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        unavailable(f"no Docker engine answers ({detail}): start one with ci/start-dockerd.sh")
    return exe


def docker(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def ci_base_image() -> str:
    """$UNETSEG_CI_BASE, else the newest unetseg-ci-base:<hash>; skips (or fails in CI) when there is none."""
    named = os.environ.get(BASE_ENV)
    if named:
        if docker("image", "inspect", named, check=False).returncode != 0:
            unavailable(f"{BASE_ENV}={named} names no local image: build it with `bash ci/build-base-image.sh`")
        return named
    listing = docker("images", BASE_REPOSITORY, "--format", "{{.Tag}}\t{{.CreatedAt}}").stdout.splitlines()
    tags = sorted((line.split("\t") for line in listing if line and not line.startswith(("latest\t", "<none>\t"))),
                  key=lambda row: row[1], reverse=True)
    if not tags:
        unavailable(f"no {BASE_REPOSITORY}:<hash> image: build it with `bash ci/build-base-image.sh` "
                    f"(or name one in ${BASE_ENV})")
    return f"{BASE_REPOSITORY}:{tags[0][0]}"


def network_info(name: str = LOCAL_NETWORK) -> dict | None:
    proc = docker("network", "inspect", name, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def internal_network(name: str = LOCAL_NETWORK) -> dict:
    """Create `name` as an internal bridge (containers reach each other, nothing else); an existing non-internal one
    with no containers on it is replaced. Compose then finds it by name and uses it: the SDK's compose file declares
    no `internal` key, which Compose v1 and v2 then leave unchecked."""
    return _bridge(name, internal=True)


def bridge_network(name: str = LOCAL_NETWORK) -> dict:
    """Create `name` as a plain bridge, whose containers can publish ports on the host (an internal network publishes
    none); an existing internal one with no containers on it is replaced."""
    return _bridge(name, internal=False)


def _bridge(name: str, internal: bool) -> dict:
    kind = "internal" if internal else "not internal"
    info = network_info(name)
    if info is not None and bool(info.get("Internal")) != internal:
        if info.get("Containers"):  # running ones; Docker removes a network that only stopped containers name
            pytest.fail(f"network {name} exists, is {'not ' if internal else ''}internal and has containers on it "
                        f"({', '.join(c['Name'] for c in info['Containers'].values())}); another Docker test may "
                        f"be running: wait for it, or stop them, and retry")
        docker("network", "rm", name)
        info = None
    if info is None:
        docker("network", "create", *(["--internal"] if internal else []), "--driver", "bridge", name)
        info = network_info(name)
    assert info and bool(info["Internal"]) == internal, (kind, info)
    return info


@contextlib.contextmanager
def sagemaker_local_network(internal: bool):
    """`sagemaker-local` for the SDK's compose files (internal: no published ports, nothing reachable outside), after
    checking that a Compose exists; the containers started meanwhile, and the network when empty, removed after."""
    from unetseg.client.local_mode import compose_command

    try:
        compose_command()
    except ImportError as exc:  # neither `docker compose` (v2+) nor docker-compose
        unavailable(str(exc))
    before = set(containers_on())
    info = internal_network() if internal else bridge_network()
    try:
        yield info
    finally:
        remove_containers([c for c in containers_on() if c not in before])
        if not containers_on():
            remove_network()


def containers_on(name: str = LOCAL_NETWORK) -> list[str]:
    """Ids of containers attached to network `name`, stopped ones included."""
    return docker("ps", "-aq", "--filter", f"network={name}").stdout.split()


def remove_containers(ids: Sequence[str]) -> None:
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)


def remove_network(name: str = LOCAL_NETWORK) -> None:
    remove_containers(containers_on(name))
    docker("network", "rm", name, check=False)


@functools.cache
def training_image(tag: str = "unetseg:ci") -> str:
    """`tag`, built from entry/Dockerfile on the CI base with no network (seconds when Docker's cache has it); built
    once per test session whichever module asks first."""
    engine_or_skip()
    from unetseg.client.docker_image import ImageError, build_image

    base = ci_base_image()
    started = time.monotonic()
    try:
        build_image(tag, base_image=base, network="none", out=None)
    except ImageError as exc:
        pytest.fail(f"building {tag} on {base} failed: {exc}\n" + "\n".join(exc.log_tail))
    print(f"built {tag} on {base} in {time.monotonic() - started:.0f}s")
    return tag


def port_in_use(port: int) -> str | None:
    """Why a container could not publish `port` on the host, or None: something listens there, or a container
    already publishes it."""
    publishers = docker("ps", "--filter", f"publish={port}", "--format", "{{.Names}}", check=False).stdout.split()
    if publishers:
        return f"container(s) {', '.join(publishers)} publish it"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as docker-proxy binds: TIME_WAIT is no obstacle
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            return f"a process on this machine listens on it ({exc.strerror})"
    return None


def require_free_port(port: int, what: str) -> None:
    """Fail (not skip: the engine is there) naming what holds `port`, which `what` needs."""
    why = port_in_use(port)
    if why:
        pytest.fail(f"{what} needs host port {port}, but {why}; free it (`ss -ltnp 'sport = :{port}'`, "
                    f"`docker ps --filter publish={port}`) and retry")


