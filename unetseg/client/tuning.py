"""Hyperparameter tuning on a UNetEstimator, with the checks and defaults a plain HyperparameterTuner lacks.

A plain `HyperparameterTuner(est, ...)` works with UNetEstimator, but (sagemaker 2.257, sagemaker/tuner.py) it sends
only the `metric_definitions` given to the tuner itself, not the estimator's, its fit() sends a bare S3 string as one
channel named "training", which the container does not read, and it names the tuning job after the image's repository,
which may hold `_` or `.` that SageMaker refuses in names. `UNetEstimator.tuner()` fills all three in, checks the
objective against the metric vocabulary, and checks every range end and category with TrainConfig.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from sagemaker.parameter import CategoricalParameter, ParameterRange
from sagemaker.tuner import HyperparameterTuner

from ..contract.config import TrainConfig
from ..contract.errors import ConfigError
from ..contract.metrics_log import SELECTION_METRIC
from . import job_rules as rules
from .job_rules import JobSettingsError

if TYPE_CHECKING:  # pragma: no cover
    from .estimator import UNetEstimator


class UNetTuner(HyperparameterTuner):
    """A HyperparameterTuner whose fit() takes the same inputs as UNetEstimator.fit(), and whose tuning jobs each
    keep their trials' checkpoints under a prefix of their own.

    SageMaker (CreateHyperParameterTuningJob) takes one CheckpointConfig for all trials of a tuning job, has no
    per-trial prefix, and restores the whole prefix into every trial. So the prefix is the tuning job's own:
    <output_path>/<tuning job>/checkpoints, or <checkpoint_s3_uri>/<tuning job> when the estimator was given one;
    within it each trial keeps its state under its job name, and removes it once finished (sagemaker_env).
    """

    def fit(self, inputs: Any = None, job_name: Optional[str] = None, include_cls_metadata: Any = False,
            estimator_kwargs: Any = None, wait: bool = True, **kwargs: Any) -> Any:
        from sagemaker.utils import name_from_base

        rules.raise_if([rules.job_name_problem("job_name", job_name, rules.TUNING_JOB_NAME_LIMIT)])
        estimator = self.estimator  # make_tuner gives one UNetEstimator
        if inputs is not None:
            inputs = estimator.training_inputs(inputs)
        # Named now, so that the estimator's checkpoint prefix carries the tuning job's name (the SDK prepares the
        # estimator before it names the tuning job).
        if job_name is None:
            estimator._ensure_base_job_name()
            job_name = name_from_base(self.base_tuning_job_name or estimator.base_job_name,
                                      max_length=rules.TUNING_JOB_NAME_LIMIT, short=True)
        given = estimator.checkpoint_s3_uri if estimator._checkpoint_s3_uri_given else None
        if given:
            estimator.checkpoint_s3_uri = f"{given.rstrip('/')}/{job_name}"
        try:
            return super().fit(inputs, job_name=job_name, include_cls_metadata=include_cls_metadata,
                               estimator_kwargs=estimator_kwargs, wait=wait, **kwargs)
        finally:
            if given:
                estimator.checkpoint_s3_uri = given


def make_tuner(estimator: UNetEstimator, hyperparameter_ranges: Mapping[str, ParameterRange],
               objective_metric_name: Optional[str], objective_type: str, **kwargs: Any) -> UNetTuner:
    objective = objective_metric_name or SELECTION_METRIC
    recorded = [d["Name"] for d in estimator.metric_definitions]
    if objective not in recorded:
        raise JobSettingsError(f"objective_metric_name={objective!r} is not a metric this job records; "
                               f"choose one of {', '.join(recorded)}")
    if objective_type not in ("Maximize", "Minimize"):
        raise JobSettingsError(f"objective_type={objective_type!r}: use 'Maximize' or 'Minimize'")
    check_ranges(estimator, hyperparameter_ranges)
    # The SDK trims the base to fit the 32-character limit with its timestamp; the base itself must be a valid name.
    rules.raise_if([rules.job_name_problem("base_tuning_job_name", kwargs.get("base_tuning_job_name"))])
    if kwargs.get("base_tuning_job_name") is None:
        estimator._ensure_base_job_name()
        kwargs["base_tuning_job_name"] = estimator.base_job_name
    kwargs.setdefault("metric_definitions", estimator.metric_definitions)
    return UNetTuner(estimator, objective, dict(hyperparameter_ranges), objective_type=objective_type, **kwargs)


def check_ranges(estimator: UNetEstimator, hyperparameter_ranges: Mapping[str, ParameterRange]) -> None:
    """Every range end and category must make a valid TrainConfig for this instance type."""
    problems = []
    known = list(TrainConfig.model_fields)
    for name, parameter_range in hyperparameter_ranges.items():
        if name not in known:
            problems.append(f"tuning range for unknown hyperparameter {name!r}; known: {', '.join(known)}")
            continue
        if isinstance(parameter_range, CategoricalParameter):
            candidates = list(parameter_range.values)
        else:
            candidates = [parameter_range.min_value, parameter_range.max_value]
        for value in candidates:
            try:
                config = estimator.config.replace(**{name: value})
            except ConfigError as exc:  # names the key and the rule
                problems.append(f"tuning range {name}: {value!r} is not valid: {exc}")
                continue
            problems += [f"tuning range {name}: {p}" for p in rules.gpu_setting_problems(config, estimator._kind)]
    rules.raise_if(problems)
