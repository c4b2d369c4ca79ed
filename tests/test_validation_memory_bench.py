"""bench/validation_memory.py stays runnable (in its smallest form): validation of one large image, tiled against a
whole-image pass. Memory, not time, is compared: tiling must need less."""

import re
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.slow


def test_validation_memory_bench_smoke():
    done = subprocess.run([sys.executable, "validation_memory.py", "--size", "1024", "--tile", "256"],
                          cwd=REPO / "bench", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = {mode: float(mib) for mode, mib in re.findall(r"(whole|tiled): peak RSS \+(\d+) MiB", done.stdout)}
    assert set(peaks) == {"whole", "tiled"}, done.stdout
    assert peaks["tiled"] < peaks["whole"], done.stdout
    assert "ratio: the whole-image pass peaks at" in done.stdout
