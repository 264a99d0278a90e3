"""Multi-process scenarios on the torch.distributed backend "devccl". Each function runs on
every rank; see worker.py."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch.distributed import ReduceOp

import devccl
import devccl.torch  # noqa: F401  (registers the backend)
from scenarios_native import FP8, base, cast, fp8_ref, fp8_values, raw, unsigned_ref
from scenarios_torch_names import REQUIRED

RANK = int(os.environ["RANK"])
N = int(os.environ["WORLD_SIZE"])

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64]
OPS = [ReduceOp.SUM, ReduceOp.AVG, ReduceOp.PRODUCT, ReduceOp.MIN, ReduceOp.MAX]
OP_NAMES = {ReduceOp.SUM: "sum", ReduceOp.AVG: "avg", ReduceOp.PRODUCT: "prod", ReduceOp.MIN: "min", ReduceOp.MAX: "max"}


def values(rank: int, count: int, dt: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Small exact integers (non-negative for uint8)."""
    i = torch.arange(count, dtype=torch.int64)
    v = (i * 7 + (rank + salt) * 3) % 5 + 1 if dt == torch.uint8 else (i * 7 + (rank + salt) * 3) % 7 - 3
    return v.to(dt)


def reduce_ref(op: Any, xs: list[torch.Tensor], dt: torch.dtype) -> torch.Tensor:
    s = torch.stack([x.double() for x in xs])
    if op == ReduceOp.SUM:
        r = s.sum(0)
    elif op == ReduceOp.PRODUCT:
        r = s.prod(0)
    elif op == ReduceOp.MIN:
        r = s.amin(0)
    elif op == ReduceOp.MAX:
        r = s.amax(0)
    elif not dt.is_floating_point:
        r = torch.trunc(s.sum(0) / len(xs))
    elif dt == torch.float64:
        r = s.sum(0) / len(xs)
    else:
        return (s.sum(0).float() / len(xs)).to(dt)
    return r.to(dt)


