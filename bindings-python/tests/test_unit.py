"""Single-process tests: the exception hierarchy, argument checks, the device check, a
world-of-one communicator, the rendezvous server, and the stubs."""

from __future__ import annotations

import ast
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


def test_device_check_refuses_cuda_tensors_with_a_clear_message() -> None:
    fake = SimpleNamespace(device=_FakeDevice())
    with pytest.raises(devccl.UnsupportedError) as e:
        _buffers.check_device(fake, "tensor")
    msg = str(e.value)
    assert "does not yet support CUDA tensors" in msg and "cuda:0" in msg and ".cpu()" in msg
    _buffers.check_device(SimpleNamespace(device=SimpleNamespace(type="cpu")), "tensor")


def test_device_check_on_a_real_non_cpu_tensor(comm: devccl.Communicator) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(devccl.UnsupportedError, match=r"meta tensors .*\.cpu\(\)"):
        comm.all_reduce(torch.empty(4, device="meta"))
    if torch.cuda.is_available():  # on a machine with a GPU: the real thing
        with pytest.raises(devccl.UnsupportedError, match="does not yet support CUDA tensors"):
            comm.all_reduce(torch.ones(4, device="cuda"))


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
