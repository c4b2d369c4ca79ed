"""Small synthetic files for tests: every test makes its own data, so the suite passes anywhere."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
from PIL import Image

from unetseg.contract.sagemaker_env import (
    CHANNEL_ENV_PREFIX,
    CHANNELS_ENV,
    CURRENT_HOST_ENV,
    HOSTS_ENV,
    INPUT_CONFIG_DIR_ENV,
    MODEL_DIR_ENV,
    NUM_GPUS_ENV,
    OPT_ML_ENV,
    OUTPUT_DATA_DIR_ENV,
    OUTPUT_DIR_ENV,
)

REPO = Path(__file__).resolve().parents[1]

# What only the engine may import: a notebook's client and the contract import none of them (tests/test_layers.py).
ENGINE_ONLY_MODULES = ("torch", "torchvision", "segmentation_models_pytorch", "timm", "albumentations", "cv2")

# A small, fast model for CPU tests: resnet18 stem + 2 stages, a three-level decoder, 32-64 px crops.
TINY = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8], "encoder_weights": None,
        "image_size": 32, "batch_size": 4, "augment": "light", "lr": 0.003}


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def wsgi_call(app: Any, path: str = "/invocations", body: bytes = b"", content_type: Optional[str] = None,
              accept: Optional[str] = None, method: str = "POST", attrs: Optional[str] = None,
              environ: Optional[dict] = None) -> Answer:
    """One request through a WSGI app, with the environ gunicorn builds (attrs: SageMaker's custom attributes header;
    environ: entries that replace or add to the usual ones)."""
    env = {"PATH_INFO": path, "REQUEST_METHOD": method, "CONTENT_LENGTH": str(len(body)),
           "wsgi.input": io.BytesIO(body)}
    for key, value in (("CONTENT_TYPE", content_type), ("HTTP_ACCEPT", accept),
                       ("HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES", attrs)):
        if value is not None:
            env[key] = value
    env.update(environ or {})
    seen = {}
    payload = b"".join(app(env, lambda status, headers: seen.update(status=int(status[:3]), headers=dict(headers))))
    return Answer(seen["status"], seen["headers"], payload)


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, image_ext: str = ".png",
               mask_ext: str = ".png") -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image_path, mask_path = root / "images" / f"{stem}{image_ext}", root / "masks" / f"{stem}{mask_ext}"
    save(image_path, image)
    save(mask_path, mask)
    return image_path, mask_path


def save(path: Path, array: np.ndarray) -> None:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, array)
    elif array.dtype == np.uint16 and array.ndim == 3:
        import cv2

        cv2.imwrite(str(path), array[..., ::-1])
    else:
        Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).save(path)


def random_pair(rng: np.random.Generator, size: int = 32, channels: int = 3, classes: int = 2):
    image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    mask = rng.integers(0, classes, (size, size), dtype=np.uint8)
    return image, mask


def make_channel(root: Path, count: int = 4, size: int = 32, channels: int = 3, classes: int = 2,
                 seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        write_pair(root, f"s{i:02d}", *random_pair(rng, size, channels, classes))
    return root


def opt_ml_tree(root: Path, hyperparameters: Mapping[str, object], channels: Mapping[str, Path],
                host: str = "algo-1", copy_channels: bool = True) -> Path:
    """/opt/ml as SageMaker lays it out for `train`: config JSONs (hyperparameters as strings), the channel folders
    copied in (File mode; copy_channels=False leaves them where they are, for sagemaker_tree), and empty
    checkpoints/ (the checkpoint_s3_uri sync target), model/ and output/data/."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()}
    (config / "hyperparameters.json").write_text(json.dumps(strings))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": host, "hosts": [host], "network_interface_name": "eth0", "current_instance_type": "local"}))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {name: {"TrainingInputMode": "File"} for name in channels}))
    if copy_channels:
        for name, folder in channels.items():
            shutil.copytree(folder, root / "input" / "data" / name)
    for sub in ("checkpoints", "model", "output/data"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def sagemaker_tree(root: Path, hyperparameters: Mapping[str, object], channels: Mapping[str, Path]) -> dict[str, str]:
    """An opt_ml_tree() and the environment SageMaker's training toolkit would give the script, for running
    entry/train.py on this machine; the channels are read where they are."""
    opt_ml_tree(root, hyperparameters, channels, copy_channels=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update({
        OPT_ML_ENV: str(root),
        MODEL_DIR_ENV: str(root / "model"), OUTPUT_DATA_DIR_ENV: str(root / "output" / "data"),
        OUTPUT_DIR_ENV: str(root / "output"), INPUT_CONFIG_DIR_ENV: str(root / "input" / "config"),
        CHANNELS_ENV: json.dumps(sorted(channels)), HOSTS_ENV: json.dumps(["algo-1"]), CURRENT_HOST_ENV: "algo-1",
        NUM_GPUS_ENV: "0", "OMP_NUM_THREADS": "1",
    })
    for name, path in channels.items():
        env[CHANNEL_ENV_PREFIX + name.upper()] = str(path)
    return env


def run_entry(env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "entry" / "train.py")], env=env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
