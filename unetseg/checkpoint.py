"""Resumable training state in the checkpoint dir (/opt/ml/checkpoints, synced to S3 for spot training).

`last.pt` holds everything needed to continue exactly: model, optimizer, scheduler, grad scaler, position
(epoch, batch within the epoch, global step), the partial epoch's running loss, history, best score, RNG states,
and what it was trained on (`data`: images per channel, a fingerprint of their names and sizes, steps per epoch), so
that a resume on changed data is noticed.
`best.safetensors` holds the best weights so far: on a spot restart only this folder survives, not the model dir.
Both are written to a temporary file and renamed, so a kill mid-write leaves the previous file intact. The temporary
file is written outside this folder (the system's temporary folder, $TMPDIR), because SageMaker uploads whatever
appears here and restores all of it on every restart: an orphan of a kill would be model and optimizer in size.
"""

from __future__ import annotations

import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import replace_atomically
from .contract.errors import UnetsegError

LAST, BEST = "last.pt", "best.safetensors"
# What save_state writes; a file without one of them is another version's or no checkpoint at all.
FIELDS = ("model", "optimizer", "scheduler", "scaler", "epoch", "batch", "step", "history", "best", "partial",
          "hyperparameters", "rng")


class CheckpointError(UnetsegError):
    """The checkpoint folder holds a file that is not a whole unetseg checkpoint (damaged, truncated, foreign)."""


def save_state(directory: Path, state: dict[str, Any]) -> None:
    state = {**state, "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    replace_atomically(directory / LAST, lambda tmp: torch.save(state, tmp), staging=_staging())


def load_state(directory: Path) -> Optional[dict[str, Any]]:
    """The state saved in `directory`, None when there is none; CheckpointError naming the file when last.pt, or the
    best.safetensors that the end of training needs, is not whole: a resume fails now, not after hours of training."""
    path = directory / LAST
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except pickle.UnpicklingError:
        raise _damaged(path, "it holds objects other than tensors and numbers, which are never loaded") from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError... for a damaged file
        cut = "PytorchStreamReader" in str(exc) or isinstance(exc, EOFError)
        raise _damaged(path, "unreadable: " + ("truncated, or not a file torch.save wrote" if cut
                                               else _first_line(exc))) from None
    missing = [name for name in FIELDS if name not in state] if isinstance(state, dict) else ["a checkpoint's fields"]
    if missing:
        raise _damaged(path, f"it has no {', '.join(missing)}: not written by this version of unetseg")
    if (directory / BEST).is_file():
        _check_best(directory / BEST)
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the random number generators as they were when `state` was saved (and take them out of it)."""
    rng = state.pop("rng")
    random.setstate(_as_tuple(rng["python"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_best(directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    replace_atomically(directory / BEST, lambda tmp: save_file(weights, str(tmp)), staging=_staging())


def load_best(directory: Path) -> Optional[dict[str, torch.Tensor]]:
    path = directory / BEST
    if not path.is_file():
        return None
    _check_best(path)
    return load_file(str(path))


def _check_best(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt"):  # the header, and that the file holds all it declares
            pass
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every malformation
        raise _damaged(path, f"unreadable: {_first_line(exc)}") from None


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a whole unetseg checkpoint ({why}); to start over, train into a fresh "
                           f"checkpoint location (another --output, or checkpoint_s3_uri), or move {path.parent} "
                           "away; to resume, put back the files that training wrote there")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _staging() -> Path:
    return Path(tempfile.gettempdir())


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
