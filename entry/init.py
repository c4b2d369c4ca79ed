#!/usr/bin/env python3
"""PID 1 of the unetseg image: runs the command SageMaker gives (`train` or `serve`) and passes signals on.

Why: SageMaker stops a job (spot reclaim, StopTrainingJob) with SIGTERM to PID 1, then SIGKILL 120 s later. As PID 1
the training toolkit would ignore SIGTERM (the kernel drops default-action signals to a namespace's init), and it
does not forward signals anyway, so the training process would never get the chance to checkpoint. This init sends
each SIGTERM/SIGINT to every process in the container, reaps orphans, and exits only when all of them are gone: a
training process that outlives the toolkit still finishes writing its checkpoint. Standard library only.
"""

import os
import signal
import subprocess
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: unetseg-init COMMAND [ARGS...]  (SageMaker passes train or serve)", file=sys.stderr)
        return 2
    as_init = os.getpid() == 1
    child = subprocess.Popen(sys.argv[1:], start_new_session=not as_init)

    def forward(signum, _frame):
        # kill(-1) reaches every process of the container's PID namespace but ourselves; outside a container
        # (not PID 1) only the command's own session is ours to signal.
        try:
            os.kill(-1, signum) if as_init else os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1 if as_init else child.pid, 0)
        except ChildProcessError:
            break  # nothing left to wait for
        except InterruptedError:
            continue
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            if not as_init:
                break
    if code is None:
        code = 1
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
