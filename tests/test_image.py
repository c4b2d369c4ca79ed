"""unetseg.client.docker_image: building and pushing the training image.

The unit tests drive a fake `docker` on PATH that records every command line (and the stdin of `docker login`), and
moto for STS and ECR. The `docker` tests use the real engine and a real registry (Debian's docker-registry) on
127.0.0.1; they skip without an engine, unless UNETSEG_REQUIRE_DOCKER=1 (CI), where a skip would hide a broken setup.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from support import free_port
from unetseg.client import docker_image
from unetseg.client.docker_image import ImageError
from unetseg.contract.errors import UnetsegError

REPO = Path(__file__).resolve().parents[1]

FAKE_DOCKER = r"""#!{python}
# A stand-in for the docker CLI: records each call (and the environment that decides how it builds), answers like
# docker, fails where FAKE_DOCKER_FAIL says. FAKE_DOCKER_CLIENT picks the client it plays: "legacy" (Docker 20.10's
# CLI, or a newer one without buildx: the classic builder), "buildx" (a CLI with the buildx plugin, >= 0.10) or
# "old-buildx" (buildx 0.9: BuildKit, but no attestation flags). FAKE_DOCKER_STORE=containerd plays an engine that
# keeps images in the containerd image store.
import json, os, sys
args = sys.argv[1:]
rec = {{"argv": args, "env": {{k: v for k, v in os.environ.items() if k.startswith(("BUILDX_", "DOCKER_BUILDKIT"))}}}}
if args[:1] == ["login"]:
    rec["stdin"] = sys.stdin.read()
with open(os.environ["FAKE_DOCKER_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\n")
fail = os.environ.get("FAKE_DOCKER_FAIL", "")
client = os.environ.get("FAKE_DOCKER_CLIENT", "legacy")
cmd = args[0] if args else ""
LEGACY_HELP = "Usage:  docker build [OPTIONS] PATH | URL | -\n      --build-arg list\n  -f, --file string\n" \
              "      --force-rm\n      --network string\n      --platform string\n  -t, --tag list\n"
BUILDX_HELP = "Usage:  docker buildx build [OPTIONS] PATH | URL | -\n      --build-arg stringArray\n" \
              "  -f, --file string\n      --load\n      --network string\n  -o, --output stringArray\n" \
              "      --platform stringArray\n      --progress string\n  -t, --tag stringArray\n"
ATTESTATION_HELP = "      --provenance string\n      --sbom string\n"
if "--help" in args:
    if args[:2] == ["buildx", "build"] and client in ("buildx", "old-buildx"):
        print(BUILDX_HELP + (ATTESTATION_HELP if client == "buildx" else ""))
    elif args[:1] == ["build"]:
        print(LEGACY_HELP)
    elif args[:1] == ["push"]:
        print("Usage:  docker push [OPTIONS] NAME[:TAG]\n  -a, --all-tags\n      --platform string\n")
    sys.exit(0)
if cmd == "version":
    if fail == "engine":
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?",
              file=sys.stderr)
        sys.exit(1)
    print("20.10.24")
elif cmd == "info":
    print(json.dumps([["driver-type", "io.containerd.snapshotter.v1"]] if os.environ.get("FAKE_DOCKER_STORE") ==
                     "containerd" else [["Backing Filesystem", "extfs"], ["Supports d_type", "true"]]))
elif cmd == "buildx" and client == "legacy":
    print("docker: 'buildx' is not a docker command.", file=sys.stderr)
    sys.exit(1)
elif cmd == "buildx" and args[1:2] == ["version"]:
    print("github.com/docker/buildx " + ("v0.12.1 30feaa1" if client == "buildx" else "v0.9.1 ed00243"))
elif cmd == "build" or args[:2] == ["buildx", "build"]:
    print("Step 1/3 : FROM base")
    if fail == "build":
        print("ERROR: Could not find a version that satisfies the requirement torch==9.9")
        print("The command '/bin/sh -c pip install' returned a non-zero code: 1")
        sys.exit(1)
    print("Successfully built 0123456789ab")
