"""UCX, the optional data plane (COLLECTIVES_TRANSPORT=ucx): where libucp is found, loading
it into the core, and what it sees on this host (collectives-info).

The core is built with UCX's headers only and loads libucp when a job asks for it, so an
installation without UCX imports and runs every other transport. libucp comes from the
``libucx-cu12`` wheel (``pip install collectives[ucx]``) where it is installed, else from the
system (``libucp.so.0`` on the loader's path: Debian's libucx0, MOFED, a module).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Tuple

from . import _core
from .errors import CollectiveError

__all__ = ["built", "library_path", "load", "describe", "RDMA_TRANSPORTS", "rdma_capable", "rdma_devices"]

_SYSTEM_LIBRARY = "libucp.so.0"
# UCX's transports between hosts over RDMA-capable NICs (InfiniBand, RoCE, AWS EFA): those of
# its "ib" alias (UCX_TLS=ib; src/ucp/core/ucp_context.c) less gga_mlx5 (copies within a host)
# and rc_gda (started by a GPU). Only the first part of a device's name: "rc_mlx5/mlx5_0:1".
RDMA_TRANSPORTS = frozenset({"rc_verbs", "rc_mlx5", "dc_mlx5", "ud_verbs", "ud_mlx5", "srd"})
# Where the kernel lists its RDMA devices (verbs: InfiniBand, RoCE, EFA); absent or empty
# without one, and then libucp is not even loaded.
_KERNEL_RDMA_DEVICES = "/sys/class/infiniband"


def built() -> bool:
    """Whether this build of the core has the UCX transport."""
    return bool(_core.HAVE_UCX)


def library_path() -> str:
    """The libucp to load: the libucx wheel's if it is installed, else the system's."""
    try:
        import libucx  # the libucx-cu12 wheel
    except ImportError:
        return _SYSTEM_LIBRARY
    path = os.path.join(os.path.dirname(libucx.__file__), "lib", _SYSTEM_LIBRARY)
    return path if os.path.exists(path) else _SYSTEM_LIBRARY


def load() -> None:
    """Loads libucp into the core (once per process; a libucp the process has already, such as
    Open MPI's under mpirun, is used instead); CollectiveError saying what to install if this
    build has no UCX transport or no libucp is found."""
    if not built():
        raise CollectiveError("COLLECTIVES_TRANSPORT=ucx: this build of collectives has no UCX transport; rebuild it "
                              "with UCX's headers present (pip install libucx-cu12 first; CMake option "
                              "COLLECTIVES_WITH_UCX), or choose another transport")
    _core.load_ucx(library_path())


def describe() -> Dict[str, Any]:
    """For collectives-info: whether the transport is built, and UCX's version and devices
    (transport/device) where libucp loads; why not where it does not."""
    if not built():
        return {"built": False}
    try:
        load()
    except CollectiveError as e:
        return {"built": True, "loaded": False, "why": str(e)}
    path, version, devices = _core.describe_ucx()
    return {"built": True, "loaded": True, "library": path, "version": version, "devices": list(devices)}


def rdma_capable(devices: Iterable[str]) -> List[str]:
    """Those of UCX's ``devices`` ("transport/device", as describe() lists them) that run over
    an RDMA-capable NIC."""
    return [device for device in devices if device.split("/", 1)[0] in RDMA_TRANSPORTS]


def rdma_devices() -> Tuple[List[str], str]:
    """UCX's RDMA-capable devices on this host, for COLLECTIVES_TRANSPORT=auto, and where
    there are none, why: the kernel lists no RDMA device, this build has no UCX, libucp does
    not load, or UCX sees none (UCX_TLS is obeyed). Never raises: UCX only ever adds to auto's
    choices."""
    try:
        kernel_has_rdma = bool(os.listdir(_KERNEL_RDMA_DEVICES))
    except OSError:
        kernel_has_rdma = False
    if not kernel_has_rdma:
        return [], f"no RDMA device ({_KERNEL_RDMA_DEVICES} lists none)"
    try:
        info = describe()
    except Exception as e:  # noqa: BLE001 - a UCX that breaks leaves auto as it was
        return [], f"UCX could not list its devices ({type(e).__name__}: {e})"
    if not info["built"]:
        return [], "RDMA devices, but this build of collectives has no UCX transport"
    if not info["loaded"]:
        return [], f"RDMA devices, but {info['why']}"
    found = rdma_capable(info["devices"])
    return found, "" if found else f"RDMA devices, but UCX runs on none of them (it sees {', '.join(info['devices'])})"
