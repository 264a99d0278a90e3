#!/usr/bin/env python3
"""torch.distributed all_reduce: backend "devccl" against "gloo", on this machine, in one run.

    python bindings-python/bench/torch_allreduce.py              # 2 and 4 ranks, 4 KiB .. 256 MiB
    python bindings-python/bench/torch_allreduce.py --ranks 2 --max-mib 16
    python bindings-python/bench/torch_allreduce.py --device cuda --ranks 2 --min-mib 64   # CUDA tensors

For each world size and backend it starts the ranks as processes on 127.0.0.1 (Gloo on
``lo``), and for each size (float32, sum) runs warm-up ops, then timed ops each preceded by
``dist.barrier()``. An op's time is the maximum over ranks; the table shows the median over
ops (the method of /work/shared/peers/gloo_allreduce.py). algbw = bytes / time,
busbw = algbw × 2(n−1)/n (nccl-tests, GB = 1e9 B). Every result is checked (#wrong).

The closing markdown tables compare the backends: latency ratio devccl/gloo (lower is
better) and busbw ratio devccl/gloo (higher is better). Run it with the extension built in
release mode (``maturin build --release`` + pip install, or ``maturin develop --release``);
``--python`` picks the interpreter of the ranks. With ``--device cuda`` the tensors live on
the GPU (ranks share GPU ``LOCAL_RANK % device_count``) and each timed op ends with
``torch.cuda.synchronize()``, so the time covers the whole stream-ordered collective.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bytes, warm-up ops, timed ops
SIZES = [
    (4 << 10, 20, 200),
    (16 << 10, 10, 200),
    (64 << 10, 10, 100),
    (256 << 10, 5, 60),
    (1 << 20, 5, 40),
    (4 << 20, 3, 20),
    (16 << 20, 2, 10),
    (64 << 20, 1, 6),
    (256 << 20, 1, 4),
]


def worker(backend: str, min_bytes: int, max_bytes: int, device: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "devccl":
        import devccl.torch  # noqa: F401

    torch.set_num_threads(1)
    cuda = device == "cuda"
    if cuda:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    dist.init_process_group(backend)
    rank, n = dist.get_rank(), dist.get_world_size()
    expect = float(n * (n + 1) // 2)
    rows = []
    for nbytes, warm, iters in SIZES:
        if nbytes > max_bytes:
            break
        if nbytes < min_bytes:
            continue
        x = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
        for _ in range(warm):
            x.fill_(rank + 1)
            dist.all_reduce(x)
        sync()
        ts = []
        wrong = 0
        for _ in range(iters):
            x.fill_(rank + 1)
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            sync()
            ts.append(time.perf_counter() - t0)
            wrong += int((x != expect).sum())
        tt = torch.tensor(ts, dtype=torch.float64)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        w = torch.tensor([wrong], dtype=torch.int64)
        dist.all_reduce(w)
        rows.append({"bytes": nbytes, "times": tt.tolist(), "wrong": int(w.item())})
        del x
    if rank == 0:
        result = {"backend": backend, "n": n, "torch": torch.__version__, "device": device, "rows": rows}
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(python: str, backend: str, n: int, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        port = free_port()
        procs = []
        for r in range(n):
            env = dict(
                os.environ,
                RANK=str(r),
                WORLD_SIZE=str(n),
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE=str(n),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                GLOO_SOCKET_IFNAME="lo",
                OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1",
            )
            cmd = [python, __file__, "--worker", backend, "--out", out, "--device", a.device]
            cmd += ["--min-mib", str(a.min_mib), "--max-mib", str(a.max_mib)]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + a.timeout
        rc = 0
        try:
            for p in procs:
                rc |= p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = 124
        finally:
            for p in procs:  # only the processes started here, by handle
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if rc != 0 or not os.path.exists(out):
            raise SystemExit(f"{backend} on {n} ranks failed (rc={rc})")
        return json.loads(Path(out).read_text())


def human(b: int) -> str:
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


def stats(res: dict) -> dict[int, tuple[float, float, int]]:
    """bytes -> (median µs, busbw GB/s, #wrong)."""
    n = res["n"]
    f = 2.0 * (n - 1) / n
    out = {}
    for row in res["rows"]:
        med = statistics.median(row["times"])
        out[row["bytes"]] = (med * 1e6, row["bytes"] / med / 1e9 * f, row["wrong"])
    return out


def print_nccl_table(res: dict) -> None:
    n = res["n"]
    where = res.get("device", "cpu")
    print(f"\n# {res['backend']} (torch.distributed {res['torch']}) all_reduce float32 sum on {where} tensors, {n} ranks, loopback")
    print(f"# {'size(B)':>12} {'count':>10} {'iters':>6} {'med(us)':>10} {'min(us)':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>6}")
    f = 2.0 * (n - 1) / n
    for row in res["rows"]:
        v = sorted(row["times"])
        med = statistics.median(v)
        alg = row["bytes"] / med / 1e9
        print(
            f"  {row['bytes']:>12} {row['bytes'] // 4:>10} {len(v):>6} {med * 1e6:>10.1f} {v[0] * 1e6:>10.1f} "
            f"{alg:>8.3f} {alg * f:>8.3f} {row['wrong']:>6}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--min-mib", type=int, default=0, help="skip sizes below this")
    ap.add_argument("--max-mib", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the tensors live")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the ranks (with torch and devccl)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per (backend, ranks) run")
    ap.add_argument("--json", default=None, help="also write all results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.min_mib << 20, a.max_mib << 20, a.device, a.out)
        return
    print(f"# loadavg at start: {open('/proc/loadavg').read().split()[:3]}, cpus: {os.cpu_count()}", flush=True)
    results = []
    for n in a.ranks:
        for backend in ("gloo", "devccl"):
            res = launch(a.python, backend, n, a)
            print_nccl_table(res)
            results.append(res)
    print(f"\n# loadavg at end: {open('/proc/loadavg').read().split()[:3]}")
    for n in a.ranks:
        g = stats(next(r for r in results if r["n"] == n and r["backend"] == "gloo"))
        d = stats(next(r for r in results if r["n"] == n and r["backend"] == "devccl"))
        print(f"\n### all_reduce float32, {n} ranks (median per-op time, max over ranks)\n")
        print("| size | gloo µs | devccl µs | latency devccl/gloo | gloo busbw GB/s | devccl busbw GB/s | busbw devccl/gloo | #wrong |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for b in sorted(g):
            if b not in d:
                continue
            (gt, gb, gw), (dt, db, dw) = g[b], d[b]
            print(f"| {human(b)} | {gt:.1f} | {dt:.1f} | {dt / gt:.2f} | {gb:.3f} | {db:.3f} | {db / gb:.2f} | {gw + dw} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
