"""Multi-process scenarios on devccl.Communicator (numpy arrays; torch tensors without
torch.distributed). Each function runs on every rank; see worker.py."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

import devccl

RANK = int(os.environ["RANK"])
N = int(os.environ["WORLD_SIZE"])
ADDR = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"

#: devccl dtype name -> numpy storage dtype (bf16 travels as uint16 bit patterns).
DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bf16": np.uint16,
    "int8": np.int8,
    "uint8": np.uint8,
    "int32": np.int32,
    "int64": np.int64,
    "uint32": np.uint32,
    "uint64": np.uint64,
}
FLOATS = {"float32", "float64", "float16", "bf16"}
#: Unsigned types whose small negative test values wrap to large ones (checks unsignedness).
UNSIGNED = {"uint32", "uint64"}
OPS = ["sum", "prod", "min", "max", "avg"]
SIZES = [0, 1, 7, 1000]


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values (exactly representable in bf16 here) as bf16 bit patterns."""
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def base(rank: int, count: int, name: str) -> np.ndarray:
    """Rank `rank`'s values: small integers, exact in every dtype, negative where allowed."""
    i = np.arange(count, dtype=np.int64)
    if name == "uint8":
        return (i * 7 + rank * 3) % 5 + 1
    return (i * 7 + rank * 3) % 7 - 3


def cast(v: np.ndarray, name: str) -> np.ndarray:
    """Exact values in float64/int64 as an array of `name`."""
    if name == "bf16":
        return to_bf16(v.astype(np.float32))
    if name in FLOATS:
        return v.astype(DTYPES[name])
    return v.astype(np.int64).astype(DTYPES[name])


def unsigned_ref(op: str, xs: list[np.ndarray], name: str) -> np.ndarray:
    """devccl's wrapping unsigned arithmetic (core/src/op.rs): sum and prod modulo 2^bits,
    avg = the wrapped sum divided by the rank count."""
    dt = DTYPES[name]
    s = np.stack([cast(x, name) for x in xs])
    if op == "sum":
        return s.sum(0, dtype=dt)
    if op == "prod":
        return s.prod(0, dtype=dt)
    if op == "min":
        return s.min(0)
    if op == "max":
        return s.max(0)
    return s.sum(0, dtype=dt) // dt(len(xs))


def reduce_ref(op: str, xs: list[np.ndarray], name: str) -> np.ndarray:
    """devccl's reduction semantics (core/src/op.rs) on exact small integers."""
    if name in UNSIGNED:
        return unsigned_ref(op, xs, name)
    s = np.stack(xs).astype(np.float64) if xs else np.zeros((1, 0))
    if op == "sum":
        r = s.sum(0)
    elif op == "prod":
        r = s.prod(0)
    elif op == "min":
        r = s.min(0)
    elif op == "max":
        r = s.max(0)
    else:
        tot = s.sum(0)
        n = len(xs)
        if name not in FLOATS:
            r = np.trunc(tot / n)
        elif name == "float64":
            r = tot / n
        else:  # f32; f16 and bf16 divide in f32 and round once
            r = (tot.astype(np.float32) / np.float32(n)).astype(np.float64)
            if name == "bf16":
                # round-to-nearest-even from f32 to bf16
                u = r.astype(np.float32).view(np.uint32).astype(np.uint64)
                u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
                return u.astype(np.uint16)
    return cast(r, name)


def same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
        raise AssertionError(f"rank {RANK}: {what}: got {a[:12]} want {b[:12]} ({a.dtype} {a.shape} vs {b.dtype} {b.shape})")


