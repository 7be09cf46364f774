"""CUDA device buffers (cupy arrays, torch CUDA tensors): found through DLPack or
``__cuda_array_interface__``, and all-reduced by staging through host memory: the device data
is copied to a host buffer, reduced there among the ranks, and copied back.

Needs a build with the CUDA kernels (nvcc present when it was built) and a GPU; elsewhere a
device buffer is refused with a TypeError saying so.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core
from ._buffers import numpy_dtype

__all__ = ["DeviceBuffer", "find", "to_host", "to_device"]

_DLPACK_CUDA = 2  # kDLCUDA


class DeviceBuffer(NamedTuple):
    obj: Any  # keeps the device memory (and its export) alive
    address: int
    count: int
    dtype: str


def find(x: Any, what: str = "buffer") -> Optional[DeviceBuffer]:
    """x's device memory if x lives on a CUDA device; None for host memory. TypeError if it
    does but this build or machine cannot reach it, or it is not contiguous."""
    device_type = None
    if hasattr(x, "__dlpack_device__"):
        device_type = int(x.__dlpack_device__()[0])
    elif hasattr(x, "__cuda_array_interface__"):
        device_type = _DLPACK_CUDA
    if device_type != _DLPACK_CUDA:
        return None
    if not _core.cuda.BUILT:
        raise TypeError(f"{what} lives on a CUDA device, and this build of collectives has no CUDA path (no nvcc when "
                        "it was built): move it to the CPU first, or rebuild collectives where nvcc is found")
    if _core.cuda.devices() == 0:
        raise TypeError(f"{what} lives on a CUDA device, but this process sees no GPU (driver missing?)")
    address, count, dtype_code, _, contiguous, owner = _core.dlpack_info(x.__dlpack__())
    if not contiguous:
        raise TypeError(f"{what} must be contiguous; pass x.contiguous() and copy back")
    return DeviceBuffer((x, owner), address, count, _core.DTYPES[dtype_code])


def to_host(device: DeviceBuffer) -> np.ndarray:
    """A host copy of the device buffer."""
    host = np.empty(device.count, dtype=numpy_dtype(device.dtype))
    _core.cuda.copy(host.ctypes.data, device.address, host.nbytes)
    return host


def to_device(host: np.ndarray, device: DeviceBuffer) -> None:
    """Copies the host buffer back over the device buffer."""
    _core.cuda.copy(device.address, host.ctypes.data, host.nbytes)
