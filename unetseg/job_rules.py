"""The rules a SageMaker training job must meet, checked in the notebook before any AWS call.

SageMaker rejects (or, worse, accepts and wastes) many settings only after the request is sent or the instances have
started. Each rule here fails fast with one message that names the setting, its value and what is allowed. The
hyperparameters themselves are TrainConfig's business; this module only checks how they meet the instance type.
Pure Python: no SDK, no boto3, no torch.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from .config import TrainConfig
from .errors import ConfigError


class JobSettingsError(ConfigError):
    """A training-job setting (instance, runtime, spot, S3 location, role) that SageMaker would reject or waste."""


LOCAL_INSTANCE_TYPES = ("local", "local_gpu")

# Service limits (CreateTrainingJob API reference and the botocore service model).
MAX_RUNTIME_LIMIT_S = 28 * 24 * 3600  # StoppingCondition.MaxRuntimeInSeconds: "The maximum value is 28 days"
KEEP_ALIVE_LIMIT_S = 21600  # ResourceConfig.KeepAlivePeriodInSeconds max
HYPERPARAMETER_VALUE_LIMIT = 2500  # HyperParameters map value max length
HYPERPARAMETER_COUNT_LIMIT = 100
METRIC_DEFINITIONS_LIMIT = 40  # AlgorithmSpecification.MetricDefinitions max items

# Spot: max_wait covers waiting for capacity plus the run, so it must be at least max_run. Twice max_run gives a
# job as long to find capacity (and survive interruptions) as it may run; capped at the runtime limit.
SPOT_MAX_WAIT_FACTOR = 2

INPUT_MODES = ("File", "FastFile")  # Pipe streams records: the container reads image files, so it cannot use it

_INSTANCE_TYPE = re.compile(r"^ml\.(?P<family>[a-z][a-z0-9-]*)\.(?P<size>\d*xlarge|large|medium|small|micro|nano)$")
# Every NVIDIA family SageMaker trains on is named p<gen>... or g<gen>... (gr6: g6 with more memory).
_CUDA_FAMILY = re.compile(r"^(p|g|gr)\d")
# CUDA GPUs older than Ampere: no bfloat16 (T4 on g4dn, V100 on p3/p3dn).
_PRE_AMPERE_FAMILIES = ("g4dn", "p3", "p3dn")
# Families whose accelerator this image cannot use; a job there would pay for the accelerator and train on the CPU.
_UNUSABLE_FAMILIES = {
    "p2": "its NVIDIA K80 (Kepler) is not supported by current PyTorch CUDA builds; use ml.g4dn, ml.g5 or newer",
    "trn1": "Trainium is not a CUDA GPU and the unetseg image trains with CUDA; use ml.g5, ml.g6 or ml.p4d",
    "trn1n": "Trainium is not a CUDA GPU and the unetseg image trains with CUDA; use ml.g5, ml.g6 or ml.p4d",
    "trn2": "Trainium is not a CUDA GPU and the unetseg image trains with CUDA; use ml.g5, ml.g6 or ml.p5",
    "g4ad": "its AMD GPU is not a CUDA GPU; use ml.g4dn, ml.g5 or newer",
}

_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)(?:/(?P<key>.*))?$")
# Bucket naming rules: 3-63 characters of lower-case letters, digits, dots and hyphens, starting and ending with a
# letter or digit.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-/]+$")
# Names of jobs, models, endpoints (configs) and transform jobs; the service matches the whole name.
_RESOURCE_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
RESOURCE_NAME_LIMIT = 63
TUNING_JOB_NAME_LIMIT = 32
DEFAULT_BASE_NAME = "unetseg"
# The SDK's split of an image URI into [registry/path/]repository[:tag] (sagemaker.utils.base_name_from_image).
_IMAGE_REPOSITORY = re.compile(r"^(.+/)?([^:/]+)(:[^:]+)?$")
_ENV_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


# --- instance types -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstanceKind:
    instance_type: str
    family: str  # "g5", "m5", or "local"/"local_gpu"
    cuda: bool  # has a CUDA GPU this image can use

    @property
    def local(self) -> bool:
        return self.instance_type in LOCAL_INSTANCE_TYPES

    @property
    def bf16(self) -> bool:
        # local_gpu: the GPU is unknown here, so bf16 is allowed (autocast reports an unsupported device itself).
        return self.cuda and self.family not in _PRE_AMPERE_FAMILIES


def parse_instance_type(instance_type: Any) -> InstanceKind:
    """What the instance type offers, or JobSettingsError when it is malformed or its accelerator is unusable."""
    if not isinstance(instance_type, str) or not instance_type:
        raise JobSettingsError(
            "instance_type is required: an ml.<family>.<size> type such as ml.g5.xlarge, "
            "or 'local' / 'local_gpu' for local mode"
        )
    if instance_type in LOCAL_INSTANCE_TYPES:
        return InstanceKind(instance_type, instance_type, cuda=instance_type == "local_gpu")
    match = _INSTANCE_TYPE.match(instance_type)
    if not match:
        raise JobSettingsError(
            f"instance_type={instance_type!r} is not of the form ml.<family>.<size> (e.g. ml.g5.xlarge) "
            f"or 'local' / 'local_gpu'{_suggest_instance_type(instance_type)}"
        )
    family = match["family"]
    if family in _UNUSABLE_FAMILIES:
        raise JobSettingsError(f"instance_type={instance_type!r}: {_UNUSABLE_FAMILIES[family]}")
    return InstanceKind(instance_type, family, cuda=bool(_CUDA_FAMILY.match(family)))


def _suggest_instance_type(text: str) -> str:
    candidate = text.strip().lower()
    if candidate and not candidate.startswith("ml."):
        candidate = "ml." + candidate
    if _INSTANCE_TYPE.match(candidate):
        return f" (did you mean {candidate!r}?)"
    close = difflib.get_close_matches(candidate, _known_training_instance_types(), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_training_instance_types() -> list[str]:
    """The training instance types of the installed botocore's SageMaker model (suggestions only, not a whitelist:
    a newer instance type than this botocore knows is still accepted)."""
    try:
        import botocore.session

        shape = botocore.session.get_session().get_service_model("sagemaker").shape_for("TrainingInstanceType")
        return list(shape.enum)
    except Exception:  # pragma: no cover - suggestions are best effort
        return []


def gpu_setting_problems(config: TrainConfig, kind: InstanceKind) -> list[str]:
    """Hyperparameters that need a CUDA GPU (or an Ampere one) the instance does not have."""
    problems = []
    where = "local mode without a GPU" if kind.instance_type == "local" else f"{kind.instance_type} has no CUDA GPU"
    if not kind.cuda:
        if config.amp in ("bf16", "fp16"):
            problems.append(f"hyperparameter amp={config.amp!r} needs a CUDA GPU but {where}; "
                            "use amp='auto' (off on CPU) or a GPU instance such as ml.g5.xlarge")
        if config.compile:
            problems.append(f"hyperparameter compile=True is meant for CUDA GPUs but {where}; "
                            "use compile=False or a GPU instance such as ml.g5.xlarge")
    elif config.amp == "bf16" and not kind.bf16:
        problems.append(f"hyperparameter amp='bf16' needs an Ampere or newer GPU but {kind.instance_type} is "
                        f"{'a T4' if kind.family == 'g4dn' else 'a V100'}; use amp='fp16' or 'auto', or ml.g5/ml.g6/ml.p4d")
    return problems


# --- runtimes, counts, sizes --------------------------------------------------------------------------------------

def default_max_wait(max_run: int) -> int:
    return max(max_run, min(SPOT_MAX_WAIT_FACTOR * max_run, MAX_RUNTIME_LIMIT_S))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def runtime_problems(*, max_run: Any, max_wait: Any, use_spot_instances: bool) -> list[str]:
    problems = []
    if not _is_int(max_run) or not 1 <= max_run <= MAX_RUNTIME_LIMIT_S:
        problems.append(f"max_run={max_run!r} must be a whole number of seconds from 1 to {MAX_RUNTIME_LIMIT_S} "
                        "(SageMaker's limit of 28 days)")
    if max_wait is None:
        return problems
    if not use_spot_instances:
        problems.append(f"max_wait={max_wait!r} is only used with use_spot_instances=True; "
                        "set use_spot_instances=True or drop max_wait")
    elif not _is_int(max_wait) or max_wait < 1:
        problems.append(f"max_wait={max_wait!r} must be a whole number of seconds")
    elif _is_int(max_run) and max_wait < max_run:
        problems.append(f"max_wait={max_wait} is shorter than max_run={max_run}; SageMaker needs max_wait >= max_run "
                        f"(max_wait counts the wait for spot capacity plus the run; default {SPOT_MAX_WAIT_FACTOR}x max_run)")
    return problems


def resource_problems(*, kind: Optional[InstanceKind], instance_count: Any, volume_size: Any,
                      keep_alive_period_in_seconds: Any, input_mode: Any) -> list[str]:
    problems = []
    if not _is_int(instance_count) or instance_count < 1:
        problems.append(f"instance_count={instance_count!r} must be a whole number >= 1")
    elif kind is not None and kind.instance_type == "local_gpu" and instance_count > 1:
        problems.append(f"instance_type='local_gpu' runs one container on this machine's GPUs; "
                        f"instance_count={instance_count} must be 1 (use instance_type='local' for several CPU containers)")
    if not _is_int(volume_size) or volume_size < 1:
        problems.append(f"volume_size={volume_size!r} must be a whole number of GB >= 1")
    if keep_alive_period_in_seconds is not None and (
            not _is_int(keep_alive_period_in_seconds) or not 0 <= keep_alive_period_in_seconds <= KEEP_ALIVE_LIMIT_S):
        problems.append(f"keep_alive_period_in_seconds={keep_alive_period_in_seconds!r} must be from 0 to "
                        f"{KEEP_ALIVE_LIMIT_S} seconds")
    if input_mode not in INPUT_MODES:
        problems.append(f"input_mode={input_mode!r}: use 'File' (copy the data to the instance) or 'FastFile' "
                        "(stream it from S3 on first read); Pipe mode is not supported by the unetseg container")
    return problems


def volume_needed_gb(dataset_bytes: int) -> int:
    """EBS volume for a File-mode job: the dataset copy with 25% slack, plus 10 GB for checkpoints, model and output."""
    return math.ceil(dataset_bytes * 1.25 / 1024**3) + 10


def hyperparameter_problems(hyperparameters: Mapping[str, str]) -> list[str]:
    problems = []
    if len(hyperparameters) > HYPERPARAMETER_COUNT_LIMIT:
        problems.append(f"{len(hyperparameters)} hyperparameters exceed SageMaker's limit of {HYPERPARAMETER_COUNT_LIMIT}")
    for key, value in hyperparameters.items():
        if len(value) > HYPERPARAMETER_VALUE_LIMIT:
            problems.append(f"hyperparameter {key!r} is {len(value)} characters as sent to SageMaker; the limit is "
                            f"{HYPERPARAMETER_VALUE_LIMIT}")
    return problems


# --- names, URIs, roles --------------------------------------------------------------------------------------------

def s3_uri_problem(name: str, uri: Any) -> Optional[str]:
    """Why `uri` is not a usable s3://bucket/key URI, or None."""
    if not isinstance(uri, str):
        return f"{name}={uri!r} must be an s3://bucket/prefix string"
    match = _S3_URI.match(uri)
    if not match:
        return f"{name}={uri!r} is not an S3 URI: expected s3://bucket/prefix"
    bucket = match["bucket"]
    if not _S3_BUCKET.match(bucket) or ".." in bucket:
        return (f"{name}={uri!r}: {bucket!r} is not a valid bucket name (3-63 lower-case letters, digits, dots and "
                "hyphens, starting and ending with a letter or digit)")
    if "//" in (match["key"] or ""):
        return f"{name}={uri!r} has an empty path segment ('//'); SageMaker would write to a different key than meant"
    if len(uri) > 1024:
        return f"{name} is {len(uri)} characters; SageMaker accepts S3 URIs up to 1024"
    return None


