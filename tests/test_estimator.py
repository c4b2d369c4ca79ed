"""UNetEstimator against moto: the CreateTrainingJob request it really sends, hyperparameters, metrics, spot,
output paths, the image URI, attach and load_model."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import time
import types
import warnings
from pathlib import Path

import pytest

from conftest import BUCKET, IMAGE, REGION, ROLE
from support import ENGINE_ONLY_MODULES
from unetseg import TrainConfig
from unetseg.client.estimator import UNetEstimator
from unetseg.client.job_rules import JobSettingsError
from unetseg.contract.errors import ArtifactError, ConfigError
from unetseg.contract.metrics_log import SELECTION_METRIC, metric_definitions
from unetseg.contract.sagemaker_env import CHECKPOINT_DIR_ENV, IMAGE_URI_ENV, OPT_ML_ENV


def make(aws, **overrides):
    kwargs = dict(image_uri=IMAGE, role=ROLE, instance_type="ml.g5.2xlarge", sagemaker_session=aws.session)
    kwargs.update(overrides)
    return UNetEstimator(**kwargs)


def put_dataset(aws, prefix: str, channels=("train", "validation"), files=("a", "b")) -> None:
    s3 = aws.boto_session.client("s3")
    for channel in channels:
        for stem in files:
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}{channel}/images/{stem}.png", Body=b"i" * 100)
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}{channel}/masks/{stem}.png", Body=b"m" * 50)
    aws.requests.clear()


# --- the CreateTrainingJob request ------------------------------------------------------------------------------------

def test_create_training_job_request_carries_every_setting(aws):
    hps = {"encoder": "resnet34", "classes": 3, "epochs": 40, "class_names": ["bg", "cell", "edge"],
           "amp": "bf16", "channels_last": True}
    put_dataset(aws, "datasets/cells/")
    est = make(aws, instance_count=2, use_spot_instances=True, max_run=4 * 3600, hyperparameters=hps,
               environment={"NCCL_DEBUG": "WARN"})
    assert aws.requests == []  # constructing sends nothing

    est.fit(f"s3://{BUCKET}/datasets/cells/", wait=False, logs=False)
    request = aws.sent("CreateTrainingJob")
    job = request["TrainingJobName"]
    expected_config = TrainConfig(**hps)

    assert request["AlgorithmSpecification"] == {
        "TrainingImage": IMAGE,
        "TrainingInputMode": "File",
        "MetricDefinitions": metric_definitions(["bg", "cell", "edge"]),
    }
    assert request["HyperParameters"] == expected_config.to_hyperparameters()
    assert TrainConfig.from_hyperparameters(request["HyperParameters"]) == expected_config
    assert all(isinstance(v, str) for v in request["HyperParameters"].values())
    assert request["HyperParameters"]["channels_last"] == "true"
    assert request["HyperParameters"]["class_names"] == '["bg", "cell", "edge"]'
    assert request["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 4 * 3600, "MaxWaitTimeInSeconds": 8 * 3600}
    assert request["EnableManagedSpotTraining"] is True
    assert request["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/unetseg/{job}/checkpoints"}
    assert request["OutputDataConfig"] == {"S3OutputPath": f"s3://{BUCKET}/unetseg/"}
    assert request["RoleArn"] == ROLE
    assert request["Environment"] == {"NCCL_DEBUG": "WARN"}
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train", "validation"]
    for channel in request["InputDataConfig"]:
        assert channel["InputMode"] == "File"
        assert channel["DataSource"]["S3DataSource"] == {
            "S3DataType": "S3Prefix", "S3DataDistributionType": "FullyReplicated",
            "S3Uri": f"s3://{BUCKET}/datasets/cells/{channel['ChannelName']}/"}
    assert "DebugHookConfig" not in request
    assert "DebugRuleConfigurations" not in request
    assert "ProfilerRuleConfigurations" not in request
    assert request.get("ProfilerConfig", {"DisableProfiler": True}) == {"DisableProfiler": True}
    # One look at the bucket, S3 listings and the job itself: no STS, IAM or telemetry.
    assert set(aws.requests) == {"s3.HeadBucket", "s3.ListObjectsV2", "sagemaker.CreateTrainingJob"}
    assert aws.requests.count("s3.HeadBucket") == 1  # data, output and checkpoints share the bucket


def test_on_demand_job_has_no_spot_fields_and_fastfile_passes_through(aws):
    put_dataset(aws, "ds/")
    est = make(aws, instance_type="ml.m5.xlarge", input_mode="FastFile", max_run=3600, keep_alive_period_in_seconds=600)
    est.fit(f"s3://{BUCKET}/ds", wait=False, logs=False)
    request = aws.sent("CreateTrainingJob")
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}
    assert request["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 600  # a warm pool: on-demand only
    assert "EnableManagedSpotTraining" not in request and "CheckpointConfig" not in request
    assert request["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    assert {c["InputMode"] for c in request["InputDataConfig"]} == {"FastFile"}


def test_spot_defaults_and_explicit_values(aws):
    est = make(aws, use_spot_instances=True, max_run=20 * 24 * 3600)
    assert est.max_wait == 28 * 24 * 3600  # 2x capped at the 28-day limit
    est = make(aws, use_spot_instances=True, max_run=3600, max_wait=5400,
               checkpoint_s3_uri=f"s3://{BUCKET}/my/checkpoints")
    put_dataset(aws, "ds/")
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    request = aws.sent("CreateTrainingJob")
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] == 5400
    assert request["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/my/checkpoints"


def test_each_fit_gets_its_own_checkpoint_prefix(aws):
    put_dataset(aws, "ds/")
    est = make(aws, use_spot_instances=True)
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False, job_name="first-job")
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False, job_name="second-job")
    uris = [body["CheckpointConfig"]["S3Uri"] for body in aws.bodies["CreateTrainingJob"]]
    assert uris == [f"s3://{BUCKET}/unetseg/first-job/checkpoints", f"s3://{BUCKET}/unetseg/second-job/checkpoints"]


UNDERSCORED_IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/team/unet_seg.v2:1"  # ECR allows _ and .


def test_a_job_named_after_an_image_with_underscores_and_dots_is_valid(aws):
    # The SDK names a job after the image's repository (unet_seg.v2-<timestamp>); SageMaker names allow neither _
    # nor . (the strict stand-in refuses such a request as the service does).
    put_dataset(aws, "ds/")
    est = make(aws, image_uri=UNDERSCORED_IMAGE)
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    name = aws.sent("CreateTrainingJob")["TrainingJobName"]
    assert name.startswith("unet-seg-v2-") and len(name) <= 63
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False, job_name="given-name")  # a name given is used as it is
    assert aws.bodies["CreateTrainingJob"][1]["TrainingJobName"] == "given-name"


@pytest.mark.parametrize("image, base", [
    ("111122223333.dkr.ecr.us-east-1.amazonaws.com/unetseg:1.0", "unetseg"),
    (UNDERSCORED_IMAGE, "unet-seg-v2"),
    ("localhost:5000/__seg__:latest", "seg"),
    ("111122223333.dkr.ecr.us-east-1.amazonaws.com/___:1", "unetseg"),
    ("registry.example.com/team/seg@sha256:" + "0" * 64, "seg-sha256"),
])
def test_base_names_from_image_names(image, base):
    from unetseg.client.job_rules import base_name_from_image

    assert base_name_from_image(image) == base


def test_the_container_checkpoints_where_checkpoint_local_path_says(aws, tmp_path):
    # SageMaker syncs CheckpointConfig.LocalPath with S3; a container writing elsewhere loses every spot restart.
    from unetseg.contract.sagemaker_env import TrainingEnv

    put_dataset(aws, "ds/")
    est = make(aws, use_spot_instances=True, checkpoint_local_path="/opt/ml/my-checkpoints",
               environment={"NCCL_DEBUG": "WARN"})
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    request = aws.sent("CreateTrainingJob")
    assert request["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/unetseg/{request['TrainingJobName']}/checkpoints",
                                           "LocalPath": "/opt/ml/my-checkpoints"}
    container = TrainingEnv.from_environ({**request["Environment"], OPT_ML_ENV: str(tmp_path)})
    assert container.checkpoint_dir == Path(request["CheckpointConfig"]["LocalPath"])
    assert request["Environment"]["NCCL_DEBUG"] == "WARN"


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_local_path": "checkpoints"}, "an absolute path"),
    ({"checkpoint_local_path": "/ck", "environment": {CHECKPOINT_DIR_ENV: "/other"}}, CHECKPOINT_DIR_ENV),
    ({"checkpoint_local_path": "/ck", "use_spot_instances": False}, "needs checkpoint_s3_uri"),
])
def test_a_checkpoint_local_path_the_container_cannot_honour_is_refused(aws, kwargs, message):
    with pytest.raises(JobSettingsError, match=message):
        make(aws, **{"use_spot_instances": True, **kwargs})
    assert aws.requests == []


# --- hyperparameters and metrics -------------------------------------------------------------------------------------

def test_hyperparameters_validated_and_exposed(aws):
    est = make(aws, hyperparameters={"classes": "3", "lr": "0.0005", "augment": "strong"})
    assert est.config == TrainConfig(classes=3, lr=5e-4, augment="strong")
    assert est.hyperparameters() == est.config.to_hyperparameters()
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        make(aws, hyperparameters={"epoch": 3})


def test_set_hyperparameters_merges_revalidates_and_updates_metrics(aws):
    est = make(aws, hyperparameters={"classes": 2, "epochs": 5})
    assert [d["Name"] for d in est.metric_definitions if d["Name"].startswith("val_iou_")] == [
        "val_iou_class_0", "val_iou_class_1"]
    est.set_hyperparameters(classes=3, class_names=["background", "Nucleus", "cell wall"])
    assert est.config.epochs == 5 and est.config.classes == 3
    assert est.metric_definitions == metric_definitions(["background", "Nucleus", "cell wall"])
    assert "val_iou_cell_wall" in [d["Name"] for d in est.metric_definitions]
    with pytest.raises(ConfigError, match="class_names has 3 names but classes=4"):
        est.set_hyperparameters(classes=4)
    assert est.config.classes == 3  # a rejected change leaves the estimator as it was
    assert est.hyperparameters() == est.config.to_hyperparameters()


def test_metric_definitions_stay_within_sagemaker_limit(aws):
    names = [f"c{i}" for i in range(20)]  # 8 epoch + 40 per-class + 1 step metrics
    with pytest.warns(UserWarning, match="at most 40 metrics"):
        est = make(aws, hyperparameters={"classes": 20, "class_names": names})
    recorded = [d["Name"] for d in est.metric_definitions]
    assert len(recorded) == 40
    assert {"val_miou", "val_loss", "train_loss", "step_loss", "val_iou_c19"} <= set(recorded)
    assert "val_dice_c19" not in recorded  # Dice of the last classes gives way first


def test_extra_metric_definitions_are_added_not_duplicated(aws):
    extra = [{"Name": "gpu_mem", "Regex": r"gpu_mem=(\S+)"}, {"Name": "val_miou", "Regex": "ignored"}]
    est = make(aws, metric_definitions=extra)
    assert est.metric_definitions == metric_definitions(est.config.resolved_class_names) + extra[:1]


# --- output path, image URI, session ---------------------------------------------------------------------------------

def test_default_output_path_from_a_named_bucket_needs_no_call(aws):
    est = make(aws, sagemaker_session=aws.new_session(default_bucket=BUCKET, default_bucket_prefix="team"))
    assert est.output_path == f"s3://{BUCKET}/team/unetseg/"
    assert aws.requests == []


def test_default_output_path_without_a_bucket_is_resolved_at_fit(aws):
    est = make(aws, sagemaker_session=aws.new_session())
    assert est.output_path is None and aws.requests == []
    put_dataset(aws, "ds/")
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    assert est.output_path == "s3://sagemaker-us-east-1-123456789012/unetseg/"
    assert aws.sent("CreateTrainingJob")["OutputDataConfig"]["S3OutputPath"] == est.output_path


def test_image_uri_from_environment(aws, monkeypatch):
    monkeypatch.setenv(IMAGE_URI_ENV, "222233334444.dkr.ecr.us-east-1.amazonaws.com/seg:env")
    est = make(aws, image_uri=None)
    assert est.training_image_uri() == "222233334444.dkr.ecr.us-east-1.amazonaws.com/seg:env"
    assert aws.requests == []


def test_image_uri_from_repository_uses_sts_only_without_an_account(aws):
    est = make(aws, image_uri=None, repository="unetseg", tag="2.0", account="111122223333")
    assert est.training_image_uri() == "111122223333.dkr.ecr.us-east-1.amazonaws.com/unetseg:2.0"
    assert aws.requests == []
    est = make(aws, image_uri=None, repository="unetseg")
    assert est.training_image_uri() == "123456789012.dkr.ecr.us-east-1.amazonaws.com/unetseg:latest"
    assert aws.requests == ["sts.GetCallerIdentity"]


def test_role_from_sdk_config_file(aws, monkeypatch, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        SchemaVersion: '1.0'
        SageMaker:
          PythonSDK:
            Modules:
              TelemetryOptOut: true
          TrainingJob:
            RoleArn: {ROLE}
        """))
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(config))
    est = make(aws, role=None, sagemaker_session=aws.new_session(default_bucket=BUCKET))
    assert est.role == ROLE


