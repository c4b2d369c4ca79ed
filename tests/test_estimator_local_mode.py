"""Local mode through the SDK's real code path, with a `docker` test double on PATH.

The double answers `docker compose version` (as Compose v2, v5, a distribution build, or not installed) and
`docker images -q`, and on `compose ... up` records the compose file and the config JSONs the SDK wrote, then
writes a model into /opt/ml/model as the container would (or, with $FAKE_DOCKER_FAILURE, writes that text to
/opt/ml/output/failure and exits 1, as a failed job does). The real Docker run belongs to the container's tests.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tarfile
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from conftest import IMAGE, recording_boto_session
from unetseg import TrainConfig
from unetseg.client import local_mode
from unetseg.client.estimator import UNetEstimator
from unetseg.synthetic import make_demo_dataset

FAKE_DOCKER = textwrap.dedent("""\
    #!{python}
    import json, os, shutil, sys
    import yaml

    prog, args = os.path.basename(sys.argv[0]), sys.argv[1:]
    record = os.environ["FAKE_DOCKER_RECORD"]
    with open(os.path.join(record, "calls.jsonl"), "a") as log:
        log.write(json.dumps({{"prog": prog, "args": args}}) + "\\n")

    if prog == "docker" and args[:2] == ["compose", "version"]:
        version = os.environ.get("FAKE_COMPOSE_PLUGIN", "")
        if not version:
            print("docker: 'compose' is not a docker command.", file=sys.stderr)
            sys.exit(1)
        print(version)
        sys.exit(0)
    if prog == "docker" and args[:2] == ["images", "-q"]:
        print("0123456789ab")  # the image is present: no ECR login, no pull
        sys.exit(0)
    compose = args[1:] if prog == "docker" and args[:1] == ["compose"] else args
    if prog in ("docker", "docker-compose") and "-f" in compose and "up" in compose:
        path = compose[compose.index("-f") + 1]
        shutil.copy(path, os.path.join(record, "docker-compose.yaml"))
        for host, service in yaml.safe_load(open(path))["services"].items():
            for volume in service["volumes"]:
                host_dir, container_dir = volume.split(":")[:2]
                if container_dir == "/opt/ml/input":
                    shutil.copytree(os.path.join(host_dir, "config"), os.path.join(record, host, "config"))
                if container_dir == "/opt/ml/model" and not os.environ.get("FAKE_DOCKER_FAILURE"):
                    os.makedirs(host_dir, exist_ok=True)  # as Docker creates a missing bind-mount source
                    for name in ("model.safetensors", "config.json", "history.json"):
                        open(os.path.join(host_dir, name), "w").write("{{}}")
                if container_dir == "/opt/ml/output" and os.environ.get("FAKE_DOCKER_FAILURE"):
                    # as the entry point does when training fails, before the container exits 1
                    open(os.path.join(host_dir, "failure"), "w").write(os.environ["FAKE_DOCKER_FAILURE"])
        if os.environ.get("FAKE_DOCKER_FAILURE"):
            print("algo-1 | Reporting training FAILURE")
            sys.exit(1)
        print("algo-1 | epoch=1 train_loss=0.5 val_miou=0.25")
        sys.exit(0)
    print("fake docker: unexpected call", prog, args, file=sys.stderr)
    sys.exit(2)
