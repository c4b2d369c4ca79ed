"""Write a file so that readers see the old version or the new one, never half of one (no torch here).

Every file a run writes (checkpoints, the model, the failure file) goes through `replace_atomically`, which is also
the one place that turns a failed write into one error naming the file and the reason: `WriteFailed`.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .contract.errors import OutputError, write_failure_reason

# The first words of a WriteFailed message, by errno: "disk full writing /opt/ml/checkpoints/last.pt: ..."
HEADLINES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


class WriteFailed(OutputError, OSError):
    """A file could not be written: `path` (the file meant, not its temporary copy), `errno` and the reason. Its
    partial copies are gone: the space they took is free again."""

    def __init__(self, path: Path, code: int, cause: BaseException, where: Optional[Path] = None):
        OSError.__init__(self, code, write_failure_reason(code, cause), str(path))
        self.path = Path(path)
        self.where = where  # the folder the write failed in, when it is not the file's own (a staging folder)

    def __str__(self) -> str:
        via = f" (through its temporary copy in {self.where})" if self.where else ""
        return f"{HEADLINES.get(self.errno, 'error')} writing {self.path}{via}: {self.strerror}"

    def __reduce__(self):  # an OSError pickles as (errno, strerror, filename): keep this class's own arguments
        return type(self), (self.path, self.errno, self.strerror, self.where)


def replace_atomically(path: Path, write: Callable[[Path], object], staging: Optional[Path] = None) -> None:
    """`write(tmp)` to a temporary file, flush it to disk, then rename it over `path`.

    A kill (SIGKILL after SageMaker's SIGTERM, a spot reclaim) mid-write leaves the previous file intact. The
    temporary file goes beside `path`, or into `staging` when `path`'s folder is synced elsewhere: SageMaker uploads
    whatever appears in the checkpoint folder, and restores all of it on a restart, half-written files included.
    A rename cannot cross filesystems (EXDEV): the finished file is then copied beside `path` under one fixed
    temporary name and renamed there, so that a kill during the copy leaves at most that one file, which the next
    write replaces, instead of one more orphan per restart.

    A write that fails (disk full, quota, a file size limit, read-only, permission) raises WriteFailed naming `path`,
    with the partial files removed; any other error (a bug in `write`) passes through as it is.
    """
    tmp = (staging or path.parent) / f".{path.name}.tmp.{os.getpid()}"
    near = path.with_name(f".{path.name}.partial")
    writing = path  # the file being written when a failure comes
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writing = tmp
        write(tmp)
        _flush(tmp)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            writing = near
            shutil.copyfile(tmp, near)
            _flush(near)
            os.replace(near, path)
    except Exception as exc:
        code = failure_errno(exc, writing)  # before the partial files go: they may be what filled the disk
        if code is None:
            raise
        where = writing.parent if writing.parent != path.parent else None
        raise WriteFailed(path, code, exc, where) from exc
    finally:
        tmp.unlink(missing_ok=True)
        if writing == near:
            near.unlink(missing_ok=True)


def failure_errno(exc: BaseException, writing: Path) -> Optional[int]:
    """The errno of a failed write of `writing`, None when `exc` is no write failure.

    Writers do not all say: torch.save reports "unexpected pos", safetensors an "(os error N)" in its text. Without a
    code, the file system is asked: a file at the size limit, a full disk, a folder that takes no more bytes."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(exc))
    if found:
        return int(found.group(1) or found.group(2))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        if limit != resource.RLIM_INFINITY and writing.stat().st_size >= limit:
            return errno.EFBIG
    except OSError:
        pass
    folder = writing.parent
    try:
        stats = os.statvfs(folder)
        if stats.f_bavail * stats.f_frsize < 1 << 20:
            return errno.ENOSPC
        with tempfile.TemporaryFile(dir=folder) as probe:  # a quota shows only when a block is taken
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as probe_error:
        return probe_error.errno
    return None


def _flush(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
