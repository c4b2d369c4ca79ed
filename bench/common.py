"""Shared benchmark helpers: a dataset to time on, and a timer that reports the median of repeats."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

ISBI = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "isbi2012-em"


def dataset(kind: str = "auto") -> tuple[Path, int, str]:
    """(channel folder, in_channels, description): the ISBI EM slices when present, else synthetic 256 px RGB."""
    if kind in ("auto", "isbi") and (ISBI / "images").is_dir():
        return ISBI, 1, "ISBI 2012 EM, 22 x 512x512 grayscale PNG"
    from unetseg.synthetic import make_demo_dataset

    root = make_demo_dataset(Path(tempfile.mkdtemp(prefix="unetseg-bench-")), train=32, validation=0, size=256)
    return root / "train", 3, "synthetic, 32 x 256x256 RGB PNG"


def median_rate(run, items: int, repeats: int = 3) -> float:
    """Items per second: the median over `repeats` timed runs, after one warm-up run."""
    run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)
