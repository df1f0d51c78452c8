#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU and the CUDA toolkit (a few minutes, most of it
# building llama-cpp-python with CUDA): installs into .venv-gpu, then checks on the GPU the properties that
# tests/test_interventions.py checks on the CPU, with pysteer's CUDA kernels editing device tensors.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYSTEER_VENV=${PYSTEER_VENV:-$PWD/.venv-gpu}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native -DPYSTEER_CUDA=ON"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
scripts/install.sh
"$PYSTEER_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/gpu/gpu_checks.py "$@"
