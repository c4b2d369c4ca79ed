#!/usr/bin/env bash
# Proof of the CUDA path on one GPU, in one command (under 8 minutes): environment, training at 512x512 (amp=auto,
# channels_last, eager and compiled), fp16 with the grad scaler, SIGTERM and resume, CUDA against CPU inference and a
# tiled 2600x2600 image, host-device syncs per step, and bench/gpu.py's images/s, MFU and peak memory.
# See bench/gpu_check.py for each check; the results go to one folder (summary.json, logs/).
#
#   bash bench/gpu_check.sh                 # on a GPU machine; fails (exit 2) where there is no CUDA device
#   bash bench/gpu_check.sh --smoke         # the CPU form with tiny sizes (what the tests run)
#   bash bench/gpu_check.sh --out DIR --checks environment,train-eager
#
# Python: $PYTHON, else the repository's .venv, else python3 (it needs unetseg's train extra: torch, smp, ...).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $repo/.venv/bin/python ]] && echo "$repo/.venv/bin/python" || command -v python3)}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
exec "$PYTHON" "$repo/bench/gpu_check.py" "$@"
