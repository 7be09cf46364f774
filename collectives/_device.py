"""CUDA device buffers (cupy arrays, torch CUDA tensors): found through DLPack or
``__cuda_array_interface__``, and all-reduced by staging through pinned host memory piece by
piece (the core's StagedAllreduce: the copy of piece k+1 into host memory overlaps the
all-reduce of piece k, and piece k is copied back while piece k+1 is reduced).

Needs a build with the CUDA path (nvcc present when it was built) and a GPU; elsewhere a device
buffer is refused with a TypeError saying so.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

from . import _core

__all__ = ["DeviceBuffer", "Staging", "find"]

_DLPACK_CUDA = 2  # kDLCUDA
# Each piece's size, and how many are in host memory at once: 4 MiB pieces keep the copies near
# the link's full speed, and four of them (16 MiB pinned per GPU and communicator) keep a piece
# in flight either way beside the one being reduced.
PIECE_BYTES = 4 << 20
SLOTS = 4


class DeviceBuffer(NamedTuple):
    obj: Any  # keeps the device memory (and its export) alive
    address: int
    count: int
    dtype: str
    device: int  # the GPU's ordinal


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
    # DLPack's stream 1, the legacy default stream: the producer orders its work before it, and
    # each call's copies wait for what was queued there before (cuda_copy_engine.h).
    try:
        capsule = x.__dlpack__(stream=1)
    except TypeError:  # an exporter older than DLPack's stream argument
        capsule = x.__dlpack__()
    address, count, dtype_code, _, contiguous, owner = _core.dlpack_info(capsule)
    if not contiguous:
        raise TypeError(f"{what} must be contiguous; pass x.contiguous() and copy back")
    device = _core.cuda.device_of(address) if count else 0
    return DeviceBuffer((x, owner), address, count, _core.DTYPES[dtype_code], device)


class Staging:
    """A communicator's staged all-reduces: one pipeline (a CUDA stream and its pinned slots)
    per GPU, made at its first buffer, freed by close()."""

    def __init__(self) -> None:
        self._pipelines: Dict[int, Any] = {}

    def allreduce(self, core: Any, buffer: DeviceBuffer, dtype_code: int, op_code: int) -> Any:
        """Queues the all-reduce of `buffer` on `core` (the core's communicator) and returns its
        Work at once; every rank must call it where it would call allreduce."""
        pipeline = self._pipelines.get(buffer.device)
        if pipeline is None:
            pipeline = self._pipelines[buffer.device] = _core.StagedAllreduce.cuda(buffer.device, PIECE_BYTES, SLOTS)
        return pipeline.allreduce(core, buffer.address, buffer.count, dtype_code, op_code)

    def close(self) -> None:
        """Waits for the all-reduces in flight (close the core first, so that they end) and frees
        the pinned memory."""
        pipelines, self._pipelines = self._pipelines, {}
        for pipeline in pipelines.values():
            pipeline.close()
