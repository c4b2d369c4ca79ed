"""The container entry point: SageMaker's training environment in; a model, or a failure file, out.

`entry/train.py` (SAGEMAKER_PROGRAM) calls `main()`. On a multi-GPU or multi-host job, `main()` relaunches this
module under torchrun and supervises it; each worker then runs `main()` again and trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Optional

from .atomic import replace_atomically
from .errors import DataError
from .sagemaker_env import INIT_MODEL_CHANNEL, TrainingEnv

TRAIN_CHANNELS, VALIDATION_CHANNELS = ("train", "training"), ("validation", "val")
FAILURE_LIMIT = 1024  # SageMaker shows this many characters of the failure file as the job's FailureReason


def main() -> int:
    env = TrainingEnv.from_environ()
    try:
        if "LOCAL_RANK" not in os.environ:  # not yet under torchrun: decide how many processes this host runs
            from .distributed import procs_per_host, torchrun_command

            command = torchrun_command(env, procs_per_host(env), module=__name__)
            if command:
                if len(env.hosts) > 1 and os.environ.get("SM_NETWORK_INTERFACE_NAME"):
                    # Multi-host: NCCL and gloo pick an interface by guessing; SageMaker names the right one.
                    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
                        os.environ.setdefault(var, os.environ["SM_NETWORK_INTERFACE_NAME"])
                return supervise(command, env.failure_file)
        return run(env)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the failure file
        write_failure(env.failure_file, exc)
        return 1


def run(env: TrainingEnv) -> int:
    from .config import TrainConfig
    from .training import RunPaths, train

    cfg = TrainConfig.from_hyperparameters(env.hyperparameters)
    train_dir, val_dir = pick_channels(env.channels)
    paths = RunPaths(train_dir, val_dir, env.model_dir, env.checkpoint_dir, env.output_data_dir,
                     init_model=env.channels.get(INIT_MODEL_CHANNEL))
    result = train(cfg, paths, progress=False)
    if result.interrupted:
        return 128 + signal.Signals[result.interrupted]
    env.discard_finished_trial_state()  # a tuning trial's restore must not fetch every finished trial's state
    return 0


def pick_channels(channels: dict[str, Path]) -> tuple[Path, Optional[Path]]:
    channels = {name: path for name, path in channels.items() if name != INIT_MODEL_CHANNEL}
    for role, names in (("training", TRAIN_CHANNELS), ("validation", VALIDATION_CHANNELS)):
        given = [n for n in names if n in channels]
        if len(given) > 1:  # using one would silently drop the other
            raise DataError(f"two {role} channels, " + " and ".join(repr(n) for n in given) +
                            f"; send one: which of them holds the {role} data is not clear")
    train = next((channels[n] for n in TRAIN_CHANNELS if n in channels), None)
    if train is None and len(channels) == 1:
        train = next(iter(channels.values()))
    if train is None:
        raise DataError(f"no training data: expected a channel named 'train' (or 'validation' beside it); "
                        f"this job has {sorted(channels) or 'no channels'}")
    val = next((channels[n] for n in VALIDATION_CHANNELS if n in channels), None)
    return train, val


def supervise(command: list[str], failure_file: Path) -> int:
    """Run torchrun, passing SIGTERM on (it forwards to the workers, which checkpoint and stop)."""
    child = subprocess.Popen(command)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, 128 + signal.SIGTERM) and not failure_file.exists():
        write_failure(failure_file, RuntimeError(f"distributed training exited with code {code}; see the job log"))
    return code


def write_failure(path: Path, exc: BaseException) -> None:
    """The error's one-line summary first (SageMaker shows only the first 1024 characters), then the traceback."""
    summary = f"{type(exc).__name__}: {exc}"
    text = summary + "\n\n" + "".join(traceback.format_exception(exc))
    print(summary, file=sys.stderr, flush=True)
    try:
        replace_atomically(path, lambda tmp: tmp.write_text(text))
    except OSError as err:
        print(f"could not write {path}: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
