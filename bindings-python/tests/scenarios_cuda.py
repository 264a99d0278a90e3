"""Multi-process scenarios on CUDA tensors: devccl.Communicator and the torch.distributed
backend, compared bit for bit with the same calls on CPU tensors; stream semantics; DDP and
FSDP2 on a CUDA model. They need a GPU (test_cuda.py skips them without one); ranks may share
one GPU: rank r uses device LOCAL_RANK % device_count."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# Deterministic cuBLAS (DDP bit-identity); read when cuBLAS starts, so set before torch does.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._functional_collectives as fc  # noqa: E402
from torch.distributed import ReduceOp  # noqa: E402

import devccl  # noqa: E402
import devccl.torch  # noqa: E402, F401  (registers the backend)
from scenarios_native import FP8, OPS, base, cast, fp8_values, raw  # noqa: E402
from scenarios_torch_names import REQUIRED  # noqa: E402

RANK = int(os.environ["RANK"])
N = int(os.environ["WORLD_SIZE"])
LOCAL = int(os.environ.get("LOCAL_RANK", RANK))
CPU = torch.device("cpu")

#: Every dtype devccl supports, as torch dtypes (torch has all of them on CUDA).
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
TORCH_OPS = {"sum": ReduceOp.SUM, "avg": ReduceOp.AVG, "prod": ReduceOp.PRODUCT, "min": ReduceOp.MIN, "max": ReduceOp.MAX}


def gpu() -> torch.device:
    """This rank's GPU (made current)."""
    if not torch.cuda.is_available():
        raise RuntimeError("this scenario needs a CUDA device (torch.cuda.is_available() is False)")
    d = torch.device("cuda", LOCAL % torch.cuda.device_count())
    torch.cuda.set_device(d)
    return d


def values(rank: int, count: int, dt: torch.dtype, salt: int = 0) -> torch.Tensor:
    """A CPU tensor of rank `rank`: random floats (rounding differences would show), small
    integers (negative ones wrap around in unsigned types), fp8 in [-8, 8]."""
    name = str(dt).removeprefix("torch.")
    if name in FP8:
        return fp8_values(rank * 13 + salt, count, name)
    if dt.is_floating_point:
        v = np.random.default_rng(rank * 1000 + salt * 7 + count).standard_normal(count)
        return torch.from_numpy(v).to(dt)
    b = base(rank + salt, count, "uint8" if dt == torch.uint8 else "int8")
    numpy_name = {torch.uint32: "uint32", torch.uint64: "uint64"}.get(dt)
    return torch.from_numpy(cast(b, numpy_name)) if numpy_name else torch.from_numpy(b).to(dt)


def ops_for(dt: torch.dtype) -> list[str]:
    """Reduction ops whose result does not depend on the order of steps that each round:
    all of them with 2 ranks; only min/max for fp8 beyond (every step rounds)."""
    name = str(dt).removeprefix("torch.")
    return OPS if N == 2 or name not in FP8 else ["min", "max"]


def compare(what: str, fn: Callable[[torch.device], list[torch.Tensor]], dev: torch.device) -> int:
    """Run ``fn`` on CPU tensors, then on CUDA tensors; the outputs must be bit-identical.
    Outputs are read with .cpu() on the current stream, so this also checks that the CUDA
    calls held it."""
    a = [raw(t) for t in fn(CPU)]
    b = [raw(t) for t in fn(dev)]
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            raise AssertionError(f"rank {RANK}: {what}: output {i} differs between CPU and CUDA ({len(x)} bytes)")
    return 1


