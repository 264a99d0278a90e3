#!/usr/bin/env python3
"""Gloo (torch.distributed) all_gather_into_tensor / reduce_scatter_tensor / all_reduce
benchmark, float32, in the format of ../shared/peers/gloo_allreduce.py, so devccl can be
compared with Gloo side by side.

    python scripts/gloo_collectives.py --nranks 4 --collective all_gather --sizes 1M,16M

With `--launch env` the script is one rank of a job started elsewhere (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME from the environment), e.g. one rank per
network namespace in scripts/netns_compare.py.

size = the whole logical buffer S (all-gather output, reduce-scatter input, all-reduce
buffer); for all-gather and reduce-scatter each rank contributes or receives S/n. Per size: warm-up, then timed ops each preceded by
dist.barrier(); an op's time is the max over ranks; median and min over ops are printed,
plus a back-to-back mean. busbw = algbw * (n-1)/n, all-reduce 2(n-1)/n (nccl-tests).
Results are checked.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def parse_size(s):
    mul = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1].upper(), 1)
    return int(s[:-1] if mul > 1 else s) * mul


def worker(rank, n, host, port, coll, sizes):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    host = f"[{host}]" if ":" in host else host
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=n)
    if rank == 0:
        print(f"# torch.distributed gloo {coll} float32, nranks={n}, torch {torch.__version__}")
    for nbytes in sizes:
        count = nbytes // 4 // n * n if coll != "all_reduce" else max(nbytes // 4, 1)
        block = count // n
        iters = max(5, min(200, (64 << 20) // max(nbytes, 1)))
        prep = lambda: None  # noqa: E731
        if coll == "all_reduce":
            buf = torch.empty(count)
            prep = lambda: buf.fill_(float(rank + 1))  # noqa: E731  (in place: reset so values stay exact)
            op = lambda: dist.all_reduce(buf)  # noqa: E731
            check = lambda: bool(torch.all(buf == float(n * (n + 1) // 2)))  # noqa: E731
        elif coll == "all_gather":
            inp = torch.full((block,), float(rank + 1))
            out = torch.empty(count)
            op = lambda: dist.all_gather_into_tensor(out, inp)  # noqa: E731
            expect = torch.repeat_interleave(torch.arange(1, n + 1, dtype=torch.float32), block)
            check = lambda: bool(torch.equal(out, expect))  # noqa: E731
        else:
            inp = torch.full((count,), float(rank + 1))
            out = torch.empty(block)
            op = lambda: dist.reduce_scatter_tensor(out, inp)  # noqa: E731
            check = lambda: bool(torch.all(out == float(n * (n + 1) // 2)))  # noqa: E731
        for _ in range(3):
            op()
        ts = []
        for _ in range(iters):
            prep()
            dist.barrier()
            t0 = time.perf_counter()
            op()
            ts.append(time.perf_counter() - t0)
        ok = check()  # after the last timed op
        tt = torch.tensor(ts, dtype=torch.float64)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            op()
        tb = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
        dist.all_reduce(tb, op=dist.ReduceOp.MAX)
        okt = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(okt, op=dist.ReduceOp.MIN)
        if rank == 0:
            v = sorted(tt.tolist())
            med, mn = statistics.median(v), v[0]
            f = (n - 1) / n * (2 if coll == "all_reduce" else 1)
            size = count * 4
            alg, algb = size / med / 1e9, size / tb.item() / 1e9
            print(f"  {size:>12} {count:>10} {iters:>6} | {med*1e6:>10.1f} {mn*1e6:>10.1f} {alg:>8.3f} {alg*f:>8.3f} | "
                  f"{tb.item()*1e6:>10.1f} {algb:>8.3f} {algb*f:>8.3f} | {'OK' if okt.item() else 'WRONG':>5}", flush=True)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nranks", type=int, default=4)
    ap.add_argument("--collective", choices=["all_gather", "reduce_scatter", "all_reduce"], default="all_gather")
    ap.add_argument("--launch", choices=["spawn", "env"], default="spawn",
                    help="spawn: start --nranks local ranks over loopback; env: be one rank (RANK, WORLD_SIZE, MASTER_*)")
    ap.add_argument("--sizes", default="1M,16M")
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=600)
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    if a.launch == "env":
        e = os.environ
        worker(int(e["RANK"]), int(e["WORLD_SIZE"]), e["MASTER_ADDR"], int(e["MASTER_PORT"]), a.collective, sizes)
        return
    if a.rank >= 0:
        worker(a.rank, a.nranks, "127.0.0.1", a.port, a.collective, sizes)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--nranks", str(a.nranks), "--collective", a.collective,
                               "--sizes", a.sizes, "--port", str(port), "--rank", str(r)], env=env)
             for r in range(a.nranks)]
    deadline = time.time() + a.timeout
    rc = 0
    try:
        for p in procs:
            rc |= p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        rc = 124
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    sys.exit(rc)


if __name__ == "__main__":
    main()
