"""unetseg: train U-Net segmentation models on AWS SageMaker from a notebook, and locally.

`import unetseg` stays light (no torch, no SageMaker SDK) until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .contract.config import TrainConfig
from .contract.errors import ArtifactError, ConfigError, DataError, UnetsegError

_LAZY = {
    "UNetEstimator": "unetseg.client.estimator",
    "load_model": "unetseg.runtime",
    "Segmenter": "unetseg.segmenter",
    "make_demo_dataset": "unetseg.synthetic",
}

if TYPE_CHECKING:  # pragma: no cover
    from .client.estimator import UNetEstimator  # noqa: F401
    from .runtime import load_model  # noqa: F401
    from .segmenter import Segmenter  # noqa: F401
    from .synthetic import make_demo_dataset  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unetseg' has no attribute {name!r}")


__all__ = ["TrainConfig", "ConfigError", "DataError", "ArtifactError", "UnetsegError", *_LAZY]
