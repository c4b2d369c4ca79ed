"""Experiment tracking with MLflow: rank 0 of a training run logs to a tracking server, when one is named.

$MLFLOW_TRACKING_URI names it: an http(s) MLflow server, or a SageMaker MLflow tracking server's ARN (the
sagemaker-mlflow plugin signs the requests). UNetEstimator(mlflow_tracking_uri=...) sets it in the job's environment,
`unetseg train --mlflow-uri` in its own. The run records TrainConfig's hyperparameters and the data check's facts
(params), one point per epoch of every epoch metric of the vocabulary (contract/metrics_log.py: the names CloudWatch
gets; the step is the epoch), the model folder and the predictions picture (artifacts). It is named after the training
job (or the run folder of `unetseg train`); its id goes into config.json, and into the checkpoint folder (RECORD): a run
resumed from that checkpoint (a spot restart, `unetseg train` again with the same --output) continues the same MLflow
run and sends the epochs the run lacks. A restart without the checkpoint trains from scratch, and so starts a new run.

A tracking server that is down, slow or refusing must never fail or stall training. One background thread makes every
request, in order; the training loop only queues them. A request that fails for a reason that can pass (no connection,
no answer within MLFLOW_HTTP_REQUEST_TIMEOUT, 5xx, 429) is retried with backoff while training goes on, and one line
says so, once. The end of training writes the model first, then gives tracking at most UNETSEG_MLFLOW_FLUSH_S (on a
stop, less: SageMaker's SIGKILL follows its SIGTERM) and moves on. mlflow is imported only when a URI is set.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from . import __version__
from .atomic import replace_atomically
from .contract.config import TrainConfig
from .contract.metrics_log import EPOCH_METRICS, per_class_names, slug
from .contract.sagemaker_env import (
    CURRENT_INSTANCE_TYPE_ENV,
    IMAGE_URI_ENV,
    JOB_ARN_ENV,
    JOB_NAME_ENV,
    MLFLOW_EXPERIMENT_ENV,
    MLFLOW_RETRIES_ENV,
    MLFLOW_TIMEOUT_ENV,
    MLFLOW_TRACKING_URI_ENV,
    TRACKING_FLUSH_ENV,
)

RECORD = "mlflow_run.json"  # in the checkpoint folder, which a spot restart restores with the checkpoint
DEFAULT_EXPERIMENT = "unetseg"
REQUEST_TIMEOUT_S = 15  # per request unless MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise (MLflow's own default is 120)
FLUSH_S = 120.0  # what the end of training gives tracking to catch up, unless UNETSEG_MLFLOW_FLUSH_S says otherwise
STOP_FLUSH_S = 20.0  # on a stop, at most this: the checkpoint and model are written, SageMaker's SIGKILL is coming
EXIT_FLUSH_S = 10.0  # a run that failed: its status, if the server answers at once
MAX_PENDING = 10_000  # requests buffered while the server is away; epochs beyond them are dropped (and said)
BACKOFF_S = (1, 2, 5, 10, 30)
PARAMS_PER_REQUEST = 100  # MLflow's LogBatch limit
RUN_NAME_TAG, JOB_NAME_TAG = "mlflow.runName", "sagemaker.training_job_name"


def tracking_uri() -> Optional[str]:
    return os.environ.get(MLFLOW_TRACKING_URI_ENV, "").strip() or None


def is_arn(uri: str) -> bool:
    return uri.startswith("arn:")


def redact(uri: str) -> str:
    """The URI without a user name or password, for log lines and config.json."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def epoch_metrics(entry: dict, class_names: Iterable[str]) -> dict[str, float]:
    """The vocabulary's per-epoch metrics in one history entry (step_loss is per step, not per epoch)."""
    return {name: float(entry[name]) for name in (*EPOCH_METRICS, *per_class_names(class_names)) if name in entry}