def test_volume_grows_to_fit_a_file_mode_dataset(aws):
    s3 = aws.boto_session.client("s3")
    for name in ("a", "b"):
        s3.put_object(Bucket=BUCKET, Key=f"big/train/images/{name}.png", Body=b"x" * 1000)
        s3.put_object(Bucket=BUCKET, Key=f"big/train/masks/{name}.png", Body=b"x" * 1000)
    est = make(aws, volume_size=5)
    with pytest.warns(UserWarning, match="volume_size raised from 5 to 11 GB"):
        est.fit(f"s3://{BUCKET}/big/", wait=False, logs=False)
    assert aws.sent("CreateTrainingJob")["ResourceConfig"]["VolumeSizeInGB"] == 11
    streamed = make(aws, volume_size=5, input_mode="FastFile")
    streamed.fit(f"s3://{BUCKET}/big/", wait=False, logs=False)
    assert aws.bodies["CreateTrainingJob"][1]["ResourceConfig"]["VolumeSizeInGB"] == 5


def test_a_file_mode_dataset_larger_than_the_nvme_storage_is_refused(aws, monkeypatch):
    # ml.g5.xlarge has 250 GB of NVMe instance storage, which SageMaker uses instead of an EBS volume; it refuses a
    # larger VolumeSizeInGB, and a File-mode copy of more would fill the disk.
    import unetseg.client.fit_inputs

    put_dataset(aws, "ds/")
    monkeypatch.setattr(unetseg.client.fit_inputs, "prefix_size", lambda s3, bucket, prefix: 100 * 2**30)  # 2 channels
    with pytest.raises(JobSettingsError, match=r"ml.g5.xlarge has 250 GB of NVMe instance storage.*FastFile"):
        make(aws, instance_type="ml.g5.xlarge").fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    assert "sagemaker.CreateTrainingJob" not in aws.requests
    make(aws, instance_type="ml.g5.xlarge", input_mode="FastFile").fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    monkeypatch.setattr(unetseg.client.fit_inputs, "prefix_size", lambda s3, bucket, prefix: 80 * 2**30)
    make(aws, instance_type="ml.g5.xlarge").fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    assert [body["ResourceConfig"]["VolumeSizeInGB"] for body in aws.bodies["CreateTrainingJob"]] == [30, 210]