def check_all(comm: devccl.Communicator, name: str, count: int) -> int:
    """Every collective on `name` × `count` against numpy references; returns checks done."""
    kw = {"dtype": "bf16"} if name == "bf16" else {}
    xs = [base(r, count, name) for r in range(N)]
    mine = cast(xs[RANK], name)
    done = 0
    root = count % N
    for op in OPS:
        want = reduce_ref(op, xs, name)
        buf = mine.copy()
        comm.all_reduce(buf, op, **kw)
        same(buf, want, f"all_reduce {name} {op} n={count}")
        out = np.zeros_like(mine)
        comm.all_reduce(mine, op, out=out, **kw)
        same(out, want, f"all_reduce(out=) {name} {op}")
        buf = mine.copy()
        w = comm.all_reduce(buf, op, async_op=True, **kw)
        same(w.wait(), want, f"all_reduce async {name} {op}")
        assert w.is_completed() and w.is_success()
        buf = mine.copy()
        comm.reduce(buf, root, op, **kw)
        same(buf, want if RANK == root else mine, f"reduce {name} {op} root {root}")
        # reduce_scatter: rank r keeps block r of the reduction of n×count inputs
        full = [base(r, count * N, name) for r in range(N)]
        out = np.zeros(count, DTYPES[name])
        comm.reduce_scatter(out, cast(full[RANK], name), op, **kw)
        blk = slice(RANK * count, (RANK + 1) * count)
        same(out, reduce_ref(op, [f[blk] for f in full], name), f"reduce_scatter {name} {op}")
        done += 5
    buf = mine.copy()
    comm.broadcast(buf, root, **kw)
    same(buf, cast(xs[root], name), f"broadcast {name}")
    gathered = cast(np.concatenate(xs), name)
    out = np.zeros(count * N, DTYPES[name])
    comm.all_gather(out, mine, **kw)
    same(out, gathered, f"all_gather {name}")
    out = np.zeros(count * N, DTYPES[name])
    out[RANK * count : (RANK + 1) * count] = mine
    comm.all_gather(out, out[RANK * count : (RANK + 1) * count], **kw)
    same(out, gathered, f"all_gather in place {name}")
    # all_to_all: block j of rank i -> block i of rank j
    a2a = [cast(base(r + 10, count * N, name), name) for r in range(N)]
    want = np.concatenate([a2a[j][RANK * count : (RANK + 1) * count] for j in range(N)])
    out = np.zeros(count * N, DTYPES[name])
    comm.all_to_all(out, a2a[RANK], **kw)
    same(out, want, f"all_to_all {name}")
    buf = a2a[RANK].copy()
    comm.all_to_all(buf, buf, **kw)
    same(buf, want, f"all_to_all in place {name}")
    # all_to_all_v: rank i sends (i + j) % 3 + count elements to rank j
    sc = [(RANK + j) % 3 + count for j in range(N)]
    rc = [(j + RANK) % 3 + count for j in range(N)]
    src = [cast(base(r + 20, sum((r + j) % 3 + count for j in range(N)), name), name) for r in range(N)]
    offs = [np.cumsum([0] + [(r + j) % 3 + count for j in range(N)]) for r in range(N)]
    want = np.concatenate([src[j][offs[j][RANK] : offs[j][RANK + 1]] for j in range(N)])
    out = np.zeros(sum(rc), DTYPES[name])
    comm.all_to_all_v(out, src[RANK], rc, sc, **kw)
    same(out, want, f"all_to_all_v {name}")
    # gather / scatter
    out = np.zeros(count * N, DTYPES[name]) if RANK == root else None
    comm.gather(mine, out, root, **kw)
    if RANK == root:
        same(out, gathered, f"gather {name}")
    out = np.zeros(count, DTYPES[name])
    comm.scatter(out, gathered if RANK == root else None, root, **kw)
    same(out, cast(xs[RANK], name), f"scatter {name}")
    # send/recv around a ring (even ranks send first, so nobody waits on a send)
    nxt, prv = (RANK + 1) % N, (RANK - 1) % N
    got = np.zeros(count, DTYPES[name])
    if RANK % 2 == 0:
        comm.send(mine, nxt, tag=7, **kw)
        comm.recv(got, prv, tag=7, **kw)
    else:
        comm.recv(got, prv, tag=7, **kw)
        comm.send(mine, nxt, tag=7, **kw)
    same(got, cast(xs[prv], name), f"send/recv {name}")
    comm.barrier()
    return done + 10


