"""Turns a set of processes into workers holding authenticated TCP connections to each other
(and to the job's reducers): composes the steps that the modules below take.

1. Launch detection (collectives._launch): which launcher started this process, and its
   rank, size, rendezvous and secret, by the precedence arguments > COLLECTIVES_* >
   the launcher's variables; with nothing set, a job of one process.
2. Rendezvous (collectives._rendezvous): worker 0 serves the job's store at the rendezvous
   and the others connect to it; or, under mpirun, the MPI path (collectives._mpi): worker 0
   broadcasts the job's secret, and a store is served only if a rendezvous is given too.
3. The mesh (collectives._mesh): every worker publishes its address through the store's or
   MPI's exchange and connects to every other, each connection authenticated. One deadline
   (config.timeout) bounds it all. A worker that fails posts its error to the store (when
   there is one) so that the others fail at once with its message instead of at the deadline.
4. Reducers (collectives.reduction_server._meet) are met last: each worker connects once to
   each of them.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from typing import Any, List, Mapping, Optional

from . import _netif
from ._config import Config
from ._handshake import JOB_ID_BYTES, ROLE_WORKER
from ._launch import SECRET_BYTES, Launch, find_launch
from ._mesh import close_links, connect_workers
from ._shm import SharedMemory
from ._mpi import MpiExchange, MpiJob, mpi_world
from ._rendezvous import Store, StoreExchange, serve_store, signed_store
from ._store import StoreClient, StoreServer
from ._topology import own_label
from ._torch_store import secret_through_store, torchrun_store
from .reduction_server._meet import (check_reducer_records, connect_reducers, meet_reducers, open_job_store,
                                     publish_job)

__all__ = ["Bootstrap", "bootstrap", "bootstrap_with_store"]

# Worker 0, failing, keeps serving the store this long at most so that the others can
# read its failure notice; it stops as soon as they have all disconnected.
_ABORT_LINGER_S = 5.0


@dataclasses.dataclass
class Bootstrap:
    """What :func:`bootstrap` hands to the core."""

    rank: int
    size: int
    # peer_links[p]: connections_per_peer connected, authenticated sockets (with their keys) to
    # worker p, by connection index; [] for p == rank. Whoever takes them closes them.
    peer_links: List[List[Any]]
    peer_names: List[str]  # "rank p (host:port)", for error messages
    store: Optional[Store]
    store_server: Optional[StoreServer]  # on worker 0 when it serves the store
    mpi_comm: Optional[Any]  # workers-only MPI communicator under mpirun
    secret: bytes = dataclasses.field(repr=False)  # in memory only; never logged
    job_id: bytes = dataclasses.field(repr=False)  # random per job; binds handshakes to it
    # reducer_links[i]: one connected, authenticated socket (with its keys) to reducer i
    reducer_links: List[Any] = dataclasses.field(default_factory=list)
    reducer_names: List[str] = dataclasses.field(default_factory=list)  # "reducer i (host:port)"
    topology: List[str] = dataclasses.field(default_factory=list)  # each worker's label (collectives._topology)
    shm: SharedMemory = SharedMemory()  # with same-host workers; the core owns its fds once handed
    transport: str = "auto"  # what the peer links carry: config.transport, or "ucx" where auto chose it

    def close(self) -> None:
        """Closes the store client and server (not the fds: the core owns those). Idempotent."""
        if self.store is not None:
            self.store.close()
        if self.store_server is not None:
            self.store_server.close()


def bootstrap(rank: Optional[int] = None, size: Optional[int] = None, rendezvous: Optional[str] = None,
              config: Optional[Config] = None, *, environ: Optional[Mapping[str, str]] = None) -> Bootstrap:
    """Finds this process's rank and peers (see collectives._launch) and connects to them all.

    ``environ`` defaults to ``os.environ``; ``config`` to ``Config.from_env(environ=environ)``.
    Raises ValueError for bad or missing settings, CollectiveError (TimeoutError, ...) when
    peers cannot be reached, naming which.
    """
    env = os.environ if environ is None else environ
    config = Config.from_env(environ=env) if config is None else config
    launch = find_launch(rank, size, rendezvous, config, env)
    if launch.launcher == "mpirun":
        return _bootstrap_mpi(launch, config, env)
    if launch.launcher == "alone":
        return _alone(config)

    host, port = launch.address
    deadline = time.monotonic() + config.timeout
    secret = launch.secret
    if secret is None:  # torchrun without COLLECTIVES_TOKEN
        secret = secret_through_store(torchrun_store(env, config.timeout))
    server = serve_store(host, port) if launch.rank == 0 else None
    client = None
    try:
        client = StoreClient(host, port, timeout=config.timeout)
        result = bootstrap_with_store(client, launch.rank, launch.size, secret, config, toward=host,
                                      rendezvous=launch.rendezvous, deadline=deadline)
    except BaseException as e:
        if client is not None:
            client.close()
        if server is not None:
            # linger only for a failure that was posted, never for Ctrl-C
            server.close(linger=_ABORT_LINGER_S if isinstance(e, Exception) else 0.0)
        raise
    result.store_server = server
    return result


def _alone(config: Config) -> Bootstrap:
    return Bootstrap(0, 1, [[]], ["rank 0 (this process)"], None, None, None,
                     secrets.token_bytes(SECRET_BYTES), secrets.token_bytes(JOB_ID_BYTES), topology=[own_label(config.topology)],
                     transport=config.transport)


def bootstrap_with_store(store: Store, rank: int, size: int, secret: bytes, config: Config, *,
                         toward: Optional[str] = None, prefix: str = "collectives/",
                         rendezvous: str = "the store", deadline: Optional[float] = None,
                         reducer_rendezvous: Optional[str] = None) -> Bootstrap:
    """Connects the workers over a :class:`~collectives._rendezvous.Store` that they share,
    such as a :class:`~collectives._store.StoreClient` or an adapter of torch.distributed's
    store.

    ``toward`` is a host on the workers' network (the store's host) from which to pick
    the local address to advertise; ``prefix`` keeps apart the keys of several jobs that
    share one store; ``rendezvous`` names the store in messages; ``deadline`` (a
    time.monotonic() value) defaults to config.timeout from now. With
    config.num_reducers, the reducers meet the workers in this store too, or, given
    ``reducer_rendezvous`` (HOST:PORT; for a store that reducers cannot use, such as
    torch.distributed's), in a collectives store that worker 0 serves there.
    """
    deadline = time.monotonic() + config.timeout if deadline is None else deadline
    signed = signed_store(store, secret)  # so that no stranger at the store can pass for one of the job
    exchange = StoreExchange(signed, prefix, rank, size, deadline, config.timeout, rendezvous)
    peer_links: List[List[Any]] = []
    mesh = None
    meeting, server = store, None  # where the reducers meet the job
    try:
        if rank == 0:
            job_id = secrets.token_bytes(JOB_ID_BYTES)
            signed.bind(job_id)
            publish_job(signed, job_id, size, config.num_reducers, prefix=prefix)
        else:
            job_id = exchange.get("job", f"rank 0 did not start the job at {rendezvous} within {config.timeout:g} s")
            signed.bind(job_id)
        mesh = connect_workers(rank, size, config, secret, job_id, deadline, exchange,
                               lambda: _netif.advertise_address(config.socket_ifname, toward))
        peer_links, peer_names = mesh.links, mesh.names
        if reducer_rendezvous is not None and config.num_reducers:
            meeting, server = open_job_store(reducer_rendezvous, "COLLECTIVES_RENDEZVOUS", rank, size, secret,
                                             job_id, config.num_reducers, deadline)
            reducer_links, reducer_names = meet_reducers(meeting, rank, size, secret, job_id, config,
                                                         rendezvous=reducer_rendezvous, deadline=deadline)
        else:
            reducer_links, reducer_names = meet_reducers(store, rank, size, secret, job_id, config, prefix=prefix,
                                                         rendezvous=rendezvous, deadline=deadline)
    except Exception as e:
        close_links(link for links in peer_links for link in links)
        if mesh is not None:
            mesh.shm.close()
        for closable in (meeting, server):
            if closable is not store and closable is not None:
                closable.close()
        exchange.publish_failure(e)
        raise
    return Bootstrap(rank, size, peer_links, peer_names, meeting, server, None, secret, job_id, reducer_links,
                     reducer_names, mesh.topology, mesh.shm, mesh.transport)


def _bootstrap_mpi(launch: Launch, config: Config, env: Mapping[str, str]) -> Bootstrap:
    """The workers of an mpirun job, over MPI (see collectives._mpi)."""
    job = MpiJob(mpi_world(env), ROLE_WORKER, time.monotonic() + config.timeout)
    mpi_comm = job.comm
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    deadline = time.monotonic() + config.timeout
    rendezvous = launch.rendezvous
    config, secret, job_id, address0 = job.start_worker(config, rendezvous, env)
    reducer_records = job.reducer_records(None) if job.reducers else []
    check_reducer_records(reducer_records)  # raises on every process alike if a reducer failed

    mesh = connect_workers(rank, size, config, secret, job_id, deadline, MpiExchange(mpi_comm),
                           lambda: address0 if rank == 0 else _netif.advertise_address(config.socket_ifname, address0))
    peer_links, peer_names = mesh.links, mesh.names
    store = server = None
    try:
        if rendezvous is not None:  # others (reducers started on their own) meet the job there
            store, server = open_job_store(rendezvous, launch.rendezvous_source, rank, size, secret, job_id,
                                           config.num_reducers, deadline)
        if job.reducers:
            reducer_links, reducer_names = connect_reducers(reducer_records, rank, config, secret, job_id, deadline)
        elif config.num_reducers:
            reducer_links, reducer_names = meet_reducers(store, rank, size, secret, job_id, config,
                                                         rendezvous=rendezvous, deadline=deadline)
        else:
            reducer_links, reducer_names = [], []
    except BaseException:
        close_links(link for links in peer_links for link in links)
        mesh.shm.close()
        for closable in (store, server):
            if closable is not None:
                closable.close()
        raise
    return Bootstrap(rank, size, peer_links, peer_names, store, server, mpi_comm, secret, job_id, reducer_links,
                     reducer_names, mesh.topology, mesh.shm, mesh.transport)
