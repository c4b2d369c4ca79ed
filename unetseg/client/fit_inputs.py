"""Turn what a user hands to `fit()` into the `train` and `validation` channels the container reads.

Accepted: an S3 prefix (finds `train/` and `validation/` or `val/` under it, or is itself a channel with `images/` and
`masks/`), a local folder of the same layout, a single TrainingInput (the train channel), or a dict of channels whose
values are any of these. Every problem is reported before a training job is created, naming the prefix, folder or
file and what was found there.

Local folders are checked as the container will check them before anything is sent (uploaded, or bound as file:// in
local mode): paired by stem, then every file read by the engine's own data check (`data.checks.check_dataset`, which
needs no torch) with the job's TrainConfig, all channels together so that one mask convention is decided from all
files. The container caches decoded pixels; this check keeps none. Data already in S3 is checked by the container.
Each bucket is checked (`check_bucket`) before the first request that reads or writes it.

A Ground Truth semantic segmentation output manifest (`s3://.../output.manifest`, or in local mode a local one) is a
channel too: read, checked and sent as plain S3Prefix channels by manifest_inputs.py; its colour map sets `classes`,
`class_names`, `class_colors` and `mask_mode` (Channels.hyperparameters).

A third channel, `init_model`, carries a trained unetseg model to fine-tune from: an s3:// URI of a model.tar.gz
(another job's `model_data`), a fitted UNetEstimator, or in local mode a local model.tar.gz or model folder.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..contract.config import TrainConfig
from ..contract.errors import DataError
from ..contract.ground_truth import is_manifest
from ..contract.image_headers import job_limit
from ..contract.layout import (
    CHANNELS,
    IMAGES,
    INIT_MODEL_CHANNEL,
    MASKS,
    TRAIN_CHANNEL,
    VALIDATION_CHANNEL,
    folder_names,
    listing,
    read_layout,
)
from ..data.scan import Sample, pair_channel, split_holdout
from .job_rules import INPUT_MODES, JobSettingsError, check_s3_uri, split_s3_uri
from .manifest_inputs import ManifestChannels, local_samples, read_manifest
from .s3_upload import is_object, list_children, prefix_size, progress_bar, sync_folder

logger = logging.getLogger(__name__)

CHECK_PROGRESS_DELAY_S = 1.0  # the data check's bar shows once a check has taken this long


@dataclass(frozen=True)
class Channels:
    inputs: dict[str, Any]  # channel name -> TrainingInput, FileSystemInput or file:// URI
    file_mode_bytes: int  # bytes that File mode copies onto the instance (0 where unknown or streamed)
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # what a Ground Truth manifest's colour map decides


@dataclass
class InputResolver:
    local: bool  # local mode: local folders are bound as file://, not uploaded
    input_mode: str
    s3_client: Callable[[], Any]  # made on first use: a local-mode run with local data needs no AWS client
    datasets_uri: Callable[[], str]  # s3://.../datasets/ where local folders are uploaded (resolved on first upload)
    config: Optional[TrainConfig] = None  # the job's hyperparameters: local data is read with them (None: pairing only)
    check_bucket: Callable[[str, str], None] = lambda setting, uri: None  # (setting, s3 URI): raises if unusable
    environment: Mapping[str, str] = field(default_factory=dict)  # the job's: its image size limit, for instance
    progress: bool = True

    def resolve(self, inputs: Any, init_model: Any = None) -> Channels:
        channels = self._resolve_data(inputs)
        if init_model is not None:
            if INIT_MODEL_CHANNEL in channels.inputs:
                raise DataError(f"init_model given twice: as fit(init_model=...) and as the "
                                f"{INIT_MODEL_CHANNEL!r} channel")
            channels.inputs[INIT_MODEL_CHANNEL] = self.model_input(init_model)
        return channels

    def _resolve_data(self, inputs: Any) -> Channels:
        from sagemaker.inputs import FileSystemInput, TrainingInput

        if inputs is None:
            raise DataError("fit() needs training data: an S3 prefix with train/ (and validation/) under it, a local "
                            "folder of the same layout, or a dict {'train': ..., 'validation': ...}")
        if isinstance(inputs, (TrainingInput, FileSystemInput)):
            inputs = {TRAIN_CHANNEL: inputs}
        if isinstance(inputs, Mapping):
            return self._from_dict(inputs)
        if isinstance(inputs, (str, os.PathLike)):
            text = os.fspath(inputs)
            if is_manifest(text):
                return self._from_manifests({TRAIN_CHANNEL: text})
            if text.startswith("s3://"):
                return self._from_s3_prefix(text)
            return self._from_local_folder(self._local_path(text))
        raise DataError(f"fit() got {type(inputs).__name__}: pass an s3:// prefix, a local folder, a TrainingInput "
                        "or a dict of channels")

    # --- S3 --------------------------------------------------------------------------------------------------------
    def _from_s3_prefix(self, uri: str) -> Channels:
        check_s3_uri("fit inputs", uri)
        self.check_bucket("fit inputs", uri)
        bucket, key = split_s3_uri(uri)
        prefix = key if not key or key.endswith("/") else key + "/"
        folders, files = list_children(self.s3_client(), bucket, prefix)
        root = f"s3://{bucket}/{prefix}"
        if not folders and not files:
            self._refuse_object(uri)
        layout = read_layout(folders, root, files)
        # layout.train "": the prefix is itself the channel, and the container holds out val_fraction of it
        found = {TRAIN_CHANNEL: root + (layout.train + "/" if layout.train else "")}
        if layout.validation:
            found[VALIDATION_CHANNEL] = root + layout.validation + "/"
        for channel_uri in found.values():
            if channel_uri != root:
                self._check_s3_channel(channel_uri)
        return Channels({name: self._training_input(u) for name, u in found.items()},
                        sum(self._s3_bytes(u) for u in found.values()))

    def _check_s3_channel(self, uri: str, given: Optional[str] = None) -> None:
        bucket, prefix = split_s3_uri(uri)
        folders, files = list_children(self.s3_client(), bucket, prefix)
        if not folders and not files and given:
            self._refuse_object(given)
        missing = [name + "/" for name in (IMAGES, MASKS) if name not in folders]
        if missing:
            raise DataError(f"{uri}: a channel needs {IMAGES}/ and {MASKS}/, missing {', '.join(missing)}; "
                            f"found {listing(folders, files)}")

    def _refuse_object(self, uri: str) -> None:
        """An S3 URI of a file where a prefix (folder) is meant; said only once the prefix was found empty."""
        bucket, key = split_s3_uri(uri)
        if is_object(self.s3_client(), bucket, key):
            raise DataError(f"{uri} is an object, not a prefix: pass the prefix (folder) that holds train/ (and "
                            "validation/), or the one that holds a channel's images/ and masks/")

    def _s3_bytes(self, uri: str) -> int:
        if self.input_mode != "File":
            return 0  # FastFile streams: nothing is copied onto the volume
        bucket, prefix = split_s3_uri(uri)
        return prefix_size(self.s3_client(), bucket, prefix)

    def _training_input(self, uri: str) -> Any:
        from sagemaker.inputs import TrainingInput

        return TrainingInput(uri, input_mode=self.input_mode, distribution="FullyReplicated")

    # --- local folders -----------------------------------------------------------------------------------------------
    def _local_path(self, text: str) -> Path:
        if text.startswith("file://"):
            if not self.local:
                raise JobSettingsError(f"{text!r}: file:// data is for local mode (instance_type='local' or "
                                       "'local_gpu'); pass the folder path to upload it, or an s3:// prefix")
            text = text[len("file://"):]
        path = Path(text).expanduser()
        if not path.is_dir():
            raise DataError(f"{text!r} is neither an s3:// prefix nor an existing local folder")
        return path.resolve()

    def _from_local_folder(self, folder: Path) -> Channels:
        folders, files = folder_names(folder)
        found = read_layout(folders, str(folder), files)
        layout = {TRAIN_CHANNEL: found.train, **({VALIDATION_CHANNEL: found.validation} if found.validation else {})}
        paired = {channel: pair_channel(folder / sub) for channel, sub in layout.items()}  # every image has its mask
        self._check_local_data(paired, validation_elsewhere=False, where=str(folder))
        if self.local:
            return Channels({name: (folder / sub).as_uri() for name, sub in layout.items()}, 0)
        return self._upload(folder, layout)

    def _check_local_data(self, paired: Mapping[str, list[Sample]], *, validation_elsewhere: bool, where: str) -> None:
        """Read every local file as the container will, before anything is sent; one DataError names each bad file."""
        if self.config is None:
            return
        from ..data.checks import (
            check_dataset,  # numpy and PIL, no torch: imported only for local data
        )

        if TRAIN_CHANNEL in paired and VALIDATION_CHANNEL not in paired and not validation_elsewhere:
            split_holdout(paired[TRAIN_CHANNEL], self.config.val_fraction, self.config.seed)  # at least two samples
        samples = [sample for channel in paired.values() for sample in channel]
        no_cache = self.config.replace(cache_images="off")  # the container caches decoded pixels; the notebook must not
        with job_limit(self.environment), progress_bar(len(samples), f"check {where}", self.progress, unit="file",
                                                       delay=CHECK_PROGRESS_DELAY_S) as bar:
            check_dataset(_CountedReads(samples, bar.update), no_cache)  # as the job's container will read the files

    def _upload(self, folder: Path, layout: Mapping[str, str], name: Optional[str] = None) -> Channels:
        target = self.datasets_uri().rstrip("/") + "/" + _s3_safe(name or folder.name) + "/"
        self.check_bucket("output_path (where local data is uploaded)", target)
        bucket, prefix = split_s3_uri(target)
        subfolders = [sub for sub in layout.values() if sub]
        report = sync_folder(self.s3_client(), folder, bucket, prefix, subfolders=subfolders or None,
                             progress=self.progress)
        channels = {ch: self._training_input(target + (sub + "/" if sub else "")) for ch, sub in layout.items()}
        return Channels(channels, report.total_bytes if self.input_mode == "File" else 0)

    # --- a model to start from ----------------------------------------------------------------------------------------
    def model_input(self, value: Any) -> Any:
        """The init_model channel for a trained model: an S3 URI, a fitted estimator, or (local mode) a local path."""
        from sagemaker.estimator import EstimatorBase
        from sagemaker.inputs import TrainingInput

        if hasattr(value, "trained_model_data"):  # a UNetEstimator: checks that its job completed
            value = value.trained_model_data("init_model")
        elif isinstance(value, EstimatorBase):
            if value.latest_training_job is None:
                raise DataError("init_model: that estimator has no training job yet; fit() it first")
            value = value.model_data
        if isinstance(value, Mapping):  # model_data of a job with disable_output_compression: an S3 prefix
            value = value.get("S3DataSource", {}).get("S3Uri", value)
        if isinstance(value, TrainingInput):
            _refuse_sharding(INIT_MODEL_CHANNEL, value)
            self._check_training_input_bucket(INIT_MODEL_CHANNEL, value)
            return value
        if not isinstance(value, (str, os.PathLike)):
            raise DataError(f"init_model: {type(value).__name__} is not an s3:// URI, a local path "
                            "or a fitted estimator")
        text = os.fspath(value)
        if text.startswith("s3://"):
            check_s3_uri("init_model", text)
            self.check_bucket("init_model", text)
            bucket, key = split_s3_uri(text)
            found = self.s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0)
            if not found:
                raise DataError(f"init_model {text}: no such object in S3 (expected a model.tar.gz written by a "
                                "unetseg job, e.g. another estimator's model_data)")
            return TrainingInput(text, input_mode="File", distribution="FullyReplicated")
        path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
        if not self.local:
            raise JobSettingsError(f"init_model={text!r}: a SageMaker job reads its starting model from S3; pass an "
                                   "s3:// URI (e.g. another estimator's model_data), or upload the model.tar.gz first")
        if not path.exists():
            raise DataError(f"init_model {text!r}: no such model folder or model.tar.gz")
        return path.resolve().as_uri()  # a file binds its folder: the container picks model.tar.gz in it

    # --- a dict of channels -------------------------------------------------------------------------------------------
    def _from_dict(self, inputs: Mapping[str, Any]) -> Channels:
        from sagemaker.inputs import FileSystemInput, TrainingInput

        unknown = [name for name in inputs if name not in CHANNELS]
        if unknown:
            hint = " (use 'validation')" if "val" in unknown else ""
            raise DataError(f"unknown channel name(s) {unknown}{hint}: the unetseg container reads "
                            f"{', '.join(CHANNELS)}")
        if TRAIN_CHANNEL not in inputs:
            raise DataError(f"fit() inputs {sorted(inputs)} have no {TRAIN_CHANNEL!r} channel")
        manifests = {name: os.fspath(value) for name, value in inputs.items() if name != INIT_MODEL_CHANNEL
                     and isinstance(value, (str, os.PathLike)) and is_manifest(os.fspath(value))}
        if manifests:
            if len(manifests) != len([name for name in inputs if name != INIT_MODEL_CHANNEL]):
                raise DataError(f"fit() inputs: {', '.join(sorted(manifests))} given as Ground Truth manifests, the "
                                "other channels not: give every data channel as a manifest, or none")
            found = self._from_manifests(manifests)
            if INIT_MODEL_CHANNEL in inputs:
                found.inputs[INIT_MODEL_CHANNEL] = self.model_input(inputs[INIT_MODEL_CHANNEL])
            return found
        # Local folders first, all together: their problems need no request, and one mask convention spans them.
        folders = {name: self._local_path(os.fspath(value)) for name, value in inputs.items()
                   if name != INIT_MODEL_CHANNEL and isinstance(value, (str, os.PathLike))
                   and not os.fspath(value).startswith("s3://")}
        paired = {name: pair_channel(folder) for name, folder in folders.items()}
        if paired:
            self._check_local_data(paired, validation_elsewhere=VALIDATION_CHANNEL in inputs,
                                   where=", ".join(str(folder) for folder in folders.values()))
        channels: dict[str, Any] = {}
        total = 0
        for name, value in inputs.items():
            if name == INIT_MODEL_CHANNEL:
                channels[name] = self.model_input(value)
            elif isinstance(value, TrainingInput):
                mode = value.config.get("InputMode")
                if mode is not None and mode not in INPUT_MODES:
                    raise JobSettingsError(f"channel {name!r} has input_mode={mode!r}; use 'File' or 'FastFile' "
                                           "(the container reads image files, not a Pipe stream)")
                _refuse_sharding(name, value)
                self._check_training_input_bucket(name, value)
                channels[name] = value
            elif isinstance(value, FileSystemInput):
                channels[name] = value
            elif isinstance(value, str) and value.startswith("s3://"):
                check_s3_uri(f"fit inputs[{name!r}]", value)
                self.check_bucket(f"fit inputs[{name!r}]", value)
                uri = value if value.endswith("/") else value + "/"
                self._check_s3_channel(uri, given=value)
                channels[name] = self._training_input(uri)
                total += self._s3_bytes(uri)
            elif isinstance(value, (str, os.PathLike)):
                folder = folders[name]  # paired and checked above
                if self.local:
                    channels[name] = folder.as_uri()
                else:
                    uploaded = self._upload(folder, {name: ""}, name=f"{folder.parent.name}-{folder.name}")
                    channels[name] = uploaded.inputs[name]
                    total += uploaded.file_mode_bytes
            else:
                raise DataError(f"channel {name!r}: {type(value).__name__} is not an s3:// URI, local folder or "
                                "TrainingInput")
        return Channels(channels, total)

    # --- Ground Truth manifests ---------------------------------------------------------------------------------------
    def _from_manifests(self, manifests: Mapping[str, str]) -> Channels:
        """Each manifest read and checked (one colour map for all), its images and masks looked up, its channels
        made."""
        attribute = self.config.label_attribute if self.config is not None else None
        for name, text in manifests.items():
            if text.startswith("s3://"):
                check_s3_uri(f"fit inputs[{name!r}]", text)
                self.check_bucket(f"fit inputs[{name!r}]", text)
        parsed = {name: read_manifest(text, self.s3_client, attribute) for name, text in manifests.items()}
        hyperparameters = self._manifest_hyperparameters(parsed)
        maker = ManifestChannels(self.s3_client, self.datasets_uri, self._training_input, self.check_bucket, self.local)
        inputs: dict[str, Any] = {}
        paired = {}
        for name, manifest in parsed.items():
            text = manifests[name]
            if manifest.skipped:  # said once, in one line: the user may have expected every object to train
                warnings.warn(manifest.summary(), UserWarning, stacklevel=5)
            else:
                logger.info(manifest.summary())
            if text.startswith("s3://"):
                inputs.update(maker.from_s3(name, manifest))
            elif not self.local:
                raise JobSettingsError(f"{text}: a local manifest is for local mode (instance_type='local'); for a "
                                       "SageMaker job give the s3:// URI of the labelling job's output manifest")
            else:
                path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser().resolve()
                inputs.update(maker.from_local(name, manifest, path))
                paired[name] = local_samples(manifest, path)
        if paired and self.config is not None:
            checker = InputResolver(self.local, self.input_mode, self.s3_client, self.datasets_uri,
                                    self.config.replace(**hyperparameters), environment=self.environment,
                                    progress=self.progress)
            checker._check_local_data(paired, validation_elsewhere=VALIDATION_CHANNEL in manifests,
                                      where=", ".join(manifests.values()))
        return Channels(inputs, maker.listed_bytes if self.input_mode == "File" else 0, hyperparameters)

    def _manifest_hyperparameters(self, parsed: Mapping[str, Any]) -> dict[str, Any]:
        """The class map of the manifests (one for all of them); a hyperparameter the user set otherwise is refused."""
        (first_name, first), *others = parsed.items()
        for name, manifest in others:
            if manifest.hyperparameters() != first.hyperparameters():
                raise DataError(f"the {first_name!r} manifest ({first.where}) and the {name!r} manifest "
                                f"({manifest.where}) have different colour maps: {first.class_names} against "
                                f"{manifest.class_names}; train and validate on one label set")
        if self.config is not None:
            first.configure(self.config)
        return first.hyperparameters()

    def _check_training_input_bucket(self, name: str, value: Any) -> None:
        uri = value.config.get("DataSource", {}).get("S3DataSource", {}).get("S3Uri")
        if isinstance(uri, str) and uri.startswith("s3://"):
            check_s3_uri(f"channel {name!r}", uri)
            self.check_bucket(f"channel {name!r}", uri)


class _CountedReads(Sequence):
    """The samples handed to check_dataset, counting for the progress bar: the check looks at each sample twice,
    first its header, then its pixels, so a sample's second look is one file decoded. Only the bar depends on this."""

    def __init__(self, samples: list[Sample], advance: Callable[[int], Any]):
        self._samples, self._advance = samples, advance
        self._looks = [0] * len(samples)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int):
            with self._lock:
                self._looks[index] += 1
                second = self._looks[index] == 2
            if second:
                self._advance(1)
        return self._samples[index]

    def __iter__(self) -> Any:
        return iter(self._samples)


def _refuse_sharding(name: str, value: Any) -> None:
    distribution = value.config.get("DataSource", {}).get("S3DataSource", {}).get("S3DataDistributionType")
    if distribution == "ShardedByS3Key":
        raise JobSettingsError(
            f"channel {name!r} has distribution='ShardedByS3Key': SageMaker would give each instance a different part "
            "of the objects under the prefix, splitting images from their masks; use distribution='FullyReplicated' "
            "(each training process already reads only its own share of the files)")


def _s3_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "dataset"
