"""Resumable training state in the checkpoint dir (/opt/ml/checkpoints, synced to S3 for spot training).

`last.pt` holds everything needed to continue exactly: model, optimizer, scheduler, grad scaler, position
(epoch, batch within the epoch, global step), the partial epoch's running loss, history, best score, RNG states.
`best.safetensors` holds the best weights so far: on a spot restart only this folder survives, not the model dir.
Both are written to a temporary file and renamed, so a kill mid-write leaves the previous file intact. The temporary
file is written outside this folder (the system's temporary folder, $TMPDIR), because SageMaker uploads whatever
appears here and restores all of it on every restart: an orphan of a kill would be model and optimizer in size.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .atomic import replace_atomically

LAST, BEST = "last.pt", "best.safetensors"


def save_state(directory: Path, state: dict[str, Any]) -> None:
    state = {**state, "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    replace_atomically(directory / LAST, lambda tmp: torch.save(state, tmp), staging=_staging())


def exists(directory: Path) -> bool:
    return (directory / LAST).is_file()


def load_state(directory: Path) -> Optional[dict[str, Any]]:
    path = directory / LAST
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    rng = state.pop("rng")
    random.setstate(_as_tuple(rng["python"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def save_best(directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    replace_atomically(directory / BEST, lambda tmp: save_file(weights, str(tmp)), staging=_staging())


def load_best(directory: Path) -> Optional[dict[str, torch.Tensor]]:
    path = directory / BEST
    return load_file(str(path)) if path.is_file() else None


def _staging() -> Path:
    return Path(tempfile.gettempdir())


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
