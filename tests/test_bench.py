"""The benchmarks stay runnable: each runs in its smallest form (no timing is asserted)."""

import json
import os
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


def test_onnx_runtime_benchmark_smoke():
    out = run("onnx_runtime.py", "--sizes", "64", "--images", "1", "--repeats", "1", "--encoder", "resnet18")
    row = out.strip().splitlines()[-1].split()
    assert "onnx img/s" in out and row[0] == "64" and float(row[3]) > 0  # size, torch, onnx, ratio, parity
    assert float(row[4]) < 1e-3


GPU_CHECKS = ["environment", "train-eager", "inference", "fp16", "resume", "sync", "train-compiled", "gpu-bench"]


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_gpu_check_smoke(tmp_path):
    """bench/gpu_check.sh --smoke: every check's code on the CPU with tiny sizes, results in one folder."""
    out = tmp_path / "gpu-check"
    done = gpu_check("--smoke", "--out", str(out), "--budget", "1500")  # a loaded 2-core CPU: minutes
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and list(summary["checks"]) == GPU_CHECKS, summary
    checks = {name: entry["result"] for name, entry in summary["checks"].items()}
    assert all((out / "logs" / f"{name}.log").stat().st_size > 0 for name in GPU_CHECKS)
    for name in ("train-eager", "fp16", "train-compiled"):
        assert checks[name]["epochs"] == 2 and 0 <= checks[name]["val_miou"] <= 1, (name, checks[name])
    assert checks["train-compiled"]["precision"] == "fp32"  # the engine's own report, read from its log
    resume = checks["resume"]
    assert resume["stopped_at"]["epoch"] == 1 and resume["stopped_at"]["batch"] < resume["steps_per_epoch"]
    # On the CPU both runs are deterministic: the resumed run ends exactly where the uninterrupted one does.
    assert resume["max_weight_diff_resumed_vs_uninterrupted"] == 0.0, resume
    assert checks["inference"]["device_vs_cpu_mask_agreement"] == 1.0  # smoke: the CPU against itself
    assert checks["inference"]["tiled_vs_one_pass_agreement_where_confident"] >= 0.99
    assert [row["mode"] for row in checks["gpu-bench"]["rows"]] == ["fp32 eager", "bf16 + channels_last"]
    assert checks["sync"]["counted"] is False and "CUDA only" in checks["sync"]["note"]
    assert "gpu_check: PASSED" in done.stdout and "resume" in done.stdout
    print(done.stdout[-3000:])


def test_gpu_check_fails_loudly_without_cuda(tmp_path):
    """The GPU form exists to prove the CUDA path: on a machine without CUDA it fails and says how to run the CPU
    form, rather than pass having checked nothing."""
    done = gpu_check("--out", str(tmp_path / "gpu-check"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    assert "no CUDA device" in done.stderr and "--smoke" in done.stderr, done.stderr
    assert not (tmp_path / "gpu-check" / "summary.json").exists()


def test_camvid_class_weights_benchmark_smoke():
    """Its smoke form: synthetic data with a void label, one epoch each way (the real figure is in the README)."""
    out = run("camvid_class_weights.py", "--smoke")
    assert "| **mIoU** |" in out and "class_weights=auto" in out and "void = 3" in out


def test_large_raster_benchmark_smoke():
    out = run("large_raster.py", "--sizes", "192,256", "--whole-max", "192", "--tile", "64", "--tiling-side", "128")
    assert "whole" in out and "windowed" in out and "s/Mpx" in out and "windowed peak RSS, 256^2 / 192^2" in out
