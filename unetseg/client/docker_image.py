"""Build the training image (entry/Dockerfile) and push it to Amazon ECR: `unetseg image build|push`.

Client side: no torch here, and boto3 only once a push needs it. Docker is driven through its command line, so that
whatever engine, context and credential helpers the user's `docker` is set up with apply unchanged.
"""

from __future__ import annotations

import argparse
import base64
import collections
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Optional

from ..contract.errors import UnetsegError

DEFAULT_TAG = "unetseg:latest"
DEFAULT_REPOSITORY = "unetseg"
# SageMaker runs the image on x86_64 hosts, and takes only a Docker image manifest v2 schema 2: an OCI index (what
# BuildKit's default provenance attestations or the containerd image store push) or an OCI manifest fails at
# CreateTrainingJob / CreateModel with "Unsupported manifest media type".
PLATFORM = "linux/amd64"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
# ECR's own rule for repositoryName (CreateRepository API reference), checked before any AWS or Docker call.
_ECR_REPOSITORY = re.compile(r"(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*")
_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # Docker's (and ECR's) rule for a tag
_DENIED = re.compile(r"denied|unauthorized|authentication required|no basic auth credentials|403 forbidden", re.I)


class ImageError(UnetsegError):
    """Building or pushing the image failed: no Docker engine, no AWS credentials, a bad name, a denied push."""

    def __init__(self, message: str, log_tail: Sequence[str] = ()):
        super().__init__(message)
        self.log_tail = list(log_tail)  # the last lines docker printed, when there are any


# --- names -----------------------------------------------------------------------------------------------------------
def validate_repository(name: str) -> str:
    if not (2 <= len(name) <= 256 and _ECR_REPOSITORY.fullmatch(name)):
        raise ImageError(
            f"invalid ECR repository name {name!r}: use 2-256 lowercase letters, digits and . _ - / "
            "(each part starting and ending with a letter or digit), e.g. 'unetseg' or 'team/unetseg'"
        )
    return name


def validate_tag(tag: str) -> str:
    if not _IMAGE_TAG.fullmatch(tag):
        raise ImageError(f"invalid image tag {tag!r}: up to 128 letters, digits and _ . - (not starting with . or -)")
    return tag


def split_reference(ref: str) -> tuple[str, Optional[str]]:
    """'host:5000/name:tag' -> ('host:5000/name', 'tag'); the tag is None when the reference has none."""
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return ref, None


