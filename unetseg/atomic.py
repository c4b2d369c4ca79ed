"""Write a file so that readers see the old version or the new one, never half of one (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, flush it to disk, then rename it over `path`.

    A kill (SIGKILL after SageMaker's SIGTERM, a spot reclaim) mid-write leaves the previous file intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
