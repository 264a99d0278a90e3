#!/usr/bin/env bash
# Build the devccl Python extension (dev profile, with `maturin develop`) into the project's
# venv and run the bindings' pytest suite: every collective on 2 and 3 ranks against
# numpy/torch references, the torch.distributed backend, DDP bit-identical to Gloo, bad
# inputs. Multi-process tests carry their own hard timeouts; the whole run is capped too.
#
#   bindings-python/run_tests.sh [pytest args...]
#
# Environment: DEVCCL_VENV (default <repo>/.venv, created by scripts/setup_python.sh when
# missing), CARGO_TARGET_DIR (default <repo>/target: the workspace's one dev profile).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
VENV=${DEVCCL_VENV:-$ROOT/.venv}
"$ROOT/scripts/setup_python.sh" "$VENV"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export VIRTUAL_ENV=$VENV
cd "$HERE"
echo "== maturin develop (dev profile, target dir $CARGO_TARGET_DIR)"
"$VENV/bin/maturin" develop --locked --quiet
echo "== pytest"
exec timeout --kill-after=30 900 "$VENV/bin/python" -m pytest "$@"
