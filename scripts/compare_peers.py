#!/usr/bin/env python3
"""Side-by-side all-reduce benchmark: devccl vs Gloo (torch.distributed) vs Open MPI (TCP),
plus the loopback TCP ceiling (iperf3), in interleaved rounds on this machine.

The machine is shared and noisy, so every configuration runs once per round and rounds are
interleaved; tables report the median over rounds and devccl's ratio to each peer.

Usage: scripts/compare_peers.py [--rounds 3] [--nranks 2,4] [--out docs/benchmarks/raw]
Needs: target/release/devccl (cargo build --release -p devccl-cli), the peers' scripts in
../shared/peers, iperf3 + Open MPI (apt), and a Python with torch (scripts/setup_python.sh).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.normpath(os.path.join(ROOT, "..", "shared", "peers"))
SIZES = [8, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
SIZE_ARG = "8,4K,64K,1M,16M,64M"


def run(cmd, env=None, timeout=900):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        print(f"# FAILED ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}", file=sys.stderr)
    return p.stdout, time.time() - t


def parse_peer(out):
    """Peer scripts print: size count iters | med min algbw busbw | b2b algbw busbw | ok."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("#") or "|" not in line:
            continue
        parts = [p.split() for p in line.split("|")]
        size = int(parts[0][0])
        med, _mn, _alg, bus = map(float, parts[1])
        rows[size] = {"med_us": med, "busbw": bus, "ok": parts[3][0] == "OK"}
    return rows


def parse_devccl(out, n, factor=None):
    rows = {}
    f = 2 * (n - 1) / n if factor is None else factor
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        c = line.split()
        size = int(c[0])
        med = float(c[13])
        rows[size] = {"med_us": med, "busbw": size / med / 1e3 * f, "b2b_busbw": float(c[7]),
                      "ok": c[8] == "0" and c[12] == "0"}
    return rows


