"""The notebook's side of experiment tracking: check a tracking URI before a job is created, and compare the runs of
an experiment (a table, and the curves of a metric).

A training job logs to MLflow when UNetEstimator(mlflow_tracking_uri=...) is given (see unetseg/tracking.py for what
a run records). The URI is an http(s) MLflow server the job can reach, or a SageMaker MLflow tracking server's ARN
(arn:aws:sagemaker:<region>:<account>:mlflow-tracking-server/<name>, or an MLflow app's, .../mlflow-app/<id>), in the
job's region; the sagemaker-mlflow plugin then signs the requests with the job's role. For a tracking server the role
needs the `sagemaker-mlflow:*` actions (CreateExperiment, CreateRun, LogBatch, UpdateRun, GetRun, ...) on its ARN; an
MLflow app's requests are signed for the `sagemaker` service instead (see AWS's IAM documentation for MLflow apps).

This module imports neither torch nor mlflow until a function needs it: `compare_runs` needs the `mlflow` extra
(pip install 'unetseg[mlflow]'), and `RunTable.plot` matplotlib.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

from ..contract.errors import UsageError
from ..contract.metrics_log import SELECTION_METRIC

_ARN = re.compile(r"^arn:aws[a-z-]*:sagemaker:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                  r"(?P<kind>mlflow-tracking-server|mlflow-app)/(?P<name>[a-zA-Z0-9](-*[a-zA-Z0-9]){0,255})$")
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")

# What the table shows of each run's hyperparameters, beside its metrics.
DEFAULT_PARAMS = ("arch", "encoder", "lr", "batch_size", "epochs", "loss", "image_size")


def tracking_uri_problem(uri: Any, region: Optional[str] = None, *, where: str = "mlflow_tracking_uri",
                         remote: bool = True) -> Optional[str]:
    """Why a training job could not log to `uri`, or None. `remote`: the job runs elsewhere (SageMaker, or a local-mode
    container), where this machine's loopback address is not this machine."""
    if not isinstance(uri, str) or not uri.strip():
        return f"{where}={uri!r}: give an http(s) MLflow server URL or a SageMaker MLflow tracking server ARN"
    if uri.startswith("arn:"):
        found = _ARN.match(uri)
        if found is None:
            return (f"{where}={uri!r} is not a SageMaker MLflow ARN; expected arn:aws:sagemaker:<region>:<account>:"
                    "mlflow-tracking-server/<name> (SageMaker console, MLflow, or `aws sagemaker "
                    "list-mlflow-tracking-servers`)")
        if region and found["region"] != region:
            return (f"{where}={uri!r} is in {found['region']}, but the job runs in {region}: the sagemaker-mlflow "
                    f"plugin reaches a tracking server in its own region only; use one in {region}, or run the job "
                    f"in {found['region']}")
        return None
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (f"{where}={uri!r}: give an http(s) MLflow server URL (https://mlflow.example.com) or a SageMaker "
                "MLflow tracking server ARN; a local store (file:, sqlite:) is not reachable from the job")
    if remote and parts.hostname in _LOOPBACK:
        return (f"{where}={uri!r}: {parts.hostname} inside the job's container is the container itself, not this "
                "machine; give an address of the server that the job can reach")
    return None


def check_tracking_uri(uri: Any, region: Optional[str] = None, *, where: str = "--mlflow-uri",
                       remote: bool = False) -> None:
    problem = tracking_uri_problem(uri, region, where=where, remote=remote)
    if problem:
        raise UsageError(problem)


@dataclass
class RunTable:
    """One row per run (a dict: run, status, epochs_logged, the last and the best value of the metric, the chosen
    hyperparameters, run_id), newest first; `curves(metric)` and `plot(metric)` show the metric per epoch."""

    rows: list[dict[str, Any]]
    columns: list[str]
    client: Any = field(repr=False, default=None)

    def curves(self, metric: str = SELECTION_METRIC) -> dict[str, list[tuple[int, float]]]:
        """{run name: [(epoch, value), ...]} of one metric of the vocabulary, one request per run."""
        out = {}
        for row in self.rows:
            history = self.client.get_metric_history(row["run_id"], metric)
            out[row["run"]] = sorted((int(m.step), float(m.value)) for m in history)
        return out

    def plot(self, metric: str = SELECTION_METRIC, ax: Any = None) -> Any:
        """The curves on a matplotlib axes (a new figure when none is given); returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        for name, points in self.curves(metric).items():
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(fontsize="small")
        return ax

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        widths = {c: max(len(c), *(len(_text(r.get(c))) for r in self.rows)) for c in self.columns}
        lines = ["  ".join(c.ljust(widths[c]) for c in self.columns)]
        lines += ["  ".join(_text(r.get(c)).ljust(widths[c]) for c in self.columns) for r in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(r.get(c)))}</td>" for c in self.columns) + "</tr>"
                       for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def compare_runs(experiment: str, *, tracking_uri: Optional[str] = None, metric: str = SELECTION_METRIC,
                 params: Sequence[str] = DEFAULT_PARAMS, max_runs: int = 50) -> RunTable:
    """The runs of `experiment` (the estimator's mlflow_experiment; "unetseg" by default), newest first. The tracking
    URI defaults to $MLFLOW_TRACKING_URI (an ARN works with the sagemaker-mlflow plugin installed)."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UsageError("compare_runs needs MLflow's client: pip install 'unetseg[mlflow]'") from None
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # the sagemaker-mlflow plugin signs by the global URI
    if not mlflow.get_tracking_uri().startswith("arn:"):  # sagemaker-mlflow 0.5 warns on each request otherwise
        logging.getLogger("mlflow.tracking.request_header.registry").setLevel(logging.ERROR)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UsageError(f"no MLflow experiment {experiment!r} at {mlflow.get_tracking_uri()}; the estimator's "
                         "mlflow_experiment names it (default 'unetseg')")
    runs = client.search_runs([found.experiment_id], max_results=max_runs, order_by=["attributes.start_time DESC"])
    rows = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric)  # one point per epoch
        rows.append({"run": run.info.run_name, "status": run.info.status,
                     "epochs_logged": len({m.step for m in history}),
                     metric: run.data.metrics.get(metric),  # the latest value
                     f"best_{metric}": max((m.value for m in history), default=None),
                     **{name: run.data.params.get(name) for name in params}, "run_id": run.info.run_id})
    columns = ["run", "status", "epochs_logged", metric, f"best_{metric}", *params, "run_id"]
    return RunTable(rows, columns, client)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
