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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..contract.config import TrainConfig
from ..contract.errors import ConfigError
from ..contract.sagemaker_env import CHECKPOINT_DIR_ENV, MAX_IMAGE_MB_ENV, TTA_ENV


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
# --- the instance table: what each family's host and accelerator are. The one place these facts live; training,
# endpoints and batch transform all check against it. GPU names as EC2 reports them (DescribeInstanceTypes GpuInfo);
# compute capabilities from NVIDIA's CUDA GPU list.


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int]

    @property
    def arch(self) -> str:
        return "sm_{}{}".format(*self.compute_capability)


GPU_FAMILIES = {
    "p2": Gpu("K80", (3, 7)),
    "p3": Gpu("V100", (7, 0)), "p3dn": Gpu("V100", (7, 0)),
    "g4dn": Gpu("T4", (7, 5)),
    "g5": Gpu("A10G", (8, 6)),
    "g6": Gpu("L4", (8, 9)), "gr6": Gpu("L4", (8, 9)), "g6e": Gpu("L40S", (8, 9)),
    "p4d": Gpu("A100", (8, 0)), "p4de": Gpu("A100", (8, 0)),
    "p5": Gpu("H100", (9, 0)), "p5e": Gpu("H200", (9, 0)), "p5en": Gpu("H200", (9, 0)),
    "p6-b200": Gpu("B200", (10, 0)), "p6-b300": Gpu("B300", (10, 3)), "p6e-gb200": Gpu("GB200", (10, 0)),
    "g7": Gpu("RTX PRO 4500", (12, 0)), "g7e": Gpu("RTX PRO Server 6000", (12, 0)),
}
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: bfloat16 in hardware (cuDNN has no bf16 convolutions before it)
# A family not in the table but named like NVIDIA's (p<gen>, g<gen>, gr<gen>) is taken for a newer CUDA GPU.
_CUDA_FAMILY = re.compile(r"^(p|g|gr)\d")

# GPU architectures compiled into PyTorch's CUDA builds (TORCH_CUDA_ARCH_LIST in pytorch's
# .ci/manywheel/build_cuda.sh; CUDA 13 can no longer compile for Volta). A GPU runs a build that holds code for its
# own major version at a minor no higher than its own (sm_86 code runs on sm_89, sm_100 code on sm_103).
TORCH_CUDA_ARCHS = {
    "12.6": ((5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0)),
    "12.8": ((7, 0), (7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0)),
    "12.9": ((7, 0), (7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0)),
    "13.0": ((7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0)),
}
IMAGE_CUDA = "12.6"  # entry/Dockerfile's default base: pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime

# Hosts with Arm CPUs, which cannot run the linux/amd64 image: Graviton families (c7g, m6gd, r8g, ...: a generation
# digit, then g) and GB200's Grace.
_ARM_FAMILY = re.compile(r"^[a-z]+\d+g[a-z]*$")
_ARM_FAMILIES = ("p6e-gb200",)

# Families whose accelerator this image cannot use; a job there would pay for the accelerator and run on the CPU.
_NOT_CUDA = "is not a CUDA GPU and the unetseg image runs on CUDA; use ml.g5, ml.g6 or ml.p4d"
_UNUSABLE_FAMILIES = {
    "trn1": f"Trainium {_NOT_CUDA}", "trn1n": f"Trainium {_NOT_CUDA}", "trn2": f"Trainium {_NOT_CUDA}",
    "inf1": f"Inferentia {_NOT_CUDA}", "inf2": f"Inferentia {_NOT_CUDA}",
    "dl1": f"Gaudi {_NOT_CUDA}",
    "g4ad": "its AMD GPU is not a CUDA GPU; use ml.g4dn, ml.g5 or newer",
}

