"""The benchmarks stay runnable: each runs in its smallest form (no timing is asserted)."""

import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.slow


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO / "bench", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_benchmark_smoke():
    out = run("gpu.py", "--smoke")
    assert "GFLOP per image" in out and "bf16 + channels_last" in out and "engine:" in out


def test_data_pipeline_benchmark_smoke():
    out = run("data_pipeline.py", "--epochs", "1", "--workers", "0", "--crop", "64")
    assert "naive PIL" in out and "unetseg (cached)" in out


def test_tta_benchmark_smoke():
    out = run("tta.py", "--epochs", "1", "--images", "4", "--size", "64")
    assert "tta=none" in out and "tta=flip" in out and "tta=d4" in out and "images/s" in out
