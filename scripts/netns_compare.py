#!/usr/bin/env python3
"""Two simulated nodes: all-reduce across two network namespaces joined by a veth pair,
devccl vs Gloo (torch.distributed), with the veth TCP ceiling (iperf3), in interleaved rounds.

Each namespace is a "node" with 1 or 2 ranks; traffic between nodes crosses the veth link
(a real TCP/IP path through two network stacks, as between hosts, though on the same CPUs).
devccl runs in its default configuration (shared memory inside a node, TCP across) and with
DEVCCL_TRANSPORTS=tcp; Gloo uses TCP throughout. Needs root and iproute2; the addresses
(198.18.78.0/30, the benchmarking range) exist only inside the two namespaces, which are
deleted on exit.

Usage: scripts/netns_compare.py [--rounds 3] [--per-node 1,2] [--out docs/benchmarks/raw]
Needs: target/release/devccl, iperf3, a Python with torch (scripts/setup_python.sh).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_peers import ROOT, record  # noqa: E402

NODES = [("dvcbench_a", "dvcb_a", "198.18.78.1"), ("dvcbench_b", "dvcb_b", "198.18.78.2")]
SIZES = "8,4K,64K,1M,16M,64M"


def sh(*args, check=True):
    return subprocess.run(args, capture_output=True, text=True, check=check)


def make_nodes():
    drop_nodes()
    (a, a_if, a_ip), (b, b_if, b_ip) = NODES
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
    for ns, dev, addr in NODES:
        sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", dev, "up")


def drop_nodes():
    for ns, _, _ in NODES:
        sh("ip", "netns", "del", ns, check=False)


def run_job(cmd, n, per_node, port, env_extra, timeout=600):
    """Start `n` ranks, `per_node` per namespace; return rank 0's stdout (all must succeed)."""
    procs = []
    for rank in range(n):
        ns, dev, _ = NODES[rank // per_node]
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank % per_node),
                   LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR=NODES[0][2], MASTER_PORT=str(port),
                   DEVCCL_SOCKET_IFNAME=dev, GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1", **env_extra)
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.time() + timeout
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"timed out: {' '.join(cmd)}")
    bad = [(r, p.returncode, e[-1500:]) for r, (p, (_, e)) in enumerate(zip(procs, outs)) if p.returncode]
    if bad:
        raise SystemExit(f"failed: {' '.join(cmd)}: {bad}")
    return outs[0][0]


def iperf_veth(secs=3):
    (a, _, a_ip), (b, _, b_ip) = NODES
    srv = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s", "-B", b_ip, "-p", "5202", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    out = sh("ip", "netns", "exec", a, "iperf3", "-c", b_ip, "-B", a_ip, "-p", "5202", "-t", str(secs), "-f", "g").stdout
    srv.wait(timeout=30)
    m = re.findall(r"([\d.]+) Gbits/sec.*receiver", out)
    return float(m[-1]) if m else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-node", default="1,2", help="ranks per namespace, comma list")
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "raw"))
    a = ap.parse_args()
    devccl = os.path.join(ROOT, "target", "release", "devccl")
    gloo = os.path.join(ROOT, "scripts", "gloo_collectives.py")
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    res, iperf, port = {}, [], 29710
    make_nodes()
    try:
        for r in range(a.rounds):
            print(f"# round {r + 1}/{a.rounds}, loadavg {open('/proc/loadavg').read().split()[:3]}", flush=True)
            iperf.append(iperf_veth())
            for p in map(int, a.per_node.split(",")):
                n = 2 * p
                bench = [devccl, "bench", "all_reduce", "--sizes", SIZES, "-w", "5", "-i", "50", "-c", "1", "-I"]
                jobs = [("devccl", bench, {})]
                if p > 1:
                    jobs.append(("devccl_tcp", bench, {"DEVCCL_TRANSPORTS": "tcp"}))
                jobs.append(("gloo", [a.python, gloo, "--launch", "env", "--collective", "all_reduce", "--sizes", SIZES], {}))
                for name, cmd, env in jobs:
                    port += 1
                    t = time.time()
                    out = run_job(cmd, n, p, port, env)
                    record(res, os.path.join(a.out, f"{stamp}_netns_{name}_n{n}_r{r}.txt"), name, n, out)
                    print(f"#   {name} n={n}: {time.time() - t:.1f}s", flush=True)
    finally:
        drop_nodes()
    med = statistics.median
    g = med(iperf)
    print(f"\n## veth TCP ceiling (iperf3, 1 stream): median {g:.2f} Gbit/s = {g / 8:.2f} GB/s\n")
    for (name, n) in sorted({k for k in res if k[0] == "devccl"}, key=lambda k: k[1]):
        systems = [s for s in ("devccl", "devccl_tcp", "gloo") if (s, n) in res]
        print(f"## all_reduce float sum, 2 nodes x {n // 2} ranks: per-op median latency (us), busbw (GB/s), "
              f"median of {a.rounds} rounds\n")
        print("| size | " + " | ".join(f"{s} us | {s} busbw" for s in systems) + " | devccl/gloo latency | devccl/gloo busbw |")
        print("|" + "---|" * (3 + 2 * len(systems)))
        for size in sorted(res[("devccl", n)]):
            vals = {s: (med([x["med_us"] for x in res[(s, n)][size]]), med([x["busbw"] for x in res[(s, n)][size]]))
                    for s in systems}
            cells = [f"{vals[s][0]:.1f} | {vals[s][1]:.3f}" for s in systems]
            d, gl = vals["devccl"], vals["gloo"]
            ratio = lambda x, y: f"{x / y:.2f}x" if y > 0 else "-"  # noqa: E731
            print(f"| {size} | " + " | ".join(cells) + f" | {ratio(d[0], gl[0])} | {ratio(d[1], gl[1])} |")
        wrong = sum(1 for rows in res[("devccl", n)].values() for x in rows if not x["ok"])
        print(f"\ndevccl #wrong rows: {wrong}\n")


if __name__ == "__main__":
    main()
