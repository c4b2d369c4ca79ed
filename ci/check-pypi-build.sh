#!/usr/bin/env bash
# Proves the path of entry/Dockerfile that real users take and CI does not: a base with CUDA torch but none of the
# other requirements and no compiler (like pytorch/pytorch:*-runtime, which no registry here can serve), so that the
# build installs gcc, g++ and Python's headers from Debian (and keeps them: torch.compile needs them at run time),
# compiles sagemaker-training and fetches the rest from PyPI. Then the local-mode and serving tests run on the result.
# Needs the network (PyPI, the Debian mirror); not part of .ci/run, which builds offline.
#
#   bash ci/start-dockerd.sh && bash ci/check-pypi-build.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=$(bash "$repo/ci/build-base-image.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The CI base less the requirements that the Dockerfile installs (torch and torchvision stay: they are the base's job).
# The host's CA bundle goes in too, for machines that reach PyPI through a TLS-inspecting proxy.
cp /etc/ssl/certs/ca-certificates.crt "$work/"
cat >"$work/Dockerfile" <<DOCKERFILE
FROM $base
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN python3 -m pip uninstall -y sagemaker-training segmentation-models-pytorch albumentations gunicorn \\
 && apt-get purge -y --auto-remove gcc g++ libc6-dev python3-dev 2>/dev/null; \\
    ! python3 -c 'import sagemaker_training' && ! command -v gcc && ! command -v g++
DOCKERFILE
docker build -q -t unetseg-torch-only:check "$work" >/dev/null

# --network host: the build's pip and apt-get reach PyPI and the mirror as this machine does.
docker build --no-cache --network host --build-arg BASE_IMAGE=unetseg-torch-only:check -f "$repo/entry/Dockerfile" \
    -t unetseg:pypi-check "$repo"
docker run --rm --entrypoint sh unetseg:pypi-check -c \
    'command -v gcc && command -v g++ \
     && python3 -c "import sagemaker_training, segmentation_models_pytorch, albumentations" \
     && python3 -c "import unetseg.container.training_job"'

# The tests build their image FROM $UNETSEG_CI_BASE offline; on this image every requirement is already satisfied.
cd "$repo"
UNETSEG_CI_BASE=unetseg:pypi-check UNETSEG_REQUIRE_DOCKER=1 .venv/bin/python -m pytest -q \
    tests/test_local_mode_docker.py tests/test_serving_docker.py