def eq(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        raise AssertionError(f"rank {RANK}: {what}: got {a.flatten()[:10]} want {b.flatten()[:10]}")


def init() -> dist.ProcessGroup:
    dist.init_process_group("devccl")
    pg = dist.group.WORLD
    assert type(pg).__name__ == "ProcessGroupDevccl", type(pg)
    assert pg.group_name, "the group must have a name (functional collectives need it)"
    return pg


def new_dtype_checks(device: str = "cpu") -> int:
    """uint32, uint64 and the float8 types through torch.distributed (every reduction op
    against a local reference; all_gather_into_tensor, broadcast, reduce_scatter_tensor)."""
    checks = 0
    for name in ("uint32", "uint64", *FP8):
        for count in (0, 1, 7, 1000):
            bases = [base(r, count, "int8") for r in range(N)]
            if name in FP8:
                xs = [fp8_values(r, count, name) for r in range(N)]
            else:
                xs = [torch.from_numpy(cast(b, name)) for b in bases]
            for op in OPS:
                o = OP_NAMES[op]
                if name in FP8 and N > 2 and o not in ("min", "max"):
                    continue  # rounding after every step: the result depends on the algorithm's order
                want = fp8_ref(o, xs, name) if name in FP8 else torch.from_numpy(unsigned_ref(o, bases, name))
                t = xs[RANK].clone().to(device)
                dist.all_reduce(t, op=op)
                if raw(t) != raw(want):
                    raise AssertionError(f"rank {RANK}: all_reduce {name} {o} n={count} on {device}: {t[:6]} vs {want[:6]}")
                checks += 1
            out = torch.empty(count * N, dtype=xs[0].dtype, device=device)
            dist.all_gather_into_tensor(out, xs[RANK].to(device))
            assert raw(out) == b"".join(raw(x) for x in xs), f"all_gather_into_tensor {name}"
            t = xs[RANK].clone().to(device)
            dist.broadcast(t, N - 1)
            assert raw(t) == raw(xs[N - 1]), f"broadcast {name}"
            checks += 2
        full = [fp8_values(r, 4 * N, name) if name in FP8 else torch.from_numpy(cast(base(r, 4 * N, "int8"), name)) for r in range(N)]
        out = torch.empty(4, dtype=full[0].dtype, device=device)
        dist.reduce_scatter_tensor(out, full[RANK].to(device), op=ReduceOp.MAX)
        want = fp8_ref("max", [f[4 * RANK : 4 * RANK + 4] for f in full], name) if name in FP8 else None
        if want is None:
            want = torch.from_numpy(unsigned_ref("max", [base(r, 4 * N, "int8")[4 * RANK : 4 * RANK + 4] for r in range(N)], name))
        assert raw(out) == raw(want), f"reduce_scatter_tensor {name}"
        checks += 1
    return checks


def scenario_torch_collectives() -> dict[str, Any]:
    """Every torch.distributed entry point against torch references; every op DDP/FSDP call
    is served by devccl (counted on the process group)."""
    pg = init()
    checks = 0
    for dt in DTYPES:
        for count in (0, 1, 7, 1000):
            xs = [values(r, count, dt) for r in range(N)]
            for op in OPS:
                want = reduce_ref(op, xs, dt)
                t = xs[RANK].clone()
                dist.all_reduce(t, op=op)
                eq(t, want, f"all_reduce {dt} {op} n={count}")
                t = xs[RANK].clone()
                w = dist.all_reduce(t, op=op, async_op=True)
                res = w.get_future().wait()
                eq(res[0], want, f"all_reduce async future {dt} {op}")
                assert w.wait() and w.is_completed()
                root = count % N
                t = xs[RANK].clone()
                dist.reduce(t, root, op=op)
                eq(t, want if RANK == root else xs[RANK], f"reduce {dt} {op}")
                full = [values(r, count * N, dt, 5) for r in range(N)]
                out = torch.empty(count, dtype=dt)
                dist.reduce_scatter_tensor(out, full[RANK], op=op)
                blk = slice(RANK * count, (RANK + 1) * count)
                eq(out, reduce_ref(op, [f[blk] for f in full], dt), f"reduce_scatter_tensor {dt} {op}")
                checks += 4
            root = (count + 1) % N
            t = xs[RANK].clone()
            dist.broadcast(t, root)
            eq(t, xs[root], f"broadcast {dt}")
            outs = [torch.empty(count, dtype=dt) for _ in range(N)]
            dist.all_gather(outs, xs[RANK])
            for r in range(N):
                eq(outs[r], xs[r], f"all_gather {dt}")
            o = torch.empty(count * N, dtype=dt)
            dist.all_gather_into_tensor(o, xs[RANK])
            eq(o, torch.cat(xs), f"all_gather_into_tensor {dt}")
            checks += 3
    checks += new_dtype_checks()
    # reduce_scatter with a list of inputs
    ins = [values(RANK, 6, torch.float32, j) for j in range(N)]
    out = torch.empty(6)
    dist.reduce_scatter(out, ins)
    eq(out, reduce_ref(ReduceOp.SUM, [values(r, 6, torch.float32, RANK) for r in range(N)], torch.float32), "reduce_scatter")
    # gather / scatter
    for root in range(N):
        x = values(RANK, 5, torch.int32)
        gl = [torch.empty(5, dtype=torch.int32) for _ in range(N)] if RANK == root else None
        dist.gather(x, gl, dst=root)
        if RANK == root:
            for r in range(N):
                eq(gl[r], values(r, 5, torch.int32), "gather")
        o = torch.empty(5, dtype=torch.int32)
        sl = [values(r, 5, torch.int32, 9) for r in range(N)] if RANK == root else None
        dist.scatter(o, sl, src=root)
        eq(o, values(RANK, 5, torch.int32, 9), "scatter")
    # all_to_all_single: equal and uneven splits (2-D tensors: splits are rows)
    inp = values(RANK, 4 * N * 3, torch.float64).reshape(4 * N, 3)
    o = torch.empty_like(inp)
    dist.all_to_all_single(o, inp)
    want = torch.cat([values(j, 4 * N * 3, torch.float64).reshape(4 * N, 3)[4 * RANK : 4 * RANK + 4] for j in range(N)])
    eq(o, want, "all_to_all_single")
    send_rows = [(RANK + j) % 3 + 1 for j in range(N)]
    recv_rows = [(j + RANK) % 3 + 1 for j in range(N)]
    inp = torch.arange(sum(send_rows) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * RANK
    o = torch.empty(sum(recv_rows), 2)
    dist.all_to_all_single(o, inp, recv_rows, send_rows)
    parts = []
    for j in range(N):
        rows_j = [(j + k) % 3 + 1 for k in range(N)]
        start = sum(rows_j[:RANK])
        src = torch.arange(sum(rows_j) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * j
        parts.append(src[start : start + rows_j[RANK]])
    eq(o, torch.cat(parts), "all_to_all_single uneven")
    # all_to_all with lists of different sizes
    ins = [torch.full((j + 1 + RANK,), float(RANK * 10 + j)) for j in range(N)]
    outs = [torch.empty(RANK + 1 + j) for j in range(N)]
    dist.all_to_all(outs, ins)
    for j in range(N):
        eq(outs[j], torch.full((RANK + 1 + j,), float(j * 10 + RANK)), "all_to_all")
    # coalesced: all_reduce_coalesced and the coalescing manager
    a, b = torch.full((3,), float(RANK)), torch.full((2, 2), float(RANK + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_reduce_coalesced([a, b])
    eq(a, torch.full((3,), float(sum(range(N)))), "all_reduce_coalesced a")
    eq(b, torch.full((2, 2), float(sum(range(1, N + 1)))), "all_reduce_coalesced b")
    outs = [torch.empty(N * 2), torch.empty(N * 3)]
    with dist._coalescing_manager(async_ops=True) as cm:
        dist.all_gather_into_tensor(outs[0], torch.full((2,), float(RANK)))
        dist.all_gather_into_tensor(outs[1], torch.full((3,), float(RANK)))
    cm.wait()
    eq(outs[0], torch.arange(N).float().repeat_interleave(2), "coalesced all_gather 0")
    eq(outs[1], torch.arange(N).float().repeat_interleave(3), "coalesced all_gather 1")
    rs = [torch.empty(2), torch.empty(1)]
    with dist._coalescing_manager():
        dist.reduce_scatter_tensor(rs[0], torch.ones(2 * N))
        dist.reduce_scatter_tensor(rs[1], torch.ones(N))
    eq(rs[0], torch.full((2,), float(N)), "coalesced reduce_scatter 0")
    eq(rs[1], torch.full((1,), float(N)), "coalesced reduce_scatter 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # torch's nesting: one list per rank, each holding one tensor per input
        lists = [[torch.empty(2), torch.empty(3, dtype=torch.float32)] for _ in range(N)]
        dist.all_gather_coalesced(lists, [torch.full((2,), float(RANK)), torch.full((3,), RANK + 0.5)])
    for r in range(N):
        eq(lists[r][0], torch.full((2,), float(r)), "all_gather_coalesced")
        eq(lists[r][1], torch.full((3,), r + 0.5), "all_gather_coalesced")
    # objects (pickled through all_gather / broadcast)
    objs = [None] * N
    dist.all_gather_object(objs, {"rank": RANK})
    assert objs == [{"rank": r} for r in range(N)], objs
    bl = [{"hello": RANK}]
    dist.broadcast_object_list(bl, src=N - 1)
    assert bl == [{"hello": N - 1}]
    # send/recv and isend/irecv around a ring
    nxt, prv = (RANK + 1) % N, (RANK - 1) % N
    got = torch.empty(4)
    if RANK % 2 == 0:
        dist.send(torch.full((4,), float(RANK)), nxt)
        dist.recv(got, prv)
    else:
        dist.recv(got, prv)
        dist.send(torch.full((4,), float(RANK)), nxt)
    eq(got, torch.full((4,), float(prv)), "send/recv")
    got = torch.empty(3, dtype=torch.int64)
    if RANK % 2 == 0:
        ws = [dist.isend(torch.full((3,), RANK, dtype=torch.int64), nxt, tag=3), dist.irecv(got, prv, tag=3)]
    else:
        ws = [dist.irecv(got, prv, tag=3), dist.isend(torch.full((3,), RANK, dtype=torch.int64), nxt, tag=3)]
    for w in ws:
        w.wait()
    eq(got, torch.full((3,), prv, dtype=torch.int64), "isend/irecv")
    # batch_isend_irecv with every rank sending first, 8 MiB each way: far more than socket
    # buffers or shared-memory rings hold, so this only completes if the sends and receives
    # progress together (devccl batches them)
    big = torch.full((2 << 20,), float(RANK))
    got = torch.empty(2 << 20)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, big, nxt), dist.P2POp(dist.irecv, got, prv)])
    for w in reqs:
        w.wait()
    eq(got, torch.full((2 << 20,), float(prv)), "batch_isend_irecv 8 MiB")
    # functional collectives (need the group's name)
    r = fc.all_reduce(torch.full((4,), float(RANK)), "sum", pg)
    eq(fc.wait_tensor(r), torch.full((4,), float(sum(range(N)))), "functional all_reduce")
    g = fc.all_gather_tensor(torch.full((2,), float(RANK)), 0, pg)
    eq(fc.wait_tensor(g), torch.arange(N).float().repeat_interleave(2), "functional all_gather_tensor")
    s = fc.reduce_scatter_tensor(torch.ones(2 * N), "sum", 0, pg)
    eq(fc.wait_tensor(s), torch.full((2,), float(N)), "functional reduce_scatter_tensor")
    # async work objects
    ws = [dist.all_reduce(torch.full((100,), float(i)), async_op=True) for i in range(10)]
    for i, w in enumerate(ws):
        w.wait()
        eq(w.result()[0], torch.full((100,), float(i * N)), f"async #{i}")
    dist.barrier()
    dist.barrier(async_op=True).wait()
    # new_group: every group is its own devccl communicator
    sub = [r for r in range(N) if r != 1] if N > 2 else [0, 1]
    g1 = dist.new_group(sub)
    if RANK in sub:
        assert type(g1).__name__ == "ProcessGroupDevccl" and g1.group_name != pg.group_name
        assert g1.communicator.comm_id != pg.communicator.comm_id
        t = torch.full((3,), float(RANK))
        dist.all_reduce(t, group=g1)
        eq(t, torch.full((3,), float(sum(sub))), "new_group all_reduce")
        t = torch.full((2,), float(RANK))
        dist.broadcast(t, src=sub[-1], group=g1)
        eq(t, torch.full((2,), float(sub[-1])), "new_group broadcast (global src rank)")
    g2 = dist.new_group()
    t = torch.ones(2)
    dist.all_reduce(t, group=g2)
    eq(t, torch.full((2,), float(N)), "new_group(all)")
    missing = REQUIRED - set(pg.calls)
    assert not missing, f"not served by devccl: {sorted(missing)}"
    calls = dict(pg.calls)
    dist.destroy_process_group()
    return {"checks": checks, "calls": calls}


def _expect(exc: type[BaseException], fn: Any, *args: Any, **kw: Any) -> str:
    try:
        fn(*args, **kw)
    except exc as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"rank {RANK}: {getattr(fn, '__name__', fn)} did not raise {exc.__name__}")


def scenario_torch_bad_inputs() -> dict[str, str]:
    """Bad inputs through torch.distributed: a clear Python exception on every rank."""
    pg = init()
    m: dict[str, str] = {}
    m["noncontig"] = _expect(devccl.InvalidUsageError, dist.all_reduce, torch.zeros(4, 4).t())
    m["noncontig_is_valueerror"] = _expect(ValueError, dist.broadcast, torch.zeros(4, 4)[:, 0], 0)
    m["bool"] = _expect(devccl.DTypeError, dist.all_reduce, torch.zeros(4, dtype=torch.bool))
    m["int16"] = _expect(TypeError, dist.all_reduce, torch.zeros(4, dtype=torch.int16))
    m["premul"] = _expect(devccl.UnsupportedError, dist.all_reduce, torch.ones(4), op=dist._make_nccl_premul_sum(2.0))
    m["band"] = _expect(devccl.UnsupportedError, dist.all_reduce, torch.ones(4, dtype=torch.int32), op=ReduceOp.BAND)
    m["meta_device"] = _expect(devccl.UnsupportedError, dist.all_reduce, torch.empty(4, device="meta"))
    m["gather_list"] = _expect(devccl.InvalidUsageError, dist.all_gather, [torch.empty(3)] * N, torch.empty(2))
    # Nothing was sent; the group still works.
    t = torch.ones(2)
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((2,), float(N)))
    # Sizes that differ across ranks: every rank raises, on a group of its own.
    g = dist.new_group()
    m["sizes"] = _expect(devccl.RemoteError, dist.all_reduce, torch.ones(4 + RANK), group=g)
    m["after_failure"] = _expect(devccl.AbortedError, dist.all_reduce, torch.ones(4), group=g)
    m["after_failure_dist"] = _expect(dist.DistBackendError, dist.all_reduce, torch.ones(4), group=g)
    g = dist.new_group()
    m["dtypes"] = _expect(devccl.RemoteError, dist.all_reduce, torch.ones(4, dtype=torch.float32 if RANK == 0 else torch.float64), group=g)
    # The asynchronous path reports the same error through the work object.
    g = dist.new_group()
    w = dist.all_reduce(torch.ones(8 + RANK), group=g, async_op=True)
    m["async_sizes"] = _expect(RuntimeError, w.wait)
    # Calling after abort: rank 0 aborts the group; every rank's next call raises.
    g = dist.new_group()
    dist.barrier(group=g)
    if RANK == 0:
        g.abort()
    m["after_abort"] = _expect(devccl.AbortedError, dist.all_reduce, torch.ones(4), group=g)
    m["after_abort_2"] = _expect(devccl.AbortedError, dist.broadcast, torch.ones(4), 0, group=g)
    dist.barrier()
    dist.destroy_process_group()
    return m


def scenario_torch_init_timeout() -> dict[str, Any]:
    """A group whose members never all arrive fails init with a timeout instead of hanging
    (rank 1 never calls new_group's creator: it is not a member of a group of 2 that
    rank 0 creates alone through a raw ProcessGroupDevccl)."""
    init()
    if RANK == 0:
        store = dist.PrefixStore("lonely/", dist.distributed_c10d._get_default_store())
        t0 = time.monotonic()
        err = _expect(devccl.DevcclError, devccl.torch.ProcessGroupDevccl, store, 0, 2, __import__("datetime").timedelta(seconds=3))
        took = time.monotonic() - t0
    else:
        err, took = "", 0.0
    dist.barrier()
    dist.destroy_process_group()
    return {"err": err, "took": took}


def scenario_fsdp2(backend: str) -> dict[str, Any]:
    """FSDP2 (fully_shard over a CPU DeviceMesh) trains a small model; the result is compared
    with Gloo's by the test. DeviceMesh needs the group's name, FSDP2 all-gathers and
    reduce-scatters (coalesced) through the backend."""
    import hashlib

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(backend)
    mesh = init_device_mesh("cpu", (N,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    per = 8 // N if 8 % N == 0 else 2
    for _ in range(5):
        x = torch.randn(per * N, 16, generator=g)[RANK * per : (RANK + 1) * per]
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    digest = hashlib.sha256(b"".join(full[k].numpy().tobytes() for k in sorted(full))).hexdigest()
    calls = dict(dist.group.WORLD.calls) if backend == "devccl" else {}
    dist.destroy_process_group()
    return {"sha": digest, "calls": calls}
