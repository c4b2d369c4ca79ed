"""Proof of the CUDA path on one GPU, in one command: `bash bench/gpu_check.sh` (or `make gpu-check`), under 8 minutes.

Each check runs in a process of its own (a crash or a hang ends that check, not the others), with a time limit:

  environment     driver, CUDA and cuDNN, the device, compute capability, bf16 without emulation
  train-eager     the engine at 512x512, amp=auto, channels_last: precision chosen, images/s, peak memory, val_miou
  inference       CUDA against CPU on the validation images (the eager run's model); a 2600x2600 image in tiles
                  against one pass: agreement, time, peak memory
  fp16            amp=fp16 with the grad scaler and grad_clip_norm: a finite loss and the scaler's final scale
  resume          `unetseg train` with loader workers, SIGTERM mid-epoch, the same command again: the largest weight
                  difference against an uninterrupted run, beside the difference between two uninterrupted runs (the
                  GPU's own run-to-run noise)
  sync            host-device syncs per training step (torch.cuda.set_sync_debug_mode), counted over two runs that
                  differ only in their number of steps, with the code lines that make them
  train-compiled  the engine with compile=true (Inductor; Triton on the GPU)
  gpu-bench       bench/gpu.py: images/s, MFU and peak memory of fp32, bf16 + channels_last, and + compile

The whole run keeps within --budget seconds (default 480): a check gets what is left, and one that cannot start is
reported as not run. Results: one folder (default runs/gpu-check-<time>): summary.json (updated after each check),
logs/<check>.log and each check's own results/<check>.json; the last lines printed give each check's figures. Exit
status 0 when every check passed, 1 when one failed, 2 when there is no CUDA device: this script exists to prove the
CUDA path and refuses to pass without one. `--smoke` runs the same code on the CPU with tiny sizes (what the tests
run, a few minutes on 2 cores, most of it torch.compile; the grad scaler and the sync count need CUDA, and say so).

    bash bench/gpu_check.sh [--smoke] [--out DIR] [--budget SECONDS] [--checks environment,train-eager,...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


@dataclass(frozen=True)
class Sizes:
    """The check's workload: the GPU form sized for one modern GPU within the time budget, the smoke form for a CPU."""

    image: int  # training crop and image side
    train: int  # training images (steps per epoch = train / batch)
    validation: int
    batch: int
    epochs: int
    encoder: str
    depth: int
    big: int  # side of the image for tiled inference
    tile: int
    resume_size: int  # the resume check trains smaller images: four runs of it
    resume_train: int  # ... and enough of them that a SIGTERM after the middle step lands before the epoch ends


GPU = Sizes(image=512, train=64, validation=8, batch=8, epochs=6, encoder="resnet34", depth=5, big=2600, tile=1024,
            resume_size=256, resume_train=64)
SMOKE = Sizes(image=64, train=8, validation=4, batch=4, epochs=2, encoder="resnet18", depth=3, big=300, tile=128,
              resume_size=64, resume_train=32)
# Seconds each check may take (the smoke form gets the same: a loaded CPU is slower than a GPU), within the whole
# run's --budget; on a GPU most of the time goes to torch.compile (train-compiled, gpu-bench's compiled mode).
LIMITS = {"environment": 120, "train-eager": 240, "inference": 180, "fp16": 240, "resume": 420, "sync": 240,
          "train-compiled": 540, "gpu-bench": 420}
BUDGET = 480  # the promise: under 8 minutes on one GPU, whatever happens
CHECKS = list(LIMITS)


def hyperparameters(sizes: Sizes, **overrides) -> dict:
    decoder = [256, 128, 64, 32, 16][5 - sizes.depth:]
    return {"encoder": sizes.encoder, "encoder_depth": sizes.depth, "decoder_channels": decoder,
            "encoder_weights": None, "classes": 3, "image_size": sizes.image, "batch_size": sizes.batch,
            "epochs": sizes.epochs, "amp": "auto", "channels_last": True, "augment": "light", "lr": 3e-3,
            # GPU: the engine's own worker count for the host (as a job gets); the CPU form keeps two, so that the
            # loader's worker processes are part of what it runs.
            "num_workers": 2 if sizes is SMOKE else None, "seed": 7, **overrides}


