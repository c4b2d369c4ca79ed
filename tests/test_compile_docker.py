"""compile=true inside the training image, on the CPU: torch.compile's Inductor builds C++ kernels at run time, so
the image must keep a C++ compiler and Python's headers (entry/Dockerfile; the CI base gets them from Debian in
ci/build-base-image.sh). A GPU job needs them too: Triton compiles its launcher with gcc.

`docker run <image> train` as SageMaker starts a job (hostname algo-1, /opt/ml's parts mounted, no network), with a
tiny model for one epoch; Inductor's cache goes to a mounted folder, so that the kernels it built can be counted.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

import docker_support
from docker_support import docker
from support import TINY, opt_ml_tree
from unetseg.synthetic import make_demo_dataset

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HPS = {**TINY, "epochs": 1, "seed": 3, "compile": True, "num_workers": 0}
CACHE = "/opt/ml/output/data/inductor"  # TORCHINDUCTOR_CACHE_DIR inside the container, a mounted folder


def test_compile_true_trains_in_the_image_on_the_cpu(tmp_path):
    image = docker_support.training_image("unetseg:ci")
    data = make_demo_dataset(tmp_path / "data", kind="binary", train=8, validation=4, size=32)
    tree = opt_ml_tree(tmp_path / "ml", HPS, {"train": data / "train", "validation": data / "validation"})
    name = f"unetseg-ci-compile-{uuid.uuid4().hex[:8]}"
    mounts = [arg for sub in ("input", "model", "output", "checkpoints")
              for arg in ("-v", f"{tree / sub}:/opt/ml/{sub}")]
    # As test_local_mode_docker.run_train: no network, and a hosts line for algo-1 (the toolkit waits for its name).
    cmd = ["docker", "run", "--name", name, "--hostname", "algo-1", "--network", "none", "--add-host",
           "algo-1:127.0.0.1", "-e", "OMP_NUM_THREADS=2", "-e", f"TORCHINDUCTOR_CACHE_DIR={CACHE}", *mounts,
           image, "train"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    finally:
        docker("rm", "-f", name, check=False)
    log = proc.stdout + proc.stderr
    failure = tree / "output" / "failure"
    assert proc.returncode == 0, (failure.read_text()[:2000] if failure.exists() else "") + log[-4000:]
    assert (tree / "model" / "model.safetensors").is_file()
    assert "epoch=1 " in log and "val_miou=" in log
    kernels = list((tree / "output" / "data" / "inductor").rglob("*.so"))
    assert kernels, f"Inductor built no C++ kernel: compile=true did not compile\n{log[-3000:]}"
    print(f"compile=true in {image}: trained one epoch on the CPU; Inductor built {len(kernels)} C++ kernel(s)")
