"""entry/init.py, the image's PID 1: it runs the command, passes SIGTERM on, and returns the command's status.

Here it runs as an ordinary process (it then signals only the command's own session); the Docker tests prove the
PID 1 path, where the SageMaker toolkit sits between it and the training process.
"""

import signal
import subprocess
import sys
import time

from support import REPO

INIT = [sys.executable, str(REPO / "entry" / "init.py")]

# A command that, like the training loop, finishes its work when SIGTERM arrives, then exits 0; its grandchild
# (the toolkit runs the training script as a child) must get the signal too.
GRACEFUL = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], "w").write("saved"), sys.exit(0)))
print("ready", flush=True)
time.sleep(60)
''', sys.argv[1]])
signal.signal(signal.SIGTERM, lambda *a: None)
child.wait()
"""


def test_sigterm_reaches_the_grandchild_and_the_status_comes_back(tmp_path):
    marker = tmp_path / "checkpoint"
    proc = subprocess.Popen([*INIT, sys.executable, "-c", GRACEFUL, str(marker)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert marker.read_text() == "saved"


def test_exit_codes_pass_through():
    assert subprocess.run([*INIT, sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    killed = subprocess.run([*INIT, sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.returncode == 128 + signal.SIGKILL
    assert subprocess.run(INIT, capture_output=True).returncode == 2


def test_a_command_that_ignores_sigterm_keeps_running_until_it_ends(tmp_path):
    start = time.time()
    proc = subprocess.Popen([*INIT, sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(2)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0 and time.time() - start >= 2
