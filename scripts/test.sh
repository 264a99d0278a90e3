#!/usr/bin/env bash
# Every test of the project: Rust unit, golden-bytes, conformance, mesh, multi-process and
# live-kernel tests, then the Python bindings and the PyTorch backend. Installs what it needs
# on a fresh machine (a Python venv with the pinned torch; see scripts/setup_python.sh).
# CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

log "system packages (lavapipe: the Vulkan device the device-buffer tests run on)"
./scripts/setup_system.sh
# The Vulkan tests must not skip in CI: lavapipe was just installed.
export DEVCCL_REQUIRE_VULKAN=${DEVCCL_REQUIRE_VULKAN:-1}
# Nor the CUDA kernels' NVRTC compile check: NVRTC comes with the venv's CUDA wheels below.
export DEVCCL_REQUIRE_NVRTC=${DEVCCL_REQUIRE_NVRTC:-1}

log "python environment (torch 2.11.0, numpy, pytest, maturin): needed by the bindings crate and its tests"
./scripts/setup_python.sh
export DEVCCL_VENV=${DEVCCL_VENV:-$(pwd)/.venv}
# pyo3's build script looks for the interpreter; use the venv's (Python >= 3.11).
export PYO3_PYTHON=${PYO3_PYTHON:-$DEVCCL_VENV/bin/python}

log "rust: build and test the whole workspace (one dev profile)"
cargo test --workspace --locked --no-fail-fast

log "python: build the extension (dev profile) and run the bindings' and torch backend's tests"
./bindings-python/run_tests.sh

log "all tests passed"
