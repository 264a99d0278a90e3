"""Turning numpy arrays and torch tensors into buffers the native module accepts.

Torch tensors are never copied: a CPU tensor becomes a numpy view of the same memory
(``tensor.detach().numpy()``; bfloat16, which numpy lacks, as an int16 view with
``dtype="bf16"``). Tensors devccl cannot use directly are refused with a message that says
what to do, instead of being copied behind the caller's back:

- tensors on another device (CUDA, meta, ...): :class:`devccl.UnsupportedError`;
- non-contiguous or sparse tensors: :class:`devccl.InvalidUsageError` (a ``ValueError``);
- element types devccl does not reduce (bool, int16, complex, ...): :class:`devccl.DTypeError`
  (a ``TypeError``).

torch is never imported here: a tensor can only exist if the caller already imported it.
"""

from __future__ import annotations

import sys
from typing import Any

from ._native import DTypeError, InvalidUsageError, UnsupportedError

#: torch dtype name -> devccl dtype name, for the types numpy can view directly.
_TORCH_NUMPY_DTYPES = {
    "torch.float32": "float32",
    "torch.float64": "float64",
    "torch.float16": "float16",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
    "torch.int32": "int32",
    "torch.int64": "int64",
}

SUPPORTED = "float32, float64, float16, bfloat16, int8, uint8, int32, int64"


def is_tensor(x: Any) -> bool:
    """True when ``x`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_device(t: Any, what: str) -> None:
    """Refuse a tensor that does not live in host memory.

    devccl does not move device memory yet; copying silently would hide a device-to-host
    transfer (and its synchronisation) in every collective, so the caller must do it.
    """
    dev = t.device
    kind = dev.type
    if kind == "cpu":
        return
    name = "CUDA" if kind == "cuda" else kind
    raise UnsupportedError(
        f"devccl does not yet support {name} tensors ({what} is on {dev}); device memory support is not "
        f"implemented. Move the tensor to host memory with .cpu() (and copy the result back), or use the "
        f"'nccl' backend for GPU tensors. devccl never copies silently."
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


def tensor_dtype(t: Any, what: str) -> str | None:
    """The devccl dtype name a tensor is passed with, or None when numpy's format says it."""
    torch = sys.modules["torch"]
    if t.dtype == torch.bfloat16:
        return "bf16"
    if str(t.dtype) not in _TORCH_NUMPY_DTYPES:
        raise DTypeError(f"{what} is a {t.dtype} tensor; devccl supports {SUPPORTED}")
    return None


def as_buffer(x: Any, what: str) -> tuple[Any, str | None]:
    """``(buffer, dtype)`` for the native module: tensors as zero-copy numpy views, other
    objects (numpy arrays, bytearrays, memoryviews) unchanged."""
    if not is_tensor(x):
        return x, None
    check_tensor(x, what)
    dt = tensor_dtype(x, what)
    t = x.detach()
    if dt == "bf16":
        torch = sys.modules["torch"]
        return t.view(torch.int16).numpy(), dt
    return t.numpy(), None


def element_type(x: Any) -> str:
    """A printable element type of a tensor or array, for messages."""
    dt = getattr(x, "dtype", None)
    return str(dt) if dt is not None else type(x).__name__


def as_buffers(a: Any, what_a: str, b: Any, what_b: str) -> tuple[Any, Any, str | None]:
    """Convert two operands and check they hold the same element type."""
    if is_tensor(a) and is_tensor(b) and a.dtype != b.dtype:
        raise DTypeError(f"{what_a} is {a.dtype} but {what_b} is {b.dtype}; both must have the same dtype")
    ba, da = as_buffer(a, what_a)
    bb, db = as_buffer(b, what_b)
    if da is not None and db is not None and da != db:
        raise DTypeError(f"{what_a} is {element_type(a)} but {what_b} is {element_type(b)}")
    return ba, bb, da or db
