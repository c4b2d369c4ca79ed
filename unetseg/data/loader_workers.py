"""How DataLoader workers start: forked from the training process (they share its memory, so the image cache costs
nothing per worker), or forked from a fork server where forking the training process can deadlock the worker.

CPython before 3.11.10 (3.10.15, 3.9.20, 3.8.20; 3.12 is not affected) can deadlock a child forked while another
thread is creating a Python thread state: the child waits forever for the runtime's lock in PyOS_AfterFork_Child,
before it runs a line of Python (CPython gh-112275). Native threads create one each time they call into Python:
gloo's and NCCL's when a collective drops the last reference to a tensor Python holds, CUDA's autograd threads. Seen
here with two gloo processes and two loader workers each: about one run in 50 on a loaded machine, a validation
worker stuck at its start, the other rank waiting in the next all-reduce until the job's time ran out. Debian 12
ships 3.11.2, so the CI image has it too.

A fork server is a fresh interpreter (started by fork + exec, which is safe), single-threaded, that forks the workers.
Its cost: each worker receives its own pickled copy of the dataset, so the cache's memory budget counts one copy per
worker (`copies_per_process`). Where the interpreter is fixed, workers fork from the training process as before.
UNETSEG_LOADER_START=fork|forkserver overrides the choice (tests run both ways on one interpreter).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Optional

from ..contract.sagemaker_env import LOADER_START_ENV

START_METHODS = ("fork", "forkserver")
# The first release of each affected minor version with the fix for gh-112275.
FIXED_IN = {(3, 8): 20, (3, 9): 20, (3, 10): 15, (3, 11): 10}
# What a worker needs, imported once in the fork server instead of in each worker (torch, albumentations, cv2).
PRELOAD = ["unetseg.data.dataset", "unetseg.data.transforms"]


def fork_can_deadlock(version: tuple = tuple(sys.version_info[:3]), implementation: str = sys.implementation.name
                      ) -> bool:
    """Whether this interpreter can deadlock a child forked beside a thread that enters Python (gh-112275)."""
    if implementation != "cpython" or tuple(version[:2]) >= (3, 12):
        return False
    fixed = FIXED_IN.get(tuple(version[:2]))
    return fixed is None or version[2] < fixed


def start_method() -> str:
    """'fork' or 'forkserver': UNETSEG_LOADER_START when set, else by what this interpreter can do safely."""
    chosen = os.environ.get(LOADER_START_ENV, "").strip()
    if chosen:
        if chosen not in START_METHODS:
            raise ValueError(f"{LOADER_START_ENV}={chosen!r}: choose one of {', '.join(START_METHODS)}")
        return chosen
    return "forkserver" if fork_can_deadlock() else "fork"


def context(workers: int) -> Optional[multiprocessing.context.BaseContext]:
    """The DataLoader's multiprocessing_context for `workers` workers (None without workers)."""
    if workers <= 0:
        return None
    method = start_method()
    found = multiprocessing.get_context(method)
    if method == "forkserver":
        found.set_forkserver_preload(PRELOAD)  # read when the server starts: the first time only
    return found


def describe(workers: int) -> str:
    """The training log's words for the loader workers."""
    said = f"{workers} loader workers"
    if workers > 0 and start_method() == "forkserver" and fork_can_deadlock():
        said += (f" (started by a fork server: Python {'.'.join(map(str, sys.version_info[:3]))} can deadlock a worker "
                 "forked beside the process group's threads, CPython gh-112275; each worker holds its own copy of the "
                 "data)")
    return said


def copies_per_process(workers: int) -> int:
    """The copies of a training process's dataset in memory: its own, and one per worker under a fork server."""
    return 1 + workers if workers > 0 and start_method() == "forkserver" else 1