def native_cases(comm: devccl.Communicator, dt: torch.dtype, count: int) -> list[tuple[str, Callable[[torch.device], list[torch.Tensor]]]]:
    """Every Communicator method on `count` elements of `dt`, as (name, fn(device))."""
    root = count % N
    xs = [values(r, count, dt) for r in range(N)]
    mine = xs[RANK]
    full = values(RANK, count * N, dt, 5)
    cases: list[tuple[str, Callable[[torch.device], list[torch.Tensor]]]] = []
    for op in ops_for(dt):

        def ar(d: torch.device, op: str = op) -> list[torch.Tensor]:
            t = mine.to(d, copy=True)
            comm.all_reduce(t, op)
            o = torch.empty_like(t)
            comm.all_reduce(mine.to(d, copy=True), op, out=o)
            a = mine.to(d, copy=True)
            w = comm.all_reduce(a, op, async_op=True)
            assert w.wait() is a and w.is_completed()
            h = mine.to(d, copy=True)
            w = comm.all_reduce(h, op, async_op=True)
            if d.type == "cuda":
                w.hold()  # the current stream waits; the host does not
            else:
                w.wait()
            r = mine.to(d, copy=True)
            comm.reduce(r, root, op)
            rs = torch.empty(count, dtype=dt, device=d)
            comm.reduce_scatter(rs, full.to(d, copy=True), op)
            return [t, o, a, h, r, rs]

        cases.append((f"all_reduce/reduce/reduce_scatter {op}", ar))

    def moves(d: torch.device) -> list[torch.Tensor]:
        b = mine.to(d, copy=True)
        comm.broadcast(b, root)
        g = torch.empty(count * N, dtype=dt, device=d)
        comm.all_gather(g, mine.to(d, copy=True))
        gi = torch.zeros(count * N, dtype=dt, device=d)
        gi[RANK * count : (RANK + 1) * count] = mine.to(d, copy=True)
        comm.all_gather(gi, gi[RANK * count : (RANK + 1) * count])
        a2a = torch.empty(count * N, dtype=dt, device=d)
        comm.all_to_all(a2a, full.to(d, copy=True))
        a2ai = full.to(d, copy=True)
        comm.all_to_all(a2ai, a2ai)
        sc = [(RANK + j) % 3 + count for j in range(N)]
        rc = [(j + RANK) % 3 + count for j in range(N)]
        src = values(RANK, sum(sc), dt, 20).to(d, copy=True)
        v = torch.empty(sum(rc), dtype=dt, device=d)
        comm.all_to_all_v(v, src, rc, sc)
        go = torch.empty(count * N, dtype=dt, device=d) if RANK == root else None
        comm.gather(mine.to(d, copy=True), go, root)
        so = torch.empty(count, dtype=dt, device=d)
        comm.scatter(so, full.to(d, copy=True) if RANK == root else None, root)
        nxt, prv = (RANK + 1) % N, (RANK - 1) % N
        got = torch.empty(count, dtype=dt, device=d)
        comm.p2p_batch([(True, nxt, 3, mine.to(d, copy=True)), (False, prv, 3, got)])
        got2 = torch.empty(count, dtype=dt, device=d)
        if RANK % 2 == 0:
            comm.send(mine.to(d, copy=True), nxt, tag=4)
            comm.recv(got2, prv, tag=4)
        else:
            comm.recv(got2, prv, tag=4)
            comm.send(mine.to(d, copy=True), nxt, tag=4)
        return [b, g, gi, a2a, a2ai, v, *([go] if go is not None else []), so, got, got2]

    cases.append(("data movement", moves))
    return cases


def scenario_cuda_collectives() -> dict[str, Any]:
    """Every Communicator method on CUDA tensors, every dtype (and op), sizes 0 to 300 007:
    bit-identical to the same call on CPU tensors."""
    dev = gpu()
    comm = devccl.init()
    checks = 0
    for dt in DTYPES:
        for count in (0, 1, 7, 1000) + ((300_007,) if dt in (torch.float32, torch.bfloat16) else ()):
            for what, fn in native_cases(comm, dt, count):
                checks += compare(f"{what} {dt} n={count}", fn, dev)
    torch.cuda.synchronize()
    comm.destroy()
    return {"checks": checks}


def spin(seconds: float) -> None:
    """Queue about `seconds` of GPU busy-waiting on the current stream (the host goes on)."""
    try:
        hz = torch.cuda.clock_rate() * 1e6  # MHz, through NVML
    except Exception:  # noqa: BLE001 - no NVML: assume a 2 GHz clock (H100/H200 run at ~1.98)
        hz = 2e9
    torch.cuda._sleep(int(seconds * hz))


def late_peer(seconds: float) -> None:
    """Rank 1 arrives `seconds` late; everyone else goes on at once."""
    if RANK == 1:
        time.sleep(seconds)


