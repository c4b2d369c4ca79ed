"""The container entry point: SageMaker's training environment in; a model, or a failure file, out.

`entry/train.py` (SAGEMAKER_PROGRAM) calls `main()`. On a multi-GPU or multi-host job, `main()` relaunches this
module under torchrun and supervises it; each worker (rank) then runs `main()` again and trains.

Stopping (SIGTERM): the training process, and under torchrun each rank and the supervisor, register in the stop
registry (stop_registry.py), so that PID 1 signals them and not their DataLoader workers. A stop exits with
128 + the signal and writes no failure file. Under torchrun the ranks report their stop and their failures to the
supervisor through files, which then reports for the host: a stop as a stop, a failure as the error of the rank that
failed first (not torchrun's summary, and not another rank's "connection closed" that followed it).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from ..atomic import WriteFailed, replace_atomically
from ..contract.errors import DataError
from ..contract.ground_truth import MANIFEST_SUFFIX, PAIRING_FILE, check_pairing_config, read_pairing
from ..contract.layout import IMAGES, INIT_MODEL_CHANNEL, MASKS, TRAIN_CHANNEL, read_layout
from ..contract.sagemaker_env import RANK_REPORTS_ENV, STOP_GRACE_S, TrainingEnv, stopped_exit_code
from . import stop_registry

# torchrun SIGKILLs the ranks this long after it SIGTERMs them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default). Stops
# no longer pass through torchrun, but it still ends the other ranks when one fails, and a rank may be writing then:
# give them SageMaker's grace period, less the time this supervisor needs to report before SageMaker's SIGKILL.
TORCHRUN_SHUTDOWN_S = STOP_GRACE_S - 20


def main() -> int:
    env = TrainingEnv.from_environ()
    with stop_registry.registered(stop_registry.folder()):
        try:
            if "LOCAL_RANK" not in os.environ:  # not yet under torchrun: decide how many processes this host runs
                from ..distributed import procs_per_host, torchrun_command

                command = torchrun_command(env, procs_per_host(env), module=__name__)
                if command:
                    if len(env.hosts) > 1 and env.network_interface:
                        # Multi-host: NCCL and gloo pick an interface by guessing; SageMaker names the right one.
                        for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
                            os.environ.setdefault(var, env.network_interface)
                    return supervise(command, env.failure_file)
            return run(env)
        except KeyboardInterrupt:  # SIGINT (docker run's Ctrl-C) outside the training loop, which handles its own
            print("stopped by SIGINT outside the training loop (e.g. in the data check): no checkpoint written now; "
                  "the next run continues from the last one, if any", file=sys.stderr, flush=True)
            reports = os.environ.get(RANK_REPORTS_ENV)
            if reports:  # a stop, as run() reports it: exit 0 so that torchrun does not take it for a failure
                report_rank(Path(reports), "stopped", {"signal": "SIGINT"})
                return 0
            return stopped_exit_code(signal.SIGINT)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the failure file
            if not report_rank_failure(exc):
                write_failure(env.failure_file, exc)
            return 1


def run(env: TrainingEnv) -> int:
    from ..contract.config import TrainConfig
    from ..training import RunPaths, train

    cfg = TrainConfig.from_hyperparameters(env.hyperparameters)
    train_dir, val_dir = pick_channels(env.channels)
    for folder in (train_dir, val_dir):
        if folder is not None and (folder / PAIRING_FILE).is_file():  # a Ground Truth manifest's channels
            check_pairing_config(read_pairing(folder / PAIRING_FILE), cfg)
    paths = RunPaths(train_dir, val_dir, env.model_dir, env.checkpoint_dir, env.output_data_dir,
                     init_model=env.channels.get(INIT_MODEL_CHANNEL))
    result = train(cfg, paths, progress=False)
    if not result.interrupted:
        env.discard_finished_trial_state()  # a tuning trial's restore must not fetch every finished trial's state
        return 0
    reports = os.environ.get(RANK_REPORTS_ENV)
    if reports:
        # torchrun takes any other exit code for a failure and SIGTERMs the other ranks' process groups, DataLoader
        # workers included, while they may still be finishing: a rank that stopped cleanly exits 0 and says why.
        report_rank(Path(reports), "stopped", {"signal": result.interrupted})
        return 0
    return stopped_exit_code(result.interrupted)


def pick_channels(channels: dict[str, Path]) -> tuple[Path, Optional[Path]]:
    """The training and validation folders among the job's channels, read as fit() and `unetseg train` read a dataset
    root (contract/layout.py): the channels are the folders of /opt/ml/input/data."""
    data = {name: Path(path) for name, path in channels.items() if name != INIT_MODEL_CHANNEL}
    layout = read_layout(data, "the job's input channels")
    if layout.train == "":  # channels named images and masks: their folder is the one channel
        root = {data[IMAGES].parent, data[MASKS].parent}
        if len(root) != 1:
            raise DataError(f"the job's channels {IMAGES!r} and {MASKS!r} are in different folders ({sorted(root)}); "
                            f"send one channel {TRAIN_CHANNEL!r} holding {IMAGES}/ and {MASKS}/")
        return root.pop(), None

    def channel(name: str) -> Path:  # a Ground Truth manifest's channel is read through its pairing file
        return data.get(name + MANIFEST_SUFFIX, data[name])

    return channel(layout.train), channel(layout.validation) if layout.validation else None


def supervise(command: list[str], failure_file: Path) -> int:
    """Run torchrun; report its ranks' outcome: a stop as a stop (128 + SIGTERM), a failure as the first rank's error.

    A SIGTERM here goes to the ranks (registered in the stop registry), not to torchrun, which would pass it to each
    rank's whole process group: DataLoader workers signalled by anyone but their rank make the rank fail.
    """
    registry = stop_registry.folder()
    own_registry = registry is None  # not under entry/init.py (tests, a local run): the ranks register here
    registry = registry or stop_registry.create()
    reports = Path(tempfile.mkdtemp(prefix="unetseg-ranks-"))
    environ = {**stop_registry.announce(registry), RANK_REPORTS_ENV: str(reports)}
    environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(TORCHRUN_SHUTDOWN_S))
    stops: list[int] = []

    def forward(signum, _frame):
        stops.append(signum)
        stop_registry.send(registry, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = subprocess.Popen(command, env=environ).wait()
        return host_outcome(code, reports, stops, failure_file)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(reports, ignore_errors=True)
        if own_registry:
            shutil.rmtree(registry, ignore_errors=True)


def host_outcome(code: int, reports: Path, stops: list[int], failure_file: Path) -> int:
    """This host's exit code from torchrun's and the ranks' reports; the failure file when it failed."""
    failures = sorted((json.loads(p.read_text()) for p in reports.glob("failure.*")), key=lambda f: f["time"])
    if failures:  # the first to fail is the cause; the others' errors (a peer gone, a SIGTERM) follow from it
        replace_atomically(failure_file, lambda tmp: tmp.write_text(failures[0]["text"]))
        return code or 1
    stopped = stops + [signal.Signals[json.loads(p.read_text())["signal"]] for p in reports.glob("stopped.*")]
    if stopped:  # also when a rank died of the request before it could act on it (still starting up)
        return stopped_exit_code(stopped[0])
    if code != 0:
        write_failure(failure_file, RuntimeError(f"distributed training exited with code {code}, and no process "
                                                 f"reported an error of its own (killed?); see the job log"))
    return code


