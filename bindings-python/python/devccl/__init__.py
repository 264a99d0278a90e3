"""devccl: collective communication (all-reduce and friends) for numpy arrays and PyTorch tensors.

Under a launcher (``torchrun``, ``devccl launch``, ``srun``, ``mpirun``)::

    import numpy as np, devccl

    comm = devccl.init()                      # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    x = np.full(1024, comm.rank, dtype=np.float32)
    comm.all_reduce(x)                        # in place, sum; the GIL is released meanwhile
    work = comm.all_reduce(x, op="max", async_op=True)
    work.wait()

Every collective takes C-contiguous numpy arrays, CPU torch tensors (zero-copy), or other
buffer-protocol objects. Argument order follows torch.distributed: outputs first.

``import devccl.torch`` registers the torch.distributed backend ``"devccl"``
(``dist.init_process_group("devccl")``).

Errors are :class:`DevcclError` subclasses carrying devccl's full message: caller mistakes
are :class:`InvalidUsageError` (also a ``ValueError``; element-type problems are
:class:`DTypeError`, also a ``TypeError``); peers that disagree raise :class:`MismatchError`
on every rank; :class:`DevcclTimeoutError` when nothing progresses within DEVCCL_TIMEOUT;
:class:`AbortedError` after ``abort()`` on any rank or an earlier failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, Literal

from . import _native
from ._buffers import as_buffer, as_buffers
from ._native import (
    AbortedError,
    DevcclError,
    DevcclSystemError,
    DevcclTimeoutError,
    DTypeError,
    InternalError,
    InvalidUsageError,
    MismatchError,
    RemoteError,
    RendezvousServer,
    UnsupportedError,
)

__version__: str = _native.__version__

__all__ = [
    "AbortedError",
    "Communicator",
    "DTypeError",
    "DevcclError",
    "DevcclSystemError",
    "DevcclTimeoutError",
    "InternalError",
    "InvalidUsageError",
    "MismatchError",
    "ReduceOpName",
    "RemoteError",
    "RendezvousServer",
    "UnsupportedError",
    "Work",
    "dtypes",
    "init",
    "reduce_ops",
]

#: Reduction operators: sum, prod, min, max, avg (sum divided once by the world size;
#: integers truncate toward zero).
ReduceOpName = Literal["sum", "prod", "min", "max", "avg"]


def dtypes() -> list[str]:
    """The element types devccl supports."""
    return _native.dtypes()


def reduce_ops() -> list[str]:
    """The reduction operators devccl supports."""
    return _native.reduce_ops()


class Work:
    """An asynchronous collective. ``wait()`` returns the call's output (the tensor or array
    passed as output, or the in-place buffer) or raises its error.

    Dropping a Work does not cancel the collective; its buffers stay alive until it finished.
    Do not read or write the buffers before ``wait()`` returned.
    """

    __slots__ = ("_native", "_post", "_result")

    def __init__(self, native: _native.Work, result: Any, post: Callable[[], None] | None = None) -> None:
        self._native = native
        self._result = result
        self._post = post

    def wait(self, timeout: float | None = None) -> Any:
        """Block (without the GIL) until the collective finished; return its output.

        With ``timeout`` (seconds), raise the built-in ``TimeoutError`` if it has not finished
        by then (the work keeps running and can be waited on again).
        """
        self._native.wait(timeout)
        post, self._post = self._post, None
        if post is not None:
            post()
        return self._result

    def is_completed(self) -> bool:
        """True once the collective finished, successfully or not. Never blocks."""
        return self._native.is_completed()

    def is_success(self) -> bool:
        """True when the collective finished without error. Never blocks."""
        return self._native.is_success()

    def __repr__(self) -> str:
        return f"<devccl.Work {'completed' if self.is_completed() else 'pending'}>"


def _displs(counts: Sequence[int]) -> list[int]:
    return [0, *accumulate(counts)][:-1]


class Communicator:
    """A group of ranks running collectives together.

    ``Communicator(rank, world_size, "host:port", host_rendezvous=(rank == 0))`` joins
    explicitly; :func:`init` / :meth:`from_env` read the launcher's environment. Collectives
    on one communicator run in the order they were issued on each rank (blocking and
    asynchronous calls alike), and every rank must issue the same sequence.

    All methods taking buffers accept C-contiguous numpy arrays and CPU torch tensors of
    float32, float64, float16, bfloat16, int8, uint8, int32 or int64. Blocking calls return
    the output; ``async_op=True`` returns a :class:`Work`.
    """

    __slots__ = ("_comm",)

    def __init__(
        self,
        rank: int,
        world_size: int,
        rendezvous: str,
        *,
        host_rendezvous: bool = False,
        group: str = "world",
        local_world_size: int | None = None,
        timeout: float | None = None,
        init_timeout: float | None = None,
    ) -> None:
        """Join through the rendezvous at ``rendezvous`` (``host:port``); with
        ``host_rendezvous=True`` this process also serves it there. ``timeout`` and
        ``init_timeout`` (seconds) override DEVCCL_TIMEOUT and DEVCCL_INIT_TIMEOUT."""
        self._comm = _native.Communicator(
            rank,
            world_size,
            rendezvous,
            host_rendezvous=host_rendezvous,
            group=group,
            local_world_size=local_world_size,
            timeout=timeout,
            init_timeout=init_timeout,
        )

    @classmethod
    def from_env(cls) -> Communicator:
        """Join the communicator the launcher's environment describes (see :func:`init`)."""
        self = cls.__new__(cls)
        self._comm = _native.Communicator.from_env()
        return self

    # -- properties ---------------------------------------------------------------------------

    @property
    def native(self) -> _native.Communicator:
        """The native communicator (buffer-protocol objects only)."""
        return self._comm

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._comm.rank

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self._comm.world_size

    @property
    def group(self) -> str:
        """The rendezvous group name."""
        return self._comm.group

    @property
    def comm_id(self) -> str:
        """The communicator's id (the same on every rank), hex."""
        return self._comm.comm_id

    @property
    def poisoned(self) -> str | None:
        """Why the communicator is unusable (aborted or failed), or None."""
        return self._comm.poisoned

    # -- plumbing -----------------------------------------------------------------------------

    def _run(
        self,
        kind: str,
        inp: Any,
        out: Any,
        dtype: str | None,
        result: Any,
        async_op: bool,
        **kw: Any,
    ) -> Any:
        if async_op:
            return Work(self._comm.collective(kind, inp, out, dtype=dtype, async_op=True, **kw), result)
        self._comm.collective(kind, inp, out, dtype=dtype, **kw)
        return result

    # -- collectives --------------------------------------------------------------------------
    #
    # ``dtype`` names the element type when the buffers' format does not say it: numpy has no
    # bfloat16, so pass bf16 data as a uint16/int16 array with dtype="bf16". Torch tensors
    # never need it.

    def all_reduce(
        self,
        tensor: Any,
        op: ReduceOpName = "sum",
        *,
        out: Any = None,
        dtype: str | None = None,
        async_op: bool = False,
    ) -> Any:
        """Every rank gets the reduction of every rank's ``tensor``: in place, or into ``out``
        (same size and dtype) when given."""
        if out is None:
            b, dt = as_buffer(tensor, "tensor")
            return self._run("all_reduce", b, None, dtype or dt, tensor, async_op, op=op)
        bi, bo, dt = as_buffers(tensor, "tensor", out, "out")
        return self._run("all_reduce", bi, bo, dtype or dt, out, async_op, op=op)

    def broadcast(self, tensor: Any, root: int = 0, *, dtype: str | None = None, async_op: bool = False) -> Any:
        """Every rank's ``tensor`` becomes ``root``'s (in place)."""
        b, dt = as_buffer(tensor, "tensor")
        return self._run("broadcast", b, None, dtype or dt, tensor, async_op, root=root)

    def reduce(
        self,
        tensor: Any,
        root: int = 0,
        op: ReduceOpName = "sum",
        *,
        out: Any = None,
        dtype: str | None = None,
        async_op: bool = False,
    ) -> Any:
        """``root`` gets the reduction of every rank's ``tensor`` (in place, or into ``out``
        on the root). Other ranks' tensors are not modified."""
        if out is None:
            b, dt = as_buffer(tensor, "tensor")
            return self._run("reduce", b, None, dtype or dt, tensor, async_op, op=op, root=root)
        bi, bo, dt = as_buffers(tensor, "tensor", out, "out")
        return self._run("reduce", bi, bo, dtype or dt, out, async_op, op=op, root=root)

    def all_gather(self, output: Any, input: Any, *, dtype: str | None = None, async_op: bool = False) -> Any:
        """``output`` (world_size × len(input) elements) gets every rank's ``input`` in rank
        order. In place: pass this rank's block of ``output`` as ``input``."""
        bi, bo, dt = as_buffers(input, "input", output, "output")
        return self._run("all_gather", bi, bo, dtype or dt, output, async_op)

    def reduce_scatter(
        self,
        output: Any,
        input: Any,
        op: ReduceOpName = "sum",
        *,
        dtype: str | None = None,
        async_op: bool = False,
    ) -> Any:
        """Rank r's ``output`` gets the reduction of block r of every rank's ``input``
        (world_size × len(output) elements)."""
        bi, bo, dt = as_buffers(input, "input", output, "output")
        return self._run("reduce_scatter", bi, bo, dtype or dt, output, async_op, op=op)

    def all_to_all(self, output: Any, input: Any, *, dtype: str | None = None, async_op: bool = False) -> Any:
        """Block j of rank i's ``input`` goes to block i of rank j's ``output`` (equal blocks;
        ``output`` may be ``input`` for the in-place form)."""
        if output is input:
            b, dt = as_buffer(input, "input")
            return self._run("all_to_all", b, None, dtype or dt, output, async_op)
        bi, bo, dt = as_buffers(input, "input", output, "output")
        return self._run("all_to_all", bi, bo, dtype or dt, output, async_op)

    def all_to_all_v(
        self,
        output: Any,
        input: Any,
        output_counts: Sequence[int],
        input_counts: Sequence[int],
        *,
        output_displs: Sequence[int] | None = None,
        input_displs: Sequence[int] | None = None,
        dtype: str | None = None,
        async_op: bool = False,
    ) -> Any:
        """All-to-all with per-rank element counts: ``input_counts[j]`` elements starting at
        ``input_displs[j]`` go to rank j, whose ``output`` receives them at its
        ``output_displs[i]``. Displacements default to the counts' prefix sums."""
        bi, bo, dt = as_buffers(input, "input", output, "output")
        return self._run(
            "all_to_all_v",
            bi,
            bo,
            dtype or dt,
            output,
            async_op,
            send_counts=list(input_counts),
            send_displs=list(input_displs) if input_displs is not None else _displs(input_counts),
            recv_counts=list(output_counts),
            recv_displs=list(output_displs) if output_displs is not None else _displs(output_counts),
        )

    def gather(
        self, input: Any, output: Any = None, root: int = 0, *, dtype: str | None = None, async_op: bool = False
    ) -> Any:
        """``root``'s ``output`` (world_size × len(input) elements) gets every rank's
        ``input`` in rank order; ``output`` is only needed on the root."""
        bi, bo, dt = as_buffers(input, "input", output, "output")
        return self._run("gather", bi, bo, dtype or dt, output, async_op, root=root)

    def scatter(
        self, output: Any, input: Any = None, root: int = 0, *, dtype: str | None = None, async_op: bool = False
    ) -> Any:
        """Rank r's ``output`` gets block r of ``root``'s ``input`` (world_size × len(output)
        elements); ``input`` is only needed on the root."""
        bi, bo, dt = as_buffers(input, "input", output, "output")
        return self._run("scatter", bi, bo, dtype or dt, output, async_op, root=root)

    def send(self, tensor: Any, peer: int, tag: int = 0, *, dtype: str | None = None, async_op: bool = False) -> Any:
        """Send ``tensor`` to ``peer``; matched in order with the peer's ``recv`` of the same
        tag and size. Calls on a communicator run in issue order, so two ranks that both send
        large messages to each other before receiving must put the send and the receive in
        one ``p2p_batch``."""
        b, dt = as_buffer(tensor, "tensor")
        return self._run("send", b, None, dtype or dt, None, async_op, peer=peer, tag=tag)

    def recv(self, tensor: Any, peer: int, tag: int = 0, *, dtype: str | None = None, async_op: bool = False) -> Any:
        """Receive from ``peer`` into ``tensor``."""
        b, dt = as_buffer(tensor, "tensor")
        return self._run("recv", None, b, dtype or dt, tensor, async_op, peer=peer, tag=tag)

    def p2p_batch(self, ops: Sequence[tuple[bool, int, int, Any]], *, async_op: bool = False) -> Any:
        """Run several sends and receives as one operation: ``ops`` is a list of
        ``(is_send, peer, tag, tensor)``. They progress together (like NCCL group calls
        around send/recv, or torch's ``batch_isend_irecv``), so two ranks that exchange
        large tensors cannot deadlock. Between a pair of ranks, messages match in list
        order."""
        native_ops = []
        for send, peer, tag, t in ops:
            b, dt = as_buffer(t, "tensor")
            native_ops.append((bool(send), int(peer), int(tag), b, dt))
        if async_op:
            return Work(self._comm.p2p_batch(native_ops, async_op=True), None)
        self._comm.p2p_batch(native_ops)
        return None

    def barrier(self, *, async_op: bool = False) -> Any:
        """Return once every rank has entered the barrier."""
        return self._run("barrier", None, None, None, None, async_op)

    # -- lifecycle ----------------------------------------------------------------------------

    def abort(self, reason: str = "aborted from Python") -> None:
        """Fail the collective in progress on every rank and make every later call raise
        :class:`AbortedError`. Never blocks on the collective in progress."""
        self._comm.abort(reason)

    def destroy(self) -> None:
        """Wait for queued collectives, then leave the rendezvous and close connections."""
        self._comm.destroy()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return repr(self._comm)


def init() -> Communicator:
    """Join the communicator the launcher describes: RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT (torchrun, ``devccl launch``), SLURM_* (srun) or OMPI_* (mpirun). Rank 0
    hosts the rendezvous at MASTER_ADDR:MASTER_PORT (MASTER_PORT+1 under torchrun, whose own
    store uses MASTER_PORT) unless DEVCCL_RENDEZVOUS / DEVCCL_RENDEZVOUS_EXTERNAL say
    otherwise. Blocks until every rank joined (DEVCCL_INIT_TIMEOUT)."""
    return Communicator.from_env()