# --- the checks, each run in a child process -----------------------------------------------------------------------

class Work:
    """What a check gets: the sizes, the device, the shared folder (the dataset, models of earlier checks)."""

    def __init__(self, out: Path, smoke: bool):
        import torch

        self.out, self.smoke = out, smoke
        self.sizes = SMOKE if smoke else GPU
        self.device = torch.device("cpu" if smoke else "cuda")
        self.data = out / "work" / "data"
        self.runs = out / "work" / "runs"

    def config(self, **overrides):
        from unetseg.contract.config import TrainConfig

        return TrainConfig(**hyperparameters(self.sizes, **overrides))

    def train(self, name: str, cfg, data: Path | None = None) -> dict:
        """The engine in this process, as `unetseg train` runs it; its history, the peak GPU memory, the seconds."""
        import torch

        from unetseg.training import RunPaths, train

        data = data or self.data
        run = self.runs / name
        shutil.rmtree(run, ignore_errors=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train(cfg, RunPaths(train=data / "train", validation=data / "validation",
                                     model_dir=run / "model", checkpoint_dir=run / "checkpoints",
                                     output_data_dir=run / "output"), progress=False)
        last = result.history[-1]
        return {"seconds": round(time.perf_counter() - started, 1), "epochs": len(result.history),
                "images_per_sec_last_epoch": round(last["images_per_sec"], 1),
                "train_loss": round(last["train_loss"], 4), "val_miou": round(last["val_miou"], 4),
                "peak_gib": peak_gib(self.device), "model_dir": str(run / "model")}


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def check_environment(work: Work) -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "cuda_available": torch.cuda.is_available(), "cpus": len(os.sched_getaffinity(0))}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60)
        found["nvidia_smi"] = query.stdout.strip().splitlines()
    if work.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        found.update(device=torch.cuda.get_device_name(), devices=torch.cuda.device_count(),
                     compute_capability=f"{major}.{minor}",
                     bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                     bf16_with_emulation=torch.cuda.is_bf16_supported(including_emulation=True),
                     memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        # cuDNN has bf16 convolutions from compute capability 8.0 (A100, A10G, L4, H100): below it, amp=auto must
        # choose fp16 even though bf16 "is supported" by emulation.
        found["amp_auto_should_pick"] = "bf16" if major >= 8 else "fp16"
        x = torch.randn(256, 256, device="cuda")
        found["matmul_ok"] = bool(torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), atol=1e-2, rtol=1e-2))
    else:
        found["device"] = "cpu (smoke form: no CUDA asked for)"
    return found


def check_train_eager(work: Work) -> dict:
    return {**work.train("eager", work.config()), "precision": precision_from_log(work, "train-eager")}


def check_train_compiled(work: Work) -> dict:
    found = work.train("compiled", work.config(compile=True))
    return {**found, "precision": precision_from_log(work, "train-compiled")}


def check_fp16(work: Work) -> dict:
    import torch

    found = work.train("fp16", work.config(amp="fp16", grad_clip_norm=1.0))
    state = torch.load(Path(found["model_dir"]).parent / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=True)
    scaler = state["scaler"]
    found.update(precision=precision_from_log(work, "fp16"), grad_scaler_scale=scaler.get("scale"),
                 loss_finite=bool(torch.isfinite(torch.tensor(found["train_loss"]))))
    if work.device.type == "cuda" and not scaler.get("scale"):
        raise AssertionError(f"amp=fp16 on CUDA ran without a grad scaler: scaler state {scaler}")
    if not found["loss_finite"]:
        raise AssertionError(f"amp=fp16 training loss is {found['train_loss']}")
    return found


def precision_from_log(work: Work, check: str) -> str | None:
    """What the engine said it trains in ("... precision bf16, ..."), from this check's own log."""
    log = (work.out / "logs" / f"{check}.log")
    match = re.search(r"precision (\w+)", log.read_text()) if log.exists() else None
    return match.group(1) if match else None