def check_s3_uri(name: str, uri: Any) -> str:
    problem = s3_uri_problem(name, uri)
    if problem:
        raise JobSettingsError(problem)
    return uri


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of a URI already checked by check_s3_uri."""
    match = _S3_URI.match(uri)
    if not match:
        raise JobSettingsError(f"{uri!r} is not an S3 URI: expected s3://bucket/prefix")
    return match["bucket"], match["key"] or ""


def output_path_problem(output_path: Any, *, local: bool) -> Optional[str]:
    if output_path is None:
        return None
    if isinstance(output_path, str) and output_path.startswith("file://"):
        if not local:
            return (f"output_path={output_path!r}: file:// output is only for local mode "
                    "(instance_type='local' or 'local_gpu'); use an s3:// path")
        return None if len(output_path) > len("file://") else "output_path='file://' names no folder"
    return s3_uri_problem("output_path", output_path)


def role_problem(role: Any, *, local: bool) -> Optional[str]:
    if role is None or role == "":
        if local:
            return None
        return ("role is required outside local mode: the IAM role ARN SageMaker runs the job as, e.g. "
                "role='arn:aws:iam::111122223333:role/SageMakerRole' (in a SageMaker notebook or Studio: "
                "role=sagemaker.get_execution_role())")
    if not isinstance(role, str):
        return f"role={role!r} must be an IAM role ARN or name"
    if role.startswith("arn:") and not _ROLE_ARN.match(role):
        return (f"role={role!r} is not an IAM role ARN: expected arn:aws:iam::<12-digit account>:role/<name>")
    return None


def job_name_problem(name: str, value: Any, max_length: int = RESOURCE_NAME_LIMIT) -> Optional[str]:
    """Why `value` is not a valid name of a job, model, endpoint or transform job (at most 32 characters for a
    tuning job), or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not _RESOURCE_NAME.match(value) or len(value) > max_length:
        return (f"{name}={value!r}: SageMaker names are 1 to {max_length} letters, digits and hyphens, starting and "
                "ending with a letter or digit (no underscores or dots)")
    return None