def scenario_collectives() -> dict[str, Any]:
    """Every collective × dtype × op × size against numpy references."""
    comm = devccl.init()
    assert (comm.rank, comm.world_size) == (RANK, N)
    checks = 0
    for name in DTYPES:
        for count in SIZES:
            checks += check_all(comm, name, count)
    # Large buffers (pipelined, several chunks) for the main collectives.
    big = 300_007
    xs = [base(r, big, "float32") for r in range(N)]
    buf = cast(xs[RANK], "float32")
    comm.all_reduce(buf)
    same(buf, reduce_ref("sum", xs, "float32"), "big all_reduce")
    out = np.zeros(big * N, np.float32)
    comm.all_gather(out, cast(xs[RANK], "float32"))
    same(out, cast(np.concatenate(xs), "float32"), "big all_gather")
    red = np.zeros(big // N, np.float32)
    full = [base(r, (big // N) * N, "float32") for r in range(N)]
    comm.reduce_scatter(red, cast(full[RANK], "float32"))
    blk = slice(RANK * (big // N), (RANK + 1) * (big // N))
    same(red, reduce_ref("sum", [f[blk] for f in full], "float32"), "big reduce_scatter")
    comm.destroy()
    return {"checks": checks + 3}


def scenario_torch_tensors() -> dict[str, Any]:
    """The same Communicator on torch CPU tensors (zero-copy), every dtype incl. bfloat16."""
    import torch

    comm = devccl.init()
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64]
    checks = 0
    for dt in dtypes:
        for count in (0, 5, 1000):
            xs = []
            for r in range(N):
                v = torch.from_numpy(base(r, count, "uint8" if dt == torch.uint8 else "int8"))
                xs.append(v.to(dt))
            for op in OPS:
                if op == "avg" and not dt.is_floating_point:
                    want = torch.trunc(torch.stack([x.double() for x in xs]).sum(0) / N).to(dt)
                elif op == "avg":
                    acc = torch.float64 if dt == torch.float64 else torch.float32
                    want = (torch.stack([x.to(acc) for x in xs]).sum(0) / N).to(dt)
                else:
                    s = torch.stack([x.double() for x in xs])
                    want = {"sum": s.sum(0), "prod": s.prod(0), "min": s.amin(0), "max": s.amax(0)}[op].to(dt)
                t = xs[RANK].clone()
                assert comm.all_reduce(t, op) is t
                assert torch.equal(t, want), f"{dt} {op}: {t[:8]} vs {want[:8]}"
                t = xs[RANK].clone()
                assert comm.all_reduce(t, op, async_op=True).wait() is t
                assert torch.equal(t, want), f"async {dt} {op}"
                checks += 2
            out = torch.zeros(count * N, dtype=dt)
            comm.all_gather(out, xs[RANK])
            assert torch.equal(out, torch.cat(xs)), f"all_gather {dt}"
            t = xs[RANK].clone()
            comm.broadcast(t, N - 1)
            assert torch.equal(t, xs[N - 1])
            checks += 2
    # A tensor that requires grad, and a 2-D one, are used through their data.
    p = torch.ones(3, 4, requires_grad=True)
    comm.all_reduce(p)
    assert torch.equal(p.detach(), torch.full((3, 4), float(N)))
    comm.destroy()
    return {"checks": checks + 1}


FP8 = ("float8_e4m3fn", "float8_e5m2")


def fp8_values(rank: int, count: int, name: str) -> Any:
    """Rank `rank`'s fp8 tensor: values in [-8, 8] rounded to the type, so sums and products
    of two stay far from overflow."""
    import torch

    v = np.random.default_rng(100 + rank).uniform(-8, 8, count).astype(np.float32)
    return torch.from_numpy(v).to(getattr(torch, name))


def fp8_ref(op: str, xs: list[Any], name: str) -> Any:
    """devccl's fp8 reduction: each step in f32, rounded once to the type (round to nearest
    even), folded in rank order (the order does not matter for 2 ranks); avg divides the
    rounded sum and rounds again."""
    import torch

    dt = getattr(torch, name)
    f = {"sum": torch.add, "avg": torch.add, "prod": torch.mul, "min": torch.minimum, "max": torch.maximum}[op]
    r = xs[0]
    for x in xs[1:]:
        r = f(r.float(), x.float()).to(dt)
    return (r.float() / len(xs)).to(dt) if op == "avg" else r


def raw(t: Any) -> bytes:
    """A tensor's bytes (any dtype, CPU or CUDA)."""
    import torch

    if t.numel() == 0:
        return b""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()


def scenario_new_dtypes() -> dict[str, Any]:
    """uint32, uint64, float8_e4m3fn and float8_e5m2 on CPU torch tensors (and fp8 as a uint8
    numpy array with dtype=): every reduction op against a local reference, plus the data
    movement collectives."""
    import torch

    comm = devccl.init()
    checks = 0
    for name in ("uint32", "uint64", *FP8):
        for count in (0, 1, 7, 1000):
            bases = [base(r, count, "int8") for r in range(N)]  # small, negative ones wrap around
            if name in FP8:
                xs = [fp8_values(r, count, name) for r in range(N)]
            else:
                xs = [torch.from_numpy(cast(b, name)) for b in bases]
            for op in OPS:
                if name in FP8 and N > 2 and op not in ("min", "max"):
                    continue  # rounding after every step: the result depends on the algorithm's order
                want = fp8_ref(op, xs, name) if name in FP8 else torch.from_numpy(unsigned_ref(op, bases, name))
                t = xs[RANK].clone()
                assert comm.all_reduce(t, op) is t
                assert raw(t) == raw(want), f"{name} {op} n={count}: {t[:6]} vs {want[:6]}"
                out = torch.empty_like(t)
                comm.all_reduce(xs[RANK], op, out=out, async_op=True).wait()
                assert raw(out) == raw(want), f"{name} {op} async out="
                checks += 2
            out = torch.empty(count * N, dtype=xs[0].dtype)
            comm.all_gather(out, xs[RANK])
            assert raw(out) == b"".join(raw(x) for x in xs), f"all_gather {name}"
            t = xs[RANK].clone()
            comm.broadcast(t, N - 1)
            assert raw(t) == raw(xs[N - 1]), f"broadcast {name}"
            checks += 2
        if name in FP8:  # the same data as a uint8 numpy array with dtype=
            a = fp8_values(RANK, 64, name).view(torch.uint8).numpy().copy()
            comm.all_reduce(a, "max", dtype=name)
            assert a.tobytes() == raw(fp8_ref("max", [fp8_values(r, 64, name) for r in range(N)], name))
            checks += 1
    comm.destroy()
    return {"checks": checks}


def scenario_async_and_gil() -> dict[str, Any]:
    """Asynchronous work (many in flight, waited out of order, timeouts) and the GIL being
    released while a blocking call waits for a slow peer."""
    comm = devccl.init()
    works = []
    bufs = []
    for i in range(20):
        b = np.full(1000 + i, RANK + i, np.float32)
        bufs.append(b)
        works.append(comm.all_reduce(b, async_op=True))
    for i in reversed(range(20)):
        out = works[i].wait()
        assert out is bufs[i]
        expect = sum(r + i for r in range(N))
        assert (out == expect).all(), (i, out[:4], expect)
    # Dropping a Work handle does not cancel its collective (buffers stay alive).
    for _ in range(5):
        comm.all_reduce(np.ones(4096, np.float64), async_op=True)
    comm.barrier()
    # A peer that is late: wait(timeout) raises TimeoutError, the work keeps running.
    if RANK == 0:
        w = comm.all_reduce(np.ones(10, np.int32), async_op=True)
        try:
            w.wait(timeout=0.2)
            raise AssertionError("wait(timeout) returned although rank 1 is 1.5 s late")
        except TimeoutError:
            pass
        assert not w.is_completed()
        assert (w.wait() == N).all()
    else:
        time.sleep(1.5)
        comm.all_reduce(np.ones(10, np.int32))
    # GIL: a Python thread keeps running while this rank blocks in a collective.
    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    th = threading.Thread(target=spin)
    th.start()
    if RANK == 0:
        t0 = time.monotonic()
        comm.all_reduce(np.ones(10, np.float32))
        waited = time.monotonic() - t0
    else:
        time.sleep(1.0)
        comm.all_reduce(np.ones(10, np.float32))
        waited = 0.0
    stop.set()
    th.join()
    if RANK == 0:
        assert waited > 0.8, waited
        assert ticks > 100, f"only {ticks} ticks of a Python thread during a {waited:.2f}s blocking call: GIL held?"
    comm.destroy()
    return {"ticks": ticks}


def _expect(exc: type[BaseException], fn: Any, *args: Any, **kw: Any) -> str:
    try:
        fn(*args, **kw)
    except exc as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"rank {RANK}: {getattr(fn, '__name__', fn)} did not raise {exc.__name__}")


def _group(server_addr: str, name: str) -> devccl.Communicator:
    return devccl.Communicator(RANK, N, server_addr, group=name)


def scenario_bad_inputs() -> dict[str, str]:
    """Bad inputs raise a Python exception with a clear message on every rank."""
    import torch

    server = devccl.RendezvousServer(ADDR) if RANK == 0 else None
    msgs: dict[str, str] = {}
    comm = _group(ADDR, "local")
    x = np.zeros((4, 4), np.float32)
    msgs["noncontig_numpy"] = _expect(devccl.InvalidUsageError, comm.all_reduce, x[:, 1])
    msgs["noncontig_torch"] = _expect(ValueError, comm.all_reduce, torch.zeros(4, 4).t())
    msgs["int16_numpy"] = _expect(devccl.DTypeError, comm.all_reduce, np.zeros(4, np.int16))
    msgs["bool_torch"] = _expect(TypeError, comm.all_reduce, torch.zeros(4, dtype=torch.bool))
    msgs["complex_torch"] = _expect(devccl.DTypeError, comm.all_reduce, torch.zeros(4, dtype=torch.complex64))
    msgs["dtype_pair"] = _expect(devccl.DTypeError, comm.all_reduce, np.zeros(4, np.float32), out=np.zeros(4, np.float64))
    msgs["dtype_override"] = _expect(devccl.DTypeError, comm.all_reduce, np.zeros(4, np.float32), dtype="int32")
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    msgs["readonly"] = _expect(devccl.InvalidUsageError, comm.all_reduce, ro)
    msgs["not_a_buffer"] = _expect(devccl.InvalidUsageError, comm.all_reduce, [1.0, 2.0])
    msgs["gather_size"] = _expect(devccl.InvalidUsageError, comm.all_gather, np.zeros(3, np.float32), np.zeros(2, np.float32))
    msgs["root"] = _expect(devccl.InvalidUsageError, comm.broadcast, np.zeros(2, np.float32), N + 3)
    msgs["peer"] = _expect(devccl.InvalidUsageError, comm.send, np.zeros(2, np.float32), RANK)
    msgs["op"] = _expect(devccl.InvalidUsageError, comm.all_reduce, np.zeros(2, np.float32), "xor")
    big = np.zeros(8, np.float32)
    msgs["overlap"] = _expect(devccl.InvalidUsageError, comm.all_reduce, big[0:4], out=big[2:6])
    # Nothing was sent: the communicator still works.
    ok = np.ones(3, np.float32)
    comm.all_reduce(ok)
    assert (ok == N).all() and comm.poisoned is None
    # Sizes that differ across ranks: a mismatch error on every rank, then the group is dead.
    g = _group(ADDR, "sizes")
    # With 3+ ranks a rank may first hear that a peer failed on the mismatch: RemoteError
    # (MismatchError's base class) whose message names the mismatch.
    msgs["sizes"] = _expect(devccl.RemoteError, g.all_reduce, np.ones(4 + RANK, np.float32))
    msgs["after_mismatch"] = _expect(devccl.AbortedError, g.all_reduce, np.ones(4, np.float32))
    # Element types that differ across ranks (same count).
    g = _group(ADDR, "dtypes")
    arr = np.ones(4, np.float32 if RANK == 0 else np.int32)
    msgs["dtypes"] = _expect(devccl.RemoteError, g.all_reduce, arr)
    # Different collectives (both exchanging data: a broadcast root only sends, so it would
    # finish before its peers see the mismatch and learn of it on its next call).
    g = _group(ADDR, "colls")
    if RANK == 0:
        msgs["colls"] = _expect(devccl.RemoteError, g.all_gather, np.ones(4 * N, np.float32), np.ones(4, np.float32))
    else:
        msgs["colls"] = _expect(devccl.RemoteError, g.all_reduce, np.ones(4, np.float32))
    comm.barrier()
    comm.destroy()
    msgs["after_destroy"] = _expect(devccl.InvalidUsageError, comm.all_reduce, ok)
    if server is not None:
        time.sleep(0.5)
        server.shutdown()
    return msgs


def scenario_abort() -> dict[str, Any]:
    """abort() on rank 0 fails the others' stuck collective promptly; afterwards every call
    raises AbortedError on every rank."""
    comm = devccl.init()
    comm.all_reduce(np.ones(4, np.float32))
    t0 = time.monotonic()
    if RANK == 0:
        time.sleep(1.0)
        comm.abort("test abort")
        first = "aborted"
    else:
        first = _expect(devccl.AbortedError, comm.all_reduce, np.ones(1 << 16, np.float32))
    took = time.monotonic() - t0
    after = [
        _expect(devccl.AbortedError, comm.all_reduce, np.ones(4, np.float32)),
        _expect(devccl.AbortedError, comm.barrier),
        _expect(devccl.AbortedError, lambda: comm.broadcast(np.ones(4, np.float32), 0, async_op=True).wait()),
    ]
    assert comm.poisoned, "poisoned must say why"
    return {"first": first, "took": took, "after": after, "poisoned": comm.poisoned}


def scenario_one_rank_fails_locally() -> dict[str, str]:
    """Rank 0 passes a bad buffer (raises locally, sends nothing); the others' collective then
    fails within DEVCCL_TIMEOUT naming the missing peer: an error on every rank, no hang."""
    comm = devccl.init()
    if RANK == 0:
        err = _expect(devccl.InvalidUsageError, comm.all_reduce, np.zeros((4, 4), np.float32)[:, 0])
        time.sleep(float(os.environ["DEVCCL_TIMEOUT"]) + 3)  # let the peers time out
    else:
        err = _expect(devccl.DevcclError, comm.all_reduce, np.zeros(4, np.float32))
    return {"err": err}