def test_a_blackwell_gpu_trains_with_an_image_built_for_cuda_12_8(aws):
    put_dataset(aws, "ds/")
    est = make(aws, instance_type="ml.p6-b200.48xlarge", image_cuda="12.8", hyperparameters={"amp": "bf16"})
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    assert aws.sent("CreateTrainingJob")["ResourceConfig"]["InstanceType"] == "ml.p6-b200.48xlarge"
    with pytest.raises(JobSettingsError, match="image_cuda='12.6'.*V100|V100.*image_cuda"):
        make(aws, instance_type="ml.p3.2xlarge", image_cuda="13.0")  # CUDA 13 builds leave Volta out


def test_network_isolation_needs_pretrained_weights_in_the_image(aws):
    put_dataset(aws, "ds/")
    aws.boto_session.client("s3").put_object(Bucket=BUCKET, Key="models/a/model.tar.gz", Body=b"x")
    data = f"s3://{BUCKET}/ds/"
    make(aws, enable_network_isolation=True, baked_encoders=["resnet34"]).fit(data, wait=False, logs=False)
    make(aws, enable_network_isolation=True, baked_encoders=["resnet34:imagenet"]).fit(data, wait=False, logs=False)
    no_weights = make(aws, enable_network_isolation=True, hyperparameters={"encoder_weights": None})
    no_weights.fit(data, wait=False, logs=False)
    make(aws, enable_network_isolation=True).fit(data, init_model=f"s3://{BUCKET}/models/a/model.tar.gz", wait=False,
                                                 logs=False)  # fine-tuning starts from the model, not from ImageNet
    assert [body.get("EnableNetworkIsolation") for body in aws.bodies["CreateTrainingJob"]] == [True] * 4
    with pytest.raises(JobSettingsError, match=r"encoder resnet34 with imagenet.*baked_encoders=\['resnet50'\]"):
        make(aws, enable_network_isolation=True, baked_encoders=["resnet50"]).fit(data, wait=False, logs=False)
    make(aws, baked_encoders=["resnet50"]).fit(data, wait=False, logs=False)  # with network access, weights download
    assert len(aws.bodies["CreateTrainingJob"]) == 5


