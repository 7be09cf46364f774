"""collectives for PyTorch: the torch.distributed backend "collectives" and DDP comm hooks.

    import torch.distributed as dist
    dist.init_process_group("collectives")        # torchrun, tcp://, file://: torch autoloads the backend
                                                  # (or `import collectives.torch` first)
    model = DistributedDataParallel(model)        # buckets all-reduced by the ring, or by reducers

    collectives.torch.init_process_group()        # the same, under mpirun too

Or keep another backend for everything else and send only the gradients through collectives:

    comm = collectives.init()
    model.register_comm_hook(comm, collectives.torch.hooks.allreduce_hook)
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import collectives as cc
from collectives import _netif

from . import hooks
from ._process_group import BACKEND, ProcessGroup, create

__all__ = ["BACKEND", "ProcessGroup", "init_process_group", "hooks"]

# torch.distributed's env:// needs these; other launchers (mpirun, COLLECTIVES_*) do not set them.
_TORCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
_ADDRESS_BYTES = 256

# Registered already where torch autoloaded the backend (collectives_torch_autoload), with a creator
# that calls this module's.
if BACKEND not in dist.Backend.backend_list:
    dist.Backend.register_backend(BACKEND, create, extended_api=True,
                                  devices=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])


def init_process_group(*, timeout: Optional[datetime.timedelta] = None) -> None:
    """``dist.init_process_group("collectives")`` with whatever launched this process:
    torchrun (env://), and also mpirun (an MPMD job with reducers included) and
    COLLECTIVES_RANK/SIZE/RENDEZVOUS, where torch alone finds no rank, size or store.
    ``timeout`` bounds start-up and every collective (default: torch's, or COLLECTIVES_TIMEOUT
    outside torchrun)."""
    if all(name in os.environ for name in _TORCH_ENV):
        dist.init_process_group(BACKEND, timeout=timeout)
        return
    comm = cc.init(timeout=None if timeout is None else timeout.total_seconds())
    try:
        dist.init_process_group(BACKEND, store=_store_over(comm), rank=comm.rank, world_size=comm.size,
                                timeout=timeout, pg_options=comm)
    except BaseException:
        comm.close()
        raise


def _store_over(comm: cc.Communicator) -> dist.TCPStore:
    """A torch store for the job (torch keeps its own records there): rank 0 serves it on a
    free port and tells the others where, over ``comm``."""
    address = np.zeros(_ADDRESS_BYTES, np.uint8)
    store = None
    if comm.rank == 0:
        host = _netif.advertise_address(comm.config.socket_ifname, None)
        store = dist.TCPStore(host, 0, comm.size, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=comm.config.timeout))
        encoded = f"{host}:{store.port}".encode()
        address[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    comm.broadcast(address, root=0)
    if store is not None:
        return store
    host, _, port = address.tobytes().rstrip(b"\0").decode().rpartition(":")
    return dist.TCPStore(host, int(port), comm.size, is_master=False,
                         timeout=datetime.timedelta(seconds=comm.config.timeout))
