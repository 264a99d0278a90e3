#!/usr/bin/env python3
"""devmem on the simulated kernel vs plain TCP: all-reduce, 2 local ranks, 1-64 MiB.

Runs `devccl bench` alternately with DEVCCL_TRANSPORTS=tcp and with
DEVCCL_DEVMEM=sim DEVCCL_TRANSPORTS=devmem, several interleaved rounds, and prints the median
out-of-place time per size and transport, with the ratio, as a Markdown table.

    ./scripts/devmem_sim_vs_tcp.py [--rounds 5] [--bin target/release/devccl] [-- extra sim env K=V ...]

The simulated kernel does what the kernel does on devmem RX (payload placed in the RX pool,
cmsgs, tokens) on top of ordinary loopback TCP, so the difference measures the devmem path's
own overhead: the simulator's work plus devccl's fragment handling (gather, spills, token
return, the control socket).
"""

import argparse
import os
import statistics
import subprocess
import sys

SIZES = "1M,4M,16M,64M"


def run(binary: str, env: dict, iters: int, warmup: int) -> dict:
    e = dict(os.environ)
    e.update(env)
    out = subprocess.run(
        [binary, "bench", "all_reduce", "-n", "2", "--sizes", SIZES, "-c", "0", "-w", str(warmup), "-i", str(iters)],
        env=e,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    times = {}
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cols = line.split()
        times[int(cols[0])] = float(cols[5])
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bin", default="target/release/devccl")
    ap.add_argument("sim_env", nargs="*", help="extra K=V for the simulated runs (DEVCCL_DEVMEM_SIM_*)")
    a = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in a.sim_env)
    configs = {
        "tcp": {"DEVCCL_TRANSPORTS": "tcp"},
        "devmem-sim": {"DEVCCL_DEVMEM": "sim", "DEVCCL_TRANSPORTS": "devmem", **extra},
    }
    samples = {k: {} for k in configs}
    for r in range(a.rounds):
        for name, env in configs.items():
            for size, t in run(a.bin, env, a.iters, a.warmup).items():
                samples[name].setdefault(size, []).append(t)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    print("| size | TCP median (us) | devmem-sim median (us) | sim / TCP | TCP busbw (GB/s) | sim busbw (GB/s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in sorted(samples["tcp"]):
        t = statistics.median(samples["tcp"][size])
        d = statistics.median(samples["devmem-sim"][size])
        bw = lambda us: size / us / 1e3  # noqa: E731 (2 ranks: busbw = algbw)
        print(f"| {size >> 20} MiB | {t:.0f} | {d:.0f} | {d / t:.2f} | {bw(t):.2f} | {bw(d):.2f} |")


if __name__ == "__main__":
    main()
