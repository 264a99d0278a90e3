#!/usr/bin/env bash
# Every test of the project: Rust unit, conformance, mesh, multi-process and live-kernel
# tests, then the Python bindings and the PyTorch backend. Installs what it needs (Debian
# packages, a Python venv with the pinned torch) on a fresh machine. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
log() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

log "rust: build and test the workspace (one dev profile)"
cargo test --workspace --locked --no-fail-fast