def scenario_cuda_streams() -> dict[str, Any]:
    """Stream semantics of the Communicator on CUDA tensors: ordered after the current
    stream's queued work, the host never blocks, blocking calls hold the stream at once,
    async Works hold it on request (or block the host in wait())."""
    dev = gpu()
    comm = devccl.init()
    total = float(sum(r + 1 for r in range(N)))
    report: dict[str, Any] = {}
    warm = torch.ones(16, device=dev)  # the first call opens the device (driver, kernels): not timed
    comm.all_reduce(warm)
    torch.cuda.synchronize()
    # 1. The input is written by a kernel queued behind 0.5 s of GPU work: the collective
    # must wait for it, and the call must not wait on the host.
    x = torch.zeros(1 << 20, device=dev)
    spin(0.5)
    x.fill_(RANK + 1)
    t0 = time.monotonic()
    comm.all_reduce(x)
    report["call_s"] = time.monotonic() - t0
    assert torch.equal(x, torch.full_like(x, total)), "collective not ordered after the current stream"
    # 2. A late peer: the blocking call returns at once; work queued afterwards on the
    # stream waits for the collective.
    comm.barrier()
    late_peer(1.0)
    y = torch.full((1 << 16,), float(RANK + 1), device=dev)
    t0 = time.monotonic()
    comm.all_reduce(y)
    z = y * 2
    report["late_call_s"] = time.monotonic() - t0
    assert torch.equal(z, torch.full_like(z, 2 * total)), "stream not held by a blocking call"
    # 3. async_op: not completed while the peer is late; hold() orders another stream.
    comm.barrier()
    late_peer(1.0)
    a = torch.full((4096,), float(RANK + 1), device=dev)
    w = comm.all_reduce(a, async_op=True)
    report["completed_early"] = w.is_completed()
    side = torch.cuda.Stream(device=dev)
    w.hold(side)
    with torch.cuda.stream(side):
        b = a + 0
    side.synchronize()
    assert torch.equal(b, torch.full_like(b, total)), "hold(stream) did not order the side stream"
    assert w.wait() is a and w.is_completed() and w.is_success()
    # 4. A call made while another stream is current is ordered after that stream.
    s2 = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(s2):
        c = torch.zeros(1 << 18, device=dev)
        spin(0.3)
        c.fill_(RANK + 1)
        comm.all_reduce(c)
        d = c + 0
    s2.synchronize()
    assert torch.equal(d, torch.full_like(d, total)), "not ordered after the current (side) stream"
    # 5. Explicit stream=: ordered after that stream, and it is the one held.
    s3 = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(s3):
        e = torch.zeros(1024, device=dev)
        spin(0.2)
        e.fill_(RANK + 1)
    comm.all_reduce(e, stream=s3)
    with torch.cuda.stream(s3):
        f = e + 0
    s3.synchronize()
    assert torch.equal(f, torch.full_like(f, total)), "stream= not honoured"
    # 6. Dropping tensors right after an async call: devccl keeps them alive.
    ws = [comm.all_reduce(torch.full((1 << 16,), float(i), device=dev), async_op=True) for i in range(8)]
    del ws
    torch.cuda.synchronize()
    comm.barrier()
    comm.destroy()
    return report


def scenario_cuda_single() -> dict[str, str]:
    """One process: errors for mixed CPU/CUDA operands and other devices, a world of one."""
    dev = gpu()
    import harness

    comm = devccl.Communicator(0, 1, f"127.0.0.1:{harness.free_port()}", host_rendezvous=True)
    m: dict[str, str] = {}

    def expect(exc: type[BaseException], fn: Callable[[], Any]) -> str:
        try:
            fn()
        except exc as e:
            return f"{type(e).__name__}: {e}"
        raise AssertionError(f"did not raise {exc.__name__}")

    m["mixed"] = expect(devccl.InvalidUsageError, lambda: comm.all_reduce(torch.ones(4), out=torch.ones(4, device=dev)))
    m["mixed_gather"] = expect(
        devccl.InvalidUsageError, lambda: comm.all_gather(torch.ones(4, device=dev), torch.ones(4))
    )
    m["noncontig"] = expect(devccl.InvalidUsageError, lambda: comm.all_reduce(torch.ones(4, 4, device=dev).t()))
    m["bool"] = expect(devccl.DTypeError, lambda: comm.all_reduce(torch.ones(4, dtype=torch.bool, device=dev)))
    t = torch.arange(6, dtype=torch.float32, device=dev, requires_grad=True)
    comm.all_reduce(t)
    assert torch.equal(t.detach(), torch.arange(6, dtype=torch.float32, device=dev))
    w = comm.all_reduce(torch.ones(3, device=dev), async_op=True)
    assert w.stream == torch.cuda.current_stream(dev).cuda_stream
    w.hold()
    w.wait()
    comm.destroy()
    return m


# -- torch.distributed -----------------------------------------------------------------------


