"""collectives: collective communication for data-parallel training.

    import collectives as cc
    comm = cc.init()            # mpirun, torchrun, COLLECTIVES_* or a single process
    comm.allreduce(x)           # in place, sum over all workers
"""

import os as _os

from ._core_loading import own_symbols_first as _own_symbols_first
from .errors import CollectiveError, TimeoutError  # noqa: A004 (cc.TimeoutError on purpose)

try:
    with _own_symbols_first():
        from . import _core  # noqa: E402  (imports collectives.errors)
except ImportError as _error:
    from ._source_checkout import missing_core_message

    raise ImportError(missing_core_message(_os.path.dirname(_os.path.abspath(__file__)), _error)) from None
from .communicator import ANY_SOURCE, Communicator, Work, init  # noqa: E402

# The framework plugins live in plugins/ (plugins/torch is installed as collectives/torch): in a
# source checkout, `import collectives.torch` finds them there.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "CMakeLists.txt")) and _os.path.isdir(_os.path.join(_checkout, "plugins")):
    __path__.append(_os.path.join(_checkout, "plugins"))

__version__ = "0.1.0"
PROTOCOL_VERSION = _core.PROTOCOL_VERSION

__all__ = ["init", "Communicator", "Work", "ANY_SOURCE", "CollectiveError", "TimeoutError", "__version__"]