elif cmd == "image" and fail == "noimage":
    sys.exit(1)
elif cmd == "login":
    print("Login Succeeded")
elif cmd == "push":
    ref = [a for a in args[1:] if not a.startswith("--") and a != "linux/amd64"][0]
    print("The push refers to repository [" + ref.rsplit(":", 1)[0] + "]")
    if fail == "push":
        print("denied: User: arn:aws:iam::123456789012:user/x is not authorized to perform: ecr:InitiateLayerUpload")
        sys.exit(1)
    print(ref.rsplit(":", 1)[1] + ": digest: sha256:abc size: 529")
"""


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    """A fake docker first on PATH; returns a function giving the recorded calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "docker"
    exe.write_text(FAKE_DOCKER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "docker-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    for name in ("FAKE_DOCKER_FAIL", "FAKE_DOCKER_CLIENT", "FAKE_DOCKER_STORE", "DOCKER_BUILDKIT",
                 "BUILDX_NO_DEFAULT_ATTESTATIONS"):
        monkeypatch.delenv(name, raising=False)
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


MOTO_PASSWORD = "123456789012-auth-token"  # what moto's get_authorization_token hands out


# --- names -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unetseg", "team/unetseg", "a.b-c_d/e", "u1", "x" * 256])
def test_valid_repository_names(name):
    assert docker_image.validate_repository(name) == name


@pytest.mark.parametrize("name", ["", "u", "UNetSeg", "-unetseg", "unetseg-", "team//unetseg", "/unetseg",
                                  "unetseg/", "un etseg", "un:etseg", "a..b", "x" * 257])
def test_invalid_repository_names(name):
    with pytest.raises(ImageError, match="invalid ECR repository name"):
        docker_image.validate_repository(name)


def test_invalid_repository_fails_before_any_call(fake_docker, aws):
    with pytest.raises(ImageError, match="invalid ECR repository name") as info:
        docker_image.push_image("unetseg:latest", repository="My_Repo")
    assert isinstance(info.value, UnetsegError) and "\n" not in str(info.value)
    assert fake_docker() == []


@pytest.mark.parametrize("ref, expected", [
    ("unetseg:latest", ("unetseg", "latest")),
    ("unetseg", ("unetseg", None)),
    ("127.0.0.1:5000/a/b:v1", ("127.0.0.1:5000/a/b", "v1")),
    ("127.0.0.1:5000/a/b", ("127.0.0.1:5000/a/b", None)),
])
def test_split_reference(ref, expected):
    assert docker_image.split_reference(ref) == expected


def test_image_requirements_cover_the_train_and_serve_extras():
    """entry/requirements-image.in lists what the CI base bakes in; it must keep up with setup.cfg's `train` and
    `serve` extras."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")

    def norm(req):
        return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    extras = cfg["options.extras_require"]
    train = {norm(r) for extra in ("train", "serve", "mlflow") for r in extras[extra].splitlines() if r.strip()}
    listed = {norm(r) for r in (REPO / "entry" / "requirements-image.in").read_text().splitlines()
              if r.strip() and not r.startswith("#")}
    assert train <= listed, f"missing from entry/requirements-image.in: {sorted(train - listed)}"
    assert {"sagemaker-training", "pip", "setuptools", "wheel"} <= listed
    pins = {norm(line) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    assert listed <= pins, f"not pinned in constraints.txt: {sorted(listed - pins)}"


def test_dockerfile_contract():
    text = (REPO / "entry" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S*cuda", text, re.M)
    assert "COPY entry/train.py /opt/ml/code/train.py" in text
    for env in ("SAGEMAKER_PROGRAM=train.py", "PYTHONUNBUFFERED=1", "NO_ALBUMENTATIONS_UPDATE=1"):
        assert env in text
    # only train.py goes to /opt/ml/code: no setup.py or requirements.txt for the toolkit to pip-install
    assert re.findall(r"^COPY .*/opt/ml/code\S*", text, re.M) == ["COPY entry/train.py /opt/ml/code/train.py"]
    assert "# syntax=" not in text  # that line makes BuildKit pull a frontend image from Docker Hub


def test_setup_cfg_lists_every_package():
    """setup.cfg lists its packages by name (it must, to map unetseg.entry to entry/): a new subpackage must be
    added there or the wheel would lack it."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "unetseg").rglob("__init__.py")}
    assert found | {"unetseg.entry"} == listed
    assert cfg["options"]["package_dir"].split() == ["unetseg.entry", "=", "entry"]


