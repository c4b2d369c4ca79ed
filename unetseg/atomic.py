"""Write a file so that readers see the old version or the new one, never half of one (no torch here)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Optional


def replace_atomically(path: Path, write: Callable[[Path], object], staging: Optional[Path] = None) -> None:
    """`write(tmp)` to a temporary file, flush it to disk, then rename it over `path`.

    A kill (SIGKILL after SageMaker's SIGTERM, a spot reclaim) mid-write leaves the previous file intact. The
    temporary file goes beside `path`, or into `staging` when `path`'s folder is synced elsewhere: SageMaker uploads
    whatever appears in the checkpoint folder, and restores all of it on a restart, half-written files included.
    A rename cannot cross filesystems (EXDEV): the finished file is then copied beside `path` under one fixed
    temporary name and renamed there, so that a kill during the copy leaves at most that one file, which the next
    write replaces, instead of one more orphan per restart.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (staging or path.parent) / f".{path.name}.tmp.{os.getpid()}"
    try:
        write(tmp)
        _flush(tmp)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            near = path.with_name(f".{path.name}.partial")
            shutil.copyfile(tmp, near)
            _flush(near)
            os.replace(near, path)
    finally:
        tmp.unlink(missing_ok=True)


def _flush(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
