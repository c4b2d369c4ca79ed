"""UNetEstimator: the notebook-facing SageMaker client for the unetseg training image.

A real `sagemaker.estimator.Estimator` (attach, logs, HyperparameterTuner and deploy keep working) that:

- validates hyperparameters with the same TrainConfig the container parses, and sends them in its string form;
- sends a metric definition for every metric the training loop prints (metrics_log is the one vocabulary);
- checks instance, runtime, spot, S3, image and role settings before any AWS call (job_rules.JobSettingsError), and
  before a job is created that every bucket it reads or writes exists in the job's region (one request per bucket);
- turns an S3 prefix or a local folder into the `train` / `validation` channels (fit_inputs), checking local data as
  the container will and then uploading it;
- runs the SDK's local mode with today's Docker Compose (local_mode);
- opens the trained artifact with `load_model()`;
- serves it from the same image: `deploy()` returns a `UNetPredictor` (numpy in, numpy masks out) and
  `transformer()` runs batch transform over a folder of images, on SageMaker or locally (instance_type='local').

Importing this module imports the SageMaker SDK but never torch: `load_model()` imports the engine when called.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from sagemaker.estimator import Estimator
from sagemaker.vpc_utils import VPC_CONFIG_DEFAULT as _VPC_CONFIG_DEFAULT

from ..contract.config import TrainConfig
from ..contract.errors import ArtifactError
from ..contract.layout import INIT_MODEL_CHANNEL
from ..contract.metrics_log import all_metric_names, metric_definitions, per_class_names
from ..contract.sagemaker_env import (
    BATCH_MAX_PAYLOAD_MB,
    CHECKPOINT_DIR_ENV,
    IMAGE_URI_ENV,
    MLFLOW_EXPERIMENT_ENV,
    MLFLOW_TRACKING_URI_ENV,
    MODEL_SERVER_TIMEOUT_ENV,
    MODEL_SERVER_WORKERS_ENV,
    SERVING_MODE_ENV,
)
from . import job_rules as rules
from .fit_inputs import InputResolver
from .job_rules import JobSettingsError
from .local_mode import LOCAL_OUTPUT_DIR
from .quiet_sdk import keep_root_logging_quiet, quiet_v2_notice
from .s3_upload import bucket_facts
from .tracking import tracking_uri_problem

logger = logging.getLogger(__name__)

OUTPUT_PREFIX = "unetseg"  # s3://<default bucket>/[<session prefix>/]unetseg/ when no output_path is given
DEFAULT_VOLUME_GB = 30
# The SDK requires a role even in local mode, where Docker never uses it; an ARN (with '/') avoids an IAM lookup.
_LOCAL_MODE_ROLE = "arn:aws:iam::000000000000:role/unetseg-local-mode"
_SPOT_ARGUMENTS = ("use_spot_instances", "max_wait", "checkpoint_s3_uri", "checkpoint_local_path")


class UNetEstimator(Estimator):
    """Train a segmentation model with the unetseg image on SageMaker, or locally with instance_type='local'.

    Args:
        image_uri: the training image; else $UNETSEG_IMAGE_URI; else built from `repository`, `tag`, `account`
            (from STS when not given) and the region.
        role: IAM role ARN the job runs as (not needed in local mode).
        instance_count, instance_type: e.g. 1, "ml.g5.2xlarge"; "local" / "local_gpu" run Docker on this machine.
        hyperparameters: TrainConfig fields; validated here, sent as the strings the container parses back.
        max_run: seconds the job may run (1 s to 28 days).
        use_spot_instances: managed spot training. `max_wait` defaults to 2 x max_run (capped at 28 days) and
            `checkpoint_s3_uri` to <output_path>/<job name>/checkpoints.
        checkpoint_local_path: where the container keeps its checkpoints (default /opt/ml/checkpoints), which
            SageMaker syncs with `checkpoint_s3_uri`; passed on to the container as $UNETSEG_CHECKPOINT_DIR.
        output_path: s3:// prefix for model artifacts (file:// in local mode). Default s3://<session default
            bucket>/unetseg/, or ./unetseg-output/<job name>/ in local mode.
        volume_size: GB of EBS volume. Raised automatically when fit() knows the dataset needs more (File mode).
        input_mode: "File" (copy the data onto the instance) or "FastFile" (stream from S3).
        keep_alive_period_in_seconds: keep the instances warm for the next job (0..21600).
        environment: extra environment variables for the container.
        repository, tag, account, region: build the image URI
            <account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>.
        metric_definitions: extra metrics on top of unetseg's own (which are always sent).
        image_cuda: the CUDA version the image's PyTorch is built for ("12.6", the Dockerfile's default base; "12.8"
            or later runs Blackwell GPUs such as ml.p6-b200 and ml.g7e); None skips the GPU architecture check.
        baked_encoders: encoders whose pretrained weights the image carries (`unetseg image build --bake-weights
            resnet34` gives ["resnet34"]): with enable_network_isolation=True a job cannot download them.
        mlflow_tracking_uri: log the job to MLflow (unetseg/tracking.py): an http(s) server the job can reach, or a
            SageMaker MLflow tracking server ARN in the job's region (the role then needs `sagemaker-mlflow:*` on it).
            Sets $MLFLOW_TRACKING_URI in the job; `unetseg.client.tracking.compare_runs` compares the runs.
        mlflow_experiment: the MLflow experiment of the run (default "unetseg").
        **kwargs: anything else `sagemaker.estimator.Estimator` accepts (tags, subnets, base_job_name, ...).
    """

    def __init__(
        self,
        image_uri: Optional[str] = None,
        role: Optional[str] = None,
        instance_count: int = 1,
        instance_type: Optional[str] = None,
        *,
        hyperparameters: Optional[Mapping[str, Any]] = None,
        max_run: int = 24 * 3600,
        use_spot_instances: bool = False,
        max_wait: Optional[int] = None,
        checkpoint_s3_uri: Optional[str] = None,
        checkpoint_local_path: Optional[str] = None,
        output_path: Optional[str] = None,
        volume_size: Optional[int] = None,
        input_mode: str = "File",
        keep_alive_period_in_seconds: Optional[int] = None,
        environment: Optional[Mapping[str, str]] = None,
        sagemaker_session: Any = None,
        repository: Optional[str] = None,
        tag: str = "latest",
        account: Optional[str] = None,
        region: Optional[str] = None,
        metric_definitions: Optional[Sequence[Mapping[str, str]]] = None,
        debugger_hook_config: Any = False,
        disable_profiler: bool = True,
        image_cuda: Optional[str] = rules.IMAGE_CUDA,
        baked_encoders: Sequence[str] = (),
        mlflow_tracking_uri: Optional[str] = None,
        mlflow_experiment: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        # 1. Everything that needs no AWS call, so that a mistake costs nothing.
        config = TrainConfig.from_hyperparameters(dict(hyperparameters or {}))
        rules.raise_if([rules.image_cuda_problem(image_cuda)])
        kind = rules.parse_instance_type(instance_type, image_cuda)
        image_uri = image_uri or os.environ.get(IMAGE_URI_ENV) or None
        rules.raise_if([
            *rules.runtime_problems(
                max_run=max_run, max_wait=max_wait,
                use_spot_instances=use_spot_instances or kwargs.get("max_retry_attempts") is not None),
            *rules.resource_problems(kind=kind, instance_count=instance_count,
                                     volume_size=DEFAULT_VOLUME_GB if volume_size is None else volume_size,
                                     keep_alive_period_in_seconds=keep_alive_period_in_seconds, input_mode=input_mode,
                                     use_spot_instances=use_spot_instances),
            rules.output_path_problem(output_path, local=kind.local),
            None if kind.local or checkpoint_s3_uri is None
            else rules.s3_uri_problem("checkpoint_s3_uri", checkpoint_s3_uri),
            rules.role_problem(role, local=True),  # a missing role is checked below, after the SDK config is read
            rules.job_name_problem("base_job_name", kwargs.get("base_job_name")),
            *rules.environment_problems(environment),
            None if image_uri or repository else (
                f"no training image: pass image_uri=..., set ${IMAGE_URI_ENV}, or pass repository= (and tag=, "
                "account=, region=) to use <account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>"),
            rules.image_uri_problem(image_uri, local=kind.local) if image_uri else None,
            None if image_uri or not repository else rules.image_uri_problem(f"{repository}:{tag}", local=True,
                                                                               name="repository:tag"),
            *rules.gpu_setting_problems(config, kind),
            *rules.hyperparameter_problems(config.to_hyperparameters()),
            *_tracking_problems(mlflow_tracking_uri, mlflow_experiment, environment),
        ])

        # 2. Local mode: the SDK raises on spot and checkpoint arguments there; they mean nothing on one machine.
        if kind.local:
            given = {"use_spot_instances": use_spot_instances, "max_wait": max_wait,
                     "checkpoint_s3_uri": checkpoint_s3_uri, "checkpoint_local_path": checkpoint_local_path}
            dropped = [name for name, value in given.items() if value]
            if dropped:
                warnings.warn(f"local mode ignores {', '.join(dropped)} (spot capacity and S3 checkpoint sync "
                              "exist only on SageMaker)", UserWarning, stacklevel=2)
            use_spot_instances, max_wait, checkpoint_s3_uri, checkpoint_local_path = False, None, None, None
            role = role or _LOCAL_MODE_ROLE
        else:
            rules.raise_if([rules.checkpoint_local_path_problem(
                checkpoint_local_path, checkpointing=bool(use_spot_instances or checkpoint_s3_uri),
                environment=environment)])
            if checkpoint_local_path is not None:
                # SageMaker syncs LocalPath but tells the container nothing of it; the container reads this variable.
                environment = {**(environment or {}), CHECKPOINT_DIR_ENV: checkpoint_local_path}
            if use_spot_instances and max_wait is None:
                max_wait = rules.default_max_wait(max_run)

        # 3. The session (no request is sent by creating it), then what depends on it.
        session = _session_for(kind, sagemaker_session, region)
        keep_root_logging_quiet()
        if not kind.local:
            role = role or _role_from_sdk_config(session)
            rules.raise_if([rules.role_problem(role, local=False)])
        image_uri = image_uri or _ecr_image_uri(session, repository, tag, account, region)
        if not kind.local:
            rules.raise_if([rules.image_region_problem(image_uri, session.boto_region_name)])
        if mlflow_tracking_uri is not None:
            rules.raise_if([tracking_uri_problem(mlflow_tracking_uri, session.boto_region_name)])
            # The container logs to it (unetseg/tracking.py); the image URI tags the run with what trained it.
            environment = {**(environment or {}), MLFLOW_TRACKING_URI_ENV: mlflow_tracking_uri,
                           IMAGE_URI_ENV: image_uri,
                           **({MLFLOW_EXPERIMENT_ENV: mlflow_experiment} if mlflow_experiment else {})}

        self._config = config
        self._kind = kind
        self._image_cuda = image_cuda
        self._baked_encoders = list(baked_encoders)
        self._checkpoint_s3_uri_given = checkpoint_s3_uri is not None
        self._volume_size_given = volume_size is not None
        self._extra_metric_definitions = [dict(d) for d in (metric_definitions or ())]
        self._metric_notice: tuple = ()
        self._file_output_root = _file_output_root(output_path, kind)
        self._bucket_regions: dict[str, Optional[str]] = {}  # buckets found to exist, and their region
        self._s3_client: Any = None
        quiet_v2_notice(type(self).__name__)

        super().__init__(
            image_uri=image_uri,
            role=role,
            instance_count=instance_count,
            instance_type=instance_type,
            hyperparameters=config.to_hyperparameters(),
            metric_definitions=self._metric_definitions_for(config),
            max_run=max_run,
            use_spot_instances=use_spot_instances,
            max_wait=max_wait,
            checkpoint_s3_uri=checkpoint_s3_uri,
            checkpoint_local_path=checkpoint_local_path,
            output_path=self._file_output_root or output_path,
            volume_size=DEFAULT_VOLUME_GB if volume_size is None else volume_size,
            input_mode=input_mode,
            keep_alive_period_in_seconds=keep_alive_period_in_seconds,
            environment=dict(environment) if environment else None,
            sagemaker_session=session,
            debugger_hook_config=debugger_hook_config,
            disable_profiler=disable_profiler,
            **kwargs,
        )
        if self.output_path is None and not self._file_output_root:
            self.output_path = self._default_s3_output_path(allow_aws_calls=False)  # None: resolved at fit()

    # --- hyperparameters and metrics ----------------------------------------------------------------------------
    @property
    def config(self) -> TrainConfig:
        """The validated hyperparameters, as the container will parse them."""
        return self._config

    def set_hyperparameters(self, **kwargs: Any) -> None:
        """Change some hyperparameters; the whole set is validated again (TrainConfig, and against the instance)."""
        config = TrainConfig.from_hyperparameters({**self._config.model_dump(), **kwargs})
        rules.raise_if([*rules.gpu_setting_problems(config, self._kind),
                        *rules.hyperparameter_problems(config.to_hyperparameters())])
        self._config = config
        self._hyperparameters = config.to_hyperparameters()
        self.metric_definitions = self._metric_definitions_for(config)

    def _metric_definitions_for(self, config: TrainConfig) -> list[dict[str, str]]:
        """metrics_log's definitions plus the user's extras, within SageMaker's limit of 40 per job."""
        names = config.resolved_class_names
        ours = metric_definitions(names)
        known = set(all_metric_names(names))
        extras = [d for d in self._extra_metric_definitions if d.get("Name") not in known]
        if len(ours) + len(extras) <= rules.METRIC_DEFINITIONS_LIMIT:
            return ours + extras
        # Per-class metrics give way first (Dice of the last classes, then their IoU); the epoch metrics stay.
        per_class = [d["Name"] for d in ours if d["Name"] in set(per_class_names(names))]
        room = rules.METRIC_DEFINITIONS_LIMIT - (len(ours) - len(per_class)) - len(extras)
        if room < 0:
            raise JobSettingsError(f"{len(extras)} extra metric_definitions leave no room for unetseg's own metrics "
                                   f"within SageMaker's limit of {rules.METRIC_DEFINITIONS_LIMIT}")
        dropped = set(per_class[room:])
        if tuple(sorted(dropped)) != self._metric_notice:
            self._metric_notice = tuple(sorted(dropped))
            warnings.warn(f"SageMaker records at most {rules.METRIC_DEFINITIONS_LIMIT} metrics per job: "
                          f"{len(dropped)} per-class metrics ({', '.join(sorted(dropped)[:4])}, ...) stay in the log "
                          "but are not recorded", UserWarning, stacklevel=3)
        return [d for d in ours if d["Name"] not in dropped] + extras

    # --- training --------------------------------------------------------------------------------------------------
    def fit(self, inputs: Any = None, wait: bool = True, logs: Any = "All", job_name: Optional[str] = None,
            experiment_config: Optional[dict] = None, init_model: Any = None) -> Any:
        """Start a training job.

        `inputs`: an s3:// prefix holding train/ and validation/ (or val/), or one channel (images/ + masks/); a
        local folder of the same layout (checked, then uploaded to <output_path>/datasets/<folder name>/, or used
        in place in local mode); a TrainingInput; or a dict {'train': ..., 'validation': ...} of any of these.
        `init_model`: fine-tune from a trained unetseg model: another estimator (fitted), its `model_data` (s3://),
        or in local mode a local model.tar.gz. Same architecture; a different `classes` gets a new head.
        """
        rules.raise_if([rules.job_name_problem("job_name", job_name)])
        channels = self.training_inputs(inputs, init_model=init_model)
        return super().fit(channels, wait=wait, logs=logs, job_name=job_name, experiment_config=experiment_config)

    def training_inputs(self, inputs: Any, init_model: Any = None) -> dict[str, Any]:
        """The channels `fit(inputs)` would send (uploading local data), e.g. for `HyperparameterTuner.fit`."""
        if self.enable_network_isolation():
            fine_tuning = init_model is not None or (isinstance(inputs, Mapping) and INIT_MODEL_CHANNEL in inputs)
            rules.raise_if([rules.network_isolation_problem(self._config, baked_encoders=self._baked_encoders,
                                                            fine_tuning=fine_tuning)])
        resolver = InputResolver(
            local=self._kind.local,
            input_mode=self.input_mode,
            s3_client=self._s3,
            datasets_uri=self._datasets_uri,
            config=self._config,
            check_bucket=self._check_bucket,
            environment=self.environment or {},
        )
        channels = resolver.resolve(inputs, init_model=init_model)
        if channels.hyperparameters:  # a Ground Truth manifest's colour map: the job's classes, names and colours
            self.set_hyperparameters(**channels.hyperparameters)
        self._fit_volume_to(channels.file_mode_bytes)
        return channels.inputs

    def _fit_volume_to(self, dataset_bytes: int) -> None:
        if self._kind.local or not dataset_bytes:
            return
        rules.raise_if([rules.dataset_storage_problem(self._kind, dataset_bytes)])
        needed = rules.volume_needed_gb(dataset_bytes)
        if self.volume_size >= needed:
            return
        message = (f"volume_size raised from {self.volume_size} to {needed} GB: File mode copies "
                   f"{dataset_bytes / 1024**3:.1f} GiB of data onto the volume")
        if self._volume_size_given:
            warnings.warn(message, UserWarning, stacklevel=3)
        logger.info(message)
        self.volume_size = needed

    def _datasets_uri(self) -> str:
        output = self.output_path or self._default_s3_output_path(allow_aws_calls=True)
        if not output or not output.startswith("s3://"):
            raise JobSettingsError(f"output_path={output!r}: uploading a local dataset needs an s3:// output_path")
        return output.rstrip("/") + "/datasets/"

    def _prepare_for_training(self, job_name: Optional[str] = None) -> None:
        # Called by fit() and by HyperparameterTuner. The SDK would resolve a missing output path through STS and
        # its own default-bucket checks; ours is the session's bucket plus unetseg/ (an STS call only if the session
        # names no bucket). Per-job paths need the job name, which exists only from here on.
        if self.output_path is None and not self._file_output_root:
            self.output_path = self._default_s3_output_path(allow_aws_calls=True)
        if self._file_output_root:
            self.output_path = self._file_output_root  # the SDK validates a file:// path only in local mode
        super()._prepare_for_training(job_name=job_name)
        if self._file_output_root:
            # SageMaker writes <output_path>/<job>/output/model.tar.gz; local mode would write straight into
            # output_path, each job over the last. One folder per job, as on S3.
            self.output_path = f"{self._file_output_root.rstrip('/')}/{self._current_job_name}/"
        if self.use_spot_instances and not self._checkpoint_s3_uri_given:
            self.checkpoint_s3_uri = f"{self.output_path.rstrip('/')}/{self._current_job_name}/checkpoints"
        for setting, uri in (("output_path", self.output_path), ("checkpoint_s3_uri", self.checkpoint_s3_uri)):
            if isinstance(uri, str) and uri.startswith("s3://"):
                self._check_bucket(setting, uri)

    def _s3(self) -> Any:
        if self._s3_client is None:
            session = self.sagemaker_session
            self._s3_client = session.boto_session.client("s3", region_name=session.boto_region_name)
        return self._s3_client

    def _check_bucket(self, setting: str, uri: str) -> None:
        """The bucket of `uri` must exist and, for a SageMaker job, be in the job's region: SageMaker reads its data
        and writes its output in its own region only, and fails a job otherwise after its instances have started.
        One HeadBucket per bucket and estimator; a missing bucket is asked again (it may have been created since)."""
        bucket, _ = rules.split_s3_uri(uri)
        region = self.sagemaker_session.boto_region_name
        if bucket not in self._bucket_regions:
            facts = bucket_facts(self._s3(), bucket)
            if not facts.exists:
                raise JobSettingsError(f"{setting}={uri!r}: bucket {bucket!r} does not exist; correct the name, or "
                                       f"create it (aws s3 mb s3://{bucket} --region {region})")
            self._bucket_regions[bucket] = facts.region
        found = self._bucket_regions[bucket]
        if not self._kind.local and found and found != region:
            raise JobSettingsError(
                f"{setting}={uri!r}: bucket {bucket!r} is in {found}, but the job runs in {region}, and SageMaker "
                f"reads and writes S3 in the job's region only (it would fail the job after starting its instances); "
                f"use a bucket in {region} (aws s3 sync copies data across), or run the job in {found} "
                f"(a sagemaker.Session whose boto3 session has region_name={found!r})")

    def _ensure_base_job_name(self) -> None:
        # The SDK's base (the image's repository name) names every job, model, endpoint and transform this estimator
        # creates; it must be a valid SageMaker name.
        self.base_job_name = self.base_job_name or rules.base_name_from_image(self.training_image_uri())

    def _default_s3_output_path(self, *, allow_aws_calls: bool) -> Optional[str]:
        from sagemaker.s3_utils import s3_path_join

        session = self.sagemaker_session
        # A bucket named on the session (or in the SDK config) needs no STS or S3 call; default_bucket() makes both.
        bucket = getattr(session, "_default_bucket", None) or getattr(session, "_default_bucket_name_override", None)
        if not bucket:
            if not allow_aws_calls:
                return None
            bucket = session.default_bucket()
        return s3_path_join("s3://", bucket, getattr(session, "default_bucket_prefix", None), OUTPUT_PREFIX,
                            with_end_slash=True)

    # --- the trained model -------------------------------------------------------------------------------------------
    def load_model(self, local_dir: Optional[str | Path] = None, device: Any = None) -> Any:
        """Fetch the latest job's model artifact (S3 or file://) and open it with `unetseg.model.load_model`.

        The artifact is downloaded to `local_dir` when given (and kept), else to a temporary folder removed once the
        model is loaded.
        """
        model_data = self.trained_model_data("load_model()")
        from ..model import load_model as open_artifact  # the engine: imports torch

        if local_dir is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            return open_artifact(self._fetch_artifact(model_data, Path(local_dir)), device=device)
        with tempfile.TemporaryDirectory(prefix="unetseg-model-") as tmp:
            return open_artifact(self._fetch_artifact(model_data, Path(tmp)), device=device)

    def trained_model_data(self, needed_by: str) -> Any:
        """The latest job's model_data, once that job has Completed; else an ArtifactError saying why not."""
        job = self.latest_training_job
        if job is None:
            raise ArtifactError(f"no training job yet: {needed_by} needs a trained model; call fit() first, or "
                                "UNetEstimator.attach('<job name>')")
        details = self.sagemaker_session.sagemaker_client.describe_training_job(TrainingJobName=job.name)
        status = details.get("TrainingJobStatus")
        if status != "Completed":
            reason = f" ({details['FailureReason']})" if details.get("FailureReason") else ""
            raise ArtifactError(f"training job {job.name} is {status}{reason}; {needed_by} needs a Completed job "
                                "(est.latest_training_job.wait() waits for it)")
        return self.model_data

    def _fetch_artifact(self, model_data: Any, target: Path) -> Path:
        """A local path to model.tar.gz (or to the uncompressed model folder)."""
        s3 = self.sagemaker_session.boto_session.client("s3", region_name=self.sagemaker_session.boto_region_name)
        if isinstance(model_data, Mapping):  # disable_output_compression=True: a prefix of files
            prefix_uri = model_data["S3DataSource"]["S3Uri"]
            bucket, prefix = rules.split_s3_uri(prefix_uri)
            from .s3_upload import list_objects

            for obj in list_objects(s3, bucket, prefix):
                if obj.key.endswith("/"):
                    continue
                destination = target / obj.key[len(prefix):]
                destination.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj.key, str(destination))
            return target
        uri = str(model_data)
        if uri.startswith("file://"):
            return Path(uri[len("file://"):])
        bucket, key = rules.split_s3_uri(rules.check_s3_uri("model_data", uri))
        destination = target / Path(key).name
        logger.info("downloading %s", uri)
        s3.download_file(bucket, key, str(destination))
        return destination

    # --- inference ------------------------------------------------------------------------------------------------
    def create_model(self, role: Optional[str] = None, image_uri: Optional[str] = None, predictor_cls: Any = None,
                     vpc_config_override: Any = _VPC_CONFIG_DEFAULT, *, env: Optional[Mapping[str, str]] = None,
                     model_server_workers: Optional[int] = None, model_server_timeout: Optional[int] = None,
                     sagemaker_session: Any = None, async_inference: bool = False, **kwargs: Any) -> Any:
        """A `sagemaker.model.Model` of the latest job's artifact, served by the training image (`<image> serve`).

        Its predictor is a `UNetPredictor` (numpy images in, numpy masks out). `model_server_workers` and
        `model_server_timeout` (seconds per request) set the server's SAGEMAKER_MODEL_SERVER_* variables; `env` adds
        others (UNETSEG_MAX_BODY_MB, UNETSEG_MAX_PIXELS). `sagemaker_session` overrides the estimator's (deploy()
        passes a LocalSession for instance_type='local'). `async_inference=True`: a model for an asynchronous endpoint
        (`model.deploy(..., async_inference_config=...)`): the server serves with the async limits, since SageMaker
        does not tell a container it serves asynchronously, and the predictor is a `UNetAsyncPredictor`.
        """
        from .predictor import UNetAsyncPredictor, UNetPredictor

        environment = dict(env or {})
        if async_inference:
            named = environment.get(SERVING_MODE_ENV)
            if named not in (None, "async"):
                raise JobSettingsError(f"env {SERVING_MODE_ENV}={named!r} with async_inference: an asynchronous "
                                       "endpoint serves with the async limits (1 GB, 900 s); leave it out")
            environment[SERVING_MODE_ENV] = "async"
            predictor_cls = predictor_cls or UNetAsyncPredictor
        for name, value in ((MODEL_SERVER_WORKERS_ENV, model_server_workers),
                            (MODEL_SERVER_TIMEOUT_ENV, model_server_timeout)):
            if value is not None:
                if not rules.is_whole(value, minimum=1):
                    raise JobSettingsError(f"{name.lower().removeprefix('sagemaker_')}={value!r}: use a whole number "
                                           "of 1 or more")
                environment[name] = str(int(value))
        rules.raise_if([*rules.environment_problems(environment),
                        rules.image_uri_problem(image_uri, local=True) if image_uri is not None else None])
        model = super().create_model(role=role, image_uri=image_uri, predictor_cls=predictor_cls or UNetPredictor,
                                     vpc_config_override=vpc_config_override, env=environment or None, **kwargs)
        if model.name is None:  # else the Model names itself after the image's repository, which may hold _ or .
            from sagemaker.utils import name_from_base

            self._ensure_base_job_name()
            model.name = name_from_base(self.base_job_name)
        if sagemaker_session is not None:
            model.sagemaker_session = sagemaker_session
        return model

    def deploy(self, initial_instance_count: Optional[int] = None, instance_type: Optional[str] = None,
               serializer: Any = None, deserializer: Any = None, *, async_inference: bool = False,
               **kwargs: Any) -> Any:
        """Host the latest job's model on an endpoint and return its `UNetPredictor`:

            predictor = est.deploy(instance_type="ml.g5.xlarge")     # or "local" / "local_gpu" (Docker here)
            mask = predictor.predict(image)                          # (H, W) uint8
            predictor.delete_endpoint()

        A real-time endpoint carries at most 6 MB each way; the predictor checks each request before sending it.
        `async_inference=True` (or an `async_inference_config=AsyncInferenceConfig(...)`) deploys the same image as
        an asynchronous endpoint instead (images up to 1 GB through S3, requests up to an hour, scale-to-zero) and
        returns a `UNetAsyncPredictor`; its objects go under the job's output, <output_path>/<job>/async-input/,
        async-output/ and async-failures/, unless the config names others. Local mode has no asynchronous inference:
        there it deploys a real-time local endpoint, with a warning.
        `initial_instance_count` defaults to 1. Everything else is `Estimator.deploy`'s (endpoint_name, wait,
        serverless_inference_config, ...) or `create_model`'s (env, model_server_workers, ...).
        """
        rules.raise_if([rules.job_name_problem(name, kwargs.get(name)) for name in ("endpoint_name", "model_name")])
        is_async = bool(async_inference) or kwargs.get("async_inference_config") is not None
        if is_async and kwargs.get("serverless_inference_config") is not None:
            raise JobSettingsError("async_inference and serverless_inference_config exclude each other: a serverless "
                                   "endpoint is real-time; pass one of them")
        local = False
        if kwargs.get("serverless_inference_config") is None:
            kind = rules.parse_instance_type(instance_type, self._image_cuda)
            local = kind.local
            initial_instance_count = 1 if initial_instance_count is None else initial_instance_count
            if not rules.is_whole(initial_instance_count, minimum=1):
                raise JobSettingsError(f"initial_instance_count={initial_instance_count!r}: use 1 or more")
            if kind.local:
                if kwargs.get("sagemaker_session") is None:
                    kwargs["sagemaker_session"] = self._local_inference_session()
                # The local client starts the container and waits for /ping before CreateEndpoint returns; the SDK's
                # wait would then sleep its 30 s poll interval before looking.
                kwargs["wait"] = False
            elif not kind.local:
                self._check_hostable_remotely(instance_type)
        input_path = self._prepare_async_deploy(kwargs, local=local) if is_async else None
        from sagemaker.predictor_async import AsyncPredictor

        from .predictor import UNetPredictor

        predictor = super().deploy(initial_instance_count, instance_type, serializer, deserializer, **kwargs)
        if isinstance(predictor, AsyncPredictor):  # the SDK's wrapper: ours does what it does, and decodes as ours
            predictor = predictor.predictor
        if isinstance(predictor, UNetPredictor):
            predictor.classes = self._config.classes  # the size of its probabilities, checked before each request
        if input_path is not None:
            predictor.input_path = input_path
        return predictor

    def _prepare_async_deploy(self, kwargs: dict, *, local: bool) -> Optional[str]:
        """Set deploy()'s `kwargs` for an asynchronous endpoint; return where its input images go (None: local)."""
        from .async_inference import ASYNC_INPUT_FOLDER, default_config, job_prefix

        kwargs["async_inference"] = True  # to create_model: the server's mode and the predictor's class
        if local:
            kwargs.pop("async_inference_config", None)
            warnings.warn("local mode has no asynchronous inference: this deploys a real-time local endpoint (with the "
                          "async limits: 1 GB a request, 900 s), whose predict_async() answers at once; deploy to an "
                          "ml.* instance type for an asynchronous endpoint", UserWarning, stacklevel=3)
            return None
        if self.latest_training_job is None:
            return None  # Estimator.deploy says that a training job is needed
        prefix = job_prefix(self.output_path, self.latest_training_job.name)
        kwargs["async_inference_config"] = default_config(
            prefix, config=kwargs.get("async_inference_config"),
            max_concurrent_invocations=kwargs.get("model_server_workers"))
        return prefix + ASYNC_INPUT_FOLDER + "/"

    def transformer(self, instance_count: int = 1, instance_type: Optional[str] = None,
                    strategy: Optional[str] = "SingleRecord", assemble_with: Optional[str] = None,
                    output_path: Optional[str] = None, output_kms_key: Optional[str] = None,
                    accept: Optional[str] = "image/png", env: Optional[Mapping[str, str]] = None,
                    max_concurrent_transforms: Optional[int] = None, max_payload: Optional[int] = None,
                    tags: Any = None, role: Optional[str] = None, volume_kms_key: Optional[str] = None,
                    vpc_config_override: Any = _VPC_CONFIG_DEFAULT, enable_network_isolation: Optional[bool] = None,
                    model_name: Optional[str] = None) -> Any:
        """A batch transform over a folder of images: one request per image, one mask per image.

            job = est.transformer(instance_type="ml.g5.xlarge", output_path="s3://bucket/masks/")
            job.transform("s3://bucket/images/", content_type="image/png")   # image/jpeg for JPEGs
            # s3://bucket/masks/<image name>.out: the class-index mask as a palette PNG

        Defaults that fit images: `strategy='SingleRecord'` (an image is one record, never split or batched) and
        `accept='image/png'` (application/x-npy or application/json for the other outputs); `transform()` defaults
        `content_type` to image/png. `max_payload` and `max_concurrent_transforms` default to what the server
        reports at /execution-parameters. With instance_type='local' the job runs in Docker here (data: a local
        folder, file:// or s3://).
        """
        from sagemaker.utils import format_tags

        kind = rules.parse_instance_type(instance_type, self._image_cuda)
        session = self._local_inference_session() if kind.local else self.sagemaker_session
        if not kind.local:
            self._check_hostable_remotely(instance_type)
        payload = None  # SageMaker's limits, which its API model does not state: refused here, not in the job
        if max_payload is not None and not 0 <= max_payload <= BATCH_MAX_PAYLOAD_MB:
            payload = (f"max_payload={max_payload}: a batch transform's MaxPayloadInMB is 0 to {BATCH_MAX_PAYLOAD_MB} "
                       "(megabytes per request); larger images: `unetseg predict` reads TIFFs window by window")
        elif (max_payload or 0) * (max_concurrent_transforms or 0) > BATCH_MAX_PAYLOAD_MB:
            payload = (f"max_payload={max_payload} x max_concurrent_transforms={max_concurrent_transforms}: SageMaker "
                       f"allows at most {BATCH_MAX_PAYLOAD_MB} MB in flight per instance; lower one of them")
        rules.raise_if([None if output_path is None or kind.local else rules.s3_uri_problem("output_path", output_path),
                        rules.job_name_problem("model_name", model_name), *rules.environment_problems(env), payload])
        tags = format_tags(tags) or self.tags
        self._ensure_base_job_name()  # the transform jobs' names too
        model_name = self._get_or_create_name(model_name)
        if self.latest_training_job is None:
            logger.warning("no training job yet: this transformer names model %s, which exists only once it is "
                           "created (fit() first, or UNetEstimator.attach('<job name>'))", model_name)
        else:
            model = self.create_model(
                role=role, vpc_config_override=vpc_config_override, model_kms_key=self.output_kms_key,
                enable_network_isolation=(self.enable_network_isolation() if enable_network_isolation is None
                                          else enable_network_isolation),
                sagemaker_session=session)
            model.name = model_name
            model._create_sagemaker_model(instance_type, tags=tags)

        from .predictor import UNetTransformer

        return UNetTransformer(
            model_name, instance_count, instance_type, strategy=strategy, assemble_with=assemble_with,
            output_path=output_path, output_kms_key=output_kms_key, accept=accept,
            max_concurrent_transforms=max_concurrent_transforms, max_payload=max_payload,
            env=dict(env) if env else None, tags=tags, base_transform_job_name=self.base_job_name,
            sagemaker_session=session, volume_kms_key=volume_kms_key)

    def _local_inference_session(self) -> Any:
        """The session a local endpoint or transform runs under: this estimator's, when it is a LocalSession."""
        from sagemaker.local import LocalSession

        from .local_mode import install_compose_detection, install_serving_cleanup

        install_compose_detection()
        install_serving_cleanup()  # the SDK would leave each stopped endpoint or transform container behind
        if isinstance(self.sagemaker_session, LocalSession):
            return self.sagemaker_session
        return LocalSession(boto_session=self.sagemaker_session.boto_session)

    def _check_hostable_remotely(self, instance_type: str) -> None:
        if self._kind.local and self.latest_training_job is not None:
            model_data = self.model_data
            if isinstance(model_data, str) and model_data.startswith("file://"):
                raise JobSettingsError(
                    f"instance_type={instance_type!r}: this model was trained in local mode and is at {model_data}; "
                    "deploy it locally (instance_type='local' or 'local_gpu'), or upload model.tar.gz to S3 and "
                    "deploy a sagemaker.model.Model of it")

    # --- tuning -----------------------------------------------------------------------------------------------------
    def tuner(self, hyperparameter_ranges: Mapping[str, Any], objective_metric_name: Optional[str] = None,
              objective_type: str = "Maximize", **kwargs: Any) -> Any:
        """A HyperparameterTuner for this estimator: metric definitions filled in, ranges checked by TrainConfig,
        and a fit() that resolves inputs like `UNetEstimator.fit`. The objective defaults to val_miou."""
        from .tuning import make_tuner

        return make_tuner(self, hyperparameter_ranges, objective_metric_name, objective_type, **kwargs)