def torch_cases(dt: torch.dtype, count: int) -> list[tuple[str, Callable[[torch.device], list[torch.Tensor]]]]:
    """torch.distributed entry points on `count` elements of `dt`, as (name, fn(device))."""
    xs = [values(r, count, dt) for r in range(N)]
    mine = xs[RANK]
    full = values(RANK, count * N, dt, 5)
    root = count % N
    cases: list[tuple[str, Callable[[torch.device], list[torch.Tensor]]]] = []
    for name in ops_for(dt):
        op = TORCH_OPS[name]

        def reductions(d: torch.device, op: Any = op) -> list[torch.Tensor]:
            t = mine.to(d, copy=True)
            dist.all_reduce(t, op=op)
            a = mine.to(d, copy=True)
            w = dist.all_reduce(a, op=op, async_op=True)
            w.wait()
            r = mine.to(d, copy=True)
            dist.reduce(r, root, op=op)
            rs = torch.empty(count, dtype=dt, device=d)
            dist.reduce_scatter_tensor(rs, full.to(d, copy=True), op=op)
            rl = torch.empty(count, dtype=dt, device=d)
            dist.reduce_scatter(rl, list(full.to(d, copy=True).chunk(N)) if count else [torch.empty(0, dtype=dt, device=d)] * N, op=op)
            return [t, a, r, rs, rl]

        cases.append((f"reductions {name}", reductions))

    def moves(d: torch.device) -> list[torch.Tensor]:
        b = mine.to(d, copy=True)
        dist.broadcast(b, root)
        outs = [torch.empty(count, dtype=dt, device=d) for _ in range(N)]
        dist.all_gather(outs, mine.to(d, copy=True))
        o = torch.empty(count * N, dtype=dt, device=d)
        dist.all_gather_into_tensor(o, mine.to(d, copy=True))
        a2a = torch.empty(count * N, dtype=dt, device=d)
        dist.all_to_all_single(a2a, full.to(d, copy=True))
        return [b, *outs, o, a2a]

    cases.append(("data movement", moves))
    return cases


def other_entry_points(d: torch.device) -> list[torch.Tensor]:
    """The remaining entry points (coalesced, gather/scatter, lists, p2p, functional) on one
    dtype."""
    nxt, prv = (RANK + 1) % N, (RANK - 1) % N
    res: list[torch.Tensor] = []
    a, b = torch.full((3,), float(RANK), device=d), torch.full((2, 2), float(RANK + 1), device=d)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_reduce_coalesced([a, b])
        # torch's nesting: one list per rank, each holding one tensor per input
        lists = [[torch.empty(2, device=d), torch.empty(3, device=d)] for _ in range(N)]
        dist.all_gather_coalesced(lists, [torch.full((2,), float(RANK), device=d), torch.full((3,), RANK + 0.5, device=d)])
    res += [a, b, *(t for per_rank in lists for t in per_rank)]
    outs = [torch.empty(N * 2, device=d), torch.empty(N * 3, device=d)]
    with dist._coalescing_manager(async_ops=True) as cm:
        dist.all_gather_into_tensor(outs[0], torch.full((2,), float(RANK), device=d))
        dist.all_gather_into_tensor(outs[1], torch.full((3,), float(RANK), device=d))
    cm.wait()
    rs = [torch.empty(2, device=d), torch.empty(1, device=d)]
    with dist._coalescing_manager():
        dist.reduce_scatter_tensor(rs[0], torch.arange(2 * N, dtype=torch.float32, device=d))
        dist.reduce_scatter_tensor(rs[1], torch.arange(N, dtype=torch.float32, device=d))
    res += [*outs, *rs]
    for root in range(N):
        x = values(RANK, 5, torch.int32).to(d, copy=True)
        gl = [torch.empty(5, dtype=torch.int32, device=d) for _ in range(N)] if RANK == root else None
        dist.gather(x, gl, dst=root)
        o = torch.empty(5, dtype=torch.int32, device=d)
        sl = [values(r, 5, torch.int32, 9).to(d, copy=True) for r in range(N)] if RANK == root else None
        dist.scatter(o, sl, src=root)
        res += [*(gl or []), o]
    send_rows = [(RANK + j) % 3 + 1 for j in range(N)]
    recv_rows = [(j + RANK) % 3 + 1 for j in range(N)]
    inp = (torch.arange(sum(send_rows) * 2, dtype=torch.float32) + 100 * RANK).reshape(-1, 2).to(d, copy=True)
    o = torch.empty(sum(recv_rows), 2, device=d)
    dist.all_to_all_single(o, inp, recv_rows, send_rows)
    ins = [torch.full((j + 1 + RANK,), float(RANK * 10 + j), device=d) for j in range(N)]
    a2a = [torch.empty(RANK + 1 + j, device=d) for j in range(N)]
    dist.all_to_all(a2a, ins)
    res += [o, *a2a]
    got = torch.empty(4, device=d)
    if RANK % 2 == 0:
        dist.send(torch.full((4,), float(RANK), device=d), nxt)
        dist.recv(got, prv)
    else:
        dist.recv(got, prv)
        dist.send(torch.full((4,), float(RANK), device=d), nxt)
    big = torch.full((2 << 20,), float(RANK), device=d)
    got_big = torch.empty(2 << 20, device=d)
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, big, nxt), dist.P2POp(dist.irecv, got_big, prv)]):
        w.wait()
    res += [got, got_big]
    pg = dist.group.WORLD
    res.append(fc.wait_tensor(fc.all_reduce(torch.full((4,), float(RANK), device=d), "sum", pg)))
    res.append(fc.wait_tensor(fc.all_gather_tensor(torch.full((2,), float(RANK), device=d), 0, pg)))
    res.append(fc.wait_tensor(fc.reduce_scatter_tensor(torch.ones(2 * N, device=d), "sum", 0, pg)))
    dist.barrier()
    return res


