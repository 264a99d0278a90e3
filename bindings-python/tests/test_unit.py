"""Single-process tests: the exception hierarchy, argument checks, the device check, a
world-of-one communicator, the rendezvous server, and the stubs."""

from __future__ import annotations

import ast
import ctypes
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from harness import free_port

import devccl
from devccl import _buffers, _native


@pytest.fixture
def comm() -> Iterator[devccl.Communicator]:
    c = devccl.Communicator(0, 1, f"127.0.0.1:{free_port()}", host_rendezvous=True, init_timeout=20)
    yield c
    c.destroy()


def test_exception_hierarchy() -> None:
    assert issubclass(devccl.DevcclError, RuntimeError)
    assert issubclass(devccl.InvalidUsageError, ValueError)
    assert issubclass(devccl.DTypeError, devccl.InvalidUsageError) and issubclass(devccl.DTypeError, TypeError)
    assert issubclass(devccl.MismatchError, devccl.RemoteError)
    for e in (devccl.DevcclTimeoutError, devccl.AbortedError, devccl.UnsupportedError, devccl.DevcclSystemError, devccl.InternalError):
        assert issubclass(e, devccl.DevcclError)
    assert devccl.AbortedError.__module__ == "devccl"


def test_dtypes_and_ops() -> None:
    assert devccl.dtypes() == [
        "float32",
        "float64",
        "float16",
        "bfloat16",
        "int8",
        "uint8",
        "int32",
        "int64",
        "uint32",
        "uint64",
        "float8_e4m3fn",
        "float8_e5m2",
    ]
    assert devccl.reduce_ops() == ["sum", "prod", "min", "max", "avg"]


class _FakeDevice:
    type = "cuda"

    def __str__(self) -> str:
        return "cuda:0"


def test_device_check_accepts_cpu_and_cuda_refuses_other_devices() -> None:
    _buffers.check_device(SimpleNamespace(device=_FakeDevice()), "tensor")
    _buffers.check_device(SimpleNamespace(device=SimpleNamespace(type="cpu")), "tensor")
    with pytest.raises(devccl.UnsupportedError) as e:
        _buffers.check_device(SimpleNamespace(device=SimpleNamespace(type="xpu")), "tensor")
    assert "xpu tensors" in str(e.value) and ".cpu()" in str(e.value) and ".cuda()" in str(e.value)


def test_device_check_on_a_real_non_cpu_tensor(comm: devccl.Communicator) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(devccl.UnsupportedError, match=r"meta tensors .*\.cpu\(\)"):
        comm.all_reduce(torch.empty(4, device="meta"))