# --- what an instance type offers: job_rules' table against EC2's own description of each type ----------------------

def ec2_instance_types() -> dict:
    """EC2 DescribeInstanceTypes data as moto ships it: architectures, GPUs, instance storage per type."""
    import gzip
    import json

    import moto

    path = Path(moto.__file__).parent / "ec2" / "resources" / "instance_types.json.gz"
    return json.loads(gzip.decompress(path.read_bytes()))


def sagemaker_instance_types(*shapes: str) -> list[str]:
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    shapes = shapes or ("TrainingInstanceType", "ProductionVariantInstanceType", "TransformInstanceType")
    return sorted({t for shape in shapes for t in model.shape_for(shape).enum if t.startswith("ml.")})


def test_instance_types_on_arm_hosts_are_refused():
    from unetseg.client.job_rules import parse_instance_type

    ec2 = ec2_instance_types()
    described = [t for t in sagemaker_instance_types() if t[3:] in ec2]
    arm = [t for t in described if "arm64" in ec2[t[3:]]["ProcessorInfo"]["SupportedArchitectures"]]
    assert len(arm) > 20, arm  # Graviton: c6g, c7g, m6gd, r8g, ...
    for instance_type in arm + ["ml.p6e-gb200.36xlarge"]:  # GB200's Grace host (not in moto's data)
        with pytest.raises(JobSettingsError, match="Arm"):
            parse_instance_type(instance_type)
    for instance_type in set(described) - set(arm):
        try:
            parse_instance_type(instance_type)
        except JobSettingsError as exc:
            assert "Arm" not in str(exc), instance_type


