"""devccl: collective communication (all-reduce and friends) for numpy arrays and PyTorch tensors.

Under a launcher (``torchrun``, ``devccl launch``, ``srun``, ``mpirun``)::

    import numpy as np, devccl

    comm = devccl.init()                      # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    x = np.full(1024, comm.rank, dtype=np.float32)
    comm.all_reduce(x)                        # in place, sum; the GIL is released meanwhile
    work = comm.all_reduce(x, op="max", async_op=True)
    work.wait()

Every collective takes C-contiguous numpy arrays, CPU torch tensors (zero-copy), other
buffer-protocol objects, or CUDA torch tensors (and other objects exposing
``__cuda_array_interface__`` plus a ``device``). Argument order follows torch.distributed:
outputs first. Calls on CUDA tensors are stream-ordered like NCCL's: they run after the work
queued on the current stream, hold that stream (blocking form) or return a Work whose
``hold()`` does (``async_op=True``), and never block the host.

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
from ._buffers import Operand, as_buffer, as_buffers, check_same_device, resolve_stream
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
    Do not read or write the buffers before ``wait()`` returned, or, for calls on CUDA
    tensors, before ``hold()`` ordered the stream that uses them after the call.
    """

    __slots__ = ("_device", "_native", "_post", "_result")

    def __init__(
        self, native: _native.Work, result: Any, post: Callable[[], None] | None = None, device: Any = None
    ) -> None:
        self._native = native
        self._result = result
        self._post = post
        self._device = device

    def wait(self, timeout: float | None = None) -> Any:
        """Block (without the GIL) until the collective finished; return its output.

        With ``timeout`` (seconds), raise the built-in ``TimeoutError`` if it has not finished
        by then (the work keeps running and can be waited on again). For calls on CUDA
        tensors the device work has finished too when this returns.
        """
        self._native.wait(timeout)
        post, self._post = self._post, None
        if post is not None:
            post()
        return self._result

    def hold(self, stream: Any = None) -> Any:
        """Calls on CUDA memory: make work queued on ``stream`` from now on wait for the
        collective, without blocking the host (what ``work.wait()`` does for NCCL in
        torch.distributed), and return the output. ``stream`` is an int ``CUstream`` or a
        ``torch.cuda.Stream``; default: torch's current stream of the tensors' device (the
        stream the call was ordered after, for other CUDA objects). Idempotent; fine before
        or after completion. Raises :class:`InvalidUsageError` for calls on host memory."""
        if stream is None and self._device is not None:
            stream = resolve_stream(None, [Operand(None, None, self._device)])
        elif stream is not None:
            stream = resolve_stream(stream, [])
        self._native.hold(stream)
        return self._result

    @property
    def stream(self) -> int | None:
        """The raw CUstream a call on CUDA memory was ordered after; None for host memory."""
        return self._native.stream

    @property
    def source(self) -> int | None:
        """For :meth:`Communicator.recv_any`: the rank the message came from, once the
        receive finished successfully; None while it runs, after a failure, and for every
        other call. Never blocks."""
        return self._native.source

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

    All methods taking buffers accept C-contiguous numpy arrays and CPU or CUDA torch
    tensors of float32, float64, float16, bfloat16, int8, uint8, int32, int64, uint32,
    uint64, float8_e4m3fn or float8_e5m2 (every buffer of a call on one device). Blocking
    calls return the output; ``async_op=True`` returns a :class:`Work`.

    Calls on CUDA tensors are stream-ordered, with ProcessGroupNCCL's semantics: the
    collective's device work runs after everything queued on ``stream`` (default: torch's
    current stream of the tensors' device) when the call is made, and the call never blocks
    the host. The blocking form holds that stream at once (work queued on it afterwards sees
    the result); with ``async_op=True`` the returned Work's ``hold()`` does that later
    (``wait()`` blocks the host instead). Errors found before anything was queued raise at
    once; a failure while the collective runs releases the held streams (the output is then
    undefined), poisons the communicator (every later call raises) and is raised by
    ``Work.wait()``. Without a CUDA driver, calls on CUDA memory raise
    :class:`UnsupportedError`. (Not yet verified on a GPU.)
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
        inp: Operand | None,
        out: Operand | None,
        dtype: str | None,
        result: Any,
        async_op: bool,
        stream: Any,
        **kw: Any,
    ) -> Any:
        ops = [o for o in (inp, out) if o is not None]
        dt = dtype or next((o.dtype for o in ops if o.dtype is not None), None)
        s = resolve_stream(stream, ops)
        native = self._comm.collective(
            kind,
            inp.buf if inp is not None else None,
            out.buf if out is not None else None,
            dtype=dt,
            async_op=async_op,
            stream=s,
            **kw,
        )
        if async_op:
            return Work(native, result, device=next((o.device for o in ops if o.device is not None), None))
        return result

    # -- collectives --------------------------------------------------------------------------
    #
    # ``dtype`` names the element type when the buffers' format does not say it: numpy has no
    # bfloat16 or float8, so pass bf16 data as a uint16/int16 array with dtype="bf16" and fp8
    # data as a uint8 array with dtype="f8e4m3" / "f8e5m2". Torch tensors never need it.
    # ``stream`` (CUDA memory only) is the CUstream the call is ordered after: an int or a
    # torch.cuda.Stream; default: torch's current stream of the tensors' device.

    def all_reduce(
        self,
        tensor: Any,
        op: ReduceOpName = "sum",
        *,
        out: Any = None,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """Every rank gets the reduction of every rank's ``tensor``: in place, or into ``out``
        (same size and dtype) when given."""
        if out is None:
            b = as_buffer(tensor, "tensor")
            return self._run("all_reduce", b, None, dtype, tensor, async_op, stream, op=op)
        bi, bo = as_buffers(tensor, "tensor", out, "out")
        return self._run("all_reduce", bi, bo, dtype, out, async_op, stream, op=op)

    def broadcast(
        self, tensor: Any, root: int = 0, *, dtype: str | None = None, async_op: bool = False, stream: Any = None
    ) -> Any:
        """Every rank's ``tensor`` becomes ``root``'s (in place)."""
        b = as_buffer(tensor, "tensor")
        return self._run("broadcast", b, None, dtype, tensor, async_op, stream, root=root)

    def reduce(
        self,
        tensor: Any,
        root: int = 0,
        op: ReduceOpName = "sum",
        *,
        out: Any = None,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """``root`` gets the reduction of every rank's ``tensor`` (in place, or into ``out``
        on the root). Other ranks' tensors are not modified."""
        if out is None:
            b = as_buffer(tensor, "tensor")
            return self._run("reduce", b, None, dtype, tensor, async_op, stream, op=op, root=root)
        bi, bo = as_buffers(tensor, "tensor", out, "out")
        return self._run("reduce", bi, bo, dtype, out, async_op, stream, op=op, root=root)

    def all_gather(
        self, output: Any, input: Any, *, dtype: str | None = None, async_op: bool = False, stream: Any = None
    ) -> Any:
        """``output`` (world_size × len(input) elements) gets every rank's ``input`` in rank
        order. In place: pass this rank's block of ``output`` as ``input``."""
        bi, bo = as_buffers(input, "input", output, "output")
        return self._run("all_gather", bi, bo, dtype, output, async_op, stream)

    def reduce_scatter(
        self,
        output: Any,
        input: Any,
        op: ReduceOpName = "sum",
        *,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """Rank r's ``output`` gets the reduction of block r of every rank's ``input``
        (world_size × len(output) elements)."""
        bi, bo = as_buffers(input, "input", output, "output")
        return self._run("reduce_scatter", bi, bo, dtype, output, async_op, stream, op=op)

    def all_to_all(
        self, output: Any, input: Any, *, dtype: str | None = None, async_op: bool = False, stream: Any = None
    ) -> Any:
        """Block j of rank i's ``input`` goes to block i of rank j's ``output`` (equal blocks;
        ``output`` may be ``input`` for the in-place form)."""
        if output is input:
            b = as_buffer(input, "input")
            return self._run("all_to_all", b, None, dtype, output, async_op, stream)
        bi, bo = as_buffers(input, "input", output, "output")
        return self._run("all_to_all", bi, bo, dtype, output, async_op, stream)

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
        stream: Any = None,
    ) -> Any:
        """All-to-all with per-rank element counts: ``input_counts[j]`` elements starting at
        ``input_displs[j]`` go to rank j, whose ``output`` receives them at its
        ``output_displs[i]``. Displacements default to the counts' prefix sums."""
        bi, bo = as_buffers(input, "input", output, "output")
        return self._run(
            "all_to_all_v",
            bi,
            bo,
            dtype,
            output,
            async_op,
            stream,
            send_counts=list(input_counts),
            send_displs=list(input_displs) if input_displs is not None else _displs(input_counts),
            recv_counts=list(output_counts),
            recv_displs=list(output_displs) if output_displs is not None else _displs(output_counts),
        )

    def gather(
        self,
        input: Any,
        output: Any = None,
        root: int = 0,
        *,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """``root``'s ``output`` (world_size × len(input) elements) gets every rank's
        ``input`` in rank order; ``output`` is only needed on the root."""
        bi, bo = as_buffers(input, "input", output, "output")
        return self._run("gather", bi, bo, dtype, output, async_op, stream, root=root)

    def scatter(
        self,
        output: Any,
        input: Any = None,
        root: int = 0,
        *,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """Rank r's ``output`` gets block r of ``root``'s ``input`` (world_size × len(output)
        elements); ``input`` is only needed on the root."""
        bi, bo = as_buffers(input, "input", output, "output")
        return self._run("scatter", bi, bo, dtype, output, async_op, stream, root=root)

    def send(
        self,
        tensor: Any,
        peer: int,
        tag: int = 0,
        *,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """Send ``tensor`` to ``peer``; matched in order with the peer's ``recv`` of the same
        tag and size. Calls on a communicator run in issue order, so two ranks that both send
        large messages to each other before receiving must put the send and the receive in
        one ``p2p_batch``."""
        b = as_buffer(tensor, "tensor", writable=False)
        return self._run("send", b, None, dtype, None, async_op, stream, peer=peer, tag=tag)

    def recv(
        self,
        tensor: Any,
        peer: int,
        tag: int = 0,
        *,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """Receive from ``peer`` into ``tensor``."""
        b = as_buffer(tensor, "tensor")
        return self._run("recv", None, b, dtype, tensor, async_op, stream, peer=peer, tag=tag)

    def recv_any(
        self,
        tensor: Any,
        tag: int = 0,
        *,
        dtype: str | None = None,
        async_op: bool = False,
        stream: Any = None,
    ) -> Any:
        """Receive into ``tensor`` from whichever rank sends first (MPI_ANY_SOURCE, torch's
        ``recv`` without ``src``). A rank matches when its next point-to-point message to
        this rank has ``tag``; the sender's size and dtype must match ``tensor``, which must
        not be empty. Blocking: returns the source rank. ``async_op=True``: returns a
        :class:`Work` whose ``wait()`` returns ``tensor`` and whose ``source`` is the source
        rank once it finished.

        Like every call it runs in issue order: calls issued after it on this communicator
        start only once its message arrived. On CUDA memory it is ordered after ``stream``;
        the blocking form also waits on the host, since the source is only known then."""
        b = as_buffer(tensor, "tensor")
        s = resolve_stream(stream, [b])
        dt = dtype or b.dtype
        if async_op:
            return Work(self._comm.recv_any(b.buf, tag, dtype=dt, async_op=True, stream=s), tensor, device=b.device)
        return self._comm.recv_any(b.buf, tag, dtype=dt, stream=s)

    def p2p_batch(
        self, ops: Sequence[tuple[bool, int, int, Any]], *, async_op: bool = False, stream: Any = None
    ) -> Any:
        """Run several sends and receives as one operation: ``ops`` is a list of
        ``(is_send, peer, tag, tensor)``. They progress together (like NCCL group calls
        around send/recv, or torch's ``batch_isend_irecv``), so two ranks that exchange
        large tensors cannot deadlock. Between a pair of ranks, messages match in list
        order. All tensors on one device; on CUDA the batch is stream-ordered like every
        collective."""
        tensors = [(t, f"ops[{i}] tensor") for i, (_, _, _, t) in enumerate(ops)]
        check_same_device(tensors)
        operands = [as_buffer(t, w, writable=not send) for (send, _, _, _), (t, w) in zip(ops, tensors, strict=True)]
        native_ops = [
            (bool(send), int(peer), int(tag), o.buf, o.dtype)
            for (send, peer, tag, _), o in zip(ops, operands, strict=True)
        ]
        s = resolve_stream(stream, operands)
        if async_op:
            device = next((o.device for o in operands if o.device is not None), None)
            return Work(self._comm.p2p_batch(native_ops, async_op=True, stream=s), None, device=device)
        self._comm.p2p_batch(native_ops, stream=s)
        return None

    def barrier(self, *, async_op: bool = False) -> Any:
        """Return once every rank has entered the barrier. It runs on the host, in issue order
        with the other calls of this communicator; it involves no CUDA stream."""
        return self._run("barrier", None, None, None, None, async_op, None)

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