def _cuda_driver_present() -> bool:
    """True when libcuda can be loaded: then fake device pointers must never reach devccl."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class _FakeCudaArray:
    """An object exposing CUDA memory the way cupy or numba do (__cuda_array_interface__ and a
    device). Its pointer is made up: only use it where devccl fails before touching memory
    (argument checks, or no CUDA driver), or with zero elements."""

    def __init__(
        self,
        n: int,
        typestr: str = "<f4",
        *,
        device: object = 0,
        strides: tuple[int, ...] | None = None,
        readonly: bool = False,
        ptr: int = 0x7F00_0000_0000,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        if device is not None:
            self.device = device
        self.__cuda_array_interface__ = {
            "shape": shape or (n,),
            "typestr": typestr,
            "data": (ptr if n else 0, readonly),
            "strides": strides,
            "version": 3,
        }


def test_cuda_memory_without_a_driver_is_unsupported(comm: devccl.Communicator) -> None:
    if _cuda_driver_present():
        pytest.skip("a CUDA driver is present here: the no-driver path cannot be exercised with fake pointers")
    for call in (
        lambda: comm.all_reduce(_FakeCudaArray(8)),
        lambda: comm.native.collective("all_reduce", _FakeCudaArray(8), stream=7),
        lambda: comm.all_gather(_FakeCudaArray(8), _FakeCudaArray(8, ptr=0x7F00_0001_0000), async_op=True),
        lambda: comm.p2p_batch([(True, 0, 0, _FakeCudaArray(4))]),
    ):
        with pytest.raises(devccl.UnsupportedError, match="no CUDA driver"):
            call()
    assert comm.poisoned is None
    comm.all_reduce(np.ones(2, np.float32))  # the communicator is still usable


def test_cuda_memory_argument_errors_before_any_device_is_touched(comm: devccl.Communicator) -> None:
    host = np.zeros(8, np.float32)
    with pytest.raises(devccl.InvalidUsageError, match=r"host memory but output is CUDA memory on cuda:0.*\.cpu\(\)"):
        comm.all_reduce(host, out=_FakeCudaArray(8))
    with pytest.raises(devccl.InvalidUsageError, match="cuda:0 but output is CUDA memory on cuda:1"):
        comm.all_gather(_FakeCudaArray(16, device=1), _FakeCudaArray(8))
    with pytest.raises(devccl.InvalidUsageError, match="every buffer of a call must live on one device"):
        comm.p2p_batch([(True, 0, 0, host), (False, 0, 0, _FakeCudaArray(8))])
    with pytest.raises(devccl.InvalidUsageError, match="not C-contiguous"):
        comm.all_reduce(_FakeCudaArray(12, shape=(3, 4), strides=(4, 12)))
    with pytest.raises(devccl.InvalidUsageError, match="read-only"):
        comm.all_reduce(_FakeCudaArray(8, readonly=True))
    with pytest.raises(devccl.InvalidUsageError, match="which CUDA device"):
        comm.all_reduce(_FakeCudaArray(8, device=None))
    with pytest.raises(devccl.InvalidUsageError, match="which CUDA device"):
        comm.all_reduce(_FakeCudaArray(8, device=SimpleNamespace(index=None)))
    with pytest.raises(devccl.DTypeError, match="'<c8'"):
        comm.all_reduce(_FakeCudaArray(8, "<c8"))
    with pytest.raises(devccl.DTypeError, match="dtype=float was given"):
        comm.all_reduce(_FakeCudaArray(8, "<i4"), dtype="f32")
    bad = _FakeCudaArray(8)
    bad.__cuda_array_interface__["mask"] = object()
    with pytest.raises(devccl.InvalidUsageError, match="masked"):
        comm.all_reduce(bad)
    bad.__cuda_array_interface__ = [1, 2]
    with pytest.raises(devccl.InvalidUsageError, match="not a dict"):
        comm.all_reduce(bad)
    with pytest.raises(devccl.InvalidUsageError, match="stream= orders calls on CUDA memory"):
        comm.all_reduce(host, stream=5)
    with pytest.raises(devccl.InvalidUsageError, match="stream= orders calls on CUDA memory"):
        comm.p2p_batch([(True, 0, 0, host)], stream=5)
    with pytest.raises(devccl.InvalidUsageError, match="host memory"):
        comm.all_reduce(host, async_op=True).hold(3)
    assert comm.poisoned is None


def test_empty_cuda_buffers_need_no_device(comm: devccl.Communicator) -> None:
    """Zero-length CUDA operands run as host calls (nothing to order on a device), so this
    works with or without a driver; hold() then has nothing to wait for."""
    e = _FakeCudaArray(0, device=SimpleNamespace(index=0))
    assert comm.all_reduce(e) is e
    out = _FakeCudaArray(0)
    w = comm.all_gather(out, _FakeCudaArray(0), async_op=True, stream=11)
    assert w.stream == 11
    assert w.hold() is out  # orders nothing: there is no device work
    assert w.wait() is out
    assert w.is_completed() and w.is_success()
    w.hold(12)  # after completion: nothing to do
    assert comm.all_reduce(np.ones(1, np.float32), async_op=True).stream is None


def test_new_dtypes_in_a_world_of_one(comm: devccl.Communicator) -> None:
    for dt in (np.uint32, np.uint64):
        a = np.array([1, 2**31 + 5, np.iinfo(dt).max], dt)
        comm.all_reduce(a, "max")
        assert list(a) == [1, 2**31 + 5, np.iinfo(dt).max]
        out = np.zeros(3, dt)
        comm.all_gather(out, a)
        assert (out == a).all()
    bits = np.array([0x38, 0x40, 0x7E], np.uint8)  # fp8 e4m3: 1.0, 2.0, 448.0
    comm.all_reduce(bits, "sum", dtype="float8_e4m3fn")
    assert list(bits) == [0x38, 0x40, 0x7E]
    with pytest.raises(devccl.DTypeError, match="1-byte"):
        comm.all_reduce(np.zeros(2, np.uint16), dtype="f8e5m2")
    with pytest.raises(devccl.DTypeError, match="dtype=f8e4m3 was given"):
        comm.all_reduce(np.zeros(2, np.float32).view(np.int32), dtype="f8e4m3")


def test_new_dtypes_of_cpu_tensors(comm: devccl.Communicator) -> None:
    torch = pytest.importorskip("torch")
    for dt, name in (
        (torch.uint32, "uint32"),
        (torch.uint64, "uint64"),
        (torch.float8_e4m3fn, "f8e4m3"),
        (torch.float8_e5m2, "f8e5m2"),
        (torch.bfloat16, "bf16"),
        (torch.float32, "float32"),
    ):
        t = torch.arange(6, dtype=torch.float32).to(dt)
        o = _buffers.as_buffer(t, "t")
        assert o.dtype == name and o.device is None, (dt, o)
        before = t.view(torch.uint8).clone()
        assert comm.all_reduce(t, "max") is t
        assert torch.equal(t.view(torch.uint8), before), dt
        out = torch.empty(6, dtype=dt)
        comm.all_gather(out, t)
        assert torch.equal(out.view(torch.uint8), before), dt
    with pytest.raises(devccl.DTypeError, match="float8_e4m3fn"):
        comm.all_reduce(torch.zeros(2, dtype=torch.int16))


def test_mixed_devices_are_refused_by_name() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(devccl.InvalidUsageError, match="input is on cpu but output is on meta"):
        _buffers.as_buffers(torch.zeros(2), "input", torch.empty(2, device="meta"), "output")
    import devccl.torch as dt

    with pytest.raises(devccl.InvalidUsageError, match="tensors on cpu and cuda:0.*one device"):
        dt._call_device([torch.zeros(2), SimpleNamespace(device=torch.device("cuda", 0))], "allreduce")  # type: ignore[list-item]
    assert dt._call_device([torch.zeros(2)]) is None
    cuda_like = SimpleNamespace(device=torch.device("cuda", 1))
    assert dt._call_device([cuda_like, cuda_like]) == torch.device("cuda", 1)  # type: ignore[list-item]


def test_world_of_one(comm: devccl.Communicator) -> None:
    assert (comm.rank, comm.world_size, comm.group) == (0, 1, "world")
    assert len(comm.comm_id) == 32 and comm.poisoned is None
    x = np.arange(5, dtype=np.float32)
    assert comm.all_reduce(x) is x
    assert (x == np.arange(5)).all()
    out = np.zeros(5, np.float32)
    assert comm.all_gather(out, x) is out and (out == x).all()
    w = comm.all_reduce(x, "max", async_op=True)
    assert w.wait() is x and w.is_completed() and w.is_success()
    assert w.wait() is x  # waiting twice is fine
    comm.barrier()
    comm.barrier(async_op=True).wait()


def test_bf16_as_uint16_with_dtype(comm: devccl.Communicator) -> None:
    bits = np.array([0x3F80, 0x4000], np.uint16)  # 1.0, 2.0 in bf16
    comm.all_reduce(bits, "sum", dtype="bf16")
    assert list(bits) == [0x3F80, 0x4000]
    with pytest.raises(devccl.DTypeError, match="2-byte"):
        comm.all_reduce(bits, dtype="float32")


def test_local_argument_errors(comm: devccl.Communicator) -> None:
    a = np.zeros(8, np.float32)
    with pytest.raises(devccl.InvalidUsageError, match="overlap partially"):
        comm.all_reduce(a[0:4], out=a[2:6])
    a[:] = np.arange(8)
    comm.reduce_scatter(a[0:4], a[0:4])  # output is this rank's block of the input
    assert (a == np.arange(8)).all()
    with pytest.raises(devccl.InvalidUsageError, match="not C-contiguous"):
        comm.all_reduce(np.zeros((3, 3), np.float64)[:, :2])
    f = np.zeros((2, 2), np.float32, order="F")
    with pytest.raises(devccl.InvalidUsageError, match="not C-contiguous"):
        comm.all_reduce(f)
    with pytest.raises(devccl.DTypeError, match="'>f'"):
        comm.all_reduce(np.zeros(2, ">f4"))
    with pytest.raises(devccl.DTypeError, match="unknown dtype"):
        comm.all_reduce(a, dtype="float8")
    with pytest.raises(devccl.InvalidUsageError, match="unknown collective"):
        comm.native.collective("all_shuffle", a)
    with pytest.raises(devccl.InvalidUsageError, match="send_counts"):
        comm.native.collective("all_to_all_v", a, a.copy())
    with pytest.raises(ValueError, match="timeout"):
        comm.all_reduce(a, async_op=True)._native.wait(-1)
    assert comm.poisoned is None
    comm.all_reduce(a)  # still usable


def test_other_buffer_types(comm: devccl.Communicator) -> None:
    b = bytearray(b"\x01\x02\x03")
    comm.broadcast(b)
    assert bytes(b) == b"\x01\x02\x03"
    out = bytearray(3)
    comm.all_gather(out, memoryview(b))
    assert out == b
    with pytest.raises(devccl.InvalidUsageError, match="read-only"):
        comm.all_reduce(b"abc")


def test_destroy_is_idempotent_and_later_calls_raise() -> None:
    c = devccl.Communicator(0, 1, f"127.0.0.1:{free_port()}", host_rendezvous=True)
    c.destroy()
    c.destroy()
    c.abort("nothing left to abort")
    assert c.native.destroyed and "destroyed" in repr(c)
    with pytest.raises(devccl.InvalidUsageError, match="destroyed"):
        c.all_reduce(np.zeros(2, np.float32))


def test_abort_then_every_call_raises(comm: devccl.Communicator) -> None:
    comm.abort("unit test")
    assert "unit test" in comm.poisoned
    with pytest.raises(devccl.AbortedError, match="unit test"):
        comm.all_reduce(np.zeros(2, np.float32))
    with pytest.raises(devccl.AbortedError):
        comm.barrier(async_op=True).wait()


def test_from_env_needs_launcher_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(devccl.InvalidUsageError, match="RANK and WORLD_SIZE"):
        devccl.init()


def test_bad_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVCCL_NSOCKS", "many")
    with pytest.raises(devccl.InvalidUsageError, match="DEVCCL_NSOCKS"):
        devccl.Communicator(0, 1, f"127.0.0.1:{free_port()}", host_rendezvous=True)


def test_bad_arguments() -> None:
    with pytest.raises(devccl.InvalidUsageError, match="not below"):
        devccl.Communicator(3, 2, "127.0.0.1:1")
    with pytest.raises(devccl.InvalidUsageError, match="timeout"):
        devccl.Communicator(0, 1, "127.0.0.1:1", timeout=-1)


def test_rendezvous_server() -> None:
    s = devccl.RendezvousServer("127.0.0.1:0")
    assert s.port > 0 and s.address == f"127.0.0.1:{s.port}"
    c = devccl.Communicator(0, 1, s.address, group="g")
    assert c.group == "g"
    c.destroy()
    s.shutdown()
    s.shutdown()
    assert "stopped" in repr(s)
    with pytest.raises(devccl.InvalidUsageError):
        devccl.RendezvousServer("no-port-here")


def test_reduce_op_mapping() -> None:
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    from devccl.torch import reduce_op_name

    R = dist.ReduceOp
    assert [reduce_op_name(o) for o in (R.SUM, R.AVG, R.PRODUCT, R.MIN, R.MAX)] == ["sum", "avg", "prod", "min", "max"]
    opts = dist.AllreduceOptions()
    opts.reduceOp = R.MAX
    assert reduce_op_name(opts.reduceOp) == "max"
    with pytest.raises(devccl.UnsupportedError, match="PREMUL_SUM.*scale"):
        reduce_op_name(dist._make_nccl_premul_sum(2.0))
    for o in (R.BAND, R.BOR, R.BXOR):
        with pytest.raises(devccl.UnsupportedError, match="does not support ReduceOp"):
            reduce_op_name(o)
    assert "devccl" in dist.Backend.backend_list
    assert torch.__version__.split("+")[0] in __import__("devccl.torch").torch.TESTED_TORCH_VERSIONS


def test_torch_errors_are_devccl_and_dist_backend_errors() -> None:
    """Failures while a collective ran reach torch users as classes that are devccl's own and
    torch.distributed.DistBackendError (a RuntimeError), with a torch-shaped message prefix
    (" Timed out " / " closed ", which torch's tests and users match) before devccl's text;
    argument errors stay as they are."""
    pytest.importorskip("torch")
    import re
    from datetime import timedelta

    import torch.distributed as dist

    import devccl.torch as dt

    torch_re = re.compile(r" (Timed out|closed|timeout) ")
    cases = [
        (devccl.DevcclTimeoutError("timed out after 2s: rank 0 in all_reduce"), dt.DistTimeoutError, "Timed out waiting for allreduce to complete"),
        (devccl.RemoteError("remote error from rank 1: rank 1 closed its connection (process exited?)"), dt.DistRemoteError, "Connection closed by peer during allreduce"),
        (devccl.MismatchError("collective mismatch: rank 0 called x but rank 1 called y"), dt.DistMismatchError, "allreduce failed"),
        (devccl.AbortedError("communicator aborted: timed out after 2s: x"), dt.DistAbortedError, "allreduce failed: the group was aborted after an earlier timeout"),
        (devccl.AbortedError("communicator aborted: torch ProcessGroup.abort()"), dt.DistAbortedError, "allreduce failed"),
        (devccl.DevcclSystemError("system error: x"), dt.DistSystemError, "allreduce failed"),
        (devccl.InternalError("internal error: x"), dt.DistInternalError, "allreduce failed"),
        (devccl.DevcclError("x"), dt.DevcclBackendError, "allreduce failed"),
    ]
    for e, cls, head in cases:
        out = dt._dist_error(e, "allreduce", 3)
        assert type(out) is cls, (e, out)
        assert isinstance(out, type(e)) and isinstance(out, dist.DistBackendError) and isinstance(out, RuntimeError)
        assert str(out).startswith(f"[devccl rank 3] {head}") and str(out).endswith(str(e)), str(out)
        assert dt._dist_error(out, "allreduce", 3) is out
    assert issubclass(dt.DistMismatchError, dt.DistRemoteError)
    assert torch_re.search(str(dt._dist_error(cases[0][0], "allreduce", 0)))
    assert torch_re.search(str(dt._dist_error(cases[1][0], "allreduce", 0)))
    assert torch_re.search(str(dt._dist_error(cases[3][0], "allreduce", 0)))
    for e in (devccl.InvalidUsageError("x"), devccl.DTypeError("x"), devccl.UnsupportedError("x"), ValueError("x")):
        assert dt._dist_error(e, "allreduce", 0) is e
    # Work.wait(timeout) on a call that has not finished
    w = dt._Work(None)
    with pytest.raises(dt.DistTimeoutError, match=r"^\[devccl\] Timed out waiting 0.05 s"):
        w.wait(timedelta(seconds=0.05))


def test_stub_matches_the_module() -> None:
    stub = Path(_native.__file__).with_name("_native.pyi")
    if not stub.exists():
        stub = Path(devccl.__file__).with_name("_native.pyi")
    tree = ast.parse(stub.read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert names, "no definitions in the stub"
    for name in names:
        assert hasattr(_native, name), f"stub names {name}, the module lacks it"
    public = {n for n in dir(_native) if not n.startswith("_")}
    assert public <= names | {"CollectiveKind"}, f"undocumented in the stub: {public - names}"
    for cls in ("Communicator", "Work", "RendezvousServer"):
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        stubbed = {f.name for f in node.body if isinstance(f, ast.FunctionDef)} - {"__new__"}
        real = {n for n in dir(getattr(_native, cls)) if not n.startswith("_")}
        assert stubbed == real, (cls, stubbed ^ real)
    assert (Path(devccl.__file__).parent / "py.typed").exists()



def test_rank0_rendezvous_failure_is_published_to_the_other_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    import torch.distributed as dist

    import devccl.torch as dt

    def no_route(store: object) -> str:
        raise OSError("no route to the test host")

    monkeypatch.setattr(dt, "_advertised_host", no_route)
    store = dist.HashStore()
    with pytest.raises(devccl.InvalidUsageError, match="no route"):
        dt._connect(store, 0, 2, None)
    with pytest.raises(devccl.RemoteError, match="rank 0 of this process group could not start.*no route"):
        dt._connect(store, 1, 2, None)


class _FakeStream:
    """Stands for a torch.cuda.Stream in the simulated CUDA test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cuda_stream = 0x1000 + len(name)
        self.waited: list[object] = []

    def wait_event(self, ev: object) -> None:
        self.waited.append(ev)


class _FakeEvent:
    def __init__(self) -> None:
        self.recorded_on: _FakeStream | None = None
        self.synced = False

    def record(self, s: _FakeStream) -> None:
        self.recorded_on = s

    def synchronize(self) -> None:
        self.synced = True


def test_torch_backend_cuda_stream_logic_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's CUDA path without a GPU: CPU tensors are declared CUDA, torch's stream
    API is replaced by recorders and devccl's stream-ordered calls by host calls whose hold()
    is logged. Checks which stream each call is ordered after and when streams are held:
    blocking calls hold the current stream at once, async Works in wait() (the then-current
    stream), copy-out steps run on the side stream after holding it, completion waits for
    them, C++ callers get a Work that blocks until done. The GPU tests check the real thing."""
    torch = pytest.importorskip("torch")
    import contextlib
    from datetime import timedelta

    import torch.distributed as dist

    import devccl.torch as dt

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    log: list[tuple[object, ...]] = []
    default, other = _FakeStream("default"), _FakeStream("other")
    cur = [default]

    @contextlib.contextmanager
    def stream_ctx(s: _FakeStream) -> Iterator[None]:
        prev, cur[0] = cur[0], s
        try:
            yield
        finally:
            cur[0] = prev

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: cur[0])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(("record", s.name)))
    monkeypatch.setattr(dt, "_call_device", lambda tensors, what="": torch.device("cuda", 0) if tensors else None)
    real_unflatten = dt._unflatten_into

    def unflatten(flat: object, tensors: object) -> None:
        log.append(("post", cur[0].name))
        real_unflatten(flat, tensors)  # type: ignore[arg-type]

    monkeypatch.setattr(dt, "_unflatten_into", unflatten)

    class Held:
        def __init__(self, w: devccl.Work) -> None:
            self.w = w

        def hold(self, s: int) -> None:
            log.append(("hold", s))

        def wait(self, timeout: float | None = None) -> object:
            return self.w.wait(timeout)

    class Comm:
        def __init__(self, real: devccl.Communicator) -> None:
            self.real = real

        def __getattr__(self, name: str) -> object:
            method = getattr(self.real, name)

            def call(*a: object, stream: int | None = None, **kw: object) -> object:
                if name == "barrier" or stream is None:
                    return method(*a, **kw)
                log.append((name, stream))
                work = method(*a, **kw)
                # On a GPU the copy-out step waits for the call on the side stream; here it runs
                # at launch, so the (host) call must have finished by then.
                work.wait()
                return Held(work)

            return call

    pg = dt.ProcessGroupDevccl(dist.HashStore(), 0, 1, timedelta(seconds=20))
    pg._comm = Comm(pg._comm)  # type: ignore[assignment]
    side = pg._side_stream(torch.device("cuda", 0))
    try:
        sync = dist.AllreduceOptions()
        sync.asyncOp = False
        t = torch.ones(4)
        w = pg.allreduce([t], sync)
        assert log == [("all_reduce", default.cuda_stream), ("hold", default.cuda_stream)], log
        log.clear()
        with stream_ctx(other):
            w.wait()  # c10d waits on blocking calls too: holds the current stream, never blocks
        assert log == [("hold", other.cuda_stream)], log
        log.clear()
        # async from Python's dist.*: nothing held at launch; wait() holds the then-current stream
        monkeypatch.setattr(dt, "_called_from_c10d_python", lambda: True)
        a = dist.AllreduceOptions()
        a.asyncOp = True
        w = pg.allreduce([torch.ones(4)], a)
        assert log == [("all_reduce", default.cuda_stream)], log
        log.clear()
        with stream_ctx(other):
            w.wait()
        assert log == [("hold", other.cuda_stream)], log
        assert w.get_future().wait()[0].tolist() == [1.0] * 4
        deadline = time.monotonic() + 20
        while not w.is_completed():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        log.clear()
        # a list output: the copy-out runs on the side stream after holding it; waits use its event
        outs = [torch.zeros(3)]
        w = pg.allgather([outs], [torch.full((3,), 5.0)], a)
        assert log[0] == ("all_gather", default.cuda_stream), log
        assert log[1] == ("hold", side.cuda_stream) and log[2] == ("post", "side"), log
        assert {e for e in log[3:]} <= {("record", "side")} and len(log) > 3, log
        assert w.get_future().wait()[0][0].tolist() == [5.0] * 3
        event = w._cuda.event
        assert isinstance(event, _FakeEvent) and event.recorded_on is side and event.synced
        log.clear()
        with stream_ctx(other):
            w.wait()
        assert log == [] and other.waited[-1] is event
        # allgather_coalesced (torch's nesting: a list per rank): one all-gather ordered after
        # the current stream, the copy-out on the side stream after holding it
        log.clear()
        lists = [[torch.zeros(2), torch.zeros(1)]]
        w = pg.allgather_coalesced(lists, [torch.full((2,), 4.0), torch.full((1,), 6.0)], a)
        assert log[:2] == [("all_gather", default.cuda_stream), ("hold", side.cuda_stream)], log
        assert {e for e in log[2:]} == {("record", "side")}, log
        w.get_future().wait()
        assert lists[0][0].tolist() == [4.0, 4.0] and lists[0][1].tolist() == [6.0]
        # a sparse COO all-reduce runs blocking calls on the current stream: the same code
        # serves CUDA tensors; its Work is complete on return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse invariant checks")
            sp = torch.sparse_coo_tensor([[1, 1]], [1.0, 2.0], (3,), check_invariants=False)
        w = pg.allreduce([sp], a)
        assert w.is_completed() and sp.is_coalesced() and sp.to_dense().tolist() == [0.0, 3.0, 0.0]
        # a C++ caller (DDP's reducer): its Work blocks until the collective finished
        monkeypatch.setattr(dt, "_called_from_c10d_python", lambda: False)
        log.clear()
        t = torch.full((2,), 3.0)
        cw = pg.allreduce([t], a)
        assert log == [("all_reduce", default.cuda_stream)], log
        assert cw.wait() and cw.get_future().value()[0].tolist() == [3.0, 3.0]
    finally:
        pg.shutdown()
