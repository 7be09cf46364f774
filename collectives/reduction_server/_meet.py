"""The workers' side of meeting the job's reducers (the reducers' side is _join).

Under mpirun, reducers of the workers' (MPMD) job give their address records over MPI
(collectives._mpi.MpiJob.reducer_records). Otherwise worker 0 publishes the job's id, size
and COLLECTIVES_NUM_REDUCERS in the job's store (:func:`publish_job`; in a collectives store
of its own, :func:`open_job_store`, where the workers met otherwise), each reducer claims an
index there and publishes its :func:`reducer_record`, and every worker waits for them all
(:func:`meet_reducers`). Every process checks the records alike
(:func:`check_reducer_records`), and each worker connects once to each reducer
(:func:`connect_reducers`).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import _handshake
from .._config import Config
from .._handshake import ROLE_REDUCER, client_handshake
from .._launch import parse_address
from .._mesh import check_protocol, dial
from .._rendezvous import Store, StoreWaits, serve_store, signed_store
from .._store import SignedStore, StoreClient, StoreServer
from ..errors import CollectiveError

__all__ = ["publish_job", "open_job_store", "meet_reducers", "reducer_record", "check_reducer_records",
           "connect_reducers"]

log = logging.getLogger("collectives")


def publish_job(store: SignedStore, job_id: bytes, size: int, num_reducers: int, *,
                prefix: str = "collectives/") -> None:
    """Worker 0's part: what a reducer reads from the store to join the job. ``store`` is
    a SignedStore, since reducers check what they read."""
    store.set(prefix + "size", str(size).encode())
    store.set(prefix + "num_reducers", str(num_reducers).encode())
    store.set(prefix + "job", job_id)  # last: once it is there, so are the others


def meet_reducers(store: Store, rank: int, size: int, secret: bytes, job_id: bytes, config: Config, *,
                  prefix: str = "collectives/", rendezvous: str = "the store",
                  deadline: Optional[float] = None) -> Tuple[List[Any], List[str]]:
    """Connects this worker to each of the job's config.num_reducers reducers, which publish
    their addresses in ``store`` (the job's :class:`~collectives._rendezvous.Store`)
    once worker 0 has called :func:`publish_job` there. Returns (links, names) by reducer
    index; ([], []) for a job without reducers.
    """
    deadline = time.monotonic() + config.timeout if deadline is None else deadline
    waits = StoreWaits(signed_store(store, secret, job_id), prefix, deadline, config.timeout)
    records = waits.wait_for_addresses(
        [f"reducer/{index}" for index in range(config.num_reducers)], "reducer", "reducers",
        f" at the rendezvous {rendezvous}",
        lambda many: f"start {'them' if many else 'it'} with `collectives-reducer --rendezvous {rendezvous}` (and the "
                     "job's COLLECTIVES_TOKEN), or set COLLECTIVES_NUM_REDUCERS to the number of reducers you start")
    return connect_reducers([json.loads(r) for r in records], rank, config, secret, job_id, deadline)


def reducer_record(listener: socket.socket) -> Dict[str, Any]:
    """What a reducer publishes so that workers can reach it."""
    host, port = listener.getsockname()[:2]
    return {"host": host, "port": port, "hostname": socket.gethostname(), "protocol": _handshake.PROTOCOL_VERSION}


def check_reducer_records(records: List[Dict[str, Any]]) -> None:
    """Every worker (and under mpirun every reducer) runs this on the same records, so all
    of them raise, and alike. A reducer that could not listen publishes why, as "failed"."""
    failed = [f"reducer {index}: {r['failed']}" for index, r in enumerate(records) if "failed" in r]
    if failed:
        raise CollectiveError("reducers could not start: " + "; ".join(failed))
    for index, record in enumerate(records):
        check_protocol(f"reducer {index}", record)


def connect_reducers(records: List[Dict[str, Any]], rank: int, config: Config, secret: bytes, job_id: bytes,
                     deadline: float) -> Tuple[List[Any], List[str]]:
    """One authenticated link (socket and keys) from this worker to each reducer whose
    ``records`` are given, by reducer index, and their names, by the deadline."""
    check_reducer_records(records)
    names = [f"reducer {index} ({r['host']}:{r['port']})" for index, r in enumerate(records)]
    socks: List[socket.socket] = []
    keys = []
    try:
        for index, record in enumerate(records):
            socks.append(dial((record["host"], record["port"]), f"rank {rank}", names[index], deadline,
                              config.timeout))
            keys.append(client_handshake(socks[-1], secret, rank, index, 0,
                                         min(time.monotonic() + config.handshake_timeout, deadline), job_id=job_id,
                                         peer_role=ROLE_REDUCER, security=config.wire_security))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if socks:
        log.info("rank %d: connected to %d reducer(s)", rank, len(socks))
    return [session.link(sock) for session, sock in zip(keys, socks)], names


def open_job_store(rendezvous: str, source: str, rank: int, size: int, secret: bytes, job_id: bytes,
                   num_reducers: int, deadline: float) -> Tuple[StoreClient, Optional[StoreServer]]:
    """The collectives store at ``rendezvous`` (HOST:PORT, from ``source``) where reducers
    started on their own meet the job: worker 0 serves it and publishes the job there;
    every worker connects to it. Returns (client, server or None)."""
    host, port = parse_address(rendezvous, source)
    server = serve_store(host, port) if rank == 0 else None
    store = None
    try:
        store = StoreClient(host, port, timeout=max(1.0, deadline - time.monotonic()))
        if rank == 0:
            publish_job(signed_store(store, secret, job_id), job_id, size, num_reducers)
    except BaseException:
        for closable in (store, server):
            if closable is not None:
                closable.close()
        raise
    return store, server