# --- docker ----------------------------------------------------------------------------------------------------------
def docker_command() -> str:
    """The docker client, after checking that it reaches an engine (the first thing that goes wrong on a laptop)."""
    exe = shutil.which("docker")
    if not exe:
        raise ImageError("no Docker engine: the `docker` command is not installed or not on PATH (install Docker)")
    proc = subprocess.run([exe, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        detail = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ImageError(f"no Docker engine: `docker version` cannot reach the daemon ({detail}); "
                         "start Docker and retry")
    return exe


def _stream(cmd: Sequence[str], out: Optional[IO[str]], input: Optional[str] = None, keep: int = 30,
            env: Optional[Mapping[str, str]] = None) -> tuple[int, list[str]]:
    """Run a docker command, echo its output line by line, and return its exit code and last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
    if input is not None:
        assert proc.stdin is not None
        proc.stdin.write(input)
        proc.stdin.close()
    assert proc.stdout is not None
    for line in proc.stdout:
        if out is not None:
            out.write(line)
            out.flush()
        if line.strip():
            tail.append(line.rstrip("\n"))
    return proc.wait(), list(tail)


def _one_line(tail: Sequence[str], n: int = 3) -> str:
    return " | ".join(line.strip() for line in tail[-n:])[-600:] or "no output"


def _long_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))


def build_command(docker: str, environ: Optional[Mapping[str, str]] = None) -> tuple[list[str], dict[str, str]]:
    """The start of the build command line and its environment, from what this docker client offers (asked, not
    guessed): buildx (BuildKit; `docker build` is its alias from Docker 23) or the classic builder.

    Either way the result is one linux/amd64 image that pushes as a Docker v2 schema 2 manifest. With buildx: no
    provenance or SBOM attestations (each would wrap the image in an OCI index), Docker media types, and the image
    loaded into the engine's store (`--output type=docker`, which a docker-container builder needs too).
    DOCKER_BUILDKIT=0 keeps the classic builder, as it does for `docker build`.
    """
    env = dict(os.environ if environ is None else environ)
    buildx = env.get("DOCKER_BUILDKIT") != "0" and subprocess.run(
        [docker, "buildx", "version"], capture_output=True).returncode == 0
    cmd = [docker, "buildx", "build"] if buildx else [docker, "build"]
    options = _long_options(subprocess.run([*cmd, "--help"], capture_output=True, text=True).stdout)
    if "--force-rm" in options:  # the classic builder keeps a failed step's container otherwise
        cmd.append("--force-rm")
    if "--platform" in options:  # an Apple-silicon laptop would build linux/arm64 otherwise
        cmd += ["--platform", PLATFORM]
    if buildx:
        env["BUILDX_NO_DEFAULT_ATTESTATIONS"] = "1"
        cmd += [f"--{name}=false" for name in ("provenance", "sbom") if f"--{name}" in options]
        cmd += ["--output", "type=docker,oci-mediatypes=false"]
        if "--progress" in options:
            cmd.append("--progress=plain")  # one line per step in logs, rather than a redrawn terminal
    return cmd, env


def containerd_image_store(docker: str) -> bool:
    """Whether the engine keeps images in containerd's store, which pushes an image as it was built, index and all."""
    proc = subprocess.run([docker, "info", "--format", "{{json .DriverStatus}}"], capture_output=True, text=True)
    return "io.containerd.snapshotter" in proc.stdout


def find_context() -> Optional[Path]:
    """The source checkout this package was imported from (entry/Dockerfile beside setup.cfg), or None."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "entry" / "Dockerfile").is_file() and (parent / "setup.cfg").is_file():
            return parent
    return None


# The installed package carries entry/ as unetseg.entry (setup.cfg), constraints.txt included.
_ENTRY_FILES = ("Dockerfile", "train.py", "init.py", "serve", "requirements-image.in")
# What the Dockerfile's `pip install --no-deps --no-build-isolation` needs to install the copied package.
_PACKAGED_SETUP = """\
[metadata]
name = unetseg
version = {version}

[options]
packages = find:

[options.packages.find]
include = unetseg, unetseg.*

[options.entry_points]
console_scripts =
    unetseg = unetseg.cli:main
"""
_PACKAGED_PYPROJECT = ('[build-system]\nrequires = ["setuptools>=64", "wheel"]\n'
                       'build-backend = "setuptools.build_meta"\n')


def packaged_context(target: Path) -> Path:
    """Lay out, in `target`, the build context of an installed unetseg (no source checkout): the layout
    entry/Dockerfile expects, with this very package as the code that goes into the image."""
    from .. import __version__

    package = Path(__file__).resolve().parents[1]
    try:
        entry = Path(str(importlib.resources.files("unetseg.entry")))
    except ModuleNotFoundError:  # a source tree on PYTHONPATH, not installed: entry/ lies beside the package
        entry = package.parent / "entry"
    missing = [name for name in (*_ENTRY_FILES, "constraints.txt") if not (entry / name).is_file()]
    if missing:
        raise ImageError(f"no build context: {entry} lacks {', '.join(missing)}; reinstall unetseg, or build "
                         "from a clone of the repository (or pass context=)")
    (target / "entry").mkdir(parents=True, exist_ok=True)
    for name in _ENTRY_FILES:
        shutil.copy2(entry / name, target / "entry" / name)
    shutil.copy2(entry / "constraints.txt", target / "constraints.txt")
    # unetseg/entry is the wheel's copy of entry/, which goes to the context's entry/ above
    shutil.copytree(package, target / "unetseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "entry"),
                    dirs_exist_ok=True)
    (target / "setup.cfg").write_text(_PACKAGED_SETUP.format(version=__version__))
    (target / "pyproject.toml").write_text(_PACKAGED_PYPROJECT)
    return target


def build_image(
    tag: str = DEFAULT_TAG,
    base_image: Optional[str] = None,
    build_args: Optional[Mapping[str, str]] = None,
    context: Optional[os.PathLike | str] = None,
    dockerfile: Optional[os.PathLike | str] = None,
    bake_encoders: Sequence[str] = (),
    network: Optional[str] = None,
    out: Optional[IO[str]] = sys.stdout,
) -> str:
    """`docker build -f entry/Dockerfile` with its output streamed to `out`; returns `tag`.

    base_image: the FROM image (default: the Dockerfile's CUDA PyTorch image). bake_encoders: smp encoder names
    ("resnet34", or "name:weights") whose pretrained weights go into the image, for jobs with network isolation.
    network: `docker build --network` ("none" proves an offline build).
    """
    if not tag or any(c.isspace() for c in tag):
        raise ImageError(f"invalid image tag {tag!r}")
    if context is None and find_context() is None:  # an installed unetseg: lay out its own context
        with tempfile.TemporaryDirectory(prefix="unetseg-image-") as tmp:
            return build_image(tag, base_image, build_args, packaged_context(Path(tmp)), dockerfile, bake_encoders,
                               network, out)
    ctx = Path(context) if context is not None else find_context()
    dockerfile = Path(dockerfile) if dockerfile is not None else ctx / "entry" / "Dockerfile"
    if not dockerfile.is_file():
        raise ImageError(f"no Dockerfile at {dockerfile}")
    args = dict(build_args or {})
    if base_image:
        args["BASE_IMAGE"] = base_image
    if bake_encoders:
        args["BAKE_ENCODERS"] = " ".join(bake_encoders)
    cmd, env = build_command(docker_command())
    cmd += ["-f", str(dockerfile), "-t", tag]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if network:
        cmd += ["--network", network]
    cmd.append(str(ctx))
    rc, tail = _stream(cmd, out, env=env)
    if rc != 0:
        raise ImageError(f"docker build of {tag} failed (exit {rc}): {_one_line(tail)}", tail)
    return tag


# --- push ------------------------------------------------------------------------------------------------------------
def push_to_registry(
    local_tag: str,
    registry: str,
    repository: str,
    tag: str,
    username: Optional[str] = None,
    password: Optional[str] = None,
    out: Optional[IO[str]] = sys.stdout,
) -> str:
    """Log in (password through stdin only), tag and push; returns `registry/repository:tag`."""
    docker = docker_command()
    if subprocess.run([docker, "image", "inspect", local_tag], capture_output=True).returncode != 0:
        raise ImageError(f"no local image {local_tag!r}: build it first (unetseg image build --tag {local_tag})")
    if password is not None:
        # Never on the command line (visible in `ps` and shell history) and never echoed: stdin only.
        login = subprocess.run([docker, "login", "--username", username or "AWS", "--password-stdin", registry],
                               input=password, capture_output=True, text=True)
        if login.returncode != 0:
            detail = (login.stderr.strip().splitlines() or ["no output"])[-1].replace(password, "***")
            raise ImageError(f"docker login to {registry} failed: {detail}")
    remote = f"{registry}/{repository}:{tag}"
    if subprocess.run([docker, "tag", local_tag, remote], capture_output=True).returncode != 0:
        raise ImageError(f"docker tag {local_tag} {remote} failed")
    push = [docker, "push"]
    if containerd_image_store(docker) and "--platform" in _long_options(
            subprocess.run([docker, "push", "--help"], capture_output=True, text=True).stdout):
        push += ["--platform", PLATFORM]  # the amd64 manifest alone, not the index the store may keep around it
    rc, tail = _stream([*push, remote], out)
    if rc != 0:
        if any(_DENIED.search(line) for line in tail):
            raise ImageError(f"push to {remote} denied: {_one_line(tail, 1)} "
                             "(the credentials need ecr:InitiateLayerUpload, ecr:PutImage and friends)", tail)
        raise ImageError(f"docker push {remote} failed (exit {rc}): {_one_line(tail)}", tail)
    return remote


def _aws_error(exc: Exception, what: str) -> ImageError:
    from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ImageError("no AWS credentials: configure them (aws configure, AWS_PROFILE, or an instance role)")
    if isinstance(exc, NoRegionError):
        return ImageError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return ImageError(f"AWS refused {what}: {err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": "))
    return ImageError(f"{what} failed: {exc}")


def push_image(
    local_tag: str = DEFAULT_TAG,
    repository: str = DEFAULT_REPOSITORY,
    tag: Optional[str] = None,
    region: Optional[str] = None,
    session: Any = None,
    out: Optional[IO[str]] = sys.stdout,
) -> str:
    """Push a local image to ECR and return the URI that UNetEstimator takes.

    Resolves the account (STS) and region, creates the repository if missing (scan on push), logs Docker in with
    an ECR authorization token, tags and pushes. `tag` defaults to the local tag's own tag (or "latest").
    """
    validate_repository(repository)
    tag = validate_tag(tag or split_reference(local_tag)[1] or "latest")
    docker_command()  # fail on a missing engine before any AWS call
    if session is None:
        import boto3

        session = boto3.Session(region_name=region)
    region = region or session.region_name
    if not region:
        raise ImageError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    try:
        account = session.client("sts", region_name=region).get_caller_identity()["Account"]
    except Exception as exc:  # noqa: BLE001 - botocore's errors, turned into one line
        raise _aws_error(exc, "sts:GetCallerIdentity") from None
    ecr = session.client("ecr", region_name=region)
    try:
        _ensure_repository(ecr, repository, account)
        auth = ecr.get_authorization_token(registryIds=[account])["authorizationData"][0]
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _aws_error(exc, f"ECR access to repository {repository!r}") from None
    username, _, password = base64.b64decode(auth["authorizationToken"]).decode().partition(":")
    registry = re.sub(r"^\w+://", "", auth["proxyEndpoint"]).rstrip("/")
    return push_to_registry(local_tag, registry, repository, tag, username, password, out)


def _ensure_repository(ecr: Any, repository: str, account: str) -> None:
    try:
        ecr.describe_repositories(registryId=account, repositoryNames=[repository])
    except ecr.exceptions.RepositoryNotFoundException:
        try:
            ecr.create_repository(repositoryName=repository, imageScanningConfiguration={"scanOnPush": True})
        except ecr.exceptions.RepositoryAlreadyExistsException:
            pass  # created by someone else in between: fine


# --- command line ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetseg image", description="Build the training image and push it to ECR.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build",
                       help="docker build -f entry/Dockerfile (the source checkout's, or the installed package's)")
    b.add_argument("--tag", default=DEFAULT_TAG, help=f"local image tag (default {DEFAULT_TAG})")
    b.add_argument("--base-image", help="FROM image (default: the Dockerfile's CUDA PyTorch image)")
    b.add_argument("--bake-weights", action="append", default=[], metavar="ENCODER",
                   help="bake this encoder's pretrained weights into the image "
                        "(repeatable; ENCODER or ENCODER:WEIGHTS)")
    b.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="passed to docker build")
    b.add_argument("--network", help="docker build --network (e.g. none)")
    b.add_argument("--context", type=Path,
                   help="build context (default: the source checkout, else the installed package)")
    b.add_argument("--push", action="store_true", help="then push to ECR and print the image URI")
    _push_args(b, local_tag=False)

    p = sub.add_parser("push", help="push a local image to ECR (creating the repository) and print its URI")
    _push_args(p, local_tag=True)
    return parser


def _push_args(p: argparse.ArgumentParser, local_tag: bool) -> None:
    if local_tag:
        p.add_argument("--tag", default=DEFAULT_TAG, help=f"the local image to push (default {DEFAULT_TAG})")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help=f"ECR repository (default {DEFAULT_REPOSITORY})")
    p.add_argument("--remote-tag", help="tag in ECR (default: the local image's tag)")
    p.add_argument("--region", help="AWS region (default: the AWS configuration's)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        build_args = {}
        for item in args.build_arg:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ImageError(f"--build-arg {item!r}: expected KEY=VALUE")
            build_args[key] = value
        if args.push:  # check the name before a build of several minutes
            validate_repository(args.repository)
        build_image(args.tag, base_image=args.base_image, build_args=build_args, context=args.context,
                    bake_encoders=args.bake_weights, network=args.network, out=sys.stderr)
        if not args.push:
            print(args.tag)
            return 0
    # Progress goes to stderr; stdout carries only the URI, so that `URI=$(unetseg image push)` works.
    print(push_image(args.tag, args.repository, args.remote_tag, args.region, out=sys.stderr))
    return 0


if __name__ == "__main__":  # python -m unetseg.client.docker_image ...
    try:
        sys.exit(main())
    except UnetsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