def check_inference(work: Work) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from unetseg.model import load_model
    from unetseg.synthetic import make_demo_dataset

    model_dir = work.runs / "eager" / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise AssertionError(f"no model at {model_dir}: the train-eager check must run first")
    images = [np.array(Image.open(p)) for p in sorted((work.data / "validation" / "images").iterdir())]
    device_model, cpu_model = load_model(model_dir, device=str(work.device)), load_model(model_dir, device="cpu")
    amp = getattr(device_model, "amp", None)  # what the Segmenter autocasts to on this device
    rows, worst = [], 0.0
    for image in images:
        a, b = device_model.predict_proba(image), cpu_model.predict_proba(image)
        rows.append(agreement(a, b))
        worst = max(worst, float(np.abs(a - b).max()))
    found = {"device_vs_cpu_mask_agreement": round(min(r[0] for r in rows), 5),
             "device_vs_cpu_agreement_where_confident": round(min(r[1] for r in rows), 5),
             "device_vs_cpu_max_prob_diff": round(worst, 5),
             "device_amp": str(amp).removeprefix("torch.") if amp else "fp32"}

    big = make_demo_dataset(work.out / "work" / "big", train=0, validation=1, size=work.sizes.big, seed=5)
    image = np.array(Image.open(next((big / "validation" / "images").iterdir())))
    sync = torch.cuda.synchronize if work.device.type == "cuda" else (lambda: None)
    device_model.predict(image[:256, :256], tile=work.sizes.tile)  # warm-up: cuDNN picks its algorithms
    sync()
    if work.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    tiled = device_model.predict_proba(image, tile=work.sizes.tile)
    sync()
    seconds = time.perf_counter() - started
    tiled_peak = peak_gib(work.device)
    device_model.max_pixels = image.shape[0] * image.shape[1]  # one pass over the whole image, for comparison
    whole, confident = agreement(tiled, device_model.predict_proba(image))[:2]
    found.update(big_image=f"{image.shape[1]}x{image.shape[0]}", tile=work.sizes.tile, tiled_seconds=round(seconds, 2),
                 tiled_peak_gib=tiled_peak, tiled_vs_one_pass_agreement=round(whole, 5),
                 tiled_vs_one_pass_agreement_where_confident=round(confident, 5),
                 tiled_probabilities_sum_to_one=bool(np.allclose(tiled.sum(0), 1, atol=1e-3)))
    # A weakly trained model has many near-ties, which any rounding flips: the pass mark is on the pixels whose top
    # class leads by CONFIDENT; the agreement on all pixels is reported beside it.
    if found["device_vs_cpu_agreement_where_confident"] < 0.999 or confident < 0.99 \
            or not found["tiled_probabilities_sum_to_one"]:
        raise AssertionError(f"predictions disagree: {found}")
    return found


CONFIDENT = 0.1  # the top class's lead over the second, in probability


def agreement(a, b) -> tuple[float, float]:
    """Mask agreement of two (C, H, W) probability maps: on all pixels, and where `b` is confident."""
    import numpy as np

    equal = a.argmax(0) == b.argmax(0)
    top = np.sort(b, axis=0)
    sure = (top[-1] - top[-2]) > CONFIDENT
    return float(equal.mean()), float(equal[sure].mean()) if sure.any() else 1.0


TRAIN_CLI = [sys.executable, "-m", "unetseg.cli", "train"]