# NVMe instance storage (GB) of the training instance types that have it (EC2 DescribeInstanceTypes,
# InstanceStorageInfo.TotalSizeInGB). SageMaker uses it instead of an EBS volume and refuses a VolumeSizeInGB larger
# than it (ResourceConfig and HyperParameterTuningResourceConfig, VolumeSizeInGB).
_INSTANCE_STORAGE_GB = {
    "g4dn": {"xlarge": 125, "2xlarge": 225, "4xlarge": 225, "8xlarge": 900, "12xlarge": 900, "16xlarge": 900},
    "g5": {"xlarge": 250, "2xlarge": 450, "4xlarge": 600, "8xlarge": 900, "12xlarge": 3800, "16xlarge": 1900,
           "24xlarge": 3800, "48xlarge": 7600},
    "g6": {"xlarge": 250, "2xlarge": 450, "4xlarge": 600, "8xlarge": 900, "12xlarge": 3760, "16xlarge": 1880,
           "24xlarge": 3760, "48xlarge": 7520},
    "g6e": {"xlarge": 250, "2xlarge": 450, "4xlarge": 600, "8xlarge": 900, "12xlarge": 3800, "16xlarge": 1900,
            "24xlarge": 3800, "48xlarge": 7600},
    "g7": {"2xlarge": 440, "4xlarge": 875, "8xlarge": 930, "12xlarge": 1900, "24xlarge": 3800, "48xlarge": 7600},
    "g7e": {"2xlarge": 1900, "4xlarge": 1900, "8xlarge": 1900, "12xlarge": 3800, "24xlarge": 7600, "48xlarge": 15200},
    "p3dn": {"24xlarge": 1800},
    "p4d": {"24xlarge": 8000}, "p4de": {"24xlarge": 8000},
    "p5": {"4xlarge": 3800, "48xlarge": 30400}, "p5e": {"48xlarge": 30400}, "p5en": {"48xlarge": 30400},
    "p6-b200": {"48xlarge": 30400}, "p6-b300": {"48xlarge": 30400},
    "r5d": {"large": 75, "xlarge": 150, "2xlarge": 300, "4xlarge": 600, "8xlarge": 1200, "12xlarge": 1800,
            "16xlarge": 2400, "24xlarge": 3600},
    "trn1": {"2xlarge": 474, "32xlarge": 7600}, "trn1n": {"32xlarge": 7600}, "trn2": {"48xlarge": 7600},
}

_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)(?:/(?P<key>.*))?$")
# Bucket naming rules: 3-63 characters of lower-case letters, digits, dots and hyphens, starting and ending with a
# letter or digit.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
# Reserved prefixes (S3 user guide, "General purpose bucket naming rules"). The reserved suffixes are not refused: an
# access point alias (-s3alias, --ol-s3) or a directory bucket (--x-s3) stands where a bucket name does.
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-/]+$")
# Names of jobs, models, endpoints (configs) and transform jobs; the service matches the whole name.
_RESOURCE_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
RESOURCE_NAME_LIMIT = 63
TUNING_JOB_NAME_LIMIT = 32
DEFAULT_BASE_NAME = "unetseg"
# The SDK's split of an image URI into [registry/path/]repository[:tag] (sagemaker.utils.base_name_from_image).
_IMAGE_REPOSITORY = re.compile(r"^(.+/)?([^:/]+)(:[^:]+)?$")
# An image reference as Docker reads one (github.com/distribution/reference, regexp.go): [host[:port]/]path[:tag]
# [@sha256:hex]; the path's components are lower case. SageMaker's own model only caps TrainingImage at 255.
IMAGE_URI_LIMIT = 255  # AlgorithmSpecification.TrainingImage and ContainerDefinition.Image max length
_IMAGE_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IMAGE_HOST_PORT = re.compile(rf"^(?:{_IMAGE_HOST_PART}(?:\.{_IMAGE_HOST_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$")
_IMAGE_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_IMAGE_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")  # the digests ECR and Docker registries give
# ECR registries, <account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]: the image must be in the job's region.
_ECR_HOST = re.compile(r"^(?P<account>[^.]+)\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")
_ENV_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


# --- instance types -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstanceKind:
    instance_type: str
    family: str  # "g5", "m5", or "local"/"local_gpu"
    cuda: bool  # has a CUDA GPU this image can use
    gpu: Optional[Gpu] = None  # None: no GPU, or one this table does not know (local_gpu, a newer family)

    @property
    def local(self) -> bool:
        return self.instance_type in LOCAL_INSTANCE_TYPES

    @property
    def bf16(self) -> bool:
        # An unknown GPU (local_gpu, a family newer than the table) is allowed bf16: autocast reports it if not.
        return self.cuda and (self.gpu is None or self.gpu.compute_capability >= BF16_MIN_COMPUTE_CAPABILITY)

    @property
    def local_storage_gb(self) -> Optional[int]:
        """NVMe instance storage SageMaker trains on instead of an EBS volume; None where it attaches EBS."""
        return instance_storage_gb(self.instance_type)


