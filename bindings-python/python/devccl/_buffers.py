"""Turning numpy arrays and torch tensors into operands the native module accepts.

Torch tensors are never copied:

- a CPU tensor becomes a numpy view of the same memory (``tensor.detach().numpy()``;
  bfloat16, which numpy lacks, as an int16 view with ``dtype="bf16"``; float8 as a uint8
  view with ``dtype="f8e4m3"`` / ``"f8e5m2"``);
- a CUDA tensor becomes a :class:`CudaTensorView`: its device address, length and device
  ordinal (``__cuda_array_interface__`` plus ``device``), keeping the tensor alive for as
  long as devccl uses its memory. Calls on CUDA memory are stream-ordered (see
  :meth:`devccl.Communicator.all_reduce`).

Tensors devccl cannot use directly are refused with a message that says what to do,
instead of being copied behind the caller's back:

- tensors on other devices (meta, xpu, mps, ...): :class:`devccl.UnsupportedError`;
- a call mixing CPU and CUDA tensors (or two CUDA devices): :class:`devccl.InvalidUsageError`;
- non-contiguous or sparse tensors: :class:`devccl.InvalidUsageError` (a ``ValueError``);
- element types devccl does not reduce (bool, int16, complex, ...): :class:`devccl.DTypeError`
  (a ``TypeError``).

torch is never imported here: a tensor can only exist if the caller already imported it.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from ._native import DTypeError, InvalidUsageError, UnsupportedError

#: torch dtype name -> devccl dtype name.
_TORCH_DTYPES = {
    "torch.float32": "float32",
    "torch.float64": "float64",
    "torch.float16": "float16",
    "torch.bfloat16": "bf16",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
    "torch.int32": "int32",
    "torch.int64": "int64",
    "torch.uint32": "uint32",
    "torch.uint64": "uint64",
    "torch.float8_e4m3fn": "f8e4m3",
    "torch.float8_e5m2": "f8e5m2",
}

#: devccl dtypes numpy has no type for -> the integer torch dtype a CPU tensor is viewed as.
_RAW_VIEWS = {"bf16": "int16", "f8e4m3": "uint8", "f8e5m2": "uint8"}

#: array-interface typestr of the storage a CUDA tensor of each devccl dtype is exposed as.
_TYPESTR = {
    "float32": "<f4",
    "float64": "<f8",
    "float16": "<f2",
    "bf16": "<u2",
    "int8": "|i1",
    "uint8": "|u1",
    "int32": "<i4",
    "int64": "<i8",
    "uint32": "<u4",
    "uint64": "<u8",
    "f8e4m3": "|u1",
    "f8e5m2": "|u1",
}

SUPPORTED = (
    "float32, float64, float16, bfloat16, int8, uint8, int32, int64, uint32, uint64, float8_e4m3fn, float8_e5m2"
)


class Operand(NamedTuple):
    """One buffer as the native module takes it."""

    #: What the native module gets (numpy view, CudaTensorView, or the caller's object).
    buf: Any
    #: The devccl dtype name, when the buffer's format alone does not say it.
    dtype: str | None
    #: The torch device of a CUDA tensor (whose current stream orders the call), else None.
    device: Any = None


class CudaTensorView:
    """A CUDA tensor's memory as the native module reads it: ``__cuda_array_interface__``
    (the raw bytes of the storage, typed by ``dtype=`` rather than the typestr, since the
    interface has no bfloat16 or float8) and ``device`` (the CUDA ordinal, which the
    interface does not carry). Holding the view holds the tensor, so its memory stays
    allocated while devccl uses it; the interface names no stream: the call's ``stream=``
    orders it."""

    __slots__ = ("_interface", "device", "tensor")

    def __init__(self, t: Any, dtype: str, writable: bool = True) -> None:
        self.tensor = t
        self.device: int = t.device.index if t.device.index is not None else 0
        self._interface = {
            "shape": (t.numel(),),
            "typestr": _TYPESTR[dtype],
            "data": (t.data_ptr(), not writable),
            "strides": None,
            "version": 3,
            "stream": None,
        }

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:  # noqa: PLW3201 - the protocol's name
        return self._interface

    def __repr__(self) -> str:
        return f"<devccl CUDA view of {tuple(self.tensor.shape)} {self.tensor.dtype} on cuda:{self.device}>"


def is_tensor(x: Any) -> bool:
    """True when ``x`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_device(t: Any, what: str) -> None:
    """Refuse a tensor that lives neither in host memory nor on a CUDA device.

    devccl reaches host memory directly and CUDA memory through its CUDA device backend;
    for anything else a silent copy would hide a transfer (and its synchronisation) in every
    collective, so the caller must move the tensor.
    """
    dev = t.device
    if dev.type in ("cpu", "cuda"):
        return
    raise UnsupportedError(
        f"devccl does not support {dev.type} tensors ({what} is on {dev}); it works on CPU and CUDA tensors. Move "
        f"the tensor with .cpu() or .cuda() (and copy the result back). devccl never copies silently."
    )


def check_tensor(t: Any, what: str) -> None:
    """Refuse a tensor devccl cannot take a pointer to: wrong device, layout or strides."""
    check_device(t, what)
    torch = sys.modules["torch"]
    if t.layout != torch.strided:
        raise InvalidUsageError(f"{what} is a {t.layout} tensor; devccl needs dense (strided) tensors")
    if not t.is_contiguous():
        raise InvalidUsageError(
            f"{what} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); devccl works on "
            f"contiguous memory only: pass tensor.contiguous() (and copy the result back if needed)"
        )


def tensor_dtype(t: Any, what: str) -> str:
    """The devccl dtype name of a tensor's element type."""
    name = _TORCH_DTYPES.get(str(t.dtype))
    if name is None:
        raise DTypeError(f"{what} is a {t.dtype} tensor; devccl supports {SUPPORTED}")
    return name


def cuda_device(x: Any) -> Any:
    """The torch device of a CUDA tensor, else None."""
    return x.device if is_tensor(x) and x.device.type == "cuda" else None


def as_buffer(x: Any, what: str, writable: bool = True) -> Operand:
    """The operand for the native module: CPU tensors as zero-copy numpy views, CUDA tensors
    as :class:`CudaTensorView`, other objects (numpy arrays, bytearrays, memoryviews,
    objects with ``__cuda_array_interface__``) unchanged."""
    if not is_tensor(x):
        return Operand(x, None)
    check_tensor(x, what)
    dt = tensor_dtype(x, what)
    t = x.detach()
    if t.device.type == "cuda":
        return Operand(CudaTensorView(t, dt, writable), dt, t.device)
    raw = _RAW_VIEWS.get(dt)
    if raw is not None:
        torch = sys.modules["torch"]
        return Operand(t.view(getattr(torch, raw)).numpy(), dt)
    return Operand(t.numpy(), dt)


def element_type(x: Any) -> str:
    """A printable element type of a tensor or array, for messages."""
    dt = getattr(x, "dtype", None)
    return str(dt) if dt is not None else type(x).__name__


def _where(x: Any) -> str:
    return str(x.device) if is_tensor(x) else "host memory"


def check_same_device(pairs: list[tuple[Any, str]]) -> None:
    """Refuse operands of one call on different devices (CPU and CUDA, or two GPUs), naming
    both: devccl never copies between them."""
    tensors = [(x, w) for x, w in pairs if x is not None and is_tensor(x)]
    if not tensors:
        return
    first, what = tensors[0]
    for x, w in tensors[1:]:
        if x.device != first.device:
            raise InvalidUsageError(
                f"{what} is on {_where(first)} but {w} is on {_where(x)}: every tensor of a call must be on one device "
                f"(devccl never copies between host and device memory); move them with .cpu() or .cuda()"
            )


def as_buffers(a: Any, what_a: str, b: Any, what_b: str) -> tuple[Operand, Operand]:
    """Convert two operands (``b`` written) and check they hold one element type on one device."""
    if is_tensor(a) and is_tensor(b) and a.dtype != b.dtype:
        raise DTypeError(f"{what_a} is {a.dtype} but {what_b} is {b.dtype}; both must have the same dtype")
    check_same_device([(a, what_a), (b, what_b)])
    oa, ob = as_buffer(a, what_a, writable=False), as_buffer(b, what_b)
    if oa.dtype is not None and ob.dtype is not None and oa.dtype != ob.dtype:
        raise DTypeError(f"{what_a} is {element_type(a)} but {what_b} is {element_type(b)}")
    return oa, ob


def resolve_stream(stream: Any, operands: list[Operand]) -> int | None:
    """The raw CUstream a call is ordered after: ``stream`` when given (an int or anything
    with ``cuda_stream``, like ``torch.cuda.Stream``), else torch's current stream on the
    device of the call's CUDA tensors, else None (host memory, or other CUDA objects: the
    native module then uses the stream their array interface names, or 0)."""
    if stream is not None:
        return int(getattr(stream, "cuda_stream", stream))
    for o in operands:
        if o.device is not None:
            return sys.modules["torch"].cuda.current_stream(o.device).cuda_stream
    return None
