"""Helpers for the tests that drive a real Docker engine with the unetseg training image.

- `engine_or_skip()`: the docker CLI, after checking an engine answers; a skip with the reason otherwise, or a failure
  under UNETSEG_REQUIRE_DOCKER=1 (CI), where a skip would hide a broken setup.
- `ci_base_image()`: the registry-free CI base (ci/build-base-image.sh): $UNETSEG_CI_BASE, else the newest
  `unetseg-ci-base:<hash>` tag.
- `opt_ml_tree()`: an /opt/ml folder as SageMaker lays it out for `docker run <image> train`.
- `internal_network()` / `remove_network()`: the `sagemaker-local` network that the SDK's local mode joins, made
  `--internal` so that no container reaches beyond this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

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


def opt_ml_tree(root: Path, hyperparameters: Mapping[str, object], channels: Mapping[str, Path],
                host: str = "algo-1") -> Path:
    """/opt/ml as SageMaker hands it to `train`: config JSONs (hyperparameters as strings), channel folders copied
    in (File mode), and an empty checkpoints/ (the checkpoint_s3_uri sync target)."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()}
    (config / "hyperparameters.json").write_text(json.dumps(strings))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": host, "hosts": [host], "network_interface_name": "eth0", "current_instance_type": "local"}))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {name: {"TrainingInputMode": "File"} for name in channels}))
    for name, folder in channels.items():
        shutil.copytree(folder, root / "input" / "data" / name)
    for sub in ("checkpoints", "model", "output/data"):
        (root / sub).mkdir(parents=True)
    return root


def network_info(name: str = LOCAL_NETWORK) -> dict | None:
    proc = docker("network", "inspect", name, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def internal_network(name: str = LOCAL_NETWORK) -> dict:
    """Create `name` as an internal bridge (containers reach each other, nothing else); an existing non-internal one
    with no containers on it is replaced. Compose then finds it by name and uses it: the SDK's compose file declares
    no `internal` key, which Compose v1 and v2 then leave unchecked."""
    info = network_info(name)
    if info is not None and not info.get("Internal"):
        if info.get("Containers"):
            pytest.fail(f"network {name} exists, is not internal and has containers on it "
                        f"({', '.join(c['Name'] for c in info['Containers'].values())}); stop them and retry")
        docker("network", "rm", name)
        info = None
    if info is None:
        docker("network", "create", "--internal", "--driver", "bridge", name)
        info = network_info(name)
    assert info and info["Internal"], info
    return info


def containers_on(name: str = LOCAL_NETWORK) -> list[str]:
    """Ids of containers attached to network `name`, stopped ones included."""
    return docker("ps", "-aq", "--filter", f"network={name}").stdout.split()


def remove_containers(ids: Sequence[str]) -> None:
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)


def remove_network(name: str = LOCAL_NETWORK) -> None:
    remove_containers(containers_on(name))
    docker("network", "rm", name, check=False)