def record(res, path, name, n, out, factor=None):
    """Keep one job's raw output at `path` and add its rows to `res[(name, n)][size]`."""
    with open(path, "w") as fh:
        fh.write(out)
    rows = parse_devccl(out, n, factor) if name.startswith("devccl") else parse_peer(out)
    for size, v in rows.items():
        res.setdefault((name, n), {}).setdefault(size, []).append(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nranks", default="2,4")
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "raw"))
    ap.add_argument("--skip", default="", help="comma list of: gloo,mpi,iperf")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    nranks = [int(x) for x in a.nranks.split(",")]
    os.makedirs(a.out, exist_ok=True)
    devccl = os.path.join(ROOT, "target", "release", "devccl")
    mpi_bin = "/tmp/devccl-peers/mpi_allreduce"
    if "mpi" not in skip:
        os.makedirs(os.path.dirname(mpi_bin), exist_ok=True)
        subprocess.run(["mpicc", "-O3", "-march=native", "-o", mpi_bin, os.path.join(PEERS, "mpi_allreduce.c")], check=True)
    res = {}  # (system, n) -> size -> [values per round]
    iperf = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for r in range(a.rounds):
        load = open("/proc/loadavg").read().split()[:3]
        print(f"# round {r + 1}/{a.rounds}, loadavg {load}", flush=True)
        if "iperf" not in skip:
            out, _ = run(["bash", os.path.join(PEERS, "iperf_loopback.sh"), "1", "3"])
            for line in out.splitlines():
                m = re.search(r"loopback (\S+).*Gbit/s=([\d.]+)", line)
                if m:
                    iperf.append((m.group(1), float(m.group(2))))
        for n in nranks:
            bench = [devccl, "bench", "all_reduce", "-n", str(n), "--sizes", SIZE_ARG, "-w", "3", "-i", "20", "-c", "1", "-I"]
            jobs = [("devccl", bench, None), ("devccl_tcp", bench, dict(os.environ, DEVCCL_TRANSPORTS="tcp"))]
            if "gloo" not in skip:
                jobs.append(("gloo", [a.python, os.path.join(PEERS, "gloo_allreduce.py"), "--nranks", str(n), "--max-mib", "64"], None))
            if "mpi" not in skip:
                jobs.append(("mpi_tcp", ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "pml", "ob1", "--mca", "btl", "tcp,self",
                                         "--mca", "btl_tcp_if_include", "lo", "-np", str(n), mpi_bin], None))
            for name, cmd, env in jobs:
                out, took = run(cmd, env)
                record(res, os.path.join(a.out, f"{stamp}_{name}_n{n}_r{r}.txt"), name, n, out)
                print(f"#   {name} n={n}: {took:.1f}s", flush=True)
        if "blocks" not in skip:
            # all-gather and reduce-scatter, 4 ranks: devccl vs Gloo
            n = 4
            for coll in ("all_gather", "reduce_scatter"):
                jobs = [(f"devccl_{coll}", [devccl, "bench", coll, "-n", str(n), "--sizes", "1M,16M,64M", "-w", "3", "-i", "20", "-c", "1", "-I"])]
                if "gloo" not in skip:
                    jobs.append((f"gloo_{coll}", [a.python, os.path.join(ROOT, "scripts", "gloo_collectives.py"), "--nranks", str(n),
                                                  "--collective", coll, "--sizes", "1M,16M,64M"]))
                for name, cmd in jobs:
                    out, took = run(cmd)
                    record(res, os.path.join(a.out, f"{stamp}_{name}_n{n}_r{r}.txt"), name, n, out, (n - 1) / n)
                    print(f"#   {name} n={n}: {took:.1f}s", flush=True)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    summary = {}
    print()
    if iperf:
        print("## Loopback TCP ceiling (iperf3, median Gbit/s -> GB/s)\n")
        print("| case | Gbit/s | GB/s |\n|---|---|---|")
        for case in sorted(set(c for c, _ in iperf)):
            g = med([v for c, v in iperf if c == case])
            summary[f"iperf_{case}"] = g
            print(f"| {case} | {g:.2f} | {g / 8:.2f} |")
        print()
    for n in nranks:
        print(f"## all_reduce float sum, {n} ranks: per-op median latency (us) and busbw (GB/s), median of {a.rounds} rounds\n")
        systems = [s for s in ("devccl", "devccl_tcp", "gloo", "mpi_tcp") if (s, n) in res]
        hdr = "| size | " + " | ".join(f"{s} us | {s} busbw" for s in systems)
        hdr += "".join(f" | lat vs {s} | busbw vs {s}" for s in systems[1:]) + " |"
        print(hdr)
        print("|" + "---|" * (1 + 2 * len(systems) + 2 * (len(systems) - 1)))
        for size in SIZES:
            cells, vals = [], {}
            for s in systems:
                rows = res[(s, n)].get(size, [])
                lat = med([x["med_us"] for x in rows])
                bw = med([x["busbw"] for x in rows])
                vals[s] = (lat, bw)
                cells += [f"{lat:.1f}", f"{bw:.3f}"]
            for s in systems[1:]:
                d, p = vals["devccl"], vals[s]
                cells += [f"{d[0] / p[0]:.2f}x", f"{d[1] / p[1]:.2f}x" if p[1] > 0 else "-"]
            summary[f"n{n}_{size}"] = vals
            print(f"| {size} | " + " | ".join(cells) + " |")
        wrong = [x for x in res.get(("devccl", n), {}).values() for y in x if not y["ok"]]
        print(f"\ndevccl #wrong rows: {len(wrong)}\n")
    for coll in ("all_gather", "reduce_scatter"):
        d, g = res.get((f"devccl_{coll}", 4)), res.get((f"gloo_{coll}", 4))
        if not d:
            continue
        print(f"## {coll} float, 4 ranks: per-op median latency (us) and busbw (GB/s), median of {a.rounds} rounds\n")
        print("| size | devccl us | devccl busbw | gloo us | gloo busbw | busbw devccl/gloo |\n|---|---|---|---|---|---|")
        for size in sorted(d):
            dl, db = med([x["med_us"] for x in d[size]]), med([x["busbw"] for x in d[size]])
            gl = med([x["med_us"] for x in g.get(size, [])]) if g else float("nan")
            gb = med([x["busbw"] for x in g.get(size, [])]) if g else float("nan")
            summary[f"{coll}_n4_{size}"] = ((dl, db), (gl, gb))
            print(f"| {size} | {dl:.1f} | {db:.3f} | {gl:.1f} | {gb:.3f} | {db / gb:.2f}x |")
        print()
    with open(os.path.join(a.out, f"{stamp}_summary.json"), "w") as fh:
        json.dump({k if isinstance(k, str) else str(k): v for k, v in summary.items()}, fh, indent=1)


if __name__ == "__main__":
    main()
