#!/usr/bin/env python3
"""PID 1 of the unetseg image: runs the command SageMaker gives (`train` or `serve`) and passes signals on.

Why: SageMaker stops a job (spot reclaim, StopTrainingJob) with SIGTERM to PID 1, then SIGKILL 120 s later. As PID 1
the training toolkit would ignore SIGTERM (the kernel drops default-action signals to a namespace's init), and it
does not forward signals anyway, so the training process would never get the chance to checkpoint.

Who gets a signal: the command itself (the toolkit, which dies of it, or the server) and every process registered
in the stop registry (unetseg/container/stop_registry.py: the training process; under torchrun, each rank and the
supervisor), including those that register after the request came. Never the others: a DataLoader worker signalled by
anyone but its parent makes the training process fail instead of checkpointing. As PID 1 it reaps orphans and exits
only when every process is gone, so a training process that outlives the toolkit still finishes writing its
checkpoint.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

from unetseg.container import stop_registry
from unetseg.contract.sagemaker_env import stopped_exit_code

POLL_S = 0.2  # how often it looks for ended processes and for processes that registered after a stop request


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: unetseg-init COMMAND [ARGS...]  (SageMaker passes train or serve)", file=sys.stderr)
        return 2
    as_init = os.getpid() == 1
    registry = stop_registry.create()  # the command and its descendants find it in their environment
    child, code = None, None
    request, told = None, set()  # the latest request, and who has heard it

    def deliver():  # to whoever has not heard the latest request: at once, and later to those who register after it
        if child is not None and code is None and child.pid not in told:  # not yet waited for: its pid is its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, request)
            told.add(child.pid)
        told.update(stop_registry.send(registry, request, skip=frozenset(told)))

    def on_signal(signum, _frame):
        nonlocal request, told
        request, told = signum, set()
        deliver()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # before the command starts: none may be lost
        signal.signal(sig, on_signal)
    child = subprocess.Popen(sys.argv[1:], start_new_session=not as_init, env=stop_registry.announce(registry))
    try:
        while True:
            if request is not None:
                deliver()
            try:
                pid, status = os.waitpid(-1 if as_init else child.pid, os.WNOHANG)
            except ChildProcessError:  # nothing left to wait for (not as PID 1: the command has been waited for)
                if as_init or not stop_registry.members(registry):
                    break
                pid = 0  # registered processes the command left behind are still running
            if pid == child.pid:
                code = os.waitstatus_to_exitcode(status)
            elif pid == 0:
                time.sleep(POLL_S)
    finally:
        shutil.rmtree(registry, ignore_errors=True)
    if code is None:
        code = 1
    return code if code >= 0 else stopped_exit_code(-code)  # killed by signal N


if __name__ == "__main__":
    sys.exit(main())
