"""Turning the user's arrays and tensors into (address, element count, dtype) for the core.

Accepted: numpy arrays (bfloat16 through ml_dtypes), objects with ``__dlpack__`` (torch CPU
tensors, JAX and others; torch tensors do not expose the buffer protocol), and anything with
the buffer protocol. Nothing here copies: the core reads and writes the caller's memory, and
the caller's object is kept alive until the collective is done.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from . import _core

DTYPES: Tuple[str, ...] = tuple(_core.DTYPES)

# DLPack device types that are host memory the CPU can read and write: CPU, CUDA pinned host.
_DLPACK_HOST_DEVICES = frozenset({1, 3})


class Buffer(NamedTuple):  # a tuple: made on every call, so made cheaply
    obj: Any  # what keeps the memory alive (and exported) while the core uses it
    address: int
    count: int  # elements
    dtype: str
    shape: Tuple[int, ...]

    @property
    def dtype_code(self) -> int:
        return DTYPES.index(self.dtype)


# numpy dtype -> its name where the core takes it in this machine's byte order, else None.
# numpy makes dtype.name anew on every access, which costs a small collective more than its
# exchange on one host.
_NATIVE_NAMES: Dict[np.dtype, Optional[str]] = {}


def _native_name(dtype: np.dtype) -> Optional[str]:
    try:
        return _NATIVE_NAMES[dtype]
    except KeyError:
        name = dtype.name if dtype.isnative and dtype.name in DTYPES else None
        return _NATIVE_NAMES.setdefault(dtype, name)


def numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _unsupported_dtype(name: str) -> TypeError:
    return TypeError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}")


def view(x: Any, *, writable: bool, what: str = "buffer") -> Buffer:
    """The memory of x. TypeError for kinds, dtypes and layouts the core cannot use."""
    if isinstance(x, np.ndarray):
        return _view_numpy(x, x, writable, what)
    if hasattr(x, "__dlpack__"):
        return _view_dlpack(x, what)
    try:
        memory = memoryview(x)
    except TypeError:
        raise TypeError(
            f"{what} must be a numpy array, a tensor with __dlpack__ (e.g. a torch CPU tensor) "
            f"or an object with the buffer protocol, not {type(x).__name__}"
        ) from None
    # The export itself is held: while it lives, x cannot be resized or freed under us.
    return _view_numpy(np.asarray(memory), memory, writable, what)


def _view_numpy(array: np.ndarray, owner: Any, writable: bool, what: str) -> Buffer:
    name = _native_name(array.dtype)
    if name is None and array.dtype.name not in DTYPES:
        raise _unsupported_dtype(array.dtype.name)
    if name is None:
        raise TypeError(f"{what} is {array.dtype.str} (not this machine's byte order); pass x.astype(x.dtype.newbyteorder('='))")
    if not array.flags.c_contiguous:
        raise TypeError(f"{what} must be C-contiguous; pass np.ascontiguousarray(x) and copy back")
    if writable and not array.flags.writeable:
        raise TypeError(f"{what} is read-only, but this collective writes its result into it")
    address = _core.buffer_address(array)
    if address is None:
        address = array.__array_interface__["data"][0]
    return Buffer(owner, address, array.size, name, array.shape)


def _view_dlpack(x: Any, what: str) -> Buffer:
    try:
        capsule = x.__dlpack__()
    except (RuntimeError, TypeError, BufferError) as error:
        raise TypeError(f"{what} cannot be exported through DLPack: {error}") from error
    address, count, dtype_code, device_type, contiguous, owner = _core.dlpack_info(capsule)
    if device_type not in _DLPACK_HOST_DEVICES:
        raise TypeError(
            f"{what} lives on a device (DLPack device type {device_type}); collectives takes device memory in "
            "allreduce only (CUDA builds, collectives._device): move it to the CPU first"
        )
    if not contiguous and count:  # without elements, strides say nothing (torch's new_empty((3, 0)))
        raise TypeError(f"{what} must be contiguous; pass x.contiguous() and copy back")
    return Buffer((x, owner), address, count, DTYPES[dtype_code], tuple(getattr(x, "shape", (count,))))


def empty_like_kind(x: Any, shape: Tuple[int, ...], dtype: str) -> Any:
    """A new, uninitialised array of x's kind: a tensor for a tensor (x.new_empty), else numpy."""
    if not isinstance(x, np.ndarray) and hasattr(x, "new_empty"):
        return x.new_empty(shape)
    return np.empty(shape, dtype=numpy_dtype(dtype))