def torch_stream_semantics(dev: torch.device) -> dict[str, Any]:
    """ProcessGroupNCCL's semantics through dist.*: the host never blocks, async_op=False
    holds the current stream, work.wait() holds the then-current stream, is_completed() and
    the future follow completion."""
    total = float(sum(r + 1 for r in range(N)))
    rep: dict[str, Any] = {}
    dist.barrier()
    late_peer(1.0)
    x = torch.full((1 << 16,), float(RANK + 1), device=dev)
    t0 = time.monotonic()
    dist.all_reduce(x)
    y = x * 2
    rep["sync_call_s"] = time.monotonic() - t0
    assert torch.equal(y, torch.full_like(y, 2 * total)), "async_op=False did not hold the current stream"
    dist.barrier()
    late_peer(1.0)
    a = torch.full((4096,), float(RANK + 1), device=dev)
    t0 = time.monotonic()
    w = dist.all_reduce(a, async_op=True)
    rep["completed_early"] = w.is_completed()
    s = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(s):
        w.wait()  # holds s, not the default stream; does not block the host
        b = a + 0
    rep["async_wait_s"] = time.monotonic() - t0
    s.synchronize()
    assert torch.equal(b, torch.full_like(b, total)), "work.wait() did not hold the current stream"
    fut = dist.all_reduce(torch.full((8,), float(RANK + 1), device=dev), async_op=True).get_future()
    assert torch.equal(fut.wait()[0], torch.full((8,), total, device=dev)), "future value"
    deadline = time.monotonic() + 30
    while not w.is_completed():
        assert time.monotonic() < deadline, "is_completed() never became True"
        time.sleep(0.01)
    # A list output (copy-out on the group's side stream), through the future only.
    outs = [torch.empty(3, device=dev) for _ in range(N)]
    vals = dist.all_gather(outs, torch.full((3,), float(RANK), device=dev), async_op=True).get_future().wait()
    for r in range(N):
        assert torch.equal(vals[0][r], torch.full((3,), float(r), device=dev)), "future of a list output"
    # work.wait() then synchronize sees a list output.
    outs = [torch.empty(5, device=dev) for _ in range(N)]
    w = dist.all_gather(outs, torch.full((5,), float(RANK + 7), device=dev), async_op=True)
    w.wait()
    torch.cuda.synchronize()
    for r in range(N):
        assert torch.equal(outs[r], torch.full((5,), float(r + 7), device=dev)), "wait + synchronize"
    return rep