def report_rank_failure(exc: BaseException) -> bool:
    """A rank's error goes to the supervisor, which keeps the first; False when this is no rank (or it cannot)."""
    reports = os.environ.get(RANK_REPORTS_ENV)
    if not reports:
        return False
    try:
        report_rank(Path(reports), "failure", {"time": time.time(), "text": failure_text(exc)})
    except OSError:
        return False
    print(failure_summary(exc), file=sys.stderr, flush=True)
    return True


def report_rank(reports: Path, kind: str, fields: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    replace_atomically(reports / f"{kind}.{rank}", lambda tmp: tmp.write_text(json.dumps({"rank": rank, **fields})))


def failure_text(exc: BaseException) -> str:
    """The error's summary first (SageMaker shows only the first 1024 characters), then the traceback."""
    return failure_summary(exc) + "\n\n" + "".join(traceback.format_exception(exc))


def failure_summary(exc: BaseException) -> str:
    if isinstance(exc, WriteFailed):  # "disk full writing /opt/ml/checkpoints/last.pt: ...": the file and the reason
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return f"{exc}" + ("; give the job a larger volume (UNetEstimator volume_size, in GB) and start it again: "
                           "with a checkpoint location it resumes from the last checkpoint written" if full else "")
    return f"{type(exc).__name__}: {exc}"


def write_failure(path: Path, exc: BaseException) -> None:
    text = failure_text(exc)
    print(failure_summary(exc), file=sys.stderr, flush=True)
    try:
        replace_atomically(path, lambda tmp: tmp.write_text(text))
    except OSError as err:
        print(f"could not write {path}: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
