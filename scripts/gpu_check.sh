#!/usr/bin/env bash
# Every CUDA check of devccl, in one call on a machine with an NVIDIA GPU (the accelerator
# machine has no cargo: build here, carry the results).
#
#   scripts/gpu_check.sh prepare      # here: release binaries, the CUDA test binary and the
#                                     # wheel into .dev/gpu/ (git-ignored)
#   scripts/gpu_check.sh run [DIR]    # there: run everything (about 6 min), logs into DIR
#                                     # (default docs/evidence/gpu_<date>); with the device
#                                     # tool's $OUT set, also packed into $OUT (8 files max)
#
# What `run` does, each step bounded by its own timeout, all output kept:
#  1. nvidia-smi, driver and NVRTC as devccl sees them;
#  2. the CUDA backend's tests (conformance vs the host, edge values, stream ordering, gates,
#     leaks) and the Rust API on cudarc slices, with DEVCCL_REQUIRE_CUDA=1, so nothing skips;
#  3. every collective × dtype × op × count on CUDA buffers vs host buffers, 2 and 4 processes
#     sharing the GPU, and a peer killed during staged CUDA collectives;
#  4. the device_train example on the GPU;
#  5. benchmarks: all_reduce busbw on CUDA vs host buffers (2 ranks, 64–256 MiB, two
#     interleaved rounds), the reduction kernel's bandwidth vs the GPU's copy bandwidth;
#  6. the Python wheel: CUDA tensor tests (every collective, stream semantics, DDP vs Gloo,
#     FSDP) and torch.distributed all_reduce on CUDA tensors, devccl vs gloo.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=.dev/gpu

# test_binary PACKAGE TEST: build that integration test (release) and print its path.
test_binary() {
    cargo test --release --locked -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2"
}

prepare() {
    set -e
    mkdir -p "$STAGE"
    cargo build --release --locked -p devccl-cli --bins
    cargo build --release --locked -p devccl --example device_train
    cargo build --release --locked -p devccl-device --example cuda_bench
    cp target/release/devccl target/release/devccl-devcheck target/release/examples/device_train \
        target/release/examples/cuda_bench "$STAGE/"
    cp "$(test_binary devccl-device cuda)" "$STAGE/cuda-tests"
    cp "$(test_binary devccl tcp_threads)" "$STAGE/api-tests"
    # Line tables make these ~50 MB each; the device tool carries 64 MiB in all.
    strip "$STAGE"/devccl "$STAGE"/devccl-devcheck "$STAGE"/device_train "$STAGE"/cuda_bench "$STAGE"/*-tests
    ./scripts/setup_python.sh
    rm -f "$STAGE"/*.whl
    (cd bindings-python && ../.venv/bin/maturin build --release --locked --quiet --out "../$STAGE")
    ls -la "$STAGE"
}

# step NAME SECONDS CMD...: run CMD under a timeout, its output into NAME.txt and the summary.
step() {
    local name=$1 secs=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name: $*" | tee -a "$LOG/summary.txt"
    timeout --kill-after=10 "$secs" "$@" >"$LOG/$name.txt" 2>&1
    rc=$?
    tail -n 25 "$LOG/$name.txt"
    echo "== $name: rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$LOG/summary.txt"
}

run() {
    LOG=${1:-docs/evidence/gpu_$(date -u +%F)}
    mkdir -p "$LOG"
    export LOG DEVCCL_REQUIRE_CUDA=1
    local bin=$STAGE
    step env 30 sh -c 'date -u; nvidia-smi; uname -a; python3 --version; ldconfig -p | grep -E "libcuda.so|libnvrtc.so"'
    step cuda_tests 150 "$bin/cuda-tests" --test-threads=1
    step api_tests 60 "$bin/api-tests" cudarc --nocapture
    step matrix_2 120 env DEVCHECK_DEVICE=cuda DEVCHECK_COUNTS=0,1,7919,1048583 \
        "$bin/devccl" launch -n 2 -- "$bin/devccl-devcheck"
    step matrix_4 120 env DEVCHECK_DEVICE=cuda DEVCHECK_COUNTS=0,1,7919,262147 \
        "$bin/devccl" launch -n 4 -- "$bin/devccl-devcheck"
    step fault_3 45 env DEVCHECK_DEVICE=cuda DEVCHECK_MODE=fault DEVCHECK_KILL_RANK=1 DEVCHECK_KILL_MS=2000 \
        DEVCHECK_COUNT=16000000 DEVCCL_TIMEOUT=8 DEVCCL_TRANSPORTS=tcp "$bin/devccl" launch -n 3 -- "$bin/devccl-devcheck"
    step train 60 "$bin/devccl" launch -n 2 -- "$bin/device_train" --device cuda --steps 300
    step kernel_bw 30 "$bin/cuda_bench" 256
    for round in 1 2; do
        for dev in host cuda; do
            step "bench_${dev}_$round" 60 "$bin/devccl" bench all_reduce --device "$dev" -n 2 -b 1M -e 256M -f 4 \
                -w 2 -i 10 -c 1 --json "$LOG/bench_${dev}_$round.json"
        done
    done
    local site=/tmp/devccl-site
    step wheel 60 python3 -m pip install -q --no-index --no-deps --target "$site" "$STAGE"/devccl-*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    step pytest_cuda 240 python3 -m pytest -x -ra bindings-python/tests/test_cuda.py
    step torch_cuda 120 python3 bindings-python/bench/torch_allreduce.py --device cuda --ranks 2 --min-mib 16 \
        --max-mib 256 --json "$LOG/torch_cuda.json"
    echo "logs in $LOG"
    if [ -n "${OUT:-}" ]; then
        cp "$LOG/summary.txt" "$OUT/summary.txt"
        tar czf "$OUT/gpu_check.tar.gz" -C "$LOG" .
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) run "${2:-}" ;;
    *)
        echo "usage: $0 prepare|run [DIR]" >&2
        exit 2
        ;;
esac
