#!/usr/bin/env bash
# The main job: build devccl (release) and run the local multi-rank all-reduce benchmark with
# an embedded rendezvous, printing the nccl-tests table.
#
#   ./scripts/bench.sh                 # 4 ranks, 8 B .. 256 MiB, float sum
#   ./scripts/bench.sh -n 2 -e 64M     # any `devccl bench` flags override the defaults
#
# Needs the Rust toolchain (cargo); crates come from crates.io, and lavapipe (for
# `--device vulkan` runs without a GPU) from scripts/setup_system.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_system.sh
cargo build --release --locked -p devccl-cli
exec ./target/release/devccl bench all_reduce -n 4 -b 8 -e 256M -f 2 -w 5 -i 20 -c 1 "$@"
