"""Type stubs of the native module ``devccl._native`` (Rust, PyO3, abi3 ≥ 3.11).

Use the ``devccl`` package rather than this module directly: it adds one typed method per
collective and torch tensor support on top of :meth:`Communicator.collective`.
"""

from typing import Any, Literal, final

__version__: str

CollectiveKind = Literal[
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "all_to_all_v",
    "gather",
    "scatter",
    "send",
    "recv",
    "barrier",
]

def dtypes() -> list[str]:
    """The element types devccl supports (float32 float64 float16 bfloat16 int8 uint8 int32
    int64 uint32 uint64 float8_e4m3fn float8_e5m2)."""

def reduce_ops() -> list[str]:
    """The reduction operators (sum prod min max avg)."""

class DevcclError(RuntimeError):
    """Base class of every error devccl raises."""

class InvalidUsageError(DevcclError, ValueError):
    """The caller passed something invalid; nothing was sent, the communicator stays usable."""

class DTypeError(InvalidUsageError, TypeError):
    """An element type devccl does not support, or operands of different types."""

class RemoteError(DevcclError):
    """A peer failed, closed its connection, or sent something invalid."""

class MismatchError(RemoteError):
    """Ranks called different collectives, sizes, dtypes, ops or roots."""

class DevcclTimeoutError(DevcclError):
    """No progress within DEVCCL_TIMEOUT (collectives) or DEVCCL_INIT_TIMEOUT (init)."""

class AbortedError(DevcclError):
    """The communicator was aborted (by any rank) or poisoned by an earlier failure."""

class UnsupportedError(DevcclError):
    """The request cannot be served here (e.g. CUDA memory on a machine without a CUDA driver)."""

class DevcclSystemError(DevcclError):
    """An operating-system call failed."""

class InternalError(DevcclError):
    """A bug in devccl."""

@final
class Work:
    """An asynchronous or stream-ordered collective."""

    def wait(self, timeout: float | None = None) -> Any:
        """Block (GIL released) until finished; return the output buffer or raise the
        collective's error. With ``timeout`` seconds, raise the built-in TimeoutError if it
        has not finished by then (the work keeps running)."""

    def hold(self, stream: int | None = None) -> None:
        """Calls on CUDA memory: make work queued on ``stream`` (a raw CUstream; default: the
        stream the call was ordered after) from now on wait for the call, without blocking
        the host. Raises InvalidUsageError for calls on host memory."""

    @property
    def stream(self) -> int | None:
        """The CUstream a call on CUDA memory was ordered after; None for host calls."""

    @property
    def source(self) -> int | None:
        """For :meth:`Communicator.recv_any` with ``async_op=True``: the rank the message came
        from, once the receive finished successfully. None while it runs, after it failed
        (``wait()`` raises the error), and for every other call. Never blocks."""

    def is_completed(self) -> bool:
        """True once finished (successfully or not). Never blocks."""

    def is_success(self) -> bool:
        """True when finished without error. Never blocks."""

@final
class Communicator:
    """A devccl communicator (see ``devccl.Communicator`` for the typed API)."""

    def __new__(
        cls,
        rank: int,
        world_size: int,
        rendezvous: str,
        *,
        host_rendezvous: bool = False,
        group: str = "world",
        local_world_size: int | None = None,
        timeout: float | None = None,
        init_timeout: float | None = None,
    ) -> Communicator: ...
    @staticmethod
    def from_env() -> Communicator:
        """Join the communicator the launcher's environment describes."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def group(self) -> str: ...
    @property
    def comm_id(self) -> str: ...
    @property
    def poisoned(self) -> str | None: ...
    @property
    def destroyed(self) -> bool: ...
    def collective(
        self,
        kind: CollectiveKind,
        input: Any = None,
        output: Any = None,
        *,
        op: str = "sum",
        root: int = 0,
        peer: int = 0,
        tag: int = 0,
        send_counts: list[int] | None = None,
        send_displs: list[int] | None = None,
        recv_counts: list[int] | None = None,
        recv_displs: list[int] | None = None,
        dtype: str | None = None,
        async_op: bool = False,
        stream: int | None = None,
    ) -> Any:
        """Run one collective on buffer-protocol objects (host memory) or objects with
        ``__cuda_array_interface__`` and a ``device`` (CUDA memory, all on one device).
        Blocking: returns the output object (or the in-place buffer, or None); on CUDA memory
        without blocking the host, after holding ``stream``. ``async_op=True``: returns a
        :class:`Work`. CUDA calls are ordered after ``stream`` (default: the stream the array
        interface names, else 0)."""

    def p2p_batch(
        self,
        ops: list[tuple[bool, int, int, Any, str | None]],
        *,
        async_op: bool = False,
        stream: int | None = None,
    ) -> Any:
        """Several sends (is_send=True) and receives, as one operation; returns a Work when
        async_op, else None. Buffers all in host memory or all CUDA memory of one device
        (then stream-ordered as :meth:`collective`)."""
        ...
    def recv_any(
        self,
        buf: Any,
        tag: int = 0,
        *,
        dtype: str | None = None,
        async_op: bool = False,
        stream: int | None = None,
    ) -> Any:
        """Receive into ``buf`` (writable, C-contiguous, not empty; host or CUDA memory) from
        whichever rank sends first: the first rank whose next point-to-point message to this
        one has ``tag`` (a rank whose next message is something else does not match and is
        not skipped over); then as ``collective("recv", ...)`` from it (size and dtype must
        match the send). In issue order with the other calls; bounded by the communicator's
        timeout (DevcclTimeoutError naming the tag and the ranks).

        Blocking: returns the source rank (int); on CUDA memory it holds ``stream`` and waits
        on the host until the message arrived. ``async_op=True``: returns a :class:`Work`
        whose ``wait()`` returns ``buf`` and whose ``source`` is the source rank once
        finished."""

    def abort(self, reason: str = "aborted from Python") -> None:
        """Fail the collective in progress on every rank; later calls raise AbortedError."""

    def destroy(self) -> None:
        """Wait for queued collectives, then leave the rendezvous and close connections."""

@final
class RendezvousServer:
    """A rendezvous server hosted by this process."""

    def __new__(
        cls,
        listen: str = "127.0.0.1:0",
        *,
        world: int | None = None,
        secret: str | None = None,
        group_timeout: float = 120.0,
    ) -> RendezvousServer: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    def shutdown(self) -> None:
        """Stop serving. Idempotent."""
