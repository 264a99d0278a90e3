"""Parity scenarios: the same torch.distributed calls on backend "gloo" and on backend
"devccl", run one after the other in the same processes (one c10d store, a prefix per
backend); ``test_torch_parity.py`` compares what each backend produced, Gloo's result being
the expected one. Each function runs on every rank; see worker.py.

Results are JSON: tensors as ``{"dtype", "shape", "v"}``; a call expected to fail as
``{"raised": bool, "runtime": isinstance(e, RuntimeError)}`` (compared across backends) with
the message kept apart under ``"msg"`` keys (not compared). ``"_hard_exit"`` makes the worker
leave with ``os._exit(0)`` once the report is written: Gloo can abort at interpreter exit
(see test_torch_backend.GLOO_EXIT_CRASH), which must not fail a run whose work is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ReduceOp

import devccl
import devccl.torch as dt

RANK = int(os.environ["RANK"])
N = int(os.environ["WORLD_SIZE"])
BACKENDS = ("gloo", "devccl")
#: What torch's own tests match timeout and closed-peer errors with.
TORCH_TIMEOUT_RE = re.compile(r" (Timed out|closed|timeout) ")

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


# -- helpers ----------------------------------------------------------------------------------


def _t(x: torch.Tensor) -> dict[str, Any]:
    """A tensor as JSON, exactly (complex as its real view)."""
    x = x.detach()
    if x.layout != torch.strided:
        return {"layout": str(x.layout), "dense": _t(x.to_dense())}
    v = torch.view_as_real(x) if x.is_complex() else x
    if v.dtype in (torch.bfloat16, torch.float16):
        v = v.float()
    return {"dtype": str(x.dtype), "shape": list(x.shape), "v": v.tolist()}


def _sparse(x: torch.Tensor) -> dict[str, Any]:
    """A sparse COO tensor as JSON: its coalesced flag, indices and values as stored."""
    return {
        "coalesced": x.is_coalesced(),
        "size": list(x.shape),
        "indices": x._indices().tolist(),
        "values": _t(x._values()),
    }


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    """Whether ``fn()`` raised (compared across backends) and what (``msg``: not compared)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded, compared by the test
        return {"raised": True, "runtime": isinstance(e, RuntimeError), "msg": f"{type(e).__name__}: {e}"[:400]}
    return {"raised": False, "runtime": False, "msg": ""}


def _digest(params: Iterator[torch.Tensor]) -> dict[str, Any]:
    ts = [p.detach().reshape(-1).double() for p in params]
    flat = torch.cat(ts) if ts else torch.zeros(0)
    return {"sha": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "v": flat.tolist()}


def _store() -> dist.TCPStore:
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), N, RANK == 0, timeout=timedelta(seconds=60)
    )


def _served() -> dict[str, int]:
    """The calls every devccl group of this process served so far (world and new groups)."""
    served: dict[str, int] = {}
    for pg in list(dist.distributed_c10d._world.pg_map):
        if isinstance(pg, dt.ProcessGroupDevccl):
            for k, v in pg.calls.items():
                served[k] = served.get(k, 0) + v
    return served


def _timed(parts: dict[str, Callable[[str], Any]], backend: str) -> dict[str, Any]:
    """Run each part; their wall times go to ``seconds`` (not compared)."""
    out: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, fn in parts.items():
        t0 = time.monotonic()
        out[name] = fn(backend)
        seconds[name] = round(time.monotonic() - t0, 2)
    out["seconds"] = seconds
    return out


def _on_both(body: Callable[[str], dict[str, Any]], timeout: timedelta = timedelta(seconds=60)) -> dict[str, Any]:
    """``body(backend)`` under a default group of Gloo, then of devccl (same processes, one
    store). Records which ProcessGroupDevccl methods served the devccl run (``served``)."""
    store = _store()
    out: dict[str, Any] = {"_hard_exit": True}
    for backend in BACKENDS:
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"{backend}/", store), rank=RANK, world_size=N, timeout=timeout
        )
        out[backend] = body(backend)
        dist.barrier()
        if backend == "devccl":
            out["served"] = _served()
        dist.destroy_process_group()
    return out


