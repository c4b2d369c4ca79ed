"""Which processes hear a stop request: those that registered here, never every process in the container.

SageMaker stops a job with SIGTERM to PID 1 (entry/init.py). Passing it to every process also reaches DataLoader
workers, and a worker that anyone but its parent signals dies, making the training process fail ("DataLoader worker
(pid N) is killed by signal: Terminated") instead of checkpointing. So the processes that act on a stop (the training
process; under torchrun, each rank and the supervisor) register here, and whoever passes a stop on signals only them.
Their workers end the normal way, from their parent.

The registry is a folder, named in the environment (STOP_REGISTRY_ENV) so that every descendant finds it. A
registration is a file named by the pid that holds the process's start time: a pid that a dead process left behind
and the kernel gave to another is not signalled. Standard library only: PID 1 imports this.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from ..contract.sagemaker_env import STOP_REGISTRY_ENV


def folder() -> Optional[Path]:
    """The registry this process inherited, if any."""
    value = os.environ.get(STOP_REGISTRY_ENV)
    return Path(value) if value else None


def create() -> Path:
    """A new registry; its creator hands `announce(path)` to the processes it starts."""
    return Path(tempfile.mkdtemp(prefix="unetseg-stop-"))


def announce(registry: Path) -> dict[str, str]:
    """This process's environment, naming `registry` for the children started with it."""
    return {**os.environ, STOP_REGISTRY_ENV: str(registry)}


@contextlib.contextmanager
def registered(registry: Optional[Path]) -> Iterator[None]:
    """This process hears stop requests while the block runs (nothing happens without a registry)."""
    if registry is None:
        yield
        return
    pid = os.getpid()
    entry = registry / str(pid)
    try:
        entry.write_text(_start_time(pid))
    except OSError as exc:  # training goes on; only a stop would then find it unprepared
        print(f"could not register for stop requests in {registry}: {exc}", file=sys.stderr)
        yield
        return
    try:
        yield
    finally:
        if os.getpid() == pid:  # not in a forked child that unwinds this frame
            entry.unlink(missing_ok=True)


def members(registry: Path) -> list[int]:
    """The live registered processes, this one excluded."""
    pids = []
    for entry in registry.glob("[0-9]*"):
        pid = int(entry.name)
        try:
            started = entry.read_text()
        except FileNotFoundError:  # unregistered meanwhile
            continue
        if pid != os.getpid() and _start_time(pid) == started:  # without /proc both read "": kill() then tells
            pids.append(pid)
    return sorted(pids)


def send(registry: Optional[Path], signum: int, skip: frozenset[int] = frozenset()) -> list[int]:
    """Signal every registered process not in `skip`; the pids signalled."""
    sent = []
    for pid in members(registry) if registry is not None and registry.is_dir() else []:
        if pid in skip:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            sent.append(pid)
    return sent


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), "" when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3

