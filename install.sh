#!/usr/bin/env bash
# Sets up bitfast from nothing in ./.venv: torch 2.14.1 (CUDA 13 build, so the CUDA kernels compile even on a
# machine without a GPU), the build tools, then builds bitfast._C and installs bitfast in editable mode.
# Environment knobs: PYTHON (default python3), VENV (default .venv), BITFAST_NO_CUDA=1 (skip the CUDA kernels),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS (default 2), CUDA_HOME (default /usr/local/cuda if present).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install --quiet numpy pybind11 ninja cmake tqdm matplotlib pytest pytest-benchmark imagehash webdataset tensorboard scikit-image
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-2}
# --no-build-isolation: build against the torch installed above, not a second one pip would fetch.
"$VENV/bin/python" -m pip install --no-build-isolation --no-deps -e .
"$VENV/bin/python" -m bitfast
