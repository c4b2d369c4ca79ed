"""Commands whose processes must all end with the test, even when it fails: torchrun starts each rank in a session
of its own, so killing the command after a timeout would leave ranks waiting in a collective for half an hour
(gloo's timeout), and a process whose parent dies (the toolkit, on a stop) leaves the tree below the command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, and so on (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _started(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


@contextlib.contextmanager
def deadline(proc: subprocess.Popen, seconds: float) -> Iterator[threading.Event]:
    """SIGKILL `proc` and every process seen below it, if it still runs `seconds` from now; its pipes then close, so a
    loop reading its output ends. Processes are remembered with their start time: a pid reused meanwhile is spared.
    Yields an event, set if the deadline struck."""
    seen: dict[int, str] = {}
    done, expired = threading.Event(), threading.Event()

    def watch() -> None:
        end = time.monotonic() + seconds
        while not done.wait(0.5):
            seen.update({pid: _started(pid) for pid in descendants(proc.pid) if pid not in seen})
            if time.monotonic() > end:
                expired.set()
                for pid, started in seen.items():
                    if started and _started(pid) == started:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                proc.kill()
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield expired
    finally:
        done.set()
        thread.join()


def run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, timeout=timeout), but a timeout kills the whole tree;
    TimeoutExpired then carries what the command printed until then."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with deadline(proc, timeout) as expired:
        out, err = proc.communicate()
    if expired.is_set():
        raise subprocess.TimeoutExpired(command, timeout, out, err)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