@pytest.mark.slow
def test_an_installed_wheel_lays_out_its_own_build_context(tmp_path):
    """Without a source checkout, `unetseg image build` builds from the files the wheel carries: entry/ as
    unetseg.entry (constraints.txt included) and the installed package itself."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch folder
    (wheel,) = (tmp_path / "dist").glob("unetseg-*.whl")
    site = tmp_path / "site"
    import zipfile

    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import sys, unetseg; from pathlib import Path; from unetseg.client import docker_image; "
             "assert Path(unetseg.__file__).is_relative_to(sys.argv[1]), unetseg.__file__; "
             "assert docker_image.find_context() is None; docker_image.packaged_context(Path(sys.argv[2]))")
    ctx = tmp_path / "context"
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install's finder
    done = subprocess.run([sys.executable, "-c", probe, str(site), str(ctx)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    for name in ("Dockerfile", "train.py", "init.py", "serve", "requirements-image.in"):
        assert (ctx / "entry" / name).read_bytes() == (REPO / "entry" / name).read_bytes(), name
    assert (ctx / "constraints.txt").read_bytes() == (REPO / "constraints.txt").read_bytes()
    source = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "unetseg").rglob("*.py"))
    assert sorted(p.relative_to(ctx).as_posix() for p in (ctx / "unetseg").rglob("*.py")) == source
    assert all((ctx / rel).read_bytes() == (REPO / rel).read_bytes() for rel in source)
    cfg = configparser.ConfigParser()
    cfg.read(ctx / "setup.cfg")
    import unetseg

    assert (cfg["metadata"]["name"], cfg["metadata"]["version"]) == ("unetseg", unetseg.__version__)


# --- build -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_build_command(fake_docker):
    """The classic builder (Docker 20.10's, or a newer CLI without buildx): single-platform linux/amd64, which it pushes
    as a Docker v2 schema 2 manifest, the one media type SageMaker accepts."""
    out = io.StringIO()
    tag = docker_image.build_image("unetseg:t1", base_image="unetseg-ci-base:abc", build_args={"X": "1"},
                            bake_encoders=["resnet34", "efficientnet-b0:imagenet"], network="none", out=out)
    assert tag == "unetseg:t1"
    build = [c["argv"] for c in fake_docker() if c["argv"][0] == "build" and "--help" not in c["argv"]][0]
    assert build[:2] == ["build", "--force-rm"]  # a failed step leaves no container behind
    assert build[build.index("-f") + 1] == str(REPO / "entry" / "Dockerfile")
    assert build[build.index("-t") + 1] == "unetseg:t1"
    assert build[-1] == str(REPO)
    pairs = {build[i + 1] for i, a in enumerate(build) if a == "--build-arg"}
    assert pairs == {"X=1", "BASE_IMAGE=unetseg-ci-base:abc", "BAKE_ENCODERS=resnet34 efficientnet-b0:imagenet"}
    assert build[build.index("--network") + 1] == "none"
    assert build[build.index("--platform") + 1] == "linux/amd64"
    assert not any(a.startswith(("--provenance", "--sbom", "--output")) for a in build)  # the classic builder has none
    assert "Successfully built" in out.getvalue()  # streamed


@pytest.mark.slow
def test_build_with_buildx_makes_one_docker_v2_manifest(fake_docker, monkeypatch):
    """A client with buildx (docker build is its alias from Docker 23): BuildKit adds provenance attestations by
    default, which turn the pushed image into an OCI index that SageMaker refuses ("Unsupported manifest media type").
    One platform, no attestations, Docker media types, loaded into the engine's image store."""
    monkeypatch.setenv("FAKE_DOCKER_CLIENT", "buildx")
    docker_image.build_image("unetseg:t2", base_image="b:1", network="none", out=None)
    (build,) = [c for c in fake_docker() if c["argv"][:2] == ["buildx", "build"] and "--help" not in c["argv"]]
    argv = build["argv"]
    assert argv[argv.index("--platform") + 1] == "linux/amd64"
    assert "--provenance=false" in argv and "--sbom=false" in argv
    assert argv[argv.index("--output") + 1] == "type=docker,oci-mediatypes=false"
    assert argv[argv.index("-t") + 1] == "unetseg:t2" and argv[argv.index("--network") + 1] == "none"
    assert "--force-rm" not in argv  # a classic-builder flag: BuildKit leaves no containers behind
    assert build["env"].get("BUILDX_NO_DEFAULT_ATTESTATIONS") == "1"


@pytest.mark.slow
def test_build_with_a_buildx_that_has_no_attestation_flags(fake_docker, monkeypatch):
    """buildx before 0.10 adds no attestations and would reject --provenance: the flags follow what the client
    offers."""
    monkeypatch.setenv("FAKE_DOCKER_CLIENT", "old-buildx")
    docker_image.build_image("unetseg:t3", out=None)
    (argv,) = [c["argv"] for c in fake_docker() if c["argv"][:2] == ["buildx", "build"] and "--help" not in c["argv"]]
    assert not any(a.startswith(("--provenance", "--sbom")) for a in argv)
    assert argv[argv.index("--platform") + 1] == "linux/amd64"
    assert argv[argv.index("--output") + 1] == "type=docker,oci-mediatypes=false"


@pytest.mark.slow
def test_docker_buildkit_0_keeps_the_classic_builder(fake_docker, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_CLIENT", "buildx")
    monkeypatch.setenv("DOCKER_BUILDKIT", "0")  # the user asked docker for its classic builder
    docker_image.build_image("unetseg:t4", out=None)
    builds = [c["argv"] for c in fake_docker() if c["argv"][0] in ("build", "buildx") and "--help" not in c["argv"]
              and c["argv"][:2] != ["buildx", "version"]]
    assert [b[0] for b in builds] == ["build"] and builds[0][builds[0].index("--platform") + 1] == "linux/amd64"


@pytest.mark.slow
def test_push_from_the_containerd_image_store_pushes_the_amd64_manifest(fake_docker, aws, monkeypatch):
    """The containerd image store keeps what a build made, index included, and `docker push` sends all of it; with
    --platform it sends the linux/amd64 manifest alone."""
    monkeypatch.setenv("FAKE_DOCKER_STORE", "containerd")
    uri = docker_image.push_image("unetseg:v1", out=None)
    (push,) = [c["argv"] for c in fake_docker() if c["argv"][0] == "push" and "--help" not in c["argv"]]
    assert push == ["push", "--platform", "linux/amd64", uri]


@pytest.mark.slow
def test_build_failure_carries_the_log_tail(fake_docker, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_FAIL", "build")
    with pytest.raises(ImageError, match=r"docker build of unetseg:latest failed \(exit 1\):.*torch==9\.9") as info:
        docker_image.build_image(out=None)
    assert "\n" not in str(info.value)
    assert info.value.log_tail[-1].startswith("The command")


@pytest.mark.slow
def test_no_docker_engine(fake_docker, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_FAIL", "engine")
    with pytest.raises(ImageError, match="no Docker engine.*Cannot connect to the Docker daemon"):
        docker_image.build_image(out=None)


def test_no_docker_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="no Docker engine: the `docker` command is not installed"):
        docker_image.push_image("unetseg:latest")


# --- push to ECR (moto) ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_push_creates_repository_and_logs_in_through_stdin(fake_docker, aws, capsys):
    import boto3

    uri = docker_image.push_image("unetseg:v1", repository="team/unetseg")
    assert uri == "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/unetseg:v1"
    # push's own boto3 session went through the suite's one offline AWS: recorded, and checked by strict_aws
    asked = {"sts.GetCallerIdentity", "ecr.CreateRepository", "ecr.GetAuthorizationToken"}
    assert asked <= set(aws.requests), aws.requests

    repo = boto3.client("ecr").describe_repositories(repositoryNames=["team/unetseg"])["repositories"][0]
    assert repo["imageScanningConfiguration"]["scanOnPush"] is True

    calls = fake_docker()
    login = [c for c in calls if c["argv"][0] == "login"]
    assert len(login) == 1
    registry = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    assert login[0]["argv"] == ["login", "--username", "AWS", "--password-stdin", registry]
    assert login[0]["stdin"] == MOTO_PASSWORD
    # the password is on no command line, and nowhere in what the user sees
    assert all(MOTO_PASSWORD not in " ".join(c["argv"]) for c in calls)
    seen = capsys.readouterr()
    assert MOTO_PASSWORD not in seen.out + seen.err
    assert [c["argv"] for c in calls if c["argv"][0] in ("tag", "push") and "--help" not in c["argv"]] == [
        ["tag", "unetseg:v1", uri], ["push", uri]]  # the classic image store pushes one manifest: no --platform


@pytest.mark.slow
def test_push_to_an_existing_repository(fake_docker, aws):
    import boto3

    boto3.client("ecr").create_repository(repositoryName="unetseg")
    assert docker_image.push_image("unetseg", region="us-east-1", out=None).endswith("/unetseg:latest")
    assert docker_image.push_image("unetseg:latest", tag="2024-06-01", out=None).endswith("/unetseg:2024-06-01")
    assert len(boto3.client("ecr").describe_repositories()["repositories"]) == 1


@pytest.mark.slow
def test_push_denied(fake_docker, aws, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_FAIL", "push")
    denied = r"push to .*/unetseg:latest denied: denied: .*ecr:InitiateLayerUpload"
    with pytest.raises(ImageError, match=denied) as info:
        docker_image.push_image("unetseg:latest", out=None)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_push_without_a_local_image(fake_docker, aws, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_FAIL", "noimage")
    with pytest.raises(ImageError, match="no local image 'unetseg:latest': build it first"):
        docker_image.push_image("unetseg:latest", out=None)


@pytest.mark.slow
def test_no_aws_credentials(fake_docker, aws, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ImageError, match="^no AWS credentials"):
        docker_image.push_image("unetseg:latest", out=None)
    assert not any(c["argv"][0] in ("login", "push") for c in fake_docker())


@pytest.mark.slow
def test_no_aws_region(fake_docker, aws, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(ImageError, match="no AWS region"):
        docker_image.push_image("unetseg:latest", out=None)


@pytest.mark.slow
def test_cli_push_prints_only_the_uri(fake_docker, aws, capsys):
    assert docker_image.main(["push", "--tag", "unetseg:v2", "--repository", "seg", "--region", "eu-west-1"]) == 0
    out = capsys.readouterr().out
    assert out == "123456789012.dkr.ecr.eu-west-1.amazonaws.com/seg:v2\n"


@pytest.mark.slow
def test_cli_build_then_push(fake_docker, aws, capsys):
    assert docker_image.main(["build", "--tag", "unetseg:v3", "--base-image", "b:1", "--bake-weights", "resnet34",
                       "--build-arg", "A=b", "--push", "--repository", "seg"]) == 0
    assert capsys.readouterr().out == "123456789012.dkr.ecr.us-east-1.amazonaws.com/seg:v3\n"
    build = [c["argv"] for c in fake_docker() if c["argv"][0] == "build" and "--help" not in c["argv"]][0]
    assert "BASE_IMAGE=b:1" in build and "BAKE_ENCODERS=resnet34" in build and "A=b" in build


def test_cli_build_checks_the_repository_before_building(fake_docker, aws):
    with pytest.raises(ImageError, match="invalid ECR repository name"):
        docker_image.main(["build", "--push", "--repository", "Bad Name"])
    assert not any(c["argv"][0] == "build" for c in fake_docker())


@pytest.mark.slow
def test_building_the_image_needs_no_boto3():
    """boto3 only once a push needs it (torch never: tests/test_layers.py checks the whole client)."""
    code = "import sys, unetseg.client.docker_image; assert 'boto3' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- the real engine and a real registry on 127.0.0.1 ---------------------------------------------------------------
def _engine_or_skip() -> str:
    exe = shutil.which("docker")
    why = "no docker command on PATH" if not exe else None
    if exe:
        proc = subprocess.run([exe, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
        if proc.returncode != 0:
            why = f"no Docker engine answers ({(proc.stderr.strip().splitlines() or ['?'])[-1]})"
    if why:
        if os.environ.get("UNETSEG_REQUIRE_DOCKER") == "1":
            pytest.fail(f"UNETSEG_REQUIRE_DOCKER=1 but {why}; start one with ci/start-dockerd.sh")
        pytest.skip(f"{why}: start one with ci/start-dockerd.sh (CI sets UNETSEG_REQUIRE_DOCKER=1)")
    return exe


def _bcrypt(password: str) -> str:
    """The registry's htpasswd wants bcrypt: the stdlib's crypt (3.12 and older, on glibc/libxcrypt), else bcrypt."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
        if hashed and hashed.startswith("$2"):
            return hashed
    except (ImportError, AttributeError):
        pass
    bcrypt = pytest.importorskip("bcrypt", reason="no bcrypt for the test registry's htpasswd")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()


@pytest.fixture
def registry(tmp_path):
    """Debian's docker-registry on a free loopback port, with htpasswd auth: (host:port, user, password)."""
    _engine_or_skip()
    exe = shutil.which("docker-registry")
    if not exe:
        if os.environ.get("UNETSEG_REQUIRE_DOCKER") == "1":
            pytest.fail("UNETSEG_REQUIRE_DOCKER=1 but docker-registry is not installed "
                        "(ci/start-dockerd.sh installs it)")
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    user, password = "ci", uuid.uuid4().hex
    (tmp_path / "htpasswd").write_text(f"{user}:{_bcrypt(password)}\n")
    port = free_port()
    (tmp_path / "config.yml").write_text(
        "version: 0.1\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
        f"auth: {{htpasswd: {{realm: unetseg-test, path: {tmp_path / 'htpasswd'}}}}}\n"
    )
    log = open(tmp_path / "registry.log", "w")
    proc = subprocess.Popen([exe, "serve", str(tmp_path / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"docker-registry did not start: {(tmp_path / 'registry.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", user, password
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def tiny_image(tmp_path):
    """A one-file image made with `docker import`: no base image, no registry, a second to build."""
    docker = _engine_or_skip()
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    marker = uuid.uuid4().hex
    (root / "etc" / "unetseg-marker").write_text(marker)
    tarball = tmp_path / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname=".")
    tag = f"unetseg-test-tiny:{marker[:12]}"
    subprocess.run([docker, "import", str(tarball), tag], check=True, capture_output=True)
    yield tag, marker
    subprocess.run([docker, "rmi", "-f", tag], capture_output=True)


@pytest.fixture
def built_image(tmp_path):
    """A one-file image that `unetseg image build` (docker_image.build_image) makes: FROM scratch, no base, a second."""
    docker = _engine_or_skip()
    context = tmp_path / "context"
    context.mkdir()
    marker = uuid.uuid4().hex
    (context / "unetseg-marker").write_text(marker)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY unetseg-marker /etc/unetseg-marker\n")
    tag = f"unetseg-test-built:{marker[:12]}"
    docker_image.build_image(tag, context=context, dockerfile=context / "Dockerfile", network="none", out=None)
    yield tag, marker
    subprocess.run([docker, "rmi", "-f", tag], capture_output=True)


# What a registry may hold under a tag: the one SageMaker takes, and what it refuses
# ("Unsupported manifest media type").
ACCEPT_ANY_MANIFEST = ", ".join([docker_image.MANIFEST_MEDIA_TYPE, "application/vnd.oci.image.manifest.v1+json",
                                 "application/vnd.oci.image.index.v1+json",
                                 "application/vnd.docker.distribution.manifest.list.v2+json"])


def registry_get(address: str, path: str, user: str, password: str, accept: str) -> tuple[str, dict]:
    """GET /v2/<path> from the test registry as SageMaker's puller would: (Content-Type, the JSON document)."""
    import base64
    import urllib.request

    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"http://{address}/v2/{path}",
                                     headers={"Accept": accept, "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers.get("Content-Type", ""), json.loads(response.read())


class _FakeEcrSession:
    """Just enough of a boto3 Session: STS and ECR answer as AWS would, but the registry is the local one."""

    def __init__(self, registry: str, user: str, password: str):
        self.region_name = "us-east-1"
        token = __import__("base64").b64encode(f"{user}:{password}".encode()).decode()
        outer = self

        class Exceptions:
            RepositoryNotFoundException = type("RepositoryNotFoundException", (Exception,), {})
            RepositoryAlreadyExistsException = type("RepositoryAlreadyExistsException", (Exception,), {})

        class Client:
            exceptions = Exceptions

            def get_caller_identity(self):
                return {"Account": "123456789012"}

            def describe_repositories(self, **kw):
                if kw["repositoryNames"][0] not in outer.created:
                    raise Exceptions.RepositoryNotFoundException()

            def create_repository(self, **kw):
                outer.created[kw["repositoryName"]] = kw

            def get_authorization_token(self, **kw):
                return {"authorizationData": [{"authorizationToken": token, "proxyEndpoint": f"http://{registry}"}]}

        self.created: dict = {}
        self._client = Client()

    def client(self, name, **kw):
        return self._client


@pytest.mark.docker
def test_push_to_a_real_registry_and_pull_back(registry, built_image, tmp_path, monkeypatch):
    docker = _engine_or_skip()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))  # the login stays out of ~/.docker
    address, user, password = registry
    local_tag, marker = built_image
    session = _FakeEcrSession(address, user, password)
    out = io.StringIO()

    uri = docker_image.push_image(local_tag, repository="team/unetseg-test", tag="v1", session=session, out=out)
    assert uri == f"{address}/team/unetseg-test:v1"
    assert session.created["team/unetseg-test"]["imageScanningConfiguration"] == {"scanOnPush": True}
    assert "digest: sha256:" in out.getvalue() and password not in out.getvalue()

    # What landed under the tag, asked for with every manifest type in Accept (so the registry answers with what it
    # holds): one Docker v2 schema 2 manifest for linux/amd64, not an index or list.
    kind, manifest = registry_get(address, "team/unetseg-test/manifests/v1", user, password, ACCEPT_ANY_MANIFEST)
    assert kind == manifest["mediaType"] == docker_image.MANIFEST_MEDIA_TYPE, (kind, manifest)
    assert "manifests" not in manifest and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    _, config = registry_get(address, f"team/unetseg-test/blobs/{manifest['config']['digest']}", user, password, "*/*")
    assert (config["os"], config["architecture"]) == ("linux", "amd64")

    # Forget it locally, pull it back from the registry, and read the file it carries.
    subprocess.run([docker, "rmi", uri], check=True, capture_output=True)
    subprocess.run([docker, "pull", uri], check=True, capture_output=True)
    try:
        cid = subprocess.run([docker, "create", uri, "none"], check=True, capture_output=True, text=True).stdout.strip()
        content = subprocess.run([docker, "cp", f"{cid}:/etc/unetseg-marker", "-"], check=True,
                                 capture_output=True).stdout
        subprocess.run([docker, "rm", cid], capture_output=True)
        with tarfile.open(fileobj=io.BytesIO(content)) as tar:
            assert tar.extractfile("unetseg-marker").read().decode() == marker
    finally:
        subprocess.run([docker, "rmi", "-f", uri], capture_output=True)
    print(f"pushed {uri}: {kind}, {config['os']}/{config['architecture']}")


@pytest.mark.docker
def test_push_without_login_is_denied(registry, tiny_image, tmp_path, monkeypatch):
    _engine_or_skip()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))  # no stored login for this registry
    address, _, _ = registry
    with pytest.raises(ImageError, match=f"push to {re.escape(address)}/unetseg-test:v1 denied"):
        docker_image.push_to_registry(tiny_image[0], address, "unetseg-test", "v1", out=None)
    subprocess.run(["docker", "rmi", f"{address}/unetseg-test:v1"], capture_output=True)


@pytest.mark.docker
def test_wrong_password_fails_login_without_echoing_it(registry, tiny_image, tmp_path, monkeypatch):
    _engine_or_skip()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    address, user, _ = registry
    with pytest.raises(ImageError, match=f"docker login to {re.escape(address)} failed") as info:
        docker_image.push_to_registry(tiny_image[0], address, "unetseg-test", "v1", user, "wrong-secret-123", out=None)
    assert "wrong-secret-123" not in str(info.value)


@pytest.mark.docker
@pytest.mark.parametrize("source", ["checkout", "installed package"])
def test_dockerfile_builds_offline_on_the_ci_base(source, tmp_path):
    """The same entry/Dockerfile, on the CI base, with no network: everything it needs is in the base already.
    From the source checkout, and from the context an installed unetseg lays out for itself."""
    docker = _engine_or_skip()
    base = os.environ.get("UNETSEG_CI_BASE", "unetseg-ci-base:latest")
    if subprocess.run([docker, "image", "inspect", base], capture_output=True).returncode != 0:
        msg = f"no CI base image {base}: build it with `bash ci/build-base-image.sh`"
        if os.environ.get("UNETSEG_REQUIRE_DOCKER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    tag = "unetseg:test-offline"
    context = docker_image.packaged_context(tmp_path / "context") if source == "installed package" else None
    docker_image.build_image(tag, base_image=base, network="none", context=context, out=None)
    probe = ("import json, os, unetseg.container.training_job; "
             "print(json.dumps({'code': sorted(os.listdir('/opt/ml/code')), "
             "'env': {k: os.environ.get(k) for k in ('SAGEMAKER_PROGRAM', 'PYTHONUNBUFFERED', "
             "'NO_ALBUMENTATIONS_UPDATE', 'HF_HUB_OFFLINE')}}))")
    proc = subprocess.run([docker, "run", "--rm", "--network", "none", tag, "python3", "-c", probe],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["code"] == ["train.py"]
    assert seen["env"] == {"SAGEMAKER_PROGRAM": "train.py", "PYTHONUNBUFFERED": "1",
                           "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": ""}  # nothing baked: hub not offline
    commands = "command -v train && command -v serve && command -v unetseg"
    assert subprocess.run([docker, "run", "--rm", "--network", "none", "--entrypoint", "sh", tag, "-c", commands],
                          capture_output=True).returncode == 0


@pytest.mark.docker
def test_a_failed_build_names_the_step_and_leaves_no_container(tmp_path):
    docker = _engine_or_skip()
    base = os.environ.get("UNETSEG_CI_BASE", "unetseg-ci-base:latest")
    if subprocess.run([docker, "image", "inspect", base], capture_output=True).returncode != 0:
        pytest.skip(f"no CI base image {base}")
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN echo broken-step && exit 3\n")

    def listing():
        return set(subprocess.run([docker, "ps", "-aq"], capture_output=True, text=True).stdout.split())

    before = listing()
    with pytest.raises(ImageError, match="docker build of unetseg:test-broken failed") as info:
        docker_image.build_image("unetseg:test-broken", context=tmp_path, dockerfile=tmp_path / "Dockerfile",
                          network="none", out=None)
    assert any("broken-step" in line for line in info.value.log_tail)
    assert listing() == before  # --force-rm: the failed step's container is gone