def instance_storage_gb(instance_type: str) -> Optional[int]:
    _, family, size = (instance_type.split(".") + ["", ""])[:3]
    return _INSTANCE_STORAGE_GB.get(family, {}).get(size)


def parse_instance_type(instance_type: Any, image_cuda: Optional[str] = IMAGE_CUDA) -> InstanceKind:
    """What the instance type offers, or JobSettingsError when it is malformed or the image cannot run there: an Arm
    host, an accelerator that is not CUDA, or a GPU the image's PyTorch build (for CUDA `image_cuda`; None: not
    checked) has no code for."""
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
    if family in _ARM_FAMILIES or _ARM_FAMILY.match(family):
        raise JobSettingsError(f"instance_type={instance_type!r} runs on an Arm host and the unetseg image is built "
                               "for linux/amd64 (x86_64); use an x86 type such as ml.c6i, ml.m5 or a GPU type such as "
                               "ml.g5 or ml.p5")
    if family in _UNUSABLE_FAMILIES:
        raise JobSettingsError(f"instance_type={instance_type!r}: {_UNUSABLE_FAMILIES[family]}")
    gpu = GPU_FAMILIES.get(family)
    if gpu is not None:
        problem = cuda_build_problem(gpu, image_cuda)
        if problem:
            raise JobSettingsError(f"instance_type={instance_type!r}: {problem}")
    return InstanceKind(instance_type, family, cuda=gpu is not None or bool(_CUDA_FAMILY.match(family)), gpu=gpu)


def image_cuda_problem(image_cuda: Any) -> Optional[str]:
    if image_cuda is None or image_cuda in TORCH_CUDA_ARCHS:
        return None
    return (f"image_cuda={image_cuda!r}: the CUDA version of the image's PyTorch build is one of "
            f"{', '.join(TORCH_CUDA_ARCHS)} (default {IMAGE_CUDA}, the Dockerfile's base), or None to skip the check "
            "of GPU architectures")


def cuda_build_problem(gpu: Gpu, image_cuda: Optional[str]) -> Optional[str]:
    """Why the image's PyTorch (built for CUDA `image_cuda`) has no code for this GPU, or None."""
    archs = TORCH_CUDA_ARCHS.get(image_cuda) if image_cuda else None
    if archs is None:
        return None
    major, minor = gpu.compute_capability
    if any(m == major and n <= minor for m, n in archs):
        return None
    builds = [cuda for cuda, listed in TORCH_CUDA_ARCHS.items()
              if any(m == major and n <= minor for m, n in listed)]
    where = (f"the unetseg image's PyTorch is built for CUDA {image_cuda}, with code for "
             f"{', '.join('sm_{}{}'.format(*a) for a in archs)}")
    if not builds:
        return (f"its NVIDIA {gpu.name} ({gpu.arch}) is not supported by current PyTorch CUDA builds ({where}); "
                "use ml.g4dn, ml.g5 or newer")
    newer = _version(builds[0]) > _version(image_cuda)
    build = builds[0] if newer else builds[-1]
    return (f"its NVIDIA {gpu.name} ({gpu.arch}) needs a PyTorch build for CUDA {build} or "
            f"{'later' if newer else 'earlier'}, and {where}; build the image on such a base (unetseg image build "
            f"--base-image pytorch/pytorch:<version>-cuda{build}-cudnn9-runtime) and pass image_cuda='{build}'")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


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
    except Exception:  # noqa: BLE001  # pragma: no cover - suggestions are best effort
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
        problems.append(f"hyperparameter amp='bf16' needs an Ampere or newer GPU (compute capability 8.0) but "
                        f"{kind.instance_type} has an NVIDIA {kind.gpu.name} ({kind.gpu.arch}); use amp='fp16' or "
                        "'auto', or ml.g5/ml.g6/ml.p4d")
    return problems


# --- runtimes, counts, sizes --------------------------------------------------------------------------------------

def default_max_wait(max_run: int) -> int:
    return max(max_run, min(SPOT_MAX_WAIT_FACTOR * max_run, MAX_RUNTIME_LIMIT_S))


