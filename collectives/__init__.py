"""collectives: collective communication for data-parallel training.

    import collectives as cc
    comm = cc.init()            # mpirun, torchrun, COLLECTIVES_* or a single process
    comm.allreduce(x)           # in place, sum over all workers
"""

from .errors import CollectiveError, TimeoutError  # noqa: A004 (cc.TimeoutError on purpose)

from . import _core  # noqa: E402  (imports collectives.errors)
from .communicator import Communicator, Work, init  # noqa: E402

__version__ = "0.1.0"
PROTOCOL_VERSION = _core.PROTOCOL_VERSION

__all__ = ["init", "Communicator", "Work", "CollectiveError", "TimeoutError", "__version__"]