""")


class FakeDocker:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.bin = root / "bin"
        self.record = root / "record"
        self.bin.mkdir()
        self.record.mkdir()
        self._write("docker")
        self._monkeypatch = monkeypatch
        monkeypatch.setenv("PATH", str(self.bin))  # nothing else: no real docker or docker-compose can answer
        monkeypatch.setenv("FAKE_DOCKER_RECORD", str(self.record))

    def _write(self, name: str) -> None:
        path = self.bin / name
        path.write_text(FAKE_DOCKER.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def plugin(self, version_output: str) -> FakeDocker:
        self._monkeypatch.setenv("FAKE_COMPOSE_PLUGIN", version_output)
        return self

    def standalone_compose(self) -> FakeDocker:
        self._write("docker-compose")
        return self

    def calls(self) -> list[dict]:
        path = self.record / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def compose_up(self) -> dict:
        ups = [c for c in self.calls() if "up" in c["args"]]
        assert len(ups) == 1, self.calls()
        return ups[0]

    def compose_file(self) -> dict:
        return yaml.safe_load((self.record / "docker-compose.yaml").read_text())

    def config(self, host: str, name: str) -> dict:
        return json.loads((self.record / host / "config" / name).read_text())


@pytest.fixture
def docker(tmp_path, monkeypatch):
    return FakeDocker(tmp_path, monkeypatch)


@pytest.fixture
def local_session(tmp_path):
    from moto import mock_aws
    from sagemaker.local import LocalSession

    with mock_aws():  # nothing should reach AWS; if something tried, moto would answer, and we would see it
        requests, bodies = [], {}
        session = LocalSession(boto_session=recording_boto_session(requests, bodies))
        session.config = {"local": {"container_root": str(tmp_path / "containers")}}
        (tmp_path / "containers").mkdir()
        session.requests = requests
        yield session


@pytest.fixture
def fake_engine(monkeypatch):
    calls = []
    module = types.ModuleType("unetseg.model")
    module.load_model = lambda path, device=None: calls.append(Path(path)) or "model"
    monkeypatch.setitem(sys.modules, "unetseg.model", module)
    return calls


HPS = {"classes": 2, "epochs": 3, "image_size": 64, "encoder_depth": 3, "decoder_channels": [64, 32, 16],
       "class_names": ["background", "object"], "encoder_weights": None}


def run_local(tmp_path, session, instance_type="local_gpu", instance_count=1, **kwargs):
    data = make_demo_dataset(tmp_path / "data", train=2, validation=1, size=64)
    est = UNetEstimator(image_uri=IMAGE, instance_type=instance_type, instance_count=instance_count,
                        sagemaker_session=session, hyperparameters=HPS,
                        output_path=(tmp_path / "out").as_uri(), **kwargs)
    est.fit(str(data), wait=False, logs=False, job_name="local-job-1")
    return est, data


@pytest.mark.slow
@pytest.mark.parametrize("compose_version", ["Docker Compose version v2.29.7", "Docker Compose version v5.0.2",
                                             "Docker Compose version 2.26.1"])
def test_local_gpu_job_writes_compose_file_and_configs(tmp_path, docker, local_session, fake_engine,
                                                       compose_version):
    docker.plugin(compose_version)
    est, data = run_local(tmp_path, local_session)

    up = docker.compose_up()
    assert up["prog"] == "docker" and up["args"][0] == "compose"
    assert up["args"][-3:] == ["up", "--build", "--abort-on-container-exit"]

    compose = docker.compose_file()
    (host, service), = compose["services"].items()
    assert service["image"] == IMAGE
    assert service["command"] == "train"
    assert service["deploy"] == {"resources": {"reservations": {"devices": [{"count": "all",
                                                                             "capabilities": ["gpu"]}]}}}
    volumes = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert volumes["/opt/ml/input/data/train"] == str(data / "train")
    assert volumes["/opt/ml/input/data/validation"] == str(data / "validation")
    assert {"/opt/ml/model", "/opt/ml/output", "/opt/ml/input"} <= set(volumes)
    assert "TRAINING_JOB_NAME=local-job-1" in service["environment"]
    assert "AWS_REGION=us-east-1" in service["environment"]

    hyperparameters = docker.config(host, "hyperparameters.json")
    assert hyperparameters == TrainConfig(**HPS).to_hyperparameters()
    assert TrainConfig.from_hyperparameters(hyperparameters) == TrainConfig(**HPS)
    assert docker.config(host, "inputdataconfig.json") == {"train": {"TrainingInputMode": "File"},
                                                           "validation": {"TrainingInputMode": "File"}}
    resources = docker.config(host, "resourceconfig.json")
    assert resources["hosts"] == [host] and resources["current_host"] == host
    assert resources["current_instance_type"] == "local_gpu"

    # One output folder per job, as on S3, and load_model() opens the file:// artifact in place.
    assert est.model_data == f"{(tmp_path / 'out').as_uri()}/local-job-1/model.tar.gz"
    assert est.load_model() == "model"
    artifact = fake_engine[-1]
    assert artifact == tmp_path / "out" / "local-job-1" / "model.tar.gz"
    with tarfile.open(artifact) as tar:
        assert sorted(tar.getnames()) == ["config.json", "history.json", "model.safetensors"]
    assert local_session.requests == []


@pytest.mark.slow
def test_standalone_docker_compose_v1_is_the_fallback(tmp_path, docker, local_session, fake_engine):
    docker.plugin("").standalone_compose()
    run_local(tmp_path, local_session, instance_type="local")
    up = docker.compose_up()
    assert up["prog"] == "docker-compose" and up["args"][0] == "-f"
    (host, service), = docker.compose_file()["services"].items()
    assert "deploy" not in service  # CPU local mode asks for no GPU
    assert docker.config(host, "resourceconfig.json")["current_instance_type"] == "local"


@pytest.mark.slow
def test_several_cpu_containers(tmp_path, docker, local_session, fake_engine):
    docker.plugin("Docker Compose version v2.29.7")
    run_local(tmp_path, local_session, instance_type="local", instance_count=2)
    hosts = sorted(docker.compose_file()["services"])
    assert len(hosts) == 2
    assert docker.config(hosts[0], "resourceconfig.json")["hosts"] == hosts


@pytest.mark.slow
def test_spot_and_checkpoint_arguments_are_dropped_with_a_warning(tmp_path, docker, local_session, fake_engine):
    docker.plugin("Docker Compose version v5.0.2")
    with pytest.warns(UserWarning, match="local mode ignores use_spot_instances, max_wait, checkpoint_s3_uri"):
        est, _ = run_local(tmp_path, local_session, use_spot_instances=True, max_run=3600, max_wait=7200,
                           checkpoint_s3_uri="s3://bucket/ck")
    assert (est.use_spot_instances, est.max_wait, est.checkpoint_s3_uri) == (False, None, None)
    assert docker.compose_up()


@pytest.mark.slow
def test_default_local_output_is_a_folder_per_job_under_the_current_directory(tmp_path, docker, local_session,
                                                                             fake_engine, monkeypatch):
    docker.plugin("Docker Compose version v2.29.7")
    monkeypatch.chdir(tmp_path)
    data = make_demo_dataset(tmp_path / "data", train=2, validation=1, size=64)
    est = UNetEstimator(image_uri=IMAGE, instance_type="local", sagemaker_session=local_session, hyperparameters=HPS)
    assert est.output_path == (tmp_path / "unetseg-output").as_uri() + "/"
    est.fit(str(data), wait=False, logs=False, job_name="job-a")
    est.fit(str(data), wait=False, logs=False, job_name="job-b")
    assert (tmp_path / "unetseg-output" / "job-a" / "model.tar.gz").is_file()
    assert (tmp_path / "unetseg-output" / "job-b" / "model.tar.gz").is_file()


@pytest.mark.slow
def test_a_failed_job_raises_with_its_failure_file(tmp_path, docker, local_session, fake_engine, monkeypatch):
    docker.plugin("Docker Compose version v2.29.7")
    reason = "DataError: masks/s01.png: cannot decode the mask (truncated PNG)"
    failure = f"{reason}\nTraceback (most recent call last):\n  File \"/opt/ml/code/train.py\", line 12\n"
    monkeypatch.setenv("FAKE_DOCKER_FAILURE", failure)
    with pytest.raises(RuntimeError) as info:  # the SDK's own type, so existing handlers still catch it
        run_local(tmp_path, local_session, instance_type="local")

    error = info.value
    assert isinstance(error, local_mode.LocalTrainingError), repr(error)
    (host, text), = error.failures.items()
    assert host.startswith("algo-1-") and text == failure
    message = str(error)
    assert message.startswith(f"local training job local-job-1 failed on {host}: {reason}"), message
    assert "Process exited with code: 1" in message  # and the SDK's own line, naming the compose command
    assert local_session.requests == []


def test_local_mode_without_a_session_makes_a_local_session(docker):
    from sagemaker.local import LocalSession

    est = UNetEstimator(image_uri=IMAGE, instance_type="local")
    assert isinstance(est.sagemaker_session, LocalSession)
    assert est.role  # the SDK insists on one; local mode never uses it


# --- the Compose detection itself -------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, major", [
    ("Docker Compose version v2.29.7", 2),
    ("Docker Compose version v5.0.2", 5),
    ("Docker Compose version 2.26.1", 2),
    ("docker-compose version 1.29.2, build unknown", 1),
    ("", None),
])
def test_compose_plugin_major(output, major):
    assert local_mode.compose_plugin_major(output) == major


@pytest.mark.slow
def test_sdk_detection_rejects_compose_v5_and_ours_accepts_it(docker):
    local_mode.install_compose_detection()
    from sagemaker.local.image import _SageMakerContainer

    docker.plugin("Docker Compose version v5.0.2")
    with pytest.raises(ImportError, match="Docker Compose is not installed"):
        local_mode.sdk_compose_detection()  # the SDK's check looks for "v2" in the output
    assert _SageMakerContainer._get_compose_cmd_prefix() == ["docker", "compose"]


@pytest.mark.slow
def test_no_compose_at_all_raises_the_sdk_error_type(docker, monkeypatch):
    docker.plugin("")
    with pytest.raises(ImportError, match="install the Compose plugin"):
        local_mode.compose_command()
    monkeypatch.setenv("PATH", os.devnull)  # no docker binary either: not a FileNotFoundError
    with pytest.raises(ImportError):
        local_mode.compose_command()


@pytest.mark.slow
def test_local_mode_binds_an_init_model_file_as_its_channel(tmp_path, docker, local_session, fake_engine):
    docker.plugin("Docker Compose version v2.29.7")
    previous = tmp_path / "previous-run" / "model.tar.gz"
    previous.parent.mkdir()
    previous.write_bytes(b"a model.tar.gz")
    data = make_demo_dataset(tmp_path / "data", train=2, validation=1, size=64)
    est = UNetEstimator(image_uri=IMAGE, instance_type="local", sagemaker_session=local_session, hyperparameters=HPS,
                        output_path=(tmp_path / "out").as_uri())
    est.fit(str(data), init_model=str(previous), wait=False, logs=False, job_name="local-job-2")
    (host, service), = docker.compose_file()["services"].items()
    volumes = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert volumes["/opt/ml/input/data/init_model"] == str(previous.parent)  # the container picks model.tar.gz in it
    assert set(docker.config(host, "inputdataconfig.json")) == {"train", "validation", "init_model"}
