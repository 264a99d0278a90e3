"""The torch.distributed backend ``"devccl"``.

Importing this module registers the backend::

    import devccl.torch  # noqa: F401  (registers "devccl")
    import torch.distributed as dist

    dist.init_process_group("devccl")      # env:// under torchrun, or any init_method
    model = torch.nn.parallel.DistributedDataParallel(model)

The backend is a pure-Python ``ProcessGroup`` subclass (torch uses it as the group itself),
one devccl communicator per group: rank 0 of each group (the world and every
``dist.new_group``) starts a rendezvous server on a free port, publishes its address in the
group's c10d store, and every member joins it. Blocking calls (``async_op=False``) run inline
with the GIL released and raise devccl's exception directly. Asynchronous ones are queued on
devccl's progress thread and return a Work that a helper thread completes: for ``dist.*``
callers a Python Work whose ``wait()`` raises devccl's exception; for C++ callers (DDP's
reducer, functional collectives) a C++ Work made with ``_create_work_from_future``, whose
future resolves to the tensors or fails with devccl's message (C++ keeps no Python object).

Served by devccl (every call is counted in ``ProcessGroupDevccl.calls``): allreduce,
allreduce_coalesced, broadcast, reduce, allgather, allgather_coalesced, _allgather_base,
allgather_into_tensor_coalesced, reduce_scatter, _reduce_scatter_base,
reduce_scatter_tensor_coalesced, gather, scatter, alltoall, alltoall_base, send, recv,
recv_anysource, barrier, on CPU and CUDA tensors. Reductions: SUM, AVG, PRODUCT, MIN, MAX.
Refused with a clear error: PREMUL_SUM and the bitwise ops (BAND, BOR, BXOR), tensors of
other devices (meta, ...), a call mixing CPU and CUDA tensors, non-contiguous tensors,
unsupported dtypes, sparse tensors other than COO in ``allreduce`` with SUM.

- ``allgather_coalesced`` takes torch's nesting (one output list per rank, each holding one
  tensor per input), checked as Gloo checks it; it gathers the inputs' bytes, so every dtype
  and non-contiguous tensors work.
- ``allreduce`` of a sparse COO tensor (``dist.all_reduce``, DDP's sparse gradients): SUM only,
  as Gloo; indices and values are all-gathered and added up in Gloo's order (bit-identical
  results), in place, coalesced. It completes before returning, also when asked for
  asynchronously.
- ``recv_anysource`` (``dist.recv``/``dist.irecv`` without ``src``): the Work's
  ``_source_rank()`` is the sender. Sends and receives issued before it start first; like
  every devccl call it runs in issue order, so calls issued after it on the group wait until
  its message arrived (unlike Gloo, where a later send may complete first).

Errors: a failure while a call runs is raised as a class that is devccl's own and
``torch.distributed.DistBackendError`` (:class:`DistTimeoutError`, :class:`DistRemoteError`,
...; see :func:`_dist_error`), with a message in torch's shape (``[devccl rank 0] Timed out
waiting for allreduce to complete: <devccl's message>``, ``... Connection closed by peer
...``). Gloo raises a plain ``RuntimeError`` for these, which they are too.

CUDA tensors follow ProcessGroupNCCL's stream semantics (not yet verified on a GPU): a
collective is ordered after the work queued on the current stream of the tensors' device and
never blocks the host. ``async_op=False`` makes the current stream wait for it at once;
``async_op=True`` returns a Work whose ``wait()`` makes the then-current stream wait (so
``work.wait()`` then ``torch.cuda.synchronize()`` sees the result), while ``is_completed()`` and
``get_future()`` (which resolves with the tensors) follow the collective's completion. Copy-out
steps (unflattening coalesced or list outputs) run on a side stream of the group, ordered
after the collective, and the waits above include them. C++ callers (DDP's reducer,
functional collectives) get a Work whose ``wait()`` blocks the host until the collective and
its copy-out finished.

Timeouts: the group's ``timeout`` becomes devccl's no-progress timeout (DEVCCL_TIMEOUT) and
init timeout (DEVCCL_INIT_TIMEOUT) unless those variables are set.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import os
import queue
import socket
import sys
import threading
import uuid
import warnings
import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.distributed import ReduceOp

from . import (
    AbortedError,
    Communicator,
    DevcclError,
    DevcclSystemError,
    DevcclTimeoutError,
    InternalError,
    InvalidUsageError,
    MismatchError,
    RemoteError,
    RendezvousServer,
    UnsupportedError,
)
from . import Work as DevcclWork
from ._buffers import check_device, check_tensor, tensor_dtype

__all__ = [
    "BACKEND",
    "DevcclBackendError",
    "DistAbortedError",
    "DistInternalError",
    "DistMismatchError",
    "DistRemoteError",
    "DistSystemError",
    "DistTimeoutError",
    "ProcessGroupDevccl",
    "TESTED_TORCH_VERSIONS",
    "reduce_op_name",
]

#: The backend name given to ``dist.init_process_group``.
BACKEND = "devccl"

#: torch versions this backend was tested with.
TESTED_TORCH_VERSIONS = ("2.11.0",)

#: The c10d store key (inside the group's own prefix) holding "host:port nonce".
_STORE_KEY = "devccl/rendezvous"

_OPS = {
    ReduceOp.RedOpType.SUM: "sum",
    ReduceOp.RedOpType.AVG: "avg",
    ReduceOp.RedOpType.PRODUCT: "prod",
    ReduceOp.RedOpType.MIN: "min",
    ReduceOp.RedOpType.MAX: "max",
}

_OP_LABELS = {v: k.name for k, v in _OPS.items()}


def reduce_op_name(op: Any) -> str:
    """The devccl name of a torch ``ReduceOp`` (or ``ReduceOp.RedOpType``).

    PREMUL_SUM is refused: the scale factor it carries is not reachable from Python, so it
    cannot be applied faithfully; pre-scale the tensor and use SUM instead. Bitwise ops are
    not reductions devccl implements.
    """
    kind = getattr(op, "op", op)
    name = _OPS.get(kind)
    if name is None:
        label = getattr(kind, "name", str(kind))
        hint = "; scale the tensor first and use SUM" if label == "PREMUL_SUM" else ""
        raise UnsupportedError(
            f"devccl does not support ReduceOp.{label} (supported: SUM, AVG, PRODUCT, MIN, MAX){hint}"
        )
    return name


# -- errors as torch.distributed reports them ----------------------------------------------------
#
# A failure while a collective runs (a timeout, a peer that closed its connection or disagreed,
# an aborted group) reaches torch users as an instance of a class below: devccl's own class
# (``except devccl.DevcclTimeoutError`` keeps working) and ``torch.distributed.DistBackendError``
# (what ProcessGroupNCCL raises for such failures; a ``RuntimeError``, which is what Gloo raises
# for them in torch 2.11), with a message that starts the way torch's do (``[devccl rank 0]
# Timed out waiting for allreduce to complete: ...``, ``... Connection closed by peer ...``)
# followed by devccl's full message. Argument errors raised at the call (InvalidUsageError,
# DTypeError, UnsupportedError) are raised unchanged.


class DevcclBackendError(DevcclError, dist.DistBackendError):
    """A devccl failure while a collective ran, as a ``torch.distributed.DistBackendError``
    (and a ``RuntimeError``). Base of the other ``Dist*Error`` classes of this module."""


class DistTimeoutError(DevcclTimeoutError, DevcclBackendError):
    """No progress within the group's timeout (DEVCCL_TIMEOUT): the message contains
    ``Timed out``."""


class DistRemoteError(RemoteError, DevcclBackendError):
    """A peer failed or closed its connection (the message then says ``Connection closed by
    peer``)."""


class DistMismatchError(MismatchError, DistRemoteError):
    """Ranks called different collectives, sizes, dtypes, ops or roots."""


class DistAbortedError(AbortedError, DevcclBackendError):
    """The group was aborted, or failed earlier: every later call raises this."""


class DistSystemError(DevcclSystemError, DevcclBackendError):
    """An operating-system or device call failed."""


class DistInternalError(InternalError, DevcclBackendError):
    """A bug in devccl."""


#: devccl class -> its torch-shaped subclass (most derived first).
_DIST_ERRORS: tuple[tuple[type[BaseException], type[BaseException]], ...] = (
    (DevcclTimeoutError, DistTimeoutError),
    (MismatchError, DistMismatchError),
    (RemoteError, DistRemoteError),
    (AbortedError, DistAbortedError),
    (DevcclSystemError, DistSystemError),
    (InternalError, DistInternalError),
)

#: Errors found at the call, before anything was sent: raised as they are.
_CALLER_ERRORS = (InvalidUsageError, UnsupportedError)


def _dist_error(e: BaseException, what: str, rank: int | None = None) -> BaseException:
    """The torch-shaped form of a devccl error raised while ``what`` ran (see above); other
    exceptions, caller errors and errors already converted are returned unchanged."""
    if not isinstance(e, DevcclError) or isinstance(e, (DevcclBackendError, *_CALLER_ERRORS)):
        return e
    cls: type[BaseException] = DevcclBackendError
    for devccl_cls, dist_cls in _DIST_ERRORS:
        if isinstance(e, devccl_cls):
            cls = dist_cls
            break
    where = f"[devccl rank {rank}]" if rank is not None else "[devccl]"
    msg = str(e)
    if isinstance(e, DevcclTimeoutError):
        head = f"{where} Timed out waiting for {what} to complete"
    elif isinstance(e, RemoteError) and "closed its connection" in msg:
        head = f"{where} Connection closed by peer during {what}"
    elif isinstance(e, AbortedError) and "timed out" in msg:
        head = f"{where} {what} failed: the group was aborted after an earlier timeout (every later call fails)"
    else:
        head = f"{where} {what} failed"
    out = cls(f"{head}: {msg}")
    out.__traceback__ = e.__traceback__
    return out


def _target_host(store: Any) -> str | None:
    """The host other ranks reach rank 0's machine through: MASTER_ADDR, else the TCPStore's."""
    host = os.environ.get("MASTER_ADDR")
    if host:
        return host
    s = store
    while s is not None:
        if isinstance(s, dist.TCPStore):
            return s.host
        s = getattr(s, "underlying_store", None)
    return None


def _advertised_host(store: Any) -> str:
    """This machine's address on the route toward the rendezvous host (loopback stays
    loopback), which the other ranks use to reach the server rank 0 starts."""
    target = _target_host(store)
    if target is None:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    if target == "localhost":
        return "127.0.0.1"
    family, _, _, _, sockaddr = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)[0]
    ip = ipaddress.ip_address(sockaddr[0])
    if ip.is_loopback:
        return str(ip)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)  # UDP: no packet is sent; only picks the outgoing interface
        return s.getsockname()[0]


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _env_set(name: str) -> bool:
    return bool(os.environ.get(name, "").strip())


def _env_seconds(name: str) -> float | None:
    """A DEVCCL_* number of seconds, or None when unset or malformed (the native config
    reports a malformed value with the variable's name)."""
    try:
        return float(os.environ[name]) if _env_set(name) else None
    except ValueError:
        return None


def _start_rendezvous(store: Any, init_secs: float | None) -> RendezvousServer:
    """Rank 0: start the group's rendezvous server and publish its address in the store. On
    failure the error is published instead, so the other ranks fail at once with it rather
    than waiting for the store's timeout."""
    try:
        target = _target_host(store)
        try:
            host = _advertised_host(store)
        except OSError as e:
            raise InvalidUsageError(f"devccl: cannot find this host's address toward {target!r} (MASTER_ADDR): {e}") from e
        if ipaddress.ip_address(host).is_loopback:
            listen = _join_host_port(host, 0)
        else:
            listen = "[::]:0" if ":" in host else "0.0.0.0:0"
        server = RendezvousServer(
            listen,
            secret=os.environ.get("DEVCCL_SECRET") or None,
            group_timeout=_env_seconds("DEVCCL_INIT_TIMEOUT") or init_secs or 120.0,
        )
    except BaseException as e:
        store.set(_STORE_KEY, f"error {type(e).__name__}: {e}")
        raise
    store.set(_STORE_KEY, f"{_join_host_port(host, server.port)} {uuid.uuid4().hex}")
    return server


def _connect(store: Any, rank: int, size: int, timeout: timedelta | None) -> tuple[RendezvousServer | None, Communicator]:
    secs = timeout.total_seconds() if timeout is not None and timeout.total_seconds() > 0 else None
    # DEVCCL_* set explicitly win; otherwise the group's timeout applies to both.
    coll_timeout = None if _env_set("DEVCCL_TIMEOUT") else secs
    init_timeout = None if _env_set("DEVCCL_INIT_TIMEOUT") else secs
    server = _start_rendezvous(store, secs) if rank == 0 else None
    value = store.get(_STORE_KEY).decode()
    if value.startswith("error "):
        raise RemoteError(f"rank 0 of this process group could not start the devccl rendezvous: {value[6:]}")
    addr, nonce = value.split()
    local = os.environ.get("LOCAL_WORLD_SIZE")
    comm = Communicator(
        rank,
        size,
        addr,
        group=f"torch-{nonce}",
        local_world_size=int(local) if local and local.isdigit() and int(local) <= size else None,
        timeout=coll_timeout,
        init_timeout=init_timeout,
    )
    return server, comm


_C10D_PY = dist.distributed_c10d.__file__


def _called_from_c10d_python() -> bool:
    """True when the process-group method running two frames up was called by Python's
    ``torch.distributed`` functions (``dist.all_reduce`` ...), False when C++ called it
    (DDP's reducer, functional collectives, ``_broadcast_coalesced``), whose innermost
    Python frame is elsewhere (or absent, on a thread without Python frames)."""
    try:
        frame = sys._getframe(3)  # this <- _launch <- the PG method <- its caller
    except ValueError:
        return False
    return frame.f_code.co_filename == _C10D_PY


def _unwrap(fut: torch.futures.Future) -> Any:
    """Turn a failure delivered as a value into a real error of the chained future, so C++
    waiters (DDP's reducer, ``get_future().wait()``) see it as an error."""
    v = fut.value()
    if isinstance(v, BaseException):
        raise v
    return v


class _FutureSink:
    """Completion target of a call made by C++ (DDP's reducer, functional collectives): the
    returned Work is a C++ ``FutureWrappingWork`` (``_create_work_from_future``), so nothing
    C++ keeps (torch's registry of unwaited functional collectives is process-global) holds
    a Python object that would have to be released after the interpreter finalized. Its
    future resolves to the call's tensors, or fails with devccl's message."""

    __slots__ = ("_result", "_source")

    def __init__(self, result: Any) -> None:
        self._result = result
        self._source: torch.futures.Future = torch.futures.Future()

    def work(self) -> dist.Work:
        return _create_work_from_future(self._source.then(_unwrap))

    def _finish(self, error: BaseException | None) -> None:
        self._source.set_result(error if error is not None else self._result)


class _CudaCall:
    """The devccl calls of one operation on CUDA tensors, and how streams wait for them.

    The calls are ordered after the launching stream. A copy-out step (``post``) runs on the
    group's side stream for the device, which first holds on the calls; an event recorded
    after it then stands for the whole operation. ``hold(stream)`` makes later work on
    ``stream`` wait for the operation without blocking the host; ``finish()`` blocks the host
    until it finished (the completer's part).
    """

    __slots__ = ("device", "event", "works")

    def __init__(self, device: torch.device, works: list[DevcclWork]) -> None:
        self.device = device
        self.works = works
        self.event: torch.cuda.Event | None = None

    def post_on(self, side: torch.cuda.Stream, post: Callable[[], None], used: Sequence[torch.Tensor]) -> None:
        """Run ``post`` (torch copies) on ``side`` after the calls, stream-ordered. ``used``
        (outputs and temporaries it touches) are recorded on ``side`` so the caching
        allocator does not hand their memory out before the copies ran."""
        for w in self.works:
            w.hold(side.cuda_stream)
        with torch.cuda.stream(side):
            post()
            event = torch.cuda.Event()
            event.record(side)
        for t in used:
            t.record_stream(side)
        self.event = event

    def hold(self, stream: torch.cuda.Stream) -> None:
        if self.event is not None:
            stream.wait_event(self.event)
        else:
            for w in self.works:
                w.hold(stream.cuda_stream)

    def hold_current(self) -> None:
        self.hold(torch.cuda.current_stream(self.device))

    def finish(self) -> None:
        """Block the host until the copy-out step ran (the calls were waited on already)."""
        if self.event is not None:
            self.event.synchronize()


class _Work(dist.Work):
    """The c10d Work of one devccl call made from Python (``dist.*`` functions).

    ``wait()`` raises the devccl exception itself (MismatchError, AbortedError, ...), unlike
    a Work built with ``_create_work_from_future``, whose ``wait()`` ignores errors.
    ``get_future()`` resolves to the call's tensors, or fails with the error. The process
    group's completer holds it until it finished.

    On CUDA tensors (``device`` set) ``wait()`` never blocks the host: it makes the current
    stream wait for the call (NCCL's semantics), and raises only an error already known.
    """

    def __init__(self, result: Any, done: bool = False, device: torch.device | None = None) -> None:
        super().__init__()
        self._result = result
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._source: torch.futures.Future | None = None
        self._fut: torch.futures.Future | None = None
        self._device = device
        self._cuda: _CudaCall | None = None
        if done:
            self._done.set()

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._error = error
            self._done.set()
            src = self._source
        if src is not None:
            src.set_result(error if error is not None else self._result)

    def wait(self, timeout: timedelta | None = None) -> bool:
        if self._device is not None:
            if self._cuda is not None:
                self._cuda.hold_current()
            if self._done.is_set() and self._error is not None:
                raise self._error
            return True
        secs = timeout.total_seconds() if isinstance(timeout, timedelta) and timeout.total_seconds() > 0 else None
        if not self._done.wait(secs):
            raise DistTimeoutError(f"[devccl] Timed out waiting {secs} s for the work to complete (it keeps running)")
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> torch.futures.Future:
        with self._lock:
            if self._fut is None:
                self._source = torch.futures.Future()
                self._fut = self._source.then(_unwrap)
                if self._done.is_set():
                    src, err = self._source, self._error
                else:
                    src, err = None, None
            else:
                src, err = None, None
        if src is not None:
            src.set_result(err if err is not None else self._result)
        return self._fut

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> Any:
        self.wait()
        return self._result


_Item = tuple[list[DevcclWork], "_Work | _FutureSink | _FinishAll", Callable[[], None] | None, str]


class _Completer:
    """Finishes the Work of asynchronous calls, in issue order (devccl finishes a
    communicator's collectives in that order), on one daemon thread per process group.
    Failures reach the Work in their torch shape (:func:`_dist_error`)."""

    def __init__(self, name: str, rank: int) -> None:
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._name = name
        self._rank = rank
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(
        self,
        works: list[DevcclWork],
        work: _Work | _FutureSink | _FinishAll,
        post: Callable[[], None] | None,
        what: str = "work",
    ) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._q.put((works, work, post, what))

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            works, work, post, what = item
            error: BaseException | None = None
            try:
                for w in works:
                    w.wait()
                if post is not None:
                    post()
            except BaseException as e:  # noqa: BLE001 - every failure goes to the waiter
                error = _dist_error(e, what, self._rank)
            work._finish(error)

    def stop(self) -> None:
        """Let queued completions finish, then end the thread."""
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None:
            self._q.put(None)
            t.join()


class _FinishAll:
    """Completion target standing for several Works finished by one devccl call."""

    __slots__ = ("_targets",)

    def __init__(self, targets: list[_Work | _FutureSink]) -> None:
        self._targets = targets

    def _finish(self, error: BaseException | None) -> None:
        for t in self._targets:
            t._finish(error)


class _P2pWork(_Work):
    """The Work of a send or receive: waiting on it first starts the batch it belongs to."""

    def __init__(self, result: Any, batcher: _P2pBatcher, device: torch.device | None) -> None:
        super().__init__(result, device=device)
        self._batcher = batcher

    def wait(self, timeout: timedelta | None = None) -> bool:
        self._batcher.flush()
        return super().wait(timeout)


class _RecvAnyWork(_Work):
    """The Work of a receive from any source (``dist.recv``/``dist.irecv`` without
    ``src``): ``_source_rank()`` (what ``dist.recv`` returns, as a group rank) is the
    sender's rank once the message arrived. It blocks until then (on CUDA tensors too,
    where ``wait()`` does not block the host) and raises the receive's error."""

    def __init__(self, result: Any, device: torch.device | None) -> None:
        super().__init__(result, device=device)
        self._src_rank: int | None = None

    def _set_source(self, source: int | None) -> None:
        self._src_rank = source

    def _source_rank(self) -> int:
        self._done.wait()
        if self._error is not None:
            raise self._error
        if self._src_rank is None:  # pragma: no cover - the native Work reports it on success
            raise InternalError("devccl recv from any source finished without a source rank")
        return self._src_rank

    def source_rank(self) -> int:
        return self._source_rank()


class _P2pBatcher:
    """Sends and receives issued close together (``batch_isend_irecv`` issues them one after
    another) run as one devccl ``p2p_batch``, so two ranks that exchange large tensors cannot
    deadlock the way separate calls, executed in issue order, would. A batch starts when its
    first Work is waited on, when the process group issues anything else, or 1 ms after its
    first operation, whichever comes first. Operations on CUDA tensors are ordered after the
    stream current when they were issued: an operation on another device or stream than the
    batch's starts a new batch."""

    DELAY = 0.001

    def __init__(self, pg: ProcessGroupDevccl) -> None:
        self._pg = pg
        self._lock = threading.Lock()
        self._ops: list[tuple[bool, int, int, torch.Tensor]] = []
        self._targets: list[_Work | _FutureSink] = []
        self._key: tuple[torch.device | None, int | None] = (None, None)
        self._timer: threading.Timer | None = None

    def add(self, send: bool, tensor: torch.Tensor, peer: int, tag: int, result: Any) -> dist.Work:
        device = _call_device([tensor])
        stream = torch.cuda.current_stream(device).cuda_stream if device is not None else None
        if _called_from_c10d_python():
            target: _Work | _FutureSink = _P2pWork(result, self, device)
            work: dist.Work = target  # type: ignore[assignment]
        else:
            target = _FutureSink(result)
            work = target.work()
        with self._lock:
            if self._ops and self._key != (device, stream):
                self._flush_locked()
            self._key = (device, stream)
            self._ops.append((send, peer, tag, tensor))
            self._targets.append(target)
            if self._timer is None:
                self._timer = threading.Timer(self.DELAY, self.flush)
                self._timer.daemon = True
                self._timer.start()
        return work

    def add_any(self, tensor: torch.Tensor, tag: int, result: Any) -> dist.Work:
        """A receive from any source. devccl has no batch form of it: the sends and receives
        issued before it are started first (so it is not reordered against them), then it is
        issued on its own; operations issued after it form a new batch."""
        device = _call_device([tensor], "recv")
        stream = torch.cuda.current_stream(device).cuda_stream if device is not None else None
        from_python = _called_from_c10d_python()
        what = "recv (any source)"
        if from_python:
            target: _RecvAnyWork | _FutureSink = _RecvAnyWork(result, device)
            work: dist.Work = target  # type: ignore[assignment]
        else:
            target = _FutureSink(result)
            work = target.work()
        # Under the lock, like a batch: devccl and the completer see it in issue order.
        with self._lock:
            self._flush_locked()
            try:
                native = self._pg._comm.recv_any(tensor, tag, async_op=True, stream=stream)
            except DevcclError as e:
                raise _dist_error(e, what, self._pg.rank()) from None
            if isinstance(target, _RecvAnyWork):
                if device is not None:
                    target._cuda = _CudaCall(device, [native])
                post: Callable[[], None] | None = lambda: target._set_source(native.source)  # noqa: E731
            else:
                post = None
            self._pg._completer.put([native], target, post, what)
        return work

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        # Under the lock, so batches reach devccl in the order they were formed.
        ops, self._ops = self._ops, []
        targets, self._targets = self._targets, []
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if not ops:
            return
        device, stream = self._key
        try:
            native = self._pg._comm.p2p_batch(ops, async_op=True, stream=stream)
        except BaseException as e:  # noqa: BLE001 - every failure goes to the waiters
            _FinishAll(targets)._finish(_dist_error(e, "send/recv", self._pg.rank()))
            return
        if device is not None:
            call = _CudaCall(device, [native])
            for t in targets:
                if isinstance(t, _Work):
                    t._cuda = call
        self._pg._completer.put([native], _FinishAll(targets), None, "send/recv")


def _one(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    if len(tensors) != 1:
        raise InvalidUsageError(f"devccl {what}: expected exactly one tensor per call, got {len(tensors)}")
    return tensors[0]


def _same_dtype(tensors: Sequence[torch.Tensor], what: str) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors:
        if t.dtype != dt:
            raise InvalidUsageError(f"devccl {what}: all tensors must have one dtype, got {dt} and {t.dtype}")
    return dt


def _check_all(tensors: Sequence[torch.Tensor], what: str) -> None:
    for i, t in enumerate(tensors):
        check_tensor(t, f"{what}[{i}]")
        tensor_dtype(t, f"{what}[{i}]")


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated (on their device; on CUDA, on the current stream, which the
    collective is ordered after)."""
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)


def _call_device(tensors: Sequence[torch.Tensor], what: str = "call") -> torch.device | None:
    """The CUDA device all of a call's tensors live on, or None when they are CPU tensors.
    A call mixing devices is refused (devccl never copies between them); tensors of other
    devices get check_device's UnsupportedError."""
    first: torch.Tensor | None = None
    for i, t in enumerate(tensors):
        if t.device.type not in ("cpu", "cuda"):
            check_device(t, f"{what} tensor {i}")
        if first is None:
            first = t
        elif t.device != first.device:
            raise InvalidUsageError(
                f"devccl {what}: tensors on {first.device} and {t.device}; every tensor of a call must be on one "
                f"device (devccl never copies between host and device memory): move them with .cpu() or .cuda()"
            )
    return first.device if first is not None and first.device.type == "cuda" else None


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    at = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[at : at + n].view_as(t))
        at += n


# -- sparse COO all-reduce -------------------------------------------------------------------------

#: Metadata of one rank's sparse tensor: nnz, sparse_dim, dense_dim, dtype code, ndim, sizes.
_SPARSE_META = 5 + 64

_DTYPE_NAMES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _dtype_code(dt: torch.dtype) -> int:
    return zlib.crc32(str(dt).encode())


def _dtype_of_code(code: int) -> str:
    for name in _DTYPE_NAMES:
        if _dtype_code(_DTYPE_NAMES[name]) == code:
            return name
    return f"dtype #{code}"


def _describe_sparse(row: list[int]) -> str:
    nd = row[4]
    return f"{tuple(row[5 : 5 + nd])} {_dtype_of_code(row[3])} sparse tensor (sparse_dim {row[1]}, dense_dim {row[2]})"


def _sparse_sum(comm: Communicator, t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """The sum over the group of every rank's sparse COO tensor ``t``, coalesced, computed
    the way ProcessGroupGloo does (so results are bit-identical to Gloo's): every rank's
    indices and values are all-gathered, added up as sparse tensors in rank order, and
    coalesced. Two devccl calls: an all-gather of fixed-size metadata (nnz, dims, dtype,
    sizes: checked to agree across ranks, else every rank raises MismatchError and the
    group stays usable), then an all-gather-v of indices and values as raw bytes (any
    dtype torch adds sparse tensors of)."""
    inp = t if t.is_coalesced() else t.coalesce()
    size = list(inp.shape)
    if len(size) > _SPARSE_META - 5:
        raise InvalidUsageError(f"devccl allreduce: sparse tensors of at most {_SPARSE_META - 5} dimensions, got {len(size)}")
    sd = inp.sparse_dim()
    idx = inp._indices().contiguous()
    val = inp._values().contiguous()
    nnz = int(idx.shape[1])
    dev = t.device
    head = [nnz, sd, inp.dense_dim(), _dtype_code(val.dtype), len(size), *size]
    meta = torch.tensor(head + [-1] * (_SPARSE_META - len(head)), dtype=torch.int64).to(dev)
    metas = torch.empty(n * _SPARSE_META, dtype=torch.int64, device=dev)
    comm.all_gather(metas, meta)
    rows = metas.view(n, _SPARSE_META).tolist()
    for r, row in enumerate(rows):
        if row[1:] != rows[rank][1:]:
            raise MismatchError(
                f"devccl allreduce of sparse tensors: rank {rank} passed a {_describe_sparse(rows[rank])} but rank {r} "
                f"a {_describe_sparse(row)}; every rank must pass the same size and dtype"
            )
    dense = size[sd:]
    per_nnz_bytes = 8 * sd + math.prod(dense) * val.element_size()
    lengths = [row[0] * per_nnz_bytes for row in rows]
    payload = torch.cat([idx.reshape(-1).view(torch.uint8), val.reshape(-1).view(torch.uint8)])
    gathered = torch.empty(sum(lengths), dtype=torch.uint8, device=dev)
    # Every rank sends its one payload to every rank: an all-gather of unequal sizes.
    comm.all_to_all_v(gathered, payload, lengths, [lengths[rank]] * n, input_displs=[0] * n)
    output: torch.Tensor | None = None
    at = 0
    for r, row in enumerate(rows):
        k = row[0]
        ib, vb = 8 * sd * k, lengths[r] - 8 * sd * k
        # clone(): a fresh storage, so the dtype views below are aligned
        indices = gathered[at : at + ib].clone().view(torch.int64).view(sd, k)
        values = gathered[at + ib : at + ib + vb].clone().view(val.dtype).view(k, *dense)
        at += ib + vb
        with warnings.catch_warnings():  # torch 2.11 advises on invariant checks once per process
            warnings.filterwarnings("ignore", message="Sparse invariant checks")
            part = torch.sparse_coo_tensor(indices, values, size, dtype=val.dtype, device=dev, check_invariants=False)
        if output is None:
            output = part
        else:
            output += part
    assert output is not None
    return output.coalesce()


class ProcessGroupDevccl(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on a devccl communicator.

    ``calls`` counts the calls each method served (used by the tests to prove devccl, not a
    fallback, served every op).
    """

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta | None = None) -> None:
        super().__init__(rank, size)
        self._group_name = ""
        self._group_desc = ""
        self.calls: collections.Counter[str] = collections.Counter()
        try:
            self._server, self._comm = _connect(store, rank, size, timeout)
        except DevcclError as e:
            raise _dist_error(e, "process group init", rank) from None
        self._completer = _Completer(f"devccl-torch-{self._comm.comm_id[:8]}", rank)
        self._p2p = _P2pBatcher(self)
        self._side: dict[int | None, torch.cuda.Stream] = {}

    # -- identity (overridable through the C++ trampoline since torch 2.6) ---------------------

    def getBackendName(self) -> str:  # noqa: N802 - c10d's name
        return BACKEND

    def getGroupName(self) -> str:  # noqa: N802
        return self._group_name

    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._group_name = name

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._group_desc = desc

    @property
    def communicator(self) -> Communicator:
        """The devccl communicator serving this group."""
        return self._comm

    # -- plumbing -------------------------------------------------------------------------------

    def _launch(
        self,
        what: str,
        async_op: bool,
        calls: Sequence[Callable[[dict[str, Any]], Any]],
        result: Any,
        post: Callable[[], None] | None = None,
        tensors: Sequence[torch.Tensor] = (),
        temps: Sequence[torch.Tensor] = (),
    ) -> dist.Work:
        """Run ``calls`` (each issues one devccl collective with the keyword arguments it is
        given: ``async_op``, and ``stream`` on CUDA) and return a Work that completes with
        ``result`` after ``post`` (the copy-out step) ran. ``tensors`` are every tensor the
        call reads or writes (they decide the device); ``temps`` the temporaries ``post``
        reads.

        CPU tensors: blocking calls (``async_op=False``: only Python's ``dist.*`` asks for
        them) run inline and raise devccl's exception directly. Asynchronous calls from
        Python's ``dist.*`` get a :class:`_Work` (its ``wait()`` raises devccl's exception);
        calls from C++ get a pure C++ Work (see :class:`_FutureSink`). CUDA tensors: see
        :meth:`_launch_cuda`. Failures while the call runs are raised in their torch shape
        (:func:`_dist_error`), argument errors as they are."""
        self.calls[what] += 1
        # Sends and receives issued before this call go first (calls run in issue order).
        self._p2p.flush()
        from_python = _called_from_c10d_python()
        try:
            return self._launch_on(what, from_python, async_op, calls, result, post, tensors, temps)
        except DevcclError as e:
            raise _dist_error(e, what, self.rank()) from None

    def _launch_on(
        self,
        what: str,
        from_python: bool,
        async_op: bool,
        calls: Sequence[Callable[[dict[str, Any]], Any]],
        result: Any,
        post: Callable[[], None] | None,
        tensors: Sequence[torch.Tensor],
        temps: Sequence[torch.Tensor],
    ) -> dist.Work:
        device = _call_device(tensors, what)
        if device is not None:
            return self._launch_cuda(what, device, from_python, async_op, calls, result, post, [*tensors, *temps])
        if async_op:
            works = [c({"async_op": True}) for c in calls]
            if from_python:
                work = _Work(result)
                self._completer.put(works, work, post, what)
                return work
            sink = _FutureSink(result)
            self._completer.put(works, sink, post, what)
            return sink.work()
        for c in calls:
            c({"async_op": False})
        if post is not None:
            post()
        return _Work(result, done=True)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The group's stream for copy-out steps on ``device`` (made on first use)."""
        s = self._side.get(device.index)
        if s is None:
            s = self._side[device.index] = torch.cuda.Stream(device=device)
        return s

    def _launch_cuda(
        self,
        what: str,
        device: torch.device,
        from_python: bool,
        async_op: bool,
        calls: Sequence[Callable[[dict[str, Any]], Any]],
        result: Any,
        post: Callable[[], None] | None,
        used: Sequence[torch.Tensor],
    ) -> dist.Work:
        """Issue ``calls`` on CUDA tensors, ordered after the current stream, never blocking
        the host (ProcessGroupNCCL's semantics). ``post`` runs on the group's side stream
        after them. Blocking calls hold the current stream at once; the Work of
        asynchronous calls from Python holds the then-current stream in ``wait()``. The
        completer finishes the Work (``is_completed``, futures) once the calls and ``post``
        finished; C++ callers wait for that (their Work blocks the host)."""
        stream = torch.cuda.current_stream(device)
        works = [c({"async_op": True, "stream": stream.cuda_stream}) for c in calls]
        call = _CudaCall(device, works)
        if post is not None:
            call.post_on(self._side_stream(device), post, used)
        if not async_op:
            call.hold(stream)
        if from_python or not async_op:
            work = _Work(result, device=device)
            work._cuda = call
            self._completer.put(works, work, call.finish, what)
            return work
        sink = _FutureSink(result)
        self._completer.put(works, sink, call.finish, what)
        return sink.work()

    @staticmethod
    def _async(opts: Any) -> bool:
        return bool(getattr(opts, "asyncOp", True))

    # -- collectives ----------------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        if isinstance(opts, (ReduceOp, ReduceOp.RedOpType)):
            op, opts = opts, None
        else:
            op = opts.reduceOp if opts is not None else ReduceOp.SUM
        name = reduce_op_name(op)
        t = _one(tensors, "allreduce")
        if t.layout == torch.sparse_coo:
            return self._allreduce_sparse(t, name, tensors)
        if t.layout != torch.strided:
            raise InvalidUsageError(
                f"devccl allreduce: {t.layout} tensors are not supported (dense tensors are, and sparse COO tensors "
                f"with ReduceOp.SUM); convert with .to_dense() or .to_sparse_coo()"
            )
        return self._launch(
            "allreduce", self._async(opts), [lambda kw: self._comm.all_reduce(t, name, **kw)], tensors, tensors=[t]
        )

    def _allreduce_sparse(self, t: torch.Tensor, name: str, tensors: list[torch.Tensor]) -> dist.Work:
        """All-reduce of a sparse COO tensor, in place, as Gloo does it (SUM only): see
        :func:`_sparse_sum`. It runs to completion before returning, even when asked for
        asynchronously (its steps need the host between them); the Work is complete."""
        what = "allreduce"
        if name != "sum":
            raise InvalidUsageError(
                f"devccl allreduce of a sparse COO tensor: only ReduceOp.SUM is supported (as with Gloo), got "
                f"ReduceOp.{_OP_LABELS[name]}"
            )
        self.calls["allreduce_sparse"] += 1
        self._p2p.flush()
        from_python = _called_from_c10d_python()
        device = _call_device([t], what)
        try:
            out = _sparse_sum(self._comm, t, self.rank(), self.size())
        except DevcclError as e:
            raise _dist_error(e, f"{what} (sparse)", self.rank()) from None
        with torch.no_grad():
            t.copy_(out)
        if from_python:
            return _Work(tensors, done=True, device=device)
        sink = _FutureSink(tensors)
        sink._finish(None)
        return sink.work()

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        name = reduce_op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        if not tensors:
            return self._launch("allreduce_coalesced", False, [], tensors)
        _check_all(tensors, "tensors")
        _same_dtype(tensors, "allreduce_coalesced")
        _call_device(tensors, "allreduce_coalesced")
        flat = _flat(tensors)
        return self._launch(
            "allreduce_coalesced",
            self._async(opts),
            [lambda kw: self._comm.all_reduce(flat, name, **kw)],
            tensors,
            lambda: _unflatten_into(flat, tensors),
            tensors=tensors,
            temps=[flat],
        )

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        root = opts.rootRank if opts is not None else 0
        if opts is not None and opts.rootTensor != 0:
            raise InvalidUsageError(f"devccl broadcast: rootTensor must be 0, got {opts.rootTensor}")
        t = _one(tensors, "broadcast")
        return self._launch(
            "broadcast", self._async(opts), [lambda kw: self._comm.broadcast(t, root, **kw)], tensors, tensors=[t]
        )

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        root = opts.rootRank if opts is not None else 0
        name = reduce_op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        t = _one(tensors, "reduce")
        return self._launch(
            "reduce", self._async(opts), [lambda kw: self._comm.reduce(t, root, name, **kw)], tensors, tensors=[t]
        )

    def _gather_list(self, what: str, outs: list[torch.Tensor], inp: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        """A packed buffer for an all_gather into a list (on the input's device), and the
        copy-out step."""
        n = self.size()
        if len(outs) != n:
            raise InvalidUsageError(f"devccl {what}: expected {n} output tensors, got {len(outs)}")
        _check_all(outs, "output_tensors")
        _call_device([inp, *outs], what)
        for i, o in enumerate(outs):
            if o.numel() != inp.numel() or o.dtype != inp.dtype:
                raise InvalidUsageError(
                    f"devccl {what}: output_tensors[{i}] has {o.numel()} {o.dtype} elements, the input "
                    f"{inp.numel()} {inp.dtype}"
                )
        flat = torch.empty(n * inp.numel(), dtype=inp.dtype, device=inp.device)
        return flat, lambda: _unflatten_into(flat, outs)

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        inp = _one(input_tensors, "allgather")
        outs = _one(output_tensors, "allgather")
        flat, post = self._gather_list("allgather", outs, inp)
        return self._launch(
            "allgather",
            self._async(opts),
            [lambda kw: self._comm.all_gather(flat, inp, **kw)],
            output_tensors,
            post,
            tensors=[inp, *outs],
            temps=[flat],
        )

    def allgather_coalesced(
        self, output_lists: list[list[torch.Tensor]], input_list: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        """``output_lists[r][i]`` gets rank r's ``input_list[i]`` (torch's nesting: one list
        per rank, each holding one tensor per input; checked as Gloo does: world-size lists,
        one tensor per input, same shape and dtype). One devccl all-gather of the inputs'
        bytes concatenated, so every dtype works (bool, complex as torch passes it, ...) and
        non-contiguous tensors too (packing copies them anyway); the packed result is
        rank-major and unpacks into the output lists in order."""
        what = "allgather_coalesced"
        n = self.size()
        if not input_list:
            raise InvalidUsageError(f"devccl {what}: input_tensor_list is empty")
        if len(output_lists) != n:
            raise InvalidUsageError(
                f"devccl {what}: output_tensor_lists must hold one list per rank ({n}), got {len(output_lists)} lists"
            )
        for r, outs in enumerate(output_lists):
            if len(outs) != len(input_list):
                raise InvalidUsageError(
                    f"devccl {what}: output_tensor_lists[{r}] holds {len(outs)} tensors for {len(input_list)} inputs "
                    f"(each rank's list holds one tensor per input)"
                )
            for i, (o, t) in enumerate(zip(outs, input_list, strict=True)):
                if o.shape != t.shape or o.dtype != t.dtype:
                    raise InvalidUsageError(
                        f"devccl {what}: output_tensor_lists[{r}][{i}] is a {tuple(o.shape)} {o.dtype} tensor, "
                        f"input_tensor_list[{i}] a {tuple(t.shape)} {t.dtype} one (they must match)"
                    )
        dt = _same_dtype(input_list, what)
        outs_flat = [o for outs in output_lists for o in outs]
        for i, t in enumerate([*input_list, *outs_flat]):
            if t.layout != torch.strided:
                raise InvalidUsageError(f"devccl {what}: tensor {i} is a {t.layout} tensor; dense tensors only")
        device = _call_device([*input_list, *outs_flat], what)
        flat_in = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in input_list])
        flat_out = torch.empty(n * flat_in.numel(), dtype=torch.uint8, device=flat_in.device)

        def post() -> None:
            at = 0
            for o in outs_flat:
                k = o.numel() * o.element_size()
                o.copy_(flat_out[at : at + k].view(dt).view(o.shape))
                at += k

        return self._launch(
            what,
            self._async(opts),
            [lambda kw: self._comm.all_gather(flat_out, flat_in, **kw)],
            output_lists,
            post,
            tensors=[*input_list, *outs_flat],
            temps=[flat_out],
        )

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        return self._launch(
            "_allgather_base",
            self._async(opts),
            [lambda kw: self._comm.all_gather(output, input, **kw)],
            [output],
            tensors=[input, output],
        )

    def allgather_into_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        if len(outputs) != len(inputs):
            raise InvalidUsageError(f"devccl allgather_into_tensor_coalesced: {len(outputs)} outputs for {len(inputs)} inputs")
        calls = [lambda kw, o=o, i=i: self._comm.all_gather(o, i, **kw) for o, i in zip(outputs, inputs, strict=True)]
        return self._launch(
            "allgather_into_tensor_coalesced", self._async(opts), calls, outputs, tensors=[*inputs, *outputs]
        )

    def reduce_scatter(
        self, output_tensors: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None
    ) -> dist.Work:
        name = reduce_op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        out = _one(output_tensors, "reduce_scatter")
        ins = _one(input_lists, "reduce_scatter")
        n = self.size()
        if len(ins) != n:
            raise InvalidUsageError(f"devccl reduce_scatter: expected {n} input tensors, got {len(ins)}")
        _check_all(ins, "input_list")
        _call_device([out, *ins], "reduce_scatter")
        for i, t in enumerate(ins):
            if t.numel() != out.numel() or t.dtype != out.dtype:
                raise InvalidUsageError(
                    f"devccl reduce_scatter: input_list[{i}] has {t.numel()} {t.dtype} elements, the output "
                    f"{out.numel()} {out.dtype}"
                )
        flat = _flat(ins)
        return self._launch(
            "reduce_scatter",
            self._async(opts),
            [lambda kw: self._comm.reduce_scatter(out, flat, name, **kw)],
            output_tensors,
            tensors=[out, *ins],
        )

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        name = reduce_op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        return self._launch(
            "_reduce_scatter_base",
            self._async(opts),
            [lambda kw: self._comm.reduce_scatter(output, input, name, **kw)],
            [output],
            tensors=[input, output],
        )

    def reduce_scatter_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        name = reduce_op_name(opts.reduceOp if opts is not None else ReduceOp.SUM)
        if len(outputs) != len(inputs):
            raise InvalidUsageError(f"devccl reduce_scatter_tensor_coalesced: {len(outputs)} outputs for {len(inputs)} inputs")
        calls = [
            lambda kw, o=o, i=i: self._comm.reduce_scatter(o, i, name, **kw)
            for o, i in zip(outputs, inputs, strict=True)
        ]
        return self._launch(
            "reduce_scatter_tensor_coalesced", self._async(opts), calls, outputs, tensors=[*inputs, *outputs]
        )

    def gather(self, output_lists: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        root = opts.rootRank if opts is not None else 0
        inp = _one(input_tensors, "gather")
        if self.rank() == root:
            outs = _one(output_lists, "gather")
            flat, post = self._gather_list("gather", outs, inp)
            temps = [flat]
        else:
            if output_lists and any(output_lists):
                raise InvalidUsageError("devccl gather: only the root passes output tensors")
            flat, post, outs, temps = None, None, [], []
        return self._launch(
            "gather",
            self._async(opts),
            [lambda kw: self._comm.gather(inp, flat, root, **kw)],
            output_lists,
            post,
            tensors=[inp, *outs],
            temps=temps,
        )

    def scatter(self, output_tensors: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None) -> dist.Work:
        root = opts.rootRank if opts is not None else 0
        out = _one(output_tensors, "scatter")
        flat = None
        ins: list[torch.Tensor] = []
        if self.rank() == root:
            ins = _one(input_lists, "scatter")
            n = self.size()
            if len(ins) != n:
                raise InvalidUsageError(f"devccl scatter: expected {n} input tensors on the root, got {len(ins)}")
            _check_all(ins, "input_list")
            _call_device([out, *ins], "scatter")
            for i, t in enumerate(ins):
                if t.numel() != out.numel() or t.dtype != out.dtype:
                    raise InvalidUsageError(
                        f"devccl scatter: input_list[{i}] has {t.numel()} {t.dtype} elements, the output "
                        f"{out.numel()} {out.dtype}"
                    )
            flat = _flat(ins)
        elif input_lists and any(input_lists):
            raise InvalidUsageError("devccl scatter: only the root passes input tensors")
        return self._launch(
            "scatter",
            self._async(opts),
            [lambda kw: self._comm.scatter(out, flat, root, **kw)],
            output_tensors,
            tensors=[out, *ins],
        )

    @staticmethod
    def _split_counts(t: torch.Tensor, splits: Sequence[int], n: int, what: str) -> list[int]:
        """Element counts per rank for splits along dim 0 (equal split when empty)."""
        rows = t.shape[0] if t.dim() > 0 else t.numel()
        per_row = t.numel() // rows if rows else 0
        if not splits:
            if rows % n:
                raise InvalidUsageError(f"devccl alltoall_base: {what} has {rows} rows, which do not split into {n} equal parts")
            return [rows // n * per_row] * n
        if len(splits) != n or sum(splits) != rows or any(s < 0 for s in splits):
            raise InvalidUsageError(
                f"devccl alltoall_base: {what}_split_sizes {list(splits)} must be {n} non-negative sizes summing to {rows}"
            )
        return [s * per_row for s in splits]

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any = None,
    ) -> dist.Work:
        n = self.size()
        if not output_split_sizes and not input_split_sizes and output.numel() == input.numel():
            call = lambda kw: self._comm.all_to_all(output, input, **kw)  # noqa: E731
        else:
            oc = self._split_counts(output, output_split_sizes, n, "output")
            ic = self._split_counts(input, input_split_sizes, n, "input")
            call = lambda kw: self._comm.all_to_all_v(output, input, oc, ic, **kw)  # noqa: E731
        return self._launch("alltoall_base", self._async(opts), [call], [output], tensors=[input, output])

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        n = self.size()
        if len(output_tensors) != n or len(input_tensors) != n:
            raise InvalidUsageError(
                f"devccl alltoall: expected {n} input and {n} output tensors, got {len(input_tensors)} and {len(output_tensors)}"
            )
        _check_all(input_tensors, "input_tensors")
        _check_all(output_tensors, "output_tensors")
        dt = _same_dtype([*input_tensors, *output_tensors], "alltoall")
        device = _call_device([*input_tensors, *output_tensors], "alltoall")
        flat_in = _flat(input_tensors)
        flat_out = torch.empty(sum(t.numel() for t in output_tensors), dtype=dt, device=device or "cpu")
        ic = [t.numel() for t in input_tensors]
        oc = [t.numel() for t in output_tensors]
        return self._launch(
            "alltoall",
            self._async(opts),
            [lambda kw: self._comm.all_to_all_v(flat_out, flat_in, oc, ic, **kw)],
            output_tensors,
            lambda: _unflatten_into(flat_out, output_tensors),
            tensors=[*input_tensors, *output_tensors],
            temps=[flat_out],
        )

    @staticmethod
    def _tag(tag: int) -> int:
        if not 0 <= tag < 2**32:
            raise InvalidUsageError(f"devccl send/recv: tag must be in 0..2**32-1, got {tag}")
        return tag

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        t = _one(tensors, "send")
        tag = self._tag(tag)
        self._check_peer(dst, "send")
        self.calls["send"] += 1
        return self._p2p.add(True, t, dst, tag, tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        t = _one(tensors, "recv")
        tag = self._tag(tag)
        self._check_peer(src, "recv")
        self.calls["recv"] += 1
        return self._p2p.add(False, t, src, tag, tensors)

    def _check_peer(self, peer: int, what: str) -> None:
        # Checked here, at the call: errors in a batch would otherwise surface at wait().
        if not (0 <= peer < self.size() and peer != self.rank()):
            raise InvalidUsageError(
                f"devccl {what}: peer {peer} is not another rank of this {self.size()}-rank group"
            )

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> dist.Work:
        """``dist.recv``/``dist.irecv`` without ``src``: the Work's ``_source_rank()`` is the
        sender (see :meth:`_P2pBatcher.add_any`)."""
        t = _one(tensors, "recv")
        tag = self._tag(tag)
        check_tensor(t, "tensor")
        tensor_dtype(t, "tensor")
        self.calls["recv_anysource"] += 1
        return self._p2p.add_any(t, tag, tensors)

    def barrier(self, opts: Any = None) -> dist.Work:
        """A host-side barrier (no CUDA stream involved), in issue order with the group's
        other calls."""
        return self._launch("barrier", self._async(opts), [lambda kw: self._comm.barrier(**kw)], [])

    # -- lifecycle ------------------------------------------------------------------------------

    def abort(self) -> None:
        """Fail collectives in progress on every member and poison the communicator."""
        self.calls["abort"] += 1
        self._comm.abort("torch ProcessGroup.abort()")

    def shutdown(self) -> None:
        """Finish queued work, then close the communicator and the rendezvous server."""
        self.calls["shutdown"] += 1
        self._p2p.flush()
        self._completer.stop()
        try:
            self._comm.destroy()
        finally:
            if self._server is not None:
                self._server.shutdown()


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> ProcessGroupDevccl:
    return ProcessGroupDevccl(store, rank, size, timeout)


if BACKEND.upper() not in dist.Backend._plugins:
    dist.Backend.register_backend(BACKEND, _create, devices=["cpu", "cuda"])