def test_the_gpu_table_matches_ec2():
    from unetseg.client.job_rules import GPU_FAMILIES

    ec2 = ec2_instance_types()
    for instance_type in sagemaker_instance_types():
        gpus = ec2.get(instance_type[3:], {}).get("GpuInfo", {}).get("Gpus", [])
        family = instance_type.split(".")[1]
        if gpus:
            assert family in GPU_FAMILIES and GPU_FAMILIES[family].name == gpus[0]["Name"], instance_type
        elif instance_type[3:] in ec2:
            assert family not in GPU_FAMILIES, instance_type


def test_the_instance_storage_table_matches_ec2():
    from unetseg.client.job_rules import instance_storage_gb

    ec2 = ec2_instance_types()
    checked = 0
    for instance_type in sagemaker_instance_types("TrainingInstanceType"):
        if instance_type[3:] in ec2:
            expected = ec2[instance_type[3:]].get("InstanceStorageInfo", {}).get("TotalSizeInGB")
            assert instance_storage_gb(instance_type) == expected, instance_type
            checked += expected is not None
    assert checked > 50


# --- attach and load_model --------------------------------------------------------------------------------------------

@pytest.fixture
def fake_engine(monkeypatch):
    """unetseg.model.load_model stand-in: records the local path it is given (the engine needs torch)."""
    calls = []

    def load_model(path, device=None):
        path = Path(path)
        assert path.exists()
        if path.is_file():
            with tarfile.open(path) as tar:
                members = tar.getnames()
        else:
            members = sorted(p.name for p in path.iterdir())
        calls.append({"path": path, "device": device, "members": members})
        return "model"

    module = types.ModuleType("unetseg.model")
    module.load_model = load_model
    monkeypatch.setitem(sys.modules, "unetseg.model", module)
    return calls


def artifact_bytes(tmp_path: Path) -> bytes:
    folder = tmp_path / "artifact"
    folder.mkdir()
    for name in ("model.safetensors", "config.json", "history.json"):
        (folder / name).write_text("{}")
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return archive.read_bytes()


def test_load_model_downloads_the_s3_artifact(aws, fake_engine, tmp_path):
    put_dataset(aws, "ds/")
    est = make(aws)
    with pytest.raises(ArtifactError, match="call fit"):
        est.load_model()
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    key = est.model_data[len(f"s3://{BUCKET}/"):]
    assert key == f"unetseg/{est.latest_training_job.name}/output/model.tar.gz"
    aws.boto_session.client("s3").put_object(Bucket=BUCKET, Key=key, Body=artifact_bytes(tmp_path))

    assert est.load_model(device="cpu") == "model"
    call = fake_engine[-1]
    assert call["path"].name == "model.tar.gz" and call["device"] == "cpu"
    assert sorted(call["members"]) == ["config.json", "history.json", "model.safetensors"]
    assert not call["path"].exists()  # the temporary download is gone once the model is loaded

    kept = tmp_path / "kept"
    est.load_model(local_dir=kept)
    assert (kept / "model.tar.gz").is_file()