def dataset_facts(cfg: TrainConfig, train_data, val_data) -> dict[str, str]:
    """What the data check found (CheckedDataset): counts, the mask convention, each class's share of the training
    pixels, and a digest of each channel's file names and sizes (which data made this model)."""
    train, val = train_data.fingerprint(), val_data.fingerprint()
    pixels = train_data.class_pixels
    total = max(1, int(pixels.sum()))
    facts = {"data.train_images": train["images"], "data.validation_images": val["images"],
             "data.train_files": train["files"], "data.validation_files": val["files"],
             "data.mask_mode": train_data.codec.mode}
    facts.update({f"data.class_share.{slug(name)}": f"{count / total:.6f}"
                  for name, count in zip(cfg.resolved_class_names, pixels)})
    return {key: str(value) for key, value in facts.items()}


def start(cfg: TrainConfig, paths, train_data, val_data, history: list[dict]) -> Tracker | NoTracking:
    """Rank 0, once the data is checked and any checkpoint restored: a Tracker when a tracking URI is set."""
    uri = tracking_uri()
    if uri is None:
        return NO_TRACKING
    # Short requests and no retries inside the client: the retries are this module's, in the background.
    os.environ.setdefault(MLFLOW_TIMEOUT_ENV, str(REQUEST_TIMEOUT_S))
    os.environ.setdefault(MLFLOW_RETRIES_ENV, "0")
    try:  # here, before the DataLoader forks its workers, not in the thread: a fork mid-import can hang the child
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError:
        _say(f"mlflow: {MLFLOW_TRACKING_URI_ENV} is set but mlflow is not installed (pip install 'unetseg[mlflow]'); "
             "training without tracking")
        return NO_TRACKING
    if not is_arn(uri):  # sagemaker-mlflow 0.5 reads every tracking URI as an ARN and warns on each request otherwise
        logging.getLogger("mlflow.tracking.request_header.registry").setLevel(logging.ERROR)
    try:
        mlflow.set_tracking_uri(uri)  # the plugin signs and routes by the global URI
        client = MlflowClient(uri)
    except Exception as exc:  # noqa: BLE001 - a URI MLflow cannot use (an unknown scheme) is no reason to stop
        _say(f"mlflow: cannot use {MLFLOW_TRACKING_URI_ENV}={redact(uri)} ({_short(exc)}); training without tracking")
        return NO_TRACKING
    job = os.environ.get(JOB_NAME_ENV)
    tags = {"unetseg.version": __version__, RUN_NAME_TAG: job or paths.model_dir.parent.name}
    for tag, env in ((JOB_NAME_TAG, JOB_NAME_ENV), ("sagemaker.training_job_arn", JOB_ARN_ENV),
                     ("sagemaker.instance_type", CURRENT_INSTANCE_TYPE_ENV), ("unetseg.image", IMAGE_URI_ENV)):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    params = {**cfg.to_hyperparameters(), **dataset_facts(cfg, train_data, val_data)}
    experiment = os.environ.get(MLFLOW_EXPERIMENT_ENV, "").strip() or DEFAULT_EXPERIMENT
    return Tracker(client, uri, experiment, params, tags, history, cfg.resolved_class_names,
                   Path(paths.checkpoint_dir) / RECORD)


class NoTracking:
    """No tracking URI, mlflow missing, or not rank 0: every call does nothing."""

    run_id = None

    def log_epoch(self, entry: dict) -> None:
        pass

    def config_fields(self) -> dict:
        return {}

    def finish(self, model_dir: Path, picture: Optional[Path], *, best: Optional[dict] = None,
               stopped: bool = False) -> None:
        pass


NO_TRACKING = NoTracking()