# --- helpers ------------------------------------------------------------------------------------------------------

def _tracking_problems(uri: Any, experiment: Any, environment: Any) -> list[Optional[str]]:
    """mlflow_tracking_uri and mlflow_experiment, before any AWS call (the ARN's region is checked with the session)."""
    if uri is None:
        return [None if experiment is None else "mlflow_experiment needs mlflow_tracking_uri: the server to log to"]
    given = (environment or {}).get(MLFLOW_TRACKING_URI_ENV) if isinstance(environment, Mapping) else None
    return [tracking_uri_problem(uri),
            None if experiment is None or (isinstance(experiment, str) and experiment.strip()) else
            f"mlflow_experiment={experiment!r}: give the experiment's name, or leave it out (default 'unetseg')",
            None if given in (None, uri) else
            f"mlflow_tracking_uri={uri!r} and environment[{MLFLOW_TRACKING_URI_ENV!r}]={given!r} disagree; give one"]


def _session_for(kind: rules.InstanceKind, session: Any, region: Optional[str]) -> Any:
    import boto3
    import sagemaker
    from sagemaker.local import LocalSession

    if kind.local:
        from .local_mode import install_compose_detection, install_failure_reporting

        install_compose_detection()
        install_failure_reporting()  # a failed job's error carries its /opt/ml/output/failure
    if session is not None:
        if region and session.boto_region_name != region:
            raise JobSettingsError(f"region={region!r} differs from the session's region "
                                   f"{session.boto_region_name!r}; pass one of them")
        if kind.local and not isinstance(session, LocalSession):
            raise JobSettingsError(f"instance_type={kind.instance_type!r} needs a sagemaker.local.LocalSession "
                                   "(or no session: one is made for you)")
        return session
    boto_session = boto3.Session(region_name=region) if region else None
    if kind.local:
        return LocalSession(boto_session=boto_session)
    return sagemaker.Session(boto_session=boto_session)


def _role_from_sdk_config(session: Any) -> Optional[str]:
    """SageMaker.TrainingJob.RoleArn from the SDK's config files, as the SDK itself would read it."""
    from sagemaker.config import TRAINING_JOB_ROLE_ARN_PATH
    from sagemaker.utils import resolve_value_from_config

    return resolve_value_from_config(None, TRAINING_JOB_ROLE_ARN_PATH, sagemaker_session=session)


def ecr_image_uri(account: str, region: str, repository: str, tag: str = "latest") -> str:
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{repository}:{tag}"


def _ecr_image_uri(session: Any, repository: str, tag: str, account: Optional[str], region: Optional[str]) -> str:
    region = region or session.boto_region_name
    if not account:
        # The only call the constructor may make: STS, and only when the image must be named by account.
        account = session.boto_session.client("sts", region_name=region).get_caller_identity()["Account"]
    return ecr_image_uri(account, region, repository, tag)


def _file_output_root(output_path: Optional[str], kind: rules.InstanceKind) -> Optional[str]:
    if not kind.local:
        return None
    if output_path is None:
        return (Path.cwd() / LOCAL_OUTPUT_DIR).as_uri() + "/"
    return output_path if output_path.startswith("file://") else None
