"""The SageMaker SDK's noise in a notebook, cut to what is true: UNetEstimator and UNetPredictor call these.

Each is best effort against another SDK version: where the SDK's internals differ, its own behaviour stays.
"""

from __future__ import annotations

import logging
import sys


def quiet_v2_notice(class_name: str) -> None:
    """The SDK warns "<class> is part of the SageMaker Python SDK v2, which is on path of deprecation" naming the
    subclass, which reads as if UNetEstimator (or UNetPredictor) were deprecated. The package-level v2 notice on
    `import sagemaker` still shows; only this misleading per-class one is marked as already shown
    (sagemaker/deprecations.py)."""
    try:
        from sagemaker import deprecations

        deprecations._v2_deprecation_warned.add(class_name)
    except (ImportError, AttributeError):  # pragma: no cover - another SDK version: keep its warning
        pass


def keep_root_logging_quiet() -> None:
    """sagemaker/experiments/_metrics.py calls `logging.basicConfig(level=INFO)` when first imported, which fit()
    does: from then on every library's INFO records print in a notebook (botocore's endpoint lookups among them).
    Import it now, and put the root logger back as it was."""
    if "sagemaker.experiments._metrics" in sys.modules:
        return
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        import sagemaker.experiments._metrics  # noqa: F401
    except ImportError:  # pragma: no cover - another SDK version
        return
    if root.handlers != handlers:
        root.handlers[:] = handlers
        root.setLevel(level)
