"""entry/init.py, the image's PID 1: it runs the command, passes SIGTERM on, and returns the command's status.

A stop must reach the processes that checkpoint (they register: unetseg/stop_registry.py) and the command itself, and
nothing else: a DataLoader worker signalled by anyone but its parent makes the training process fail. Each behaviour
runs twice: with init as an ordinary process, and as a real PID 1 in a PID namespace of its own (`unshare`, as root;
the Docker tests prove the same through `docker stop`).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import REPO

INIT = [sys.executable, str(REPO / "entry" / "init.py")]

# The SageMaker training toolkit's place in the tree: it runs the training script as its child, does not handle
# SIGTERM (it dies of it), and prints "ready" once the trainer has registered. argv: trainer script, marker folder.
TOOLKIT = """
import subprocess, sys
trainer = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(trainer.stdout.readline().strip(), flush=True)
sys.exit(trainer.wait())
"""

# A training process: registers for stop requests, starts a "loader worker" that records any SIGTERM it gets (torch's
# workers die of a SIGTERM that their parent did not send), and on SIGTERM saves, then exits 0, which ends the worker
# the normal way (its stdin closes). argv: marker folder, and optionally seconds to wait before registering.
TRAINER = """
import signal, subprocess, sys, time
from pathlib import Path
from unetseg.container import stop_registry
out = Path(sys.argv[1])
worker = subprocess.Popen([sys.executable, "-c", '''
import signal, sys
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *a: Path(sys.argv[1], "worker-got-sigterm").write_text("x"))
print("up", flush=True)
sys.stdin.read()
''', str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert worker.stdout.readline().strip() == "up"
signal.signal(signal.SIGTERM, lambda *a: ((out / "saved").write_text("checkpoint"), sys.exit(0)))
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
with stop_registry.registered(stop_registry.folder()):
    print("ready", flush=True)
    time.sleep(60)  # bounded: a test that fails leaves nothing running for long
"""


def can_be_pid1() -> bool:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(params=["process", "pid1"])
def start_init(request):
    """Start init with a command: as an ordinary process, or as PID 1 of a new PID namespace. Returns (Popen, the pid
    to signal, i.e. init's own pid as seen from here)."""
    started = []

    def start(*command: str) -> tuple[subprocess.Popen, int]:
        if request.param == "process":
            proc = subprocess.Popen([*INIT, *command], stdout=subprocess.PIPE, text=True)
            started.append(proc)
            return proc, proc.pid
        if not can_be_pid1():
            pytest.skip("cannot create a PID namespace here (`unshare --pid` needs root); the Docker tests cover PID 1")
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *INIT, *command],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        for _ in range(200):
            pids = children.read_text().split() if children.exists() else []
            if pids:
                return proc, int(pids[0])
            time.sleep(0.05)
        raise AssertionError("unshare started no init")

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_sigterm_reaches_the_registered_trainer_and_spares_its_workers(start_init, tmp_path):
    proc, init_pid = start_init(sys.executable, "-c", TOOLKIT, TRAINER, str(tmp_path))
    assert proc.stdout.readline().strip() == "ready"
    os.kill(init_pid, signal.SIGTERM)
    code = proc.wait(timeout=30)
    # init waited for the trainer (not only for the toolkit it started) before it exited
    assert (tmp_path / "saved").read_text() == "checkpoint"
    assert not (tmp_path / "worker-got-sigterm").exists(), "a stop reached the trainer's worker, not only the trainer"
    assert code == 128 + signal.SIGTERM  # the toolkit's status: it died of the SIGTERM, as SageMaker's does


@pytest.mark.slow
def test_a_trainer_that_registers_after_the_stop_request_still_hears_it(start_init, tmp_path):
    # The toolkit ignores SIGTERM here, so that the trainer it starts outlives the request; the trainer registers 1 s
    # after the request came.
    toolkit = TOOLKIT.replace("sys.argv[2]]", "sys.argv[2], '1']")  # the trainer waits 1 s before registering
    toolkit = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + toolkit
    toolkit = toolkit.replace('print(trainer.stdout.readline().strip(), flush=True)', 'print("started", flush=True)')
    proc, init_pid = start_init(sys.executable, "-c", toolkit, TRAINER, str(tmp_path))
    assert proc.stdout.readline().strip() == "started"
    os.kill(init_pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # the toolkit returns the trainer's 0
    assert (tmp_path / "saved").read_text() == "checkpoint"
    assert not (tmp_path / "worker-got-sigterm").exists()


@pytest.mark.slow
def test_exit_codes_pass_through():
    assert subprocess.run([*INIT, sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    killed = subprocess.run([*INIT, sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.returncode == 128 + signal.SIGKILL
    assert subprocess.run(INIT, capture_output=True).returncode == 2


@pytest.mark.slow
def test_a_command_that_ignores_sigterm_keeps_running_until_it_ends(tmp_path):
    start = time.time()
    deaf = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(2)")
    proc = subprocess.Popen([*INIT, sys.executable, "-c", deaf], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0 and time.time() - start >= 2