def is_whole(value: Any, minimum: Optional[int] = None) -> bool:
    """A whole number as SageMaker takes one, at least `minimum`: an int, and not a bool (Python counts True as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def runtime_problems(*, max_run: Any, max_wait: Any, use_spot_instances: bool) -> list[str]:
    problems = []
    if not is_whole(max_run) or not 1 <= max_run <= MAX_RUNTIME_LIMIT_S:
        problems.append(f"max_run={max_run!r} must be a whole number of seconds from 1 to {MAX_RUNTIME_LIMIT_S} "
                        "(SageMaker's limit of 28 days)")
    if max_wait is None:
        return problems
    if not use_spot_instances:
        problems.append(f"max_wait={max_wait!r} is only used with use_spot_instances=True; "
                        "set use_spot_instances=True or drop max_wait")
    elif not is_whole(max_wait, minimum=1):
        problems.append(f"max_wait={max_wait!r} must be a whole number of seconds")
    elif is_whole(max_run) and max_wait < max_run:
        problems.append(f"max_wait={max_wait} is shorter than max_run={max_run}; SageMaker needs max_wait >= max_run "
                        "(max_wait counts the wait for spot capacity plus the run; "
                        f"default {SPOT_MAX_WAIT_FACTOR}x max_run)")
    return problems


def resource_problems(*, kind: Optional[InstanceKind], instance_count: Any, volume_size: Any,
                      keep_alive_period_in_seconds: Any, input_mode: Any,
                      use_spot_instances: bool = False) -> list[str]:
    problems = []
    if not is_whole(instance_count, minimum=1):
        problems.append(f"instance_count={instance_count!r} must be a whole number >= 1")
    elif kind is not None and kind.instance_type == "local_gpu" and instance_count > 1:
        problems.append(f"instance_type='local_gpu' runs one container on this machine's GPUs; "
                        f"instance_count={instance_count} must be 1 "
                        "(use instance_type='local' for several CPU containers)")
    if not is_whole(volume_size, minimum=1):
        problems.append(f"volume_size={volume_size!r} must be a whole number of GB >= 1")
    elif kind is not None and kind.local_storage_gb is not None and volume_size > kind.local_storage_gb:
        problems.append(f"volume_size={volume_size}: {kind.instance_type} has {kind.local_storage_gb} GB of NVMe "
                        "instance storage, which SageMaker uses instead of an EBS volume, and it refuses a larger "
                        f"volume; use at most {kind.local_storage_gb} GB, or an instance type with more storage")
    if keep_alive_period_in_seconds is not None and (
            not is_whole(keep_alive_period_in_seconds) or not 0 <= keep_alive_period_in_seconds <= KEEP_ALIVE_LIMIT_S):
        problems.append(f"keep_alive_period_in_seconds={keep_alive_period_in_seconds!r} must be from 0 to "
                        f"{KEEP_ALIVE_LIMIT_S} seconds")
    elif keep_alive_period_in_seconds and use_spot_instances:
        problems.append(f"keep_alive_period_in_seconds={keep_alive_period_in_seconds} with use_spot_instances=True: "
                        "SageMaker's warm pools cannot use spot capacity; drop keep_alive_period_in_seconds (or spot)")
    if input_mode not in INPUT_MODES:
        problems.append(f"input_mode={input_mode!r}: use 'File' (copy the data to the instance) or 'FastFile' "
                        "(stream it from S3 on first read); Pipe mode is not supported by the unetseg container")
    return problems


def volume_needed_gb(dataset_bytes: int) -> int:
    """EBS volume for a File-mode job: the dataset copy with 25% slack, plus 10 GB for checkpoints, model and output."""
    return math.ceil(dataset_bytes * 1.25 / 1024**3) + 10


def dataset_storage_problem(kind: InstanceKind, dataset_bytes: int) -> Optional[str]:
    """Why a File-mode copy of the dataset cannot fit the instance's fixed NVMe storage, or None."""
    needed, storage = volume_needed_gb(dataset_bytes), kind.local_storage_gb
    if storage is None or needed <= storage:
        return None
    return (f"File mode copies {dataset_bytes / 1024**3:.1f} GiB of data onto the instance ({needed} GB with room for "
            f"checkpoints and the model), but {kind.instance_type} has {storage} GB of NVMe instance storage, which "
            "SageMaker uses instead of an EBS volume; use input_mode='FastFile' (streams the files from S3), or an "
            "instance type with more storage")


