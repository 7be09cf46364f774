"""UCX, the optional data plane (COLLECTIVES_TRANSPORT=ucx): where libucp is found, loading
it into the core, and what it sees on this host (collectives-info).

The core is built with UCX's headers only and loads libucp when a job asks for it, so an
installation without UCX imports and runs every other transport. libucp comes from the
``libucx-cu12`` wheel (``pip install collectives[ucx]``) where it is installed, else from the
system (``libucp.so.0`` on the loader's path: Debian's libucx0, MOFED, a module).
"""

from __future__ import annotations

import os
from typing import Any, Dict

from . import _core
from .errors import CollectiveError

__all__ = ["built", "library_path", "load", "describe"]

_SYSTEM_LIBRARY = "libucp.so.0"


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