def base_name_from_image(image_uri: str) -> str:
    """The SDK names jobs, models, endpoints and transform jobs after the image's repository (`.../team/unet_seg:1`
    gives unet_seg-<timestamp>), but ECR allows `_` and `.` there and SageMaker names do not: each run of other
    characters becomes one hyphen. The SDK trims the base to fit the timestamp it appends."""
    match = _IMAGE_REPOSITORY.match(image_uri or "")
    repository = match.group(2) if match else image_uri or ""
    return re.sub(r"[^a-zA-Z0-9]+", "-", repository).strip("-") or DEFAULT_BASE_NAME


def environment_problems(environment: Any) -> list[str]:
    if environment is None:
        return []
    if not isinstance(environment, Mapping):
        return [f"environment={environment!r} must be a dict of variable names to strings"]
    bad = [key for key in environment if not isinstance(key, str) or not _ENV_NAME.match(key)]
    problems = [f"environment variable names {bad} must match [A-Za-z_][A-Za-z0-9_]*"] if bad else []
    not_str = [key for key, value in environment.items() if not isinstance(value, str)]
    if not_str:
        problems.append(f"environment values must be strings; not for {not_str}")
    from .codecs import TTA_MODES

    tta = environment.get("UNETSEG_TTA")
    if isinstance(tta, str) and tta.strip().lower() not in TTA_MODES:
        problems.append(f"UNETSEG_TTA={tta!r}: the server's default test-time augmentation is one of {', '.join(TTA_MODES)}")
    return problems


def raise_if(problems: Iterable[Optional[str]]) -> None:
    """One JobSettingsError listing every problem found (most calls find one)."""
    found = [p for p in problems if p]
    found = list(dict.fromkeys(found))
    if len(found) == 1:
        raise JobSettingsError(found[0])
    if found:
        raise JobSettingsError("invalid training job settings:\n  " + "\n  ".join(found))
