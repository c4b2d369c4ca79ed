"""GPU benchmark: U-Net/ResNet34 at 512x512, FP32 eager vs bf16 + channels_last (+ torch.compile).

Reports training images/s, peak memory and model FLOP utilisation (FLOPs per image counted with
torch.utils.flop_counter, times images/s, over the GPU's dense bf16 peak), then runs the unetseg engine's CUDA
path (AMP, channels_last, compile) for two epochs on synthetic 512 px data. One command:

    python bench/gpu.py                # on a GPU machine
    python bench/gpu.py --smoke        # seconds on a CPU: checks that the script runs
    python bench/gpu.py --json t.json  # also write the table as JSON (bench/gpu_check.py reads it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}
MODES = {  # name: (autocast dtype, channels_last, compile)
    "fp32 eager": (None, False, False),
    "bf16 + channels_last": (torch.bfloat16, True, False),
    "bf16 + channels_last + compile": (torch.bfloat16, True, True),
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def flops_per_image(size: int, device: torch.device) -> float:
    model = smp.Unet("resnet34", encoder_weights=None, classes=2).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().mean().backward()
    return counter.get_total_flops() / 2


def measure(mode: str, size: int, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    dtype, channels_last, compiled = MODES[mode]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = smp.Unet("resnet34", encoder_weights=None, classes=2).to(device, memory_format=fmt)
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch, size, size), device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def step():
        with autocast():
            logits = net(x)
        loss_fn(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if not compiled else 5):  # warm-up: cudnn autotuning, compilation
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return rate, memory


def engine_run(size: int, batch: int, epochs: int, smoke: bool) -> None:
    from unetseg.contract.config import TrainConfig
    from unetseg.synthetic import make_demo_dataset
    from unetseg.training import RunPaths, train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_demo_dataset(tmp / "data", train=8 if smoke else 64, validation=4 if smoke else 16, size=size)
        cfg = TrainConfig(encoder="resnet34", encoder_weights=None, image_size=size, batch_size=batch, epochs=epochs,
                          amp="auto", channels_last=True, compile=not smoke, classes=2)
        paths = RunPaths(data / "train", data / "validation", tmp / "m", tmp / "c", tmp / "o")
        result = train(cfg, paths, progress=False)
        print(f"engine: {result.history[-1]['images_per_sec']:.1f} images/s in its last epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, no compile: checks the script")
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--json", type=Path, help="write the table (and the device, size, FLOPs) to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    size, batch, steps = (64, 2, 2) if args.smoke else (args.size, args.batch_size, args.steps)
    modes = ["fp32 eager", "bf16 + channels_last"] if args.smoke else list(MODES)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops = flops_per_image(size, device)
    peak = peak_flops(device)
    print(f"device: {name}; U-Net/ResNet34 {size}x{size}, batch {batch}, {steps} timed steps; "
          f"{flops / 1e9:.1f} GFLOP per image (forward + backward); bf16 peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}")
    print(f"{'mode':<34}{'images/s':>10}{'vs fp32':>9}{'peak GiB':>10}{'MFU':>8}")
    base, rows = None, []
    for mode in modes:
        rate, memory = measure(mode, size, batch, steps, device)
        base = base or rate
        mfu = f"{flops * rate / peak:.1%}" if peak else "n/a"
        print(f"{mode:<34}{rate:>10.1f}{rate / base:>9.2f}{memory:>10.2f}{mfu:>8}")
        rows.append({"mode": mode, "images_per_sec": round(rate, 1), "vs_fp32": round(rate / base, 2),
                     "peak_gib": None if memory != memory else round(memory, 2), "mfu": mfu})
    if args.json:
        args.json.write_text(json.dumps({"device": name, "size": size, "batch": batch, "steps": steps,
                                         "gflop_per_image": round(flops / 1e9, 1),
                                         "bf16_peak_tflops": peak and peak / 1e12, "rows": rows}, indent=2))
    if not args.no_engine:
        engine_run(size, batch, 1 if args.smoke else 2, args.smoke)


if __name__ == "__main__":
    main()