def network_isolation_problem(config: TrainConfig, *, baked_encoders: Iterable[str],
                              fine_tuning: bool) -> Optional[str]:
    """Why a job with enable_network_isolation=True could not fetch its pretrained encoder weights, or None.

    The engine downloads `encoder_weights='imagenet'` at the start of a fresh run (anything else is none or a file);
    fine-tuning (init_model) starts from a trained model instead. `baked_encoders` names what the image carries
    (`unetseg image build --bake-weights resnet34`: "resnet34" or "resnet34:imagenet")."""
    if config.encoder_weights != "imagenet" or fine_tuning:
        return None
    baked = list(baked_encoders)
    if any(name == config.encoder and weights in ("", "imagenet") for name, _, weights in
           (spec.partition(":") for spec in baked)):
        return None
    held = f" (baked_encoders={baked} holds no {config.encoder})" if baked else ""
    return (f"enable_network_isolation=True: the job cannot download the pretrained weights of encoder "
            f"{config.encoder} with imagenet weights (hyperparameter encoder_weights='imagenet'){held}; bake them into "
            f"the image (unetseg image build --bake-weights {config.encoder}) and pass "
            f"baked_encoders=[{config.encoder!r}], or set encoder_weights=none or a weights file, or fine-tune with "
            "fit(init_model=...)")


def hyperparameter_problems(hyperparameters: Mapping[str, str]) -> list[str]:
    problems = []
    if len(hyperparameters) > HYPERPARAMETER_COUNT_LIMIT:
        problems.append(f"{len(hyperparameters)} hyperparameters exceed SageMaker's limit "
                        f"of {HYPERPARAMETER_COUNT_LIMIT}")
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
    if _IP_ADDRESS.match(bucket):
        return f"{name}={uri!r}: {bucket!r} is formatted as an IP address, which no bucket name may be"
    reserved = next((prefix for prefix in _RESERVED_BUCKET_PREFIXES if bucket.startswith(prefix)), None)
    if reserved:
        return f"{name}={uri!r}: {bucket!r} starts with {reserved!r}, which S3 reserves; no bucket is named so"
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


def image_uri_problem(image_uri: Any, *, local: bool, name: str = "image_uri") -> Optional[str]:
    """Why SageMaker (or Docker, in local mode) could not pull `image_uri`, or None. Only the form is checked here;
    `image_region_problem` checks an ECR image's region once the session's is known."""
    if not isinstance(image_uri, str) or not image_uri:
        return (f"{name}={image_uri!r} must be an image reference such as "
                "111122223333.dkr.ecr.<region>.amazonaws.com/unetseg:1.0")
    shown = f"{name}={image_uri!r}"
    if image_uri != image_uri.strip():
        return f"{shown} begins or ends with whitespace; an image reference has none"
    if "://" in image_uri:
        return f"{shown}: give the image reference without a scheme, e.g. {image_uri.split('://', 1)[1]!r}"
    if len(image_uri) > IMAGE_URI_LIMIT:
        return f"{shown} is {len(image_uri)} characters; SageMaker takes image references of up to {IMAGE_URI_LIMIT}"
    reference, at, digest = image_uri.partition("@")
    if at and not _IMAGE_DIGEST.match(digest):
        return (f"{shown}: {digest!r} is not an image digest; expected @sha256: and 64 lower-case hexadecimal digits "
                "(docker images --digests shows it)")
    components = reference.split("/")
    host = components[0] if len(components) > 1 and (
        "." in components[0] or ":" in components[0] or components[0] == "localhost") else None
    path = components[1:] if host else components
    last, colon, tag = path[-1].partition(":")
    path = path[:-1] + [last]
    if host is not None and not _IMAGE_HOST_PORT.match(host):
        return f"{shown}: {host!r} is not a registry host[:port]"
    bad = [part for part in path if not _IMAGE_PATH_COMPONENT.match(part)]
    if bad:
        lower = "/".join(path).lower()
        hint = (f" (did you mean {lower!r}?)" if all(_IMAGE_PATH_COMPONENT.match(p) for p in lower.split("/"))
                else "")
        return (f"{shown}: the repository {'/'.join(path)!r} is not valid{hint}: repository names are lower-case "
                "letters and digits, separated by single '/', and '.', '_', '__' or '-' within a component")
    if colon and not _IMAGE_TAG.match(tag):
        return (f"{shown}: the tag {tag!r} is not valid: 1 to 128 letters, digits, '_', '.' and '-', not starting "
                "with '.' or '-'")
    if host is None and not local:
        return (f"{shown} names no registry: SageMaker pulls training images from Amazon ECR (push it with "
                "`unetseg image build --push`, which prints <account>.dkr.ecr.<region>.amazonaws.com/<repository>:"
                "<tag>); an image on this machine only runs in local mode (instance_type='local')")
    ecr = _ECR_HOST.match(host or "")
    if host and ".dkr.ecr" in host and (not ecr or not re.fullmatch(r"\d{12}", ecr["account"])):
        return (f"{shown}: {host!r} is not an ECR registry; expected <12-digit account>.dkr.ecr.<region>.amazonaws.com")
    return None


