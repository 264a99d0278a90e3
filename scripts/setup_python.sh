#!/usr/bin/env bash
# Creates (once) the Python environment the bindings' tests and the peer benchmarks use:
# torch 2.11.0 (the version on the accelerator machine), numpy, pytest, maturin.
#
# The PyPI torch wheel for Linux is the CUDA build; it imports (and runs on CPU) only with its
# CUDA library wheels present. To save ~1 GB and a minute we install torch without
# dependencies and then exactly the libraries it needs to import, skipping triton and
# cuda-bindings (unused without a GPU). Pins come from the wheel's own METADATA.
# Usage: scripts/setup_python.sh [venv-dir]   (default: $DEVCCL_VENV or ./.venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${DEVCCL_VENV:-$(pwd)/.venv}}
TORCH=2.11.0
STAMP="$VENV/.devccl-stamp"
WANT="torch=$TORCH numpy pytest maturin=1.16.0 v2"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "python env ready: $VENV"
    exit 0
fi
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check --no-cache-dir)
"${PIP[@]}" --no-deps "torch==$TORCH"
"${PIP[@]}" filelock "typing-extensions>=4.10.0" "setuptools<82" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" \
    "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2" \
    nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9 nvidia-nvshmem-cu13==3.4.5 \
    numpy pytest "maturin==1.16.0"
"$VENV/bin/python" -c 'import torch, torch.distributed as d; assert d.is_gloo_available(); print("torch", torch.__version__, "ok")'
echo "$WANT" > "$STAMP"
