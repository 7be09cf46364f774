"""The one communicator that collectives.tf's functions use: made by init() (or handed to it),
closed by shutdown(). Horovod's hvd.init() is the model: once per process, then every call
reads it."""

from __future__ import annotations

import threading
from typing import Optional

import collectives as cc

_lock = threading.Lock()
_comm: Optional[cc.Communicator] = None
_owned = False  # made by init(), so closed by shutdown(); a communicator handed in stays the caller's


def init(comm: Optional[cc.Communicator] = None, **init_args) -> cc.Communicator:
    """Starts collectives for this process: ``collectives.init(**init_args)`` (mpirun, torchrun,
    COLLECTIVES_* or a single process, reducers included), or takes ``comm``, a communicator
    made already. A second call returns the same communicator."""
    global _comm, _owned
    with _lock:
        if _comm is not None:
            if comm is not None and comm is not _comm or init_args:
                raise ValueError("collectives.tf.init() was called already: call shutdown() before "
                                 "initializing again with other arguments")
            return _comm
        _comm, _owned = (comm, False) if comm is not None else (cc.init(**init_args), True)
        return _comm


def communicator() -> cc.Communicator:
    """The communicator of init(); RuntimeError if init() was not called."""
    comm = _comm
    if comm is None:
        raise RuntimeError("collectives.tf is not initialized: call collectives.tf.init() first")
    return comm


def shutdown() -> None:
    """Closes the communicator that init() made (idempotent; one handed to init() stays open);
    init() may be called again after it."""
    global _comm
    with _lock:
        comm, owned, _comm = _comm, _owned, None
    if comm is not None and owned:
        comm.close()


def rank() -> int:
    return communicator().rank


def size() -> int:
    return communicator().size