def x(i: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank- and index-dependent values, exact in every dtype used."""
    v = torch.arange(math.prod(shape), dtype=torch.int64) % 50 + 100 * RANK + 10 * i
    if dtype == torch.bool:
        return (v % 3 == 0).reshape(shape)
    if dtype.is_complex:
        return torch.complex(v.double(), -v.double()).to(dtype).reshape(shape)
    if dtype == torch.uint8:
        v = v % 256
    return v.to(dtype).reshape(shape)


# -- 1, 3, 5: collectives ------------------------------------------------------------------------

AGC_CASES: dict[str, list[tuple[tuple[int, ...], torch.dtype]]] = {
    # the first case
    "single": [((2,), torch.float32)],
    "several_with_empty": [((3,), torch.float32), ((0,), torch.float32), ((2, 2), torch.float32), ((1,), torch.float32), ((0, 3), torch.float32)],
    "scalar_and_3d": [((), torch.float64), ((2, 1, 3), torch.float64)],
    "int64": [((4,), torch.int64), ((2,), torch.int64)],
    "uint8": [((5,), torch.uint8)],
    "bool": [((3,), torch.bool), ((2,), torch.bool)],
    "complex64": [((3,), torch.complex64), ((2, 2), torch.complex64)],
    "complex128": [((1,), torch.complex128)],
    "all_empty": [((0,), torch.float32)],
    "large": [((20_011,), torch.float32), ((7,), torch.float32)],
}


def _all_gather_coalesced(backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = dist.new_group(list(range(N)))
    for name, spec in AGC_CASES.items():
        for gname, group in (("default", None), ("full_group", full)):
            ins = [x(i, shape, dtp) for i, (shape, dtp) in enumerate(spec)]
            outs = [[torch.full_like(t, 7) for t in ins] for _ in range(N)]
            dist.all_gather_coalesced(outs, ins, group=group)
            out[f"{name}/{gname}"] = [[_t(o) for o in per_rank] for per_rank in outs]
    # async: torch returns the Work's future
    ins = [x(0, (3,)), x(1, (2, 2))]
    outs = [[torch.empty_like(t) for t in ins] for _ in range(N)]
    fut = dist.all_gather_coalesced(outs, ins, async_op=True)
    fut.wait()
    out["async"] = [[_t(o) for o in per_rank] for per_rank in outs]
    # a non-contiguous input and output
    ins = [torch.arange(12.0).reshape(3, 4).t()[1] + RANK]
    outs = [[torch.empty(3, 2).t()[0]] for _ in range(N)]
    dist.all_gather_coalesced(outs, ins)
    out["non_contiguous"] = [[_t(o) for o in per_rank] for per_rank in outs]
    # what torch passes that the backend must refuse (nothing sent; the group stays usable)
    one = [x(0, (2,))]
    out["err/wrong_nesting"] = _outcome(lambda: dist.all_gather_coalesced([[torch.empty(2) for _ in range(N + 1)]], one))
    out["err/short_rank_list"] = _outcome(lambda: dist.all_gather_coalesced([[] for _ in range(N)], one))
    out["err/shape"] = _outcome(lambda: dist.all_gather_coalesced([[torch.empty(2, 1)] for _ in range(N)], one))
    out["err/dtype"] = _outcome(
        lambda: dist.all_gather_coalesced([[torch.empty(2, dtype=torch.float64)] for _ in range(N)], one)
    )
    out["err/empty_input_list"] = _outcome(lambda: dist.all_gather_coalesced([[] for _ in range(N)], []))
    t = torch.ones(2)
    dist.all_reduce(t)
    out["usable_after_errors"] = _t(t)
    return out


OBJECTS: list[Any] = [
    {"rank": RANK, "blob": "x" * (1000 * RANK + 1), "tensor": torch.arange(3) + RANK},
    None,
    [RANK] * (RANK + 1),
    "é" * (20_000 * (RANK + 1)),
]


def _object_collectives(backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = dist.new_group(list(range(N)))
    for gname, group in (("default", None), ("full_group", full)):
        for i, obj in enumerate(OBJECTS):
            got: list[Any] = [None] * N
            dist.all_gather_object(got, obj, group=group)
            out[f"all_gather_object/{gname}/{i}"] = repr(got)
        for dst in sorted({0, N - 1}):
            got = [None] * N if RANK == dst else None
            dist.gather_object(OBJECTS[0], got, dst=dst, group=group)
            out[f"gather_object/{gname}/{dst}"] = repr(got)
        for src in range(N):
            objs = [OBJECTS[0], RANK, "y" * (5000 * RANK)] if RANK == src else [None, None, None]
            dist.broadcast_object_list(objs, src=src, group=group)
            out[f"broadcast_object_list/{gname}/{src}"] = repr(objs)
        for src in range(N):
            got = [None]
            ins = [{"to": r, "payload": list(range(r * 100))} for r in range(N)] if RANK == src else None
            dist.scatter_object_list(got, ins, src=src, group=group)
            out[f"scatter_object_list/{gname}/{src}"] = repr(got)
    return out


def _subgroups(backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sorted({1, N} | ({2} if N % 2 == 0 else set())):
        cur, subs = dist.new_subgroups(group_size=size)
        t = torch.full((3,), float(RANK + 1))
        dist.all_reduce(t, group=cur)
        b = torch.full((2,), float(RANK))
        dist.broadcast(b, src=(RANK // size) * size + size - 1, group=cur)
        objs: list[Any] = [None] * size
        dist.all_gather_object(objs, {"r": RANK}, group=cur)
        out[f"new_subgroups/{size}"] = {
            "sum": _t(t),
            "bcast": _t(b),
            "objs": repr(objs),
            "group_rank": dist.get_rank(cur),
            "group_size": dist.get_world_size(cur),
            "count": len(subs),
            "same_backend_as_world": str(dist.get_backend(cur)) == backend,
        }
    ranks = [[0], list(range(1, N))]
    cur, subs = dist.new_subgroups_by_enumeration(ranks)
    t = torch.full((2,), float(RANK * 2 + 1))
    dist.all_reduce(t, op=ReduceOp.MAX, group=cur)
    out["new_subgroups_by_enumeration"] = {"max": _t(t), "group_size": dist.get_world_size(cur), "count": len(subs)}
    return out


def _sparse_case(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(17 + RANK)
    if name == "vector":
        return torch.sparse_coo_tensor([[RANK, 3, 5 + RANK]], [1.0 + RANK, 2.0, 3.5], (8,))
    if name == "embedding_rows":  # what nn.Embedding(sparse=True) produces: uncoalesced rows
        idx = torch.randint(0, 10, (6,), generator=g)
        return torch.sparse_coo_tensor(idx.unsqueeze(0), torch.randn(6, 4, generator=g), (10, 4))
    if name == "duplicates":
        return torch.sparse_coo_tensor([[1, 1, 2, 1]], torch.tensor([0.1, 0.2, 0.3, 0.4]) * (RANK + 1), (4,))
    if name == "two_sparse_dims_f64":
        idx = torch.stack([torch.randint(0, 5, (7,), generator=g), torch.randint(0, 6, (7,), generator=g)])
        return torch.sparse_coo_tensor(idx, torch.randn(7, generator=g, dtype=torch.float64), (5, 6))
    if name == "two_dense_dims":
        return torch.sparse_coo_tensor([[RANK % 6, 4]], torch.randn(2, 2, 3, generator=g), (6, 2, 3))
    if name == "empty_on_rank0":
        if RANK == 0:
            return torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, 3), (5, 3))
        return torch.sparse_coo_tensor([[RANK % 5]], torch.ones(1, 3) * RANK, (5, 3))
    if name == "all_empty":
        return torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0), (9,))
    if name == "int64":
        return torch.sparse_coo_tensor([[0, RANK + 1]], torch.tensor([5, -RANK], dtype=torch.int64), (N + 2,))
    if name == "coalesced_input":
        return torch.sparse_coo_tensor([[0, 2]], torch.tensor([1.5, float(RANK)]), (3,)).coalesce()
    raise KeyError(name)


SPARSE_CASES = (
    "vector",
    "embedding_rows",
    "duplicates",
    "two_sparse_dims_f64",
    "two_dense_dims",
    "empty_on_rank0",
    "all_empty",
    "int64",
    "coalesced_input",
)


def _sparse_all_reduce(backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = dist.new_group(list(range(N)))
    for name in SPARSE_CASES:
        t = _sparse_case(name)
        dist.all_reduce(t)
        out[f"{name}"] = _sparse(t)
        t = _sparse_case(name)
        dist.all_reduce(t, group=full)
        out[f"{name}/full_group"] = _sparse(t)
        t = _sparse_case(name)
        w = dist.all_reduce(t, async_op=True)
        w.wait()
        out[f"{name}/async"] = _sparse(t)
    # refused, as by Gloo: other ops, other sparse layouts
    out["err/max"] = _outcome(lambda: dist.all_reduce(_sparse_case("vector"), op=ReduceOp.MAX))
    out["err/avg"] = _outcome(lambda: dist.all_reduce(_sparse_case("vector"), op=ReduceOp.AVG))
    out["err/csr"] = _outcome(lambda: dist.all_reduce(torch.eye(3).to_sparse_csr()))
    out["err/broadcast_coo"] = _outcome(lambda: dist.broadcast(_sparse_case("vector"), 0))
    t = torch.ones(2)
    dist.all_reduce(t)
    out["usable_after_errors"] = _t(t)
    if backend == "devccl":
        # devccl only (Gloo does not check): sizes that differ across ranks are refused on
        # every rank, and the group stays usable
        bad = torch.sparse_coo_tensor([[0]], [1.0], (4 + (RANK == 0),))
        try:
            dist.all_reduce(bad)
            raise AssertionError("a size mismatch of sparse tensors was not detected")
        except devccl.MismatchError as e:
            assert isinstance(e, dist.DistBackendError), type(e).__mro__
            assert "sparse" in str(e) and "(5,)" in str(e) and "(4,)" in str(e), str(e)
        t = torch.ones(2)
        dist.all_reduce(t)
        assert torch.equal(t, torch.full((2,), float(N)))
    return out


def scenario_parity_collectives() -> dict[str, Any]:
    """Items 1, 3 and 5: all_gather_coalesced in every shape, sparse all-reduce, the object
    collectives and new_subgroups, on Gloo then devccl."""
    return _on_both(
        lambda backend: _timed(
            {
                "all_gather_coalesced": _all_gather_coalesced,
                "sparse": _sparse_all_reduce,
                "objects": _object_collectives,
                "subgroups": _subgroups,
            },
            backend,
        )
    )


# -- 3, 5: training helpers -------------------------------------------------------------------------


def _ddp_sparse_embedding(backend: str) -> dict[str, Any]:
    """DDP over a model with nn.Embedding(sparse=True): its gradients are all-reduced as
    sparse COO tensors by DDP's reducer (C++)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 8, sparse=True), nn.Flatten(), nn.Linear(24, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randint(0, 40, (4 * N, 3), generator=g)[4 * RANK : 4 * RANK + 4]
        ddp(idx).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return _digest(model.parameters())


def _zero(backend: str) -> dict[str, Any]:
    """ZeroRedundancyOptimizer (Adam) under DDP, then consolidate_state_dict on rank 0."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        xb = torch.randn(4 * N, 8, generator=g)[4 * RANK : 4 * RANK + 4]
        ddp(xb).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.consolidate_state_dict(to=0)
    state: dict[str, Any] = {}
    if RANK == 0:
        sd = opt.state_dict()
        state = {
            "params": len(sd["state"]),
            "exp_avg": _digest(sd["state"][k]["exp_avg"] for k in sorted(sd["state"])),
        }
    return {"weights": _digest(model.parameters()), "state": state}


def _join(backend: str) -> dict[str, Any]:
    """DDP's join() context with uneven inputs: rank r runs 2 + 2r steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3 + RANK)
    with ddp.join():
        for _ in range(2 + 2 * RANK):
            ddp(torch.randn(3, 5, generator=g)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    return _digest(model.parameters())


# SyncBatchNorm: torch's module refuses CPU inputs in training (before any communication), and
# its functional path needs kernels torch has only for GPUs (batch_norm_stats & co.). To run
# that path's communication on CPU, these plain-torch versions stand in for the kernels.


def _shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _bn_stats(input: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return input.mean(_dims(input)), torch.rsqrt(input.var(_dims(input), unbiased=False) + eps)


def _bn_gather_stats_with_counts(
    input: torch.Tensor, mean_all: torch.Tensor, invstd_all: torch.Tensor, running_mean: Any, running_var: Any,
    momentum: float, eps: float, counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    c = counts.to(mean_all.dtype).unsqueeze(1)
    total = c.sum()
    mean = (mean_all * c).sum(0) / total
    var = ((invstd_all.pow(-2) - eps + (mean_all - mean).pow(2)) * c).sum(0) / total
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean * momentum)
    if running_var is not None:
        running_var.mul_(1 - momentum).add_(var * total / (total - 1) * momentum)
    return mean, torch.rsqrt(var + eps)


def _bn_elemt(input: torch.Tensor, weight: Any, bias: Any, mean: torch.Tensor, invstd: torch.Tensor, eps: float) -> torch.Tensor:
    s = _shape(input)
    y = (input - mean.view(s)) * invstd.view(s)
    if weight is not None:
        y = y * weight.view(s)
    if bias is not None:
        y = y + bias.view(s)
    return y


def _bn_backward_reduce(
    dy: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: Any, ig: bool, wg: bool, bg: bool
) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    sum_dy = dy.sum(_dims(dy))
    sum_dy_xmu = (dy * (input - mean.view(_shape(input)))).sum(_dims(dy))
    return sum_dy, sum_dy_xmu, (sum_dy_xmu * invstd) if wg else None, sum_dy if bg else None


def _bn_backward_elemt(
    dy: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: Any,
    sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor, count: torch.Tensor,
) -> torch.Tensor:
    s = _shape(input)
    total = count.sum().to(dy.dtype)
    w = weight.view(s) if weight is not None else 1.0
    xmu = input - mean.view(s)
    return (dy - (sum_dy / total).view(s) - xmu * (sum_dy_xmu / total * invstd * invstd).view(s)) * invstd.view(s) * w


@contextlib.contextmanager
def _cpu_batch_norm_kernels() -> Iterator[None]:
    saved = {}
    for name, fn in (
        ("batch_norm_stats", _bn_stats),
        ("batch_norm_gather_stats_with_counts", _bn_gather_stats_with_counts),
        ("batch_norm_elemt", _bn_elemt),
        ("batch_norm_backward_reduce", _bn_backward_reduce),
        ("batch_norm_backward_elemt", _bn_backward_elemt),
    ):
        saved[name] = getattr(torch, name)
        setattr(torch, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def _sync_batch_norm(backend: str) -> dict[str, Any]:
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFn

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(5 + RANK)
    inp = torch.randn(2 + RANK, 3, 4, generator=g)
    bn = nn.SyncBatchNorm(3)
    # torch refuses CPU inputs in training mode, with every backend, before communicating
    out["module_train_cpu"] = _outcome(lambda: bn(inp))
    bn.eval()
    out["module_eval_cpu"] = _t(bn(inp))
    # the functional path with a process group: torch has no CPU kernels for it ...
    weight, bias = torch.ones(3), torch.zeros(3)
    args = (weight, bias, torch.zeros(3), torch.ones(3), 1e-5, 0.1, dist.group.WORLD, N)
    out["functional_cpu_unpatched"] = _outcome(lambda: SyncBatchNormFn.apply(inp, *args))
    # ... with plain-torch kernels in their place, its communication runs (devccl:
    # all_gather_into_tensor of the stats; Gloo: all_gather; backward: all_reduce)
    with _cpu_batch_norm_kernels():
        for gname, group in (("world", dist.group.WORLD), ("full_group", dist.new_group(list(range(N))))):
            xin = inp.clone().requires_grad_(True)
            w = torch.linspace(0.5, 1.5, 3).requires_grad_(True)
            b = torch.linspace(-1, 1, 3).requires_grad_(True)
            rm, rv = torch.zeros(3), torch.ones(3)
            y = SyncBatchNormFn.apply(xin, w, b, rm, rv, 1e-5, 0.1, group, N)
            (y * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
            out[f"functional/{gname}"] = {
                "y": _t(y),
                "grad_input": _t(xin.grad),
                "grad_weight": _t(w.grad),
                "grad_bias": _t(b.grad),
                "running_mean": _t(rm),
                "running_var": _t(rv),
            }
    # reference: plain BatchNorm over the whole batch (every rank's input)
    every = [torch.randn(2 + r, 3, 4, generator=torch.Generator().manual_seed(5 + r)) for r in range(N)]
    ref = nn.functional.batch_norm(torch.cat(every), None, None, torch.linspace(0.5, 1.5, 3), torch.linspace(-1, 1, 3), True)
    start = sum(2 + r for r in range(RANK))
    out["reference_y"] = _t(ref[start : start + 2 + RANK])
    return out


def scenario_parity_training() -> dict[str, Any]:
    """Items 3 and 5: DDP with a sparse embedding, ZeroRedundancyOptimizer, DDP's join(),
    SyncBatchNorm on CPU, on Gloo then devccl."""
    torch.set_num_threads(1)
    return _on_both(
        lambda backend: _timed(
            {
                "ddp_sparse_embedding": _ddp_sparse_embedding,
                "zero": _zero,
                "join": _join,
                "sync_batch_norm": _sync_batch_norm,
            },
            backend,
        )
    )


# -- 2: receive from any source ----------------------------------------------------------------


def _any_source(backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # every other rank sends 3 messages to rank 0, which receives them without src
    if RANK == 0:
        got = []
        for _ in range(3 * (N - 1)):
            t = torch.empty(3)
            src = dist.recv(t)
            got.append([src, t.tolist()])
        out["recv_any"] = sorted(got)
    else:
        for i in range(3):
            dist.send(torch.full((3,), float(RANK * 10 + i)), 0)
    # irecv without src, with a tag, on an explicit group: the source is a global rank
    full = dist.new_group(list(range(N)))
    if RANK == 0:
        t = torch.empty(2, dtype=torch.int64)
        w = dist.irecv(t, tag=7, group=full)
        w.wait()
        out["irecv_any"] = {"src": w._source_rank(), "t": _t(t)}
    elif RANK == N - 1:
        dist.send(torch.tensor([RANK, 42]), 0, tag=7, group=full)
    # a subgroup without rank 0: group ranks differ from global ones
    if N > 2:
        sub = dist.new_group(list(range(1, N)))
        if RANK == 1:
            t = torch.empty(1)
            out["recv_any_subgroup"] = {"src": dist.recv(t, group=sub), "t": _t(t)}
        elif RANK == N - 1:
            dist.send(torch.tensor([9.0]), 1, group=sub)
    # ordering against earlier point-to-point calls: rank 0 first receives from rank 1 by
    # src (isend/irecv, batched by devccl), then from any source; rank 1 sends twice
    if RANK == 0:
        a, b = torch.empty(2), torch.empty(2)
        w1 = dist.irecv(a, 1)
        src = dist.recv(b)
        w1.wait()
        out["order"] = {"first": _t(a), "second": _t(b), "src": src}
    elif RANK == 1:
        w = dist.isend(torch.tensor([1.0, 1.0]), 0)
        w2 = dist.isend(torch.tensor([2.0, 2.0]), 0)
        w.wait()
        w2.wait()
    # complex tensors (torch passes the real view)
    if RANK == 0:
        t = torch.empty(2, dtype=torch.complex64)
        out["complex"] = {"src": dist.recv(t), "t": _t(t)}
    elif RANK == 1:
        dist.send(torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64), 0)
    # refused by both: an empty tensor (an empty send carries no message)
    if RANK == 0:
        out["err/empty"] = _outcome(lambda: dist.recv(torch.empty(0)))
    dist.barrier()
    return out


def _native_recv_any() -> dict[str, Any]:
    """devccl.Communicator.recv_any itself (blocking on a numpy array: the source; async on
    a tensor: a Work whose ``source`` is the sender)."""
    import numpy as np

    comm = dist.group.WORLD.communicator
    out: dict[str, Any] = {}
    if RANK == 0:
        a = np.zeros(3, np.float32)
        src = comm.recv_any(a)
        t = torch.zeros(2)
        w = comm.recv_any(t, 3, async_op=True)
        assert w.wait() is t
        out = {"blocking_src": src, "async_src": w.source, "values": [*a.tolist(), *t.tolist()]}
    elif RANK == 1:
        comm.send(np.array([5, 6, 7], np.float32), 0)
        comm.send(torch.tensor([8.0, 9.0]), 0, tag=3)
    dist.barrier()  # other ranks' later messages must not be the ones received here
    return out


def scenario_parity_any_source(messages: str = "100") -> dict[str, Any]:
    """Item 2: dist.recv / dist.irecv without src, on Gloo then devccl; then, on devccl,
    Communicator.recv_any itself and the race of :func:`_any_source_race`."""
    return _on_both(
        lambda backend: {"any_source": _any_source(backend)}
        | ({"native": _native_recv_any(), "race": _any_source_race(int(messages))} if backend == "devccl" else {})
    )


def _any_source_race(m: int) -> dict[str, Any]:
    """Every rank but 0 sends ``m`` tensors to rank 0 as fast as it can (blocking sends,
    every third one asynchronous); rank 0 receives them all with dist.recv without src and
    reports what it got, in order."""
    out: dict[str, Any] = {}
    if RANK == 0:
        got = []
        for _ in range(m * (N - 1)):
            t = torch.empty(4, dtype=torch.int64)
            src = dist.recv(t)
            got.append([src, *t.tolist()])
        out["got"] = got
    else:
        pending = []
        for i in range(m):
            t = torch.tensor([RANK, i, RANK * 1000 + i, -i], dtype=torch.int64)
            if i % 3 == 2:
                pending.append(dist.isend(t, 0))
            else:
                dist.send(t, 0)
        for w in pending:
            w.wait()
    dist.barrier()
    return out


def scenario_any_source_race(messages: str = "100") -> dict[str, Any]:
    """:func:`_any_source_race` on its own (devccl only)."""
    dist.init_process_group("devccl", timeout=timedelta(seconds=60))
    out = _any_source_race(int(messages))
    out["served"] = dict(dist.group.WORLD.calls)
    dist.destroy_process_group()
    return out


# -- 4: failures: timeouts and a peer that closed ---------------------------------------------------


def _error_shape(e: BaseException) -> dict[str, Any]:
    return {
        "runtime": isinstance(e, RuntimeError),
        "dist_backend_error": isinstance(e, dist.DistBackendError),
        "torch_regex": bool(TORCH_TIMEOUT_RE.search(str(e))),
        "timed_out_word": bool(re.search(r"\bTimed out\b", str(e))),
        "devccl_timeout": isinstance(e, devccl.DevcclTimeoutError),
        "devccl_remote": isinstance(e, devccl.RemoteError),
        "devccl_aborted": isinstance(e, devccl.AbortedError),
        "type": type(e).__name__,
        "msg": str(e)[:500],
    }


def _capture(fn: Callable[[], Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded
        d = _error_shape(e)
        d["took"] = time.monotonic() - t0
        return d
    return {"no_error": True}


def scenario_parity_failures(backend: str) -> dict[str, Any]:
    """Item 4 on one backend (a rank leaves the run, so each backend gets its own processes).

    1. a blocking all_reduce only rank 0 calls, on a group with a 1 s timeout, and the next
       call on that group;
    2. the same asynchronously, failing in ``wait()`` and through ``get_future()``;
    3. a peer that closed: the last rank leaves (os._exit) after a barrier; the others call
       all_reduce on the world group.
    """
    if backend == "devccl":
        import devccl.torch  # noqa: F401
    dist.init_process_group(backend, timeout=timedelta(seconds=30))
    out: dict[str, Any] = {"_hard_exit": True}
    short = timedelta(seconds=1)
    g = dist.new_group(list(range(N)), timeout=short)
    if RANK == 0:
        out["blocking"] = _capture(lambda: dist.all_reduce(torch.ones(4), group=g))
        out["next_call"] = _capture(lambda: dist.all_reduce(torch.ones(4), group=g))
    dist.barrier()  # the world group is unaffected
    g = dist.new_group(list(range(N)), timeout=short)
    if RANK == 0:
        w = dist.all_reduce(torch.ones(4), group=g, async_op=True)
        fut = w.get_future()
        out["async_wait"] = _capture(w.wait)
        out["future"] = _capture(fut.wait)
    dist.barrier()
    if RANK == N - 1:
        os._exit(0)  # a peer that closed
    time.sleep(0.5)
    out["peer_closed"] = _capture(lambda: dist.all_reduce(torch.ones(4)))
    return out