def image_region_problem(image_uri: str, region: Optional[str]) -> Optional[str]:
    """Why a SageMaker job in `region` could not pull this ECR image, or None: the job pulls from its own region."""
    ecr = _ECR_HOST.match(image_uri.split("/", 1)[0])
    if ecr is None or region is None or ecr["region"] == region:
        return None
    return (f"image_uri={image_uri!r} is in ECR's {ecr['region']} registry, but the job runs in {region}, where "
            f"SageMaker would fail to pull it after starting the instances; push the image to {region} "
            f"(unetseg image build --push --region {region}), or run the job in {ecr['region']}")


def base_name_from_image(image_uri: str) -> str:
    """The SDK names jobs, models, endpoints and transform jobs after the image's repository (`.../team/unet_seg:1`
    gives unet_seg-<timestamp>), but ECR allows `_` and `.` there and SageMaker names do not: each run of other
    characters becomes one hyphen. The SDK trims the base to fit the timestamp it appends."""
    match = _IMAGE_REPOSITORY.match(image_uri or "")
    repository = match.group(2) if match else image_uri or ""
    return re.sub(r"[^a-zA-Z0-9]+", "-", repository).strip("-") or DEFAULT_BASE_NAME


def checkpoint_local_path_problem(path: Any, *, checkpointing: bool, environment: Any) -> Optional[str]:
    """Why the container could not keep its checkpoints at `path` (CheckpointConfig.LocalPath), or None."""
    if path is None:
        return None
    if not isinstance(path, str) or not path.startswith("/"):
        return (f"checkpoint_local_path={path!r} must be an absolute path in the container, such as "
                "/opt/ml/checkpoints (the default)")
    if not checkpointing:
        return (f"checkpoint_local_path={path!r} needs checkpoint_s3_uri (or use_spot_instances=True, which sets one): "
                "without it SageMaker syncs nothing and ignores the path")
    given = environment.get(CHECKPOINT_DIR_ENV) if isinstance(environment, Mapping) else None
    if given is not None and given != path:
        return (f"environment {CHECKPOINT_DIR_ENV}={given!r} differs from checkpoint_local_path={path!r}; the "
                "container must write its checkpoints where SageMaker syncs them: drop the variable")
    return None


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
    from ..contract.codecs import TTA_MODES  # numpy and PIL: imported only when there is an environment to check
    from ..contract.image_headers import max_image_bytes

    if isinstance(environment.get(MAX_IMAGE_MB_ENV), str):
        try:
            max_image_bytes(environment)  # the container would refuse it at start (training) or serve no request
        except ConfigError as exc:
            problems.append(str(exc))
    tta = environment.get(TTA_ENV)
    if isinstance(tta, str) and tta.strip().lower() not in TTA_MODES:
        problems.append(f"{TTA_ENV}={tta!r}: the server's default test-time augmentation is one of "
                        f"{', '.join(TTA_MODES)}")
    return problems


def raise_if(problems: Iterable[Optional[str]]) -> None:
    """One JobSettingsError listing every problem found (most calls find one)."""
    found = [p for p in problems if p]
    found = list(dict.fromkeys(found))
    if len(found) == 1:
        raise JobSettingsError(found[0])
    if found:
        raise JobSettingsError("invalid training job settings:\n  " + "\n  ".join(found))