class Tracker:
    def __init__(self, client, uri: str, experiment: str, params: dict[str, str], tags: dict[str, str],
                 history: list[dict], class_names: list[str], record: Path):
        self.client, self.uri, self.shown_uri = client, uri, redact(uri)
        self.experiment, self.class_names, self.record = experiment, list(class_names), record
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._ops: queue.Queue = queue.Queue()
        self._give_up = threading.Event()  # the flush deadline passed: send nothing more
        self._warned: set[str] = set()
        self._off = False  # the server refused us for good (401/403): nothing more is sent
        self._failing = False
        self._closed = False
        self._put("open the run", lambda: self._open(tags))
        self._put("log the hyperparameters and data facts", lambda: self._log_params(params))
        history = [dict(entry) for entry in history]
        self._put("log the epochs the run lacks", lambda: self._log_missing_epochs(history))
        self._thread = threading.Thread(target=self._work, name="unetseg-mlflow", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # --- the training loop's side: queue and return -------------------------------------------------------------
    def log_epoch(self, entry: dict) -> None:
        if self._ops.qsize() >= MAX_PENDING:
            self._warn("full", f"mlflow: {MAX_PENDING} requests waiting for {self.shown_uri}; epochs from "
                               f"{entry.get('epoch')} on are not sent (the job log and history.json have them)")
            return
        entry = dict(entry)
        self._put(f"log epoch {entry.get('epoch')}", lambda: self._log_metrics([entry]))

    def config_fields(self) -> dict:
        """For config.json: where the run is (its id is None if the server has not answered yet)."""
        return {"mlflow": {"tracking_uri": self.shown_uri, "experiment": self.experiment,
                           "experiment_id": self.experiment_id, "run_id": self.run_id}}

    def finish(self, model_dir: Path, picture: Optional[Path], *, best: Optional[dict] = None,
               stopped: bool = False) -> None:
        """After the model is written: upload it and end the run, waiting at most the flush time."""
        if best:
            tags = {f"unetseg.best_{k}": str(v) for k, v in best.items()}
            self._put("tag the best epoch", lambda: self._set_tags(tags))
        end = ("end the run", lambda: self.client.set_terminated(self.run_id, "KILLED" if stopped else "FINISHED"))
        if stopped:  # the status first: the upload may not fit in the time a stop leaves (MLflow takes artifacts after)
            self._put(*end)
        self._put("upload the model", lambda: self.client.log_artifacts(self.run_id, str(model_dir), "model"))
        if picture is not None and Path(picture).is_file():
            self._put("upload the predictions picture", lambda: self.client.log_artifact(self.run_id, str(picture)))
        if not stopped:
            self._put(*end)
        flush = _flush_seconds()
        self._close(min(flush, STOP_FLUSH_S) if stopped else flush)

    # --- the background thread ----------------------------------------------------------------------------------
    def _put(self, what: str, call: Callable[[], Any]) -> None:
        self._ops.put((what, call))

    def _work(self) -> None:
        for what, call in iter(self._ops.get, None):
            self._attempt(what, call)

    def _attempt(self, what: str, call: Callable[[], Any]) -> None:
        for attempt in range(1 << 30):
            if self._off or self._give_up.is_set() or (self.run_id is None and what != "open the run"):
                return
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - nothing the server does may reach the training loop
                status = _http_status(exc)
                if status in (401, 403):
                    self._off = True
                    hint = (" (the job's role needs sagemaker-mlflow:* on the tracking server's ARN)"
                            if ":mlflow-tracking-server/" in self.uri else "")
                    self._warn("denied", f"mlflow: {self.shown_uri} denied {what}{hint}: {_short(exc)}; "
                                         "training goes on without tracking")
                    return
                if status in (400, 404, 409):  # this request is wrong and stays wrong: skip it, keep the others
                    self._warn(f"rejected {what}", f"mlflow: {self.shown_uri} rejected {what}: {_short(exc)}")
                    return
                self._failing = True
                self._warn("unreachable", f"mlflow: cannot reach {self.shown_uri} ({_reason(exc)}) to {what}; "
                                          "training goes on, and tracking retries in the background")
                if self._give_up.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]):
                    return
            else:
                if self._failing:
                    self._failing = False
                    self._warn("back", f"mlflow: {self.shown_uri} answers again; sending what was buffered")
                return

    def _open(self, tags: dict[str, str]) -> None:
        client = self.client
        if self.experiment_id is None:
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    client.create_experiment(self.experiment)
                except Exception:  # another job created it meanwhile
                    if client.get_experiment_by_name(self.experiment) is None:
                        raise
                found = client.get_experiment_by_name(self.experiment)
            self.experiment_id = found.experiment_id
        previous = self._read_record()
        run = None
        if previous.get("tracking_uri") == self.shown_uri and previous.get("run_id"):
            try:
                run = client.get_run(previous["run_id"])
            except Exception as exc:
                if _http_status(exc) != 404:
                    raise
                self._warn("lost run", f"mlflow: run {previous['run_id']} of the checkpoint is not on "
                                       f"{self.shown_uri} any more; starting a new run")
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            self.run_id = run.info.run_id
            self._set_tags({k: v for k, v in tags.items() if k != RUN_NAME_TAG})
        else:
            run = client.create_run(self.experiment_id, run_name=tags[RUN_NAME_TAG],
                                    tags={k: v for k, v in tags.items() if k != RUN_NAME_TAG})
            self.run_id = run.info.run_id
            self._write_record()

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_REQUEST])
        # A resume may change some (epochs, lr, ...): MLflow keeps a param's first value, so the change is a tag.
        changed = [f"{k}: {logged[k]} -> {v}" for k, v in params.items() if k in logged and logged[k] != v]
        if changed:
            self._set_tags({"unetseg.resumed_with_changes": "; ".join(changed)[:5000]})

    def _log_missing_epochs(self, history: list[dict]) -> None:
        if not history:
            return
        have = {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_METRICS[0])}
        self._log_metrics([entry for entry in history if entry["epoch"] not in have])

    def _log_metrics(self, entries: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, int(entry["epoch"]))
                   for entry in entries for name, value in epoch_metrics(entry, self.class_names).items()]
        for i in range(0, len(metrics), 1000):  # LogBatch's limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _read_record(self) -> dict:
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {}

    def _write_record(self) -> None:
        fields = {"tracking_uri": self.shown_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(self.record, lambda tmp: tmp.write_text(json.dumps(fields)))
        except OSError as exc:  # a resume then starts a new run; training is not at stake
            self._warn("record", f"mlflow: could not write {self.record} ({exc}); a resumed run will start a new "
                                 "MLflow run")

    # --- the end ------------------------------------------------------------------------------------------------
    def _close(self, deadline: float) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        self._ops.put(None)
        self._thread.join(deadline)
        if self._thread.is_alive():
            self._give_up.set()
            left = self._ops.qsize()  # the sentinel is among them; the request in flight is not
            _say(f"mlflow: {left} request(s) not sent to {self.shown_uri} within {deadline:g} s "
                 f"({TRACKING_FLUSH_ENV}); the run there lacks them; the model is saved regardless")

    def _at_exit(self) -> None:
        """The process ends without finish(): training failed. Say so to the server if it answers at once."""
        self._put("mark the run failed", lambda: self.client.set_terminated(self.run_id, "FAILED"))
        self._close(EXIT_FLUSH_S)

    def _warn(self, kind: str, text: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            _say(text)


def _flush_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(TRACKING_FLUSH_ENV, FLUSH_S)))
    except ValueError:
        return FLUSH_S


def _http_status(exc: BaseException) -> Optional[int]:
    get = getattr(exc, "get_http_status_code", None)  # MlflowException
    if get is None:
        return None
    try:
        status = int(get())
    except (TypeError, ValueError):
        return None
    # A connection error or timeout comes as MlflowException(INTERNAL_ERROR), i.e. 500: retried, as a 5xx is.
    return status


def _reason(exc: BaseException) -> str:
    chain, cause = [], exc
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any("Timeout" in type(e).__name__ for e in chain) or "timed out" in str(exc).lower():
        seconds = os.environ.get(MLFLOW_TIMEOUT_ENV, REQUEST_TIMEOUT_S)
        return f"no answer within {seconds} s, {MLFLOW_TIMEOUT_ENV}"
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