def scenario_torch_cuda() -> dict[str, Any]:
    """Every torch.distributed entry point on CUDA tensors (every dtype and op for the
    reductions) bit-identical to the same call on CPU tensors, served by devccl; stream
    semantics; clear errors for mixed devices."""
    dev = gpu()
    dist.init_process_group("devccl")
    pg = dist.group.WORLD
    cases = [(f"{w} {dt} n={c}", f) for dt in DTYPES for c in (0, 1, 7, 1000) for w, f in torch_cases(dt, c)]
    cases.append(("other entry points", other_entry_points))
    cpu_out = [[raw(t) for t in f(CPU)] for _, f in cases]
    before = dict(pg.calls)
    cuda_out = [[raw(t) for t in f(dev)] for _, f in cases]
    served = {k for k, v in pg.calls.items() if v > before.get(k, 0)}
    for (what, _), a, b in zip(cases, cpu_out, cuda_out, strict=True):
        if a != b:
            bad = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
            raise AssertionError(f"rank {RANK}: {what}: outputs {bad} differ between CPU and CUDA")
    missing = REQUIRED - served
    assert not missing, f"not served by devccl on CUDA tensors: {sorted(missing)}"
    rep = torch_stream_semantics(dev)
    rep["mixed"] = _expect_err(lambda: dist.all_gather_into_tensor(torch.empty(2 * N), torch.ones(2, device=dev)))
    rep["mixed_a2a"] = _expect_err(lambda: dist.all_to_all_single(torch.empty(N, device=dev), torch.ones(N)))
    t = torch.ones(2, device=dev)
    dist.all_reduce(t)  # nothing was sent: the group still works
    assert torch.equal(t, torch.full((2,), float(N), device=dev))
    rep["checks"] = len(cases)
    torch.cuda.synchronize()
    dist.destroy_process_group()
    return rep


def _expect_err(fn: Callable[[], Any]) -> str:
    """The error of a call mixing CPU and CUDA tensors (devccl's InvalidUsageError, unless
    torch.distributed refuses the mixture itself first)."""
    try:
        fn()
    except (devccl.InvalidUsageError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("mixing CPU and CUDA tensors did not raise")


# -- DDP and FSDP2 ----------------------------------------------------------------------------


def _deterministic() -> None:
    torch.set_num_threads(1)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def scenario_ddp_cuda(backend: str) -> dict[str, Any]:
    """DDP on a small CUDA model (the model and data of examples/ddp_train.py) over
    `backend`; rank 0 reports the sha256 of the final weights (compared with Gloo's)."""
    from torch import nn

    dev = gpu()
    _deterministic()
    dist.init_process_group(backend)
    torch.manual_seed(1234)
    module = nn.Sequential(
        nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    ).to(dev)
    model = nn.parallel.DistributedDataParallel(module, device_ids=[dev], bucket_cap_mb=0.004)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1235)
    steps, batch = 20, 64
    xs = torch.randn(steps, batch, 32, generator=g)
    w = torch.randn(32, 8, generator=g)
    ys = xs @ w + 0.1 * torch.randn(steps, batch, 8, generator=g)
    per = batch // N
    for step in range(steps):
        x = xs[step, RANK * per : (RANK + 1) * per].to(dev)
        y = ys[step, RANK * per : (RANK + 1) * per].to(dev)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    state = module.state_dict()
    blob = b"".join(raw(state[k]) for k in sorted(state))
    params = b"".join(raw(p) for _, p in sorted(module.named_parameters()))
    digest = hashlib.sha256(params).hexdigest()
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=dev)
    ref = mine.clone()
    dist.broadcast(ref, 0)
    assert torch.equal(mine, ref), f"rank {RANK}: parameters differ across ranks"
    calls = dict(dist.group.WORLD.calls) if backend == "devccl" else {}
    dist.destroy_process_group()
    return {"sha": hashlib.sha256(blob).hexdigest(), "calls": calls}


def scenario_fsdp2_cuda() -> dict[str, Any]:
    """FSDP2 (fully_shard over a CUDA DeviceMesh) over devccl trains a small model; the final
    weights match a single-process reference trained on the whole batches."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = gpu()
    _deterministic()
    dist.init_process_group("devccl")
    mesh = init_device_mesh("cuda", (N,))

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(dev)

    ref = build()
    model = build()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    per = 4
    for _ in range(5):
        x = torch.randn(per * N, 16, generator=g).to(dev)
        model(x[RANK * per : (RANK + 1) * per]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ref(x).pow(2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    want = ref.state_dict()
    diff = max(float((full[k] - want[k]).abs().max()) for k in want)
    assert diff < 1e-5, f"rank {RANK}: FSDP2 over devccl differs from the single-process reference by {diff}"
    calls = dict(dist.group.WORLD.calls)
    dist.destroy_process_group()
    return {"max_diff": diff, "calls": calls}