def test_load_model_refuses_an_unfinished_job(aws, fake_engine, monkeypatch):
    put_dataset(aws, "ds/")
    est = make(aws)
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    client = est.sagemaker_session.sagemaker_client
    real = client.describe_training_job
    monkeypatch.setattr(client, "describe_training_job",
                        lambda **kw: {**real(**kw), "TrainingJobStatus": "Failed", "FailureReason": "out of memory"})
    with pytest.raises(ArtifactError, match="is Failed \\(out of memory\\)"):
        est.load_model()
    assert fake_engine == []


def test_attach_rebuilds_an_equal_estimator(aws, monkeypatch):
    put_dataset(aws, "ds/")
    est = make(aws, hyperparameters={"classes": 3, "epochs": 7}, use_spot_instances=True)
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)
    # The service returns OutputDataConfig.KmsKeyId (empty when unset), which attach() reads; moto leaves it out.
    client = aws.session.sagemaker_client
    real = client.describe_training_job

    def describe(**kwargs):
        details = real(**kwargs)
        details["OutputDataConfig"].setdefault("KmsKeyId", "")
        return details

    monkeypatch.setattr(client, "describe_training_job", describe)
    # attach() waits for the job, sleeping 5 s before its first look (sagemaker/session.py, _wait_until...).
    import sagemaker.session

    no_sleep = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    no_sleep.sleep = lambda seconds: None
    monkeypatch.setattr(sagemaker.session, "time", no_sleep)
    attached = UNetEstimator.attach(est.latest_training_job.name, sagemaker_session=aws.session)
    assert isinstance(attached, UNetEstimator)
    assert attached.config == est.config
    assert attached.metric_definitions == est.metric_definitions
    assert (attached.instance_type, attached.use_spot_instances) == ("ml.g5.2xlarge", True)


# --- the import stays light -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_import_and_construction_do_not_import_torch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import unetseg
        assert "torch" not in sys.modules and "sagemaker" not in sys.modules, "import unetseg pulled in heavy modules"
        import sagemaker
        from unetseg import UNetEstimator
        est = UNetEstimator(image_uri={IMAGE!r}, role={ROLE!r}, instance_type="ml.g5.xlarge",
                            sagemaker_session=sagemaker.Session(default_bucket={BUCKET!r}),
                            hyperparameters={{"classes": 3}})
        est.set_hyperparameters(epochs=3)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {ENGINE_ONLY_MODULES!r})
        assert not heavy, heavy
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_selection_metric_is_recorded(aws):
    assert SELECTION_METRIC in [d["Name"] for d in make(aws).metric_definitions]


def test_region_must_match_the_session(aws):
    assert aws.session.boto_region_name == REGION
    with pytest.raises(JobSettingsError, match="differs from the session's region"):
        make(aws, region="eu-west-1")


def test_constructing_emits_no_misleading_deprecation(aws, monkeypatch):
    monkeypatch.delenv("SAGEMAKER_SUPPRESS_V2_WARNING")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(aws)
    assert not [w for w in caught if "UNetEstimator is part of the SageMaker Python SDK v2" in str(w.message)]


def test_load_model_opens_a_real_engine_artifact_from_s3(aws, tmp_path):
    """The contract with the engine: a model.tar.gz written by unetseg.model opens through UNetEstimator."""
    pytest.importorskip("torch")
    pytest.importorskip("segmentation_models_pytorch")
    from unetseg.model import artifact_config, build_model, save_artifact

    hps = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8], "encoder_weights": None,
           "image_size": 32, "classes": 2, "class_names": ["background", "cell"]}
    put_dataset(aws, "ds/")
    est = make(aws, hyperparameters=hps)
    est.fit(f"s3://{BUCKET}/ds/", wait=False, logs=False)

    model_dir = tmp_path / "model"
    save_artifact(model_dir, build_model(est.config, pretrained=False).state_dict(),
                  artifact_config(est.config, "binary"), history=[])
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    key = est.model_data[len(f"s3://{BUCKET}/"):]
    aws.boto_session.client("s3").upload_file(str(archive), BUCKET, key)

    segmenter = est.load_model(device="cpu")
    assert type(segmenter).__name__ == "Segmenter"
    assert list(segmenter.class_names) == ["background", "cell"]
