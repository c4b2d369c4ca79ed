"""The errors a user sees. Each names the thing at fault (a hyperparameter, a file, a field)."""

from __future__ import annotations

import errno
import os
from typing import Optional


class UnetsegError(Exception):
    """Base class: an error caused by the user's input, reported without a stack trace where possible."""


class ConfigError(UnetsegError, ValueError):
    """A hyperparameter or setting is unknown or has a bad value."""


class DataError(UnetsegError, ValueError):
    """A dataset file or folder is missing, unreadable, or inconsistent with the config."""


class ImageTooLargeError(DataError):
    """An image declares (in its header) more decoded bytes than the limit allows; nothing was decoded."""


class ArtifactError(UnetsegError, ValueError):
    """A model artifact (folder or model.tar.gz) is missing or malformed."""


class UsageError(UnetsegError, ValueError):
    """A command-line argument has a bad value."""


class OutputError(UnetsegError):
    """An output folder or file cannot be written: not a folder, read-only, full."""



# Why a write failed, in the words a user acts on (os.strerror's for other codes).
WRITE_FAILURES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "file too large (a file size limit applies)", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def write_failure_reason(code: Optional[int], fallback: object = "") -> str:
    if code in WRITE_FAILURES:
        return WRITE_FAILURES[code]
    return os.strerror(code) if code else str(fallback)[:200]