def check_resume(work: Work) -> dict:
    """SIGTERM in the middle of the first epoch of `unetseg train` (two loader workers), then the same command: it
    must resume and end where an uninterrupted run ends. Two uninterrupted runs measure the device's own noise."""
    import torch

    sizes = work.sizes
    steps = sizes.resume_train // sizes.batch
    stop_at = max(1, steps // 2)
    hps = hyperparameters(sizes, image_size=sizes.resume_size, epochs=2, log_every=1, num_workers=2)
    args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in hps.items()]
    data = work.out / "work" / "resume-data"
    if not data.exists():
        from unetseg.synthetic import make_demo_dataset

        make_demo_dataset(data, kind="multiclass", train=sizes.resume_train, validation=sizes.validation,
                          size=sizes.resume_size, seed=3)

    def run(name: str, stop_after: int | None = None) -> tuple[int, str]:
        out = work.runs / name
        cmd = [*TRAIN_CLI, "--data", str(data), "--output", str(out), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            print(f"[{name}] {line}", end="", flush=True)
            if stop_after is not None and line.startswith(f"step={stop_after} "):
                proc.send_signal(signal.SIGTERM)  # as SageMaker stops a job: the loader workers are left alone
                stop_after = None
        return proc.wait(), "".join(lines)

    for name in ("straight-a", "straight-b", "interrupted"):
        shutil.rmtree(work.runs / name, ignore_errors=True)
    code, log = run("straight-a")
    assert code == 0, f"uninterrupted run failed ({code}):\n{log[-3000:]}"
    code, log = run("straight-b")
    assert code == 0, f"second uninterrupted run failed ({code}):\n{log[-3000:]}"
    code, log = run("interrupted", stop_after=stop_at)
    stopped = re.search(r"stopping on SIGTERM at epoch (\d+), batch (\d+)", log)
    assert stopped, f"the SIGTERM after step {stop_at} did not stop the run at a step boundary ({code}):\n{log[-3000:]}"
    code, resumed = run("interrupted")
    assert code == 0 and "resumed from" in resumed, f"the resume failed ({code}):\n{resumed[-3000:]}"

    def weights(name: str) -> dict:
        state = torch.load(work.runs / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        return {"model": state["model"], "position": (state["epoch"], state["step"])}

    a, b, r = weights("straight-a"), weights("straight-b"), weights("interrupted")
    assert a["position"] == r["position"], \
        f"the resumed run ended at {r['position']} (epoch, step), the uninterrupted one at {a['position']}"

    def largest(x: dict, y: dict) -> float:
        return max(float((x[k].float() - y[k].float()).abs().max()) if x[k].numel() else 0.0 for k in x)

    found = {"steps_per_epoch": steps, "sigterm_after_step": stop_at,
             "stopped_at": {"epoch": int(stopped.group(1)), "batch": int(stopped.group(2))},
             "max_weight_diff_resumed_vs_uninterrupted": largest(a["model"], r["model"]),
             "max_weight_diff_uninterrupted_vs_uninterrupted": largest(a["model"], b["model"])}
    noise = found["max_weight_diff_uninterrupted_vs_uninterrupted"]
    # Resuming must add nothing beyond the device's own run-to-run noise (zero where the run is deterministic).
    if found["max_weight_diff_resumed_vs_uninterrupted"] > 10 * noise + 1e-6:
        raise AssertionError(f"the resumed run ends further from the uninterrupted one than two uninterrupted runs "
                             f"end from each other: {found}")
    return found


def check_sync(work: Work) -> dict:
    """Syncs per training step: counted by torch's sync debug mode over a run of N steps and one of 2N; the
    difference over N leaves out what runs once per epoch (validation, the epoch line, the checkpoint)."""
    import torch

    from unetseg.synthetic import make_demo_dataset

    counting = work.device.type == "cuda"  # the debug mode is CUDA's; on the CPU the same runs go uncounted
    sizes = work.sizes
    steps = sizes.train // sizes.batch
    counts, where = {}, {}
    for factor in (1, 2):
        data = work.out / "work" / f"sync-data-{factor}"
        if not data.exists():
            make_demo_dataset(data, kind="multiclass", train=sizes.train * factor, validation=sizes.validation,
                              size=sizes.resume_size, seed=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if counting:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                work.train(f"sync-{factor}", work.config(image_size=sizes.resume_size, epochs=1), data=data)
            finally:
                if counting:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        counts[factor] = len(syncs)
        where[factor] = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    growth = {line: (where[2][line] - where[1][line]) / steps for line in where[2] if where[2][line] > where[1][line]}
    found = {"counted": counting, "steps_in_short_run": steps, "syncs_short_run": counts[1],
             "syncs_long_run": counts[2], "syncs_per_training_step": round((counts[2] - counts[1]) / steps, 2),
             "per_step_by_line": dict(sorted(growth.items(), key=lambda kv: -kv[1])[:10])}
    if not counting:
        found["note"] = "host-device syncs are counted on CUDA only (the smoke form ran the same training uncounted)"
    return found


def check_gpu_bench(work: Work) -> dict:
    path = work.out / "results" / "gpu-bench-table.json"
    cmd = [sys.executable, str(BENCH / "gpu.py"), "--no-engine", "--json", str(path)]
    if work.smoke:
        cmd.append("--smoke")
    done = subprocess.run(cmd, cwd=BENCH, text=True, capture_output=True)
    print(done.stdout + done.stderr)
    if done.returncode != 0:
        raise AssertionError(f"bench/gpu.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(path.read_text())


RUNNERS: dict[str, Callable[[Work], dict]] = {
    "environment": check_environment, "train-eager": check_train_eager, "inference": check_inference,
    "fp16": check_fp16, "resume": check_resume, "sync": check_sync, "train-compiled": check_train_compiled,
    "gpu-bench": check_gpu_bench,
}


def child(name: str, out: Path, smoke: bool) -> int:
    work = Work(out, smoke)
    result = RUNNERS[name](work)
    text = json.dumps(result, indent=2, default=str)
    print(f"{name}: {text}")  # the log tells the whole story on its own
    (out / "results" / f"{name}.json").write_text(text)
    return 0


# --- the parent: runs the checks, writes the summary ---------------------------------------------------------------

def cuda_or_reason() -> str | None:
    """None when CUDA works here, else why not (asked in a child: the parent never initialises CUDA)."""
    probe = ("import torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
             "print(n, torch.__version__, torch.version.cuda)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return f"torch does not import: {done.stderr.strip().splitlines()[-1:]}"
    count, version, cuda = done.stdout.split()
    if int(count) == 0:
        return (f"torch {version} (CUDA build: {cuda}) sees no CUDA device (no NVIDIA driver, no GPU passed to this "
                f"container, or CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r})")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the CPU form, with tiny sizes (what the tests run)")
    parser.add_argument("--out", type=Path, help="results folder (default: runs/gpu-check-<UTC time>)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, from: {', '.join(CHECKS)}")
    parser.add_argument("--budget", type=float, default=BUDGET,
                        help=f"seconds for the whole run (default {BUDGET}): a check gets what is left, at most its "
                             "own limit; one that cannot start is reported as not run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.out, args.smoke)

    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in RUNNERS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if not args.smoke:
        why = cuda_or_reason()
        if why:
            print(f"gpu_check: FAILED: no CUDA device: {why}.\nThis check proves the CUDA path and cannot pass without "
                  f"a GPU; `bash bench/gpu_check.sh --smoke` runs its CPU form.", file=sys.stderr)
            return 2
    out = (args.out or REPO / "runs" / time.strftime("gpu-check-%Y%m%d-%H%M%S", time.gmtime())).resolve()
    for sub in ("logs", "results", "work"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else GPU
    from unetseg.synthetic import make_demo_dataset  # numpy and PIL only: the parent stays free of torch

    if not (out / "work" / "data").exists():
        make_demo_dataset(out / "work" / "data", kind="multiclass", train=sizes.train, validation=sizes.validation,
                          size=sizes.image, seed=1)
    summary = {"form": "smoke (CPU, tiny sizes)" if args.smoke else "gpu", "sizes": asdict(sizes),
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TORCHINDUCTOR_CACHE_DIR": str(out / "work" / "inductor"), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    for name in checks:
        log_path, result_path = out / "logs" / f"{name}.log", out / "results" / f"{name}.json"
        result_path.unlink(missing_ok=True)
        limit = min(LIMITS[name], args.budget - (time.monotonic() - started))
        if limit < 10:
            error = f"not run: the budget of {args.budget:.0f} s was spent (--budget, --checks)"
            summary["checks"][name] = {"ok": False, "seconds": 0, "error": error}
            print(f"gpu_check: {name} not run: budget spent", flush=True)
            continue
        print(f"gpu_check: {name} ...", end=" ", flush=True)
        t0 = time.monotonic()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out)]
        with open(log_path, "w") as log:
            try:
                code = subprocess.run([*cmd, *(["--smoke"] if args.smoke else [])], stdout=log,
                                      stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = round(time.monotonic() - t0, 1)
        entry: dict = {"ok": code == 0 and result_path.exists(), "seconds": seconds, "log": str(log_path)}
        if entry["ok"]:
            entry["result"] = json.loads(result_path.read_text())
        else:
            tail = log_path.read_text(errors="replace").strip().splitlines()
            reason = f"no result within its limit of {limit:.0f} s" if code is None else f"exit status {code}"
            entry["error"] = reason + ": " + " | ".join(tail[-3:])[-800:]
        summary["checks"][name] = entry
        summary["seconds"] = round(time.monotonic() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"{'ok' if entry['ok'] else 'FAILED'} ({seconds:.0f} s)", flush=True)
        if not entry["ok"]:
            print(f"  {entry['error']}", flush=True)
    summary["ok"] = all(c["ok"] for c in summary["checks"].values())
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(report(summary))
    print(f"gpu_check: {'PASSED' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f} s; "
          f"summary {out / 'summary.json'}, logs {out / 'logs'}")
    return 0 if summary["ok"] else 1


def report(summary: dict) -> str:
    """The figures that matter, one line per check."""
    lines = []
    for name, entry in summary["checks"].items():
        if not entry["ok"]:
            lines.append(f"  {name:<15} FAILED: {entry['error'][:200]}")
            continue
        r = entry["result"]
        if name == "environment":
            text = (f"{r.get('device')}, capability {r.get('compute_capability', '-')}, bf16 native "
                    f"{r.get('bf16_native', '-')}, torch {r['torch']} CUDA {r['cuda_build']} cuDNN {r['cudnn']}")
        elif name.startswith("train") or name == "fp16":
            text = (f"precision {r.get('precision')}, {r['images_per_sec_last_epoch']} images/s (last epoch), "
                    f"{_gib(r['peak_gib'])}val_miou {r['val_miou']} after {r['epochs']} epochs, {r['seconds']} s"
                    + (f", grad scale {r['grad_scaler_scale']}" if name == "fp16" else ""))
        elif name == "inference":
            text = (f"{r['device_amp']} vs CPU fp32: masks {r['device_vs_cpu_mask_agreement']:.2%} equal "
                    f"({r['device_vs_cpu_agreement_where_confident']:.2%} where confident); {r['big_image']} in "
                    f"{r['tile']} px tiles: {r['tiled_seconds']} s, {_gib(r['tiled_peak_gib'])}"
                    f"{r['tiled_vs_one_pass_agreement']:.2%} equal to one pass")
        elif name == "resume":
            text = (f"SIGTERM after step {r['sigterm_after_step']} of {r['steps_per_epoch']}: largest weight diff "
                    f"resumed vs uninterrupted {r['max_weight_diff_resumed_vs_uninterrupted']:.3g} (two uninterrupted "
                    f"runs: {r['max_weight_diff_uninterrupted_vs_uninterrupted']:.3g})")
        elif name == "sync":
            text = (r["note"] if "note" in r else
                    f"{r['syncs_per_training_step']} host-device syncs per training step {r['per_step_by_line']}")
        elif name == "gpu-bench":
            text = "; ".join(f"{row['mode']}: {row['images_per_sec']:.1f} images/s, MFU {row['mfu']}, "
                             f"{_gib(row['peak_gib'])}".rstrip(", ") for row in r["rows"])
        else:
            text = json.dumps(r)[:200]
        lines.append(f"  {name:<15} ok   {text}")
    return "\n".join(lines)


def _gib(value) -> str:
    return f"peak {value} GiB, " if value is not None else ""


if __name__ == "__main__":
    sys.exit(main())
