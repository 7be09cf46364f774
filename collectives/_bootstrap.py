"""Turns a set of processes into workers holding authenticated TCP connections to each other.

Where rank, size and the rendezvous come from (first that applies):
  1. ``rank``/``size``/``rendezvous`` arguments, or COLLECTIVES_RANK/SIZE/RENDEZVOUS:
     worker 0 serves the job's store on the rendezvous address; the others connect to it.
  2. mpirun (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK, ...): mpi4py's COMM_WORLD; worker 0
     broadcasts the job's secret (COLLECTIVES_TOKEN if set, else a fresh one); addresses
     are exchanged by allgather; a store is served only if a rendezvous is given too.
  3. torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): as 1, the store on
     MASTER_ADDR at MASTER_PORT+1 (torchrun's own store holds MASTER_PORT).
  4. nothing: a job of one process.

Then every worker listens once and publishes its address; worker i connects to every worker
j < i (connections_per_peer sockets each) and accepts from every j > i, and each connection
passes the HMAC handshake, which tells the acceptor who connected. One deadline
(config.timeout) bounds it all. A worker that fails posts its error to the store (when
there is one) so that the others fail at once with its message instead of at the deadline.

Reducers (collectives-reducer) are met last: each worker connects once to each of them.
Under mpirun they are processes of the same (MPMD) job and publish their addresses over
MPI; otherwise worker 0 publishes the job's id, size and COLLECTIVES_NUM_REDUCERS in the
store, and each reducer claims an index there and publishes its address (see
collectives.reduction_server).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from . import _handshake, _netif
from ._config import Config
from ._handshake import (JOB_ID_BYTES, ROLE_REDUCER, ROLE_WORKER, PeerHello, SessionKeys, client_handshake,
                         server_handshake)
from ._store import SignedStore, StoreClient, StoreServer
from .errors import AuthenticationError, CollectiveError, ProtocolVersionError, TimeoutError

__all__ = ["Bootstrap", "bootstrap", "bootstrap_with_store", "read_secret", "publish_job", "meet_reducers", "signed_store",
           "NO_SECRET", "parse_address", "StoreWaits", "torchrun_rendezvous"]

log = logging.getLogger("collectives")

_MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
_SECRET_BYTES = 32
# While waiting, a worker looks for another's failure notice in the store this often.
_ABORT_POLL_S = 0.5
# A peer that fails closes its sockets moments before it posts why; a worker that sees a
# connection refused or dropped waits this long for that notice, to report the cause.
_NOTICE_GRACE_S = 1.0
# Worker 0, failing, keeps serving the store this long at most so that the others can
# read its failure notice; it stops as soon as they have all disconnected.
_ABORT_LINGER_S = 5.0
# How often a process waiting for the others of its mpirun job looks at its deadline.
_MPI_POLL_S = 0.02
# Set once a process has met reducers in its mpirun job: they serve that one communicator.
_mpi_job_had_reducers = False
_ERRORS = {cls.__name__: cls for cls in (TimeoutError, AuthenticationError, ProtocolVersionError)}


@dataclasses.dataclass
class Bootstrap:
    """What :func:`bootstrap` hands to the core."""

    rank: int
    size: int
    # peer_links[p]: connections_per_peer connected, authenticated sockets (with their keys) to
    # worker p, by connection index; [] for p == rank. Whoever takes them closes them.
    peer_links: List[List[Any]]
    peer_names: List[str]  # "rank p (host:port)", for error messages
    store: Optional[StoreClient]
    store_server: Optional[StoreServer]  # on worker 0 when it serves the store
    mpi_comm: Optional[Any]  # workers-only MPI communicator under mpirun
    secret: bytes = dataclasses.field(repr=False)  # in memory only; never logged
    job_id: bytes = dataclasses.field(repr=False)  # random per job; binds handshakes to it
    # reducer_links[i]: one connected, authenticated socket (with its keys) to reducer i
    reducer_links: List[Any] = dataclasses.field(default_factory=list)
    reducer_names: List[str] = dataclasses.field(default_factory=list)  # "reducer i (host:port)"

    def close(self) -> None:
        """Closes the store client and server (not the fds: the core owns those). Idempotent."""
        if self.store is not None:
            self.store.close()
        if self.store_server is not None:
            self.store_server.close()


def bootstrap(rank: Optional[int] = None, size: Optional[int] = None, rendezvous: Optional[str] = None,
              config: Optional[Config] = None, *, environ: Optional[Mapping[str, str]] = None) -> Bootstrap:
    """Finds this process's rank and peers (see the module's doc) and connects to them all.

    ``environ`` defaults to ``os.environ``; ``config`` to ``Config.from_env(environ=environ)``.
    Raises ValueError for bad or missing settings, CollectiveError (TimeoutError, ...) when
    peers cannot be reached, naming which.
    """
    env = os.environ if environ is None else environ
    config = Config.from_env(environ=env) if config is None else config
    if rendezvous is None:
        rendezvous = env.get("COLLECTIVES_RENDEZVOUS") or None
        rendezvous_source = "COLLECTIVES_RENDEZVOUS"
    else:
        rendezvous_source = "rendezvous"
    rank, rank_source = _setting(rank, "rank", env, "COLLECTIVES_RANK")
    size, size_source = _setting(size, "size", env, "COLLECTIVES_SIZE")

    if rank is None and size is None and launched_by_mpirun(env):
        # There the job's reducers are counted, and the settings checked, over MPI.
        return _bootstrap_mpi(rendezvous, rendezvous_source, config, env)
    config.check_runnable()
    if rank is not None or size is not None:
        if rank is None or size is None:
            given = rank_source if rank is not None else size_source
            raise ValueError(f"{given} is set but not both of rank and size: set COLLECTIVES_RANK and "
                             "COLLECTIVES_SIZE (or pass rank= and size=) together")
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, rank_source = _setting(None, "RANK", env, "RANK")
        size, size_source = _setting(None, "WORLD_SIZE", env, "WORLD_SIZE")
        if rendezvous is None:
            rendezvous, rendezvous_source = torchrun_rendezvous(env), "MASTER_ADDR:MASTER_PORT+1"
    else:
        if config.num_reducers:
            raise ValueError(f"COLLECTIVES_NUM_REDUCERS={config.num_reducers} is set, but no launcher is: start the "
                             "workers with mpirun or torchrun, or set COLLECTIVES_RANK, COLLECTIVES_SIZE and "
                             "COLLECTIVES_RENDEZVOUS (where the reducers meet the job)")
        log.info("collectives: no launcher found (no COLLECTIVES_RANK/COLLECTIVES_SIZE, mpirun or torchrun "
                 "variables): this is a job of one process")
        return _alone()

    if size < 1:
        raise ValueError(f"{size_source}={size} must be at least 1")
    if not 0 <= rank < size:
        raise ValueError(f"{rank_source}={rank} is out of range for {size_source}={size}: "
                         f"ranks are 0 to {size - 1}")
    if rendezvous is None:
        if size > 1 or config.num_reducers > 0:
            raise ValueError(f"a job of {size} workers needs a rendezvous: set COLLECTIVES_RENDEZVOUS=HOST:PORT "
                             "(worker 0's host and a free port) on every process, or pass rendezvous=")
        return _alone()
    host, port = parse_address(rendezvous, rendezvous_source)
    secret = read_secret(env)
    if secret is None:
        if size > 1 or config.num_reducers > 0:
            raise ValueError(NO_SECRET)
        secret = secrets.token_bytes(_SECRET_BYTES)

    deadline = time.monotonic() + config.timeout
    server = _serve_store(host, port) if rank == 0 else None
    client = None
    try:
        client = StoreClient(host, port, timeout=config.timeout)
        result = bootstrap_with_store(client, rank, size, secret, config, toward=host, rendezvous=rendezvous,
                                      deadline=deadline)
    except BaseException as e:
        if client is not None:
            client.close()
        if server is not None:
            # linger only for a failure that was posted, never for Ctrl-C
            server.close(linger=_ABORT_LINGER_S if isinstance(e, Exception) else 0.0)
        raise
    result.store_server = server
    return result


def _alone() -> Bootstrap:
    return Bootstrap(0, 1, [[]], ["rank 0 (this process)"], None, None, None,
                     secrets.token_bytes(_SECRET_BYTES), secrets.token_bytes(JOB_ID_BYTES))


NO_SECRET = ("collectives needs a secret shared by the processes of this job to authenticate their "
              "connections: set COLLECTIVES_TOKEN to the same random string on every process (for example "
              "the output of `python -c 'import secrets; print(secrets.token_hex(32))'`), or "
              "COLLECTIVES_TOKEN_FILE to the path of a file that holds it")


# 32 hex digits carry 128 bits: a token of at least this many characters, if random, cannot be guessed.
_STRONG_SECRET_CHARACTERS = 32


def launched_by_mpirun(environ: Mapping[str, str]) -> bool:
    return any(name in environ for name in _MPI_VARIABLES)


def read_secret(environ: Optional[Mapping[str, str]] = None) -> Optional[bytes]:
    """The job's secret from COLLECTIVES_TOKEN or COLLECTIVES_TOKEN_FILE, or None if neither is set."""
    env = os.environ if environ is None else environ
    token, path = env.get("COLLECTIVES_TOKEN"), env.get("COLLECTIVES_TOKEN_FILE")
    if token and path:
        raise ValueError("both COLLECTIVES_TOKEN and COLLECTIVES_TOKEN_FILE are set: set only one")
    if token:
        return _checked_secret(token.encode(), "COLLECTIVES_TOKEN")
    if path:
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read COLLECTIVES_TOKEN_FILE={path}: {e.strerror or e}") from None
        if not secret:
            raise ValueError(f"COLLECTIVES_TOKEN_FILE={path} is empty: put the job's secret in it")
        return _checked_secret(secret, f"COLLECTIVES_TOKEN_FILE={path}")
    return None


def _checked_secret(secret: bytes, source: str) -> bytes:
    """The secret, with a warning if it is short: anyone who can read the store or the wire
    sees HMACs of known data under it, and may guess a short one offline."""
    if len(secret) < _STRONG_SECRET_CHARACTERS:
        log.warning("the job's secret from %s has %d characters: one that short can be guessed offline from what "
                    "the store and the wire show; use %d or more random ones, e.g. "
                    "python -c 'import secrets; print(secrets.token_hex(32))'", source, len(secret),
                    _STRONG_SECRET_CHARACTERS)
    return secret


def bootstrap_with_store(store: Any, rank: int, size: int, secret: bytes, config: Config, *,
                         toward: Optional[str] = None, prefix: str = "collectives/",
                         rendezvous: str = "the store", deadline: Optional[float] = None,
                         reducer_rendezvous: Optional[str] = None) -> Bootstrap:
    """Connects the workers over a store that they share: any object with
    ``set(key, bytes)``, ``get(key, timeout) -> bytes`` (raising collectives'
    TimeoutError), ``add(key, int) -> int``, ``check(keys) -> bool`` and ``close()``, such
    as a :class:`StoreClient` or an adapter of torch.distributed's store.

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
    exchange = _StoreExchange(signed, prefix, rank, size, deadline, config.timeout, rendezvous)
    peer_links: List[List[Any]] = []
    meeting, server = store, None  # where the reducers meet the job
    try:
        if rank == 0:
            job_id = secrets.token_bytes(JOB_ID_BYTES)
            publish_job(signed, job_id, size, config.num_reducers, prefix=prefix)
        else:
            job_id = exchange.get("job", f"rank 0 did not start the job at {rendezvous} within {config.timeout:g} s")
        peer_links, peer_names = _connect_workers(rank, size, config, secret, job_id, deadline, exchange,
                                                lambda: _netif.advertise_address(config.socket_ifname, toward))
        if reducer_rendezvous is not None and config.num_reducers:
            meeting, server = _open_job_store(reducer_rendezvous, "COLLECTIVES_RENDEZVOUS", rank, size, secret,
                                              job_id, config.num_reducers, deadline)
            reducer_links, reducer_names = meet_reducers(meeting, rank, size, secret, job_id, config,
                                                       rendezvous=reducer_rendezvous, deadline=deadline)
        else:
            reducer_links, reducer_names = meet_reducers(store, rank, size, secret, job_id, config, prefix=prefix,
                                                       rendezvous=rendezvous, deadline=deadline)
    except Exception as e:
        _close_links(link for links in peer_links for link in links)
        for closable in (meeting, server):
            if closable is not store and closable is not None:
                closable.close()
        exchange.publish_failure(e)
        raise
    return Bootstrap(rank, size, peer_links, peer_names, meeting, server, None, secret, job_id, reducer_links,
                     reducer_names)


def signed_store(store: Any, secret: bytes) -> SignedStore:
    """``store`` with the job's records signed and checked (so that no stranger who can
    reach it can pass for one of the job), refusals naming who writes each record."""
    return SignedStore(store, secret, writer=_record_writer)


def _record_writer(key: str) -> str:
    """Who writes a record of the job (publish_job, the exchanges, the reducers)."""
    name = key.rsplit("/", 2)
    if name[-1] in ("job", "size", "num_reducers"):
        return "rank 0"
    if len(name) >= 2 and name[-2] in ("addr", "reducer") and name[-1].isdigit():
        return f"{'rank' if name[-2] == 'addr' else 'reducer'} {name[-1]}"
    return ""


def publish_job(store: Any, job_id: bytes, size: int, num_reducers: int, *, prefix: str = "collectives/") -> None:
    """Worker 0's part: what a reducer reads from the store to join the job. ``store`` is
    a SignedStore, since reducers check what they read."""
    store.set(prefix + "size", str(size).encode())
    store.set(prefix + "num_reducers", str(num_reducers).encode())
    store.set(prefix + "job", job_id)  # last: once it is there, so are the others


def meet_reducers(store: Any, rank: int, size: int, secret: bytes, job_id: bytes, config: Config, *,
                  prefix: str = "collectives/", rendezvous: str = "the store",
                  deadline: Optional[float] = None) -> Tuple[List[int], List[str]]:
    """Connects this worker to each of the job's config.num_reducers reducers, which publish
    their addresses in ``store`` (a store-like object, as for :func:`bootstrap_with_store`)
    once worker 0 has called :func:`publish_job` there. Returns (links, names) by reducer
    index; ([], []) for a job without reducers.
    """
    deadline = time.monotonic() + config.timeout if deadline is None else deadline
    waits = StoreWaits(signed_store(store, secret), prefix, deadline, config.timeout)
    records, missing = waits.wait_all([f"reducer/{index}" for index in range(config.num_reducers)])
    if missing:
        many = len(missing) > 1
        raise TimeoutError(
            f"{_plural(missing, 'reducer', 'reducers')} of {config.num_reducers} did not publish "
            f"{'their addresses' if many else 'its address'} at the rendezvous {rendezvous} within "
            f"{config.timeout:g} s: start {'them' if many else 'it'} with `collectives-reducer --rendezvous "
            f"{rendezvous}` (and the job's COLLECTIVES_TOKEN), or set COLLECTIVES_NUM_REDUCERS to the number "
            "of reducers you start")
    return _connect_reducers([json.loads(r) for r in records], rank, config, secret, job_id, deadline)


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
        _check_protocol(f"reducer {index}", record)


def _connect_reducers(records: List[Dict[str, Any]], rank: int, config: Config, secret: bytes, job_id: bytes,
                      deadline: float) -> Tuple[List[Any], List[str]]:
    check_reducer_records(records)
    names = [f"reducer {index} ({r['host']}:{r['port']})" for index, r in enumerate(records)]
    socks: List[socket.socket] = []
    keys = []
    try:
        for index, record in enumerate(records):
            socks.append(_dial((record["host"], record["port"]), f"rank {rank}", names[index], deadline,
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


def _close_links(links) -> None:
    for link in links:
        os.close(link.fd)


def _bootstrap_mpi(rendezvous: Optional[str], rendezvous_source: str, config: Config,
                   env: Mapping[str, str]) -> Bootstrap:
    job = MpiJob(mpi_world(env), ROLE_WORKER, time.monotonic() + config.timeout)
    mpi_comm = job.comm
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    deadline = time.monotonic() + config.timeout

    # Each worker checks its settings against the reducers in the job, and worker 0 makes
    # the secret (or takes COLLECTIVES_TOKEN, which processes launched outside this mpirun
    # need too), the job id, and the address the others route toward. A failure travels in
    # the exchange itself: a process that raised instead of joining the next MPI call would
    # leave the others blocked in it for good.
    mine: Any = None
    try:
        config = _count_mpi_reducers(config, len(job.reducers), rendezvous)
        if rank == 0:
            address = _netif.advertise_address(config.socket_ifname, "127.0.0.1" if job.one_host else None)
            mine = (read_secret(env) or secrets.token_bytes(_SECRET_BYTES), secrets.token_bytes(JOB_ID_BYTES), address)
    except (OSError, ValueError, CollectiveError) as e:
        mine = e
    secret, job_id, address0 = job.start(mine)
    reducer_records = job.reducer_records(None) if job.reducers else []

    peer_links, peer_names = _connect_workers(
        rank, size, config, secret, job_id, deadline, _MpiExchange(mpi_comm),
        lambda: address0 if rank == 0 else _netif.advertise_address(config.socket_ifname, address0))
    store = server = None
    try:
        if rendezvous is not None:  # others (reducers started on their own) meet the job there
            store, server = _open_job_store(rendezvous, rendezvous_source, rank, size, secret, job_id,
                                            config.num_reducers, deadline)
        if job.reducers:
            reducer_links, reducer_names = _connect_reducers(reducer_records, rank, config, secret, job_id, deadline)
        elif config.num_reducers:
            reducer_links, reducer_names = meet_reducers(store, rank, size, secret, job_id, config,
                                                       rendezvous=rendezvous, deadline=deadline)
        else:
            reducer_links, reducer_names = [], []
    except BaseException:
        _close_links(link for links in peer_links for link in links)
        for closable in (store, server):
            if closable is not None:
                closable.close()
        raise
    return Bootstrap(rank, size, peer_links, peer_names, store, server, mpi_comm, secret, job_id, reducer_links,
                     reducer_names)


def _count_mpi_reducers(config: Config, count: int, rendezvous: Optional[str]) -> Config:
    """The settings for an mpirun job that holds ``count`` reducer processes."""
    if count:
        if config.num_reducers not in (0, count):
            raise ValueError(f"COLLECTIVES_NUM_REDUCERS={config.num_reducers}, but this mpirun job holds {count} "
                             "reducer processes: unset it, or make the two agree")
        config = dataclasses.replace(config, num_reducers=count)
    elif config.num_reducers and rendezvous is None:
        raise ValueError(
            f"COLLECTIVES_NUM_REDUCERS={config.num_reducers}, but this mpirun job holds no reducers: launch them "
            "in it (mpirun -np N python train.py : -np R collectives-reducer), or set COLLECTIVES_RENDEZVOUS=HOST:PORT "
            "where reducers started on their own (collectives-reducer --rendezvous HOST:PORT) meet the job")
    config.check_runnable()
    return config


def mpi_world(env: Mapping[str, str]) -> Any:
    """mpi4py's COMM_WORLD, for a process that mpirun started."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        found = next(name for name in _MPI_VARIABLES if name in env)
        raise ImportError(f"this process was started by mpirun ({found} is set) but mpi4py is not installed: "
                          "pip install mpi4py, or launch with COLLECTIVES_RANK/SIZE/RENDEZVOUS instead") from e
    return MPI.COMM_WORLD


class MpiJob:
    """The processes of one mpirun job, workers and reducers (one MPMD job), as each of them
    sees it. Every process makes the same MPI_COMM_WORLD calls in the same order: this
    constructor, then :meth:`start`, then, where the job holds reducers,
    :meth:`reducer_records`."""

    def __init__(self, world: Any, role: int, deadline: float):
        global _mpi_job_had_reducers
        if _mpi_job_had_reducers:
            raise CollectiveError(
                "this mpirun job's reducers serve the first communicator that its workers made, and no other: "
                "under mpirun with reducers, make one communicator per process and keep it (or start reducers "
                "on their own, collectives-reducer --rendezvous, for jobs that make several)")
        self.world = world
        # A process that never joins (a worker that bootstraps otherwise) must not leave the
        # others blocked in MPI for good: they meet at a barrier that can be given up.
        arrived = world.Ibarrier()
        while not arrived.Test():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "not every process of this mpirun job reached collectives' start-up in time: under mpirun, "
                    "every worker calls collectives.init() (with no rank or size given) and every reducer runs "
                    "collectives-reducer; or start reducers on their own with --rendezvous")
            time.sleep(_MPI_POLL_S)
        # Every process says what it is, so that workers and reducers of one MPMD job can
        # tell each other apart; each role gets its own communicator, ordered as in COMM_WORLD.
        self.members: List[Tuple[int, str]] = world.allgather((role, socket.gethostname()))
        self.comm = world.Split(color=role, key=world.rank)
        self.workers = [r for r, (member_role, _) in enumerate(self.members) if member_role == ROLE_WORKER]
        self.reducers = [r for r, (member_role, _) in enumerate(self.members) if member_role == ROLE_REDUCER]
        _mpi_job_had_reducers = bool(self.reducers)
        self.one_host = len({hostname for _, hostname in self.members}) == 1

    def _name(self, world_rank: int) -> str:
        if world_rank in self.workers:
            return f"rank {self.workers.index(world_rank)}"
        return f"reducer {self.reducers.index(world_rank)}"

    def start(self, mine: Any) -> Tuple[bytes, bytes, str]:
        """(secret, job id, worker 0's address), which worker 0 gives as ``mine``; any
        process may give its failure instead, and then every process raises."""
        gathered = self.world.allgather(mine)
        failed = [r for r, item in enumerate(gathered) if isinstance(item, Exception)]
        if self.world.rank in failed:
            raise gathered[self.world.rank]
        if failed:
            raise CollectiveError("; ".join(f"{self._name(r)} could not start the job: {gathered[r]}" for r in failed))
        return gathered[self.workers[0]]

    def reducer_records(self, mine: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Every reducer's address record, by reducer index: reducers give theirs as
        ``mine`` (see reducer_record, or {"failed": why}), workers None."""
        gathered = self.world.allgather(mine)
        records = [gathered[r] for r in self.reducers]
        check_reducer_records(records)
        return records


def _open_job_store(rendezvous: str, source: str, rank: int, size: int, secret: bytes, job_id: bytes,
                    num_reducers: int, deadline: float) -> Tuple[StoreClient, Optional[StoreServer]]:
    """The collectives store at ``rendezvous`` (HOST:PORT, from ``source``) where reducers
    started on their own meet the job: worker 0 serves it and publishes the job there;
    every worker connects to it. Returns (client, server or None)."""
    host, port = parse_address(rendezvous, source)
    server = _serve_store(host, port) if rank == 0 else None
    store = None
    try:
        store = StoreClient(host, port, timeout=max(1.0, deadline - time.monotonic()))
        if rank == 0:
            publish_job(signed_store(store, secret), job_id, size, num_reducers)
    except BaseException:
        for closable in (store, server):
            if closable is not None:
                closable.close()
        raise
    return store, server


def _serve_store(host: str, port: int) -> StoreServer:
    # A host written as loopback is served there only; any other name on every interface,
    # since a host's own name may resolve to 127.0.1.1 here and to its real address elsewhere.
    if _netif.names_loopback(host):
        return StoreServer("127.0.0.1" if host == "localhost" else host, port).start()
    return StoreServer("", port).start()


def _setting(value: Optional[int], name: str, env: Mapping[str, str], variable: str) -> Tuple[Optional[int], str]:
    """An integer from the argument ``name`` or else the environment ``variable``, and its source."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        return value, name
    text = env.get(variable)
    if text is None or not text.strip():
        return None, variable
    try:
        return int(text), variable
    except ValueError:
        raise ValueError(f"{variable}={text!r} is not an integer") from None


def torchrun_rendezvous(env: Mapping[str, str]) -> str:
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not port:
        raise ValueError("RANK and WORLD_SIZE are set (torchrun?) but MASTER_ADDR or MASTER_PORT is not: "
                         "set both, or set COLLECTIVES_RENDEZVOUS=HOST:PORT")
    try:
        store_port = int(port) + 1
    except ValueError:
        raise ValueError(f"MASTER_PORT={port!r} is not a port number") from None
    if not 1 < store_port <= 65535:
        raise ValueError(f"MASTER_PORT={port!r}: the store would take MASTER_PORT+1, which is no port; "
                         "set COLLECTIVES_RENDEZVOUS=HOST:PORT")
    return f"{addr}:{store_port}"


def parse_address(text: str, source: str) -> Tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not sep or not host or not 1 <= number <= 65535:
        raise ValueError(f"{source}={text!r} is not HOST:PORT (e.g. 10.0.0.1:29600)")
    return host, number


def _plural(ranks: List[int], one: str, many: str) -> str:
    return f"{one} {ranks[0]}" if len(ranks) == 1 else f"{many} {', '.join(map(str, ranks))}"


class StoreWaits:
    """Waits for keys of a job's store until a deadline, failing at once instead when a
    worker posts its failure there."""

    def __init__(self, store: Any, prefix: str, deadline: float, timeout: float):
        self.store, self.prefix, self.deadline, self.timeout = store, prefix, deadline, timeout
        self.notified = False  # our failure came from a worker's notice

    def get(self, key: str, timeout_message: str) -> bytes:
        """The value of ``key`` once set; TimeoutError(timeout_message) at the deadline."""
        value = self._wait(key)
        if value is None:
            raise TimeoutError(timeout_message)
        return value

    def wait_all(self, keys: List[str]) -> Tuple[List[bytes], List[int]]:
        """(the values of all ``keys``, []) once they are set; at the deadline ([], the
        indices of the keys still missing)."""
        values = []
        for index, key in enumerate(keys):
            value = self._wait(key)
            if value is None:
                missing = [i for i in range(index, len(keys)) if not self.store.check([self.prefix + keys[i]])]
                return [], missing or [index]
            values.append(value)
        return values, []

    def _wait(self, key: str) -> Optional[bytes]:
        while True:
            remaining = self.deadline - time.monotonic()
            try:
                return self.store.get(self.prefix + key, timeout=max(0.0, min(remaining, _ABORT_POLL_S)))
            except TimeoutError:
                self.raise_if_aborted()
                if remaining <= _ABORT_POLL_S:
                    return None

    def raise_if_aborted(self, store_may_be_gone: bool = False, wait: float = 0.0) -> None:
        """Raises a worker's failure if it posts one within ``wait`` seconds.
        ``store_may_be_gone``: once the addresses are exchanged, worker 0 may finish and
        close the store at any time."""
        try:
            notice = json.loads(self.store.get(self.prefix + "abort", timeout=wait))
        except TimeoutError:
            return
        except AuthenticationError:
            raise AuthenticationError(self._unsigned_notice()) from None
        except CollectiveError:
            if store_may_be_gone:
                return
            raise
        self.notified = True
        cls = _ERRORS.get(notice.get("error"), CollectiveError)
        raise cls(f"{notice.get('message')} (reported by rank {notice.get('rank')})")


    def _unsigned_notice(self) -> str:
        """Why a failure notice that is not signed with the job's secret is refused, naming
        the rank it claims to come from (a claim only: it cannot be checked)."""
        try:
            who = f"rank {int(json.loads(self.store.unverified(self.prefix + 'abort'))['rank'])} (as it claims)"
        except (CollectiveError, ValueError, KeyError, TypeError):
            who = "a process"
        return (f"{who} posted a failure notice that is not signed with this job's secret: it was started with "
                "another COLLECTIVES_TOKEN (give every worker and reducer the same), or a stranger who can reach the "
                "store wrote it")


class _StoreExchange(StoreWaits):
    """Exchanges the workers' addresses and failure notices through the store."""

    def __init__(self, store: Any, prefix: str, rank: int, size: int, deadline: float, timeout: float,
                 rendezvous: str):
        super().__init__(store, prefix, deadline, timeout)
        self.rank, self.size, self.rendezvous = rank, size, rendezvous

    def allgather(self, record: bytes) -> List[bytes]:
        if self.store.add(f"{self.prefix}claim/{self.rank}", 1) > 1:
            raise CollectiveError(f"two processes claim rank {self.rank} of this job: give each process its "
                                  "own COLLECTIVES_RANK (or RANK)")
        self.store.set(f"{self.prefix}addr/{self.rank}", record)
        records, missing = self.wait_all([f"addr/{peer}" for peer in range(self.size)])
        if missing:
            many = len(missing) > 1
            raise TimeoutError(
                f"{_plural(missing, 'rank', 'ranks')} of {self.size} did not publish "
                f"{'their addresses' if many else 'its address'} within {self.timeout:g} s: "
                f"{'are they' if many else 'is it'} running, and using the same rendezvous ({self.rendezvous})?")
        return records

    def publish_failure(self, error: Exception) -> None:
        """Tells the other workers why this one failed, unless it learnt it from them or
        another worker told them first. Best effort: the store may be gone too."""
        if self.notified:
            return
        notice = {"rank": self.rank, "error": type(error).__name__, "message": str(error)}
        try:
            if self.store.add(self.prefix + "abort_claim", 1) == 1:
                self.store.set(self.prefix + "abort", json.dumps(notice).encode())
        except Exception as e:  # noqa: BLE001 - the original error matters, not this one
            log.debug("rank %d: could not post its failure to the store: %s", self.rank, e)


class _MpiExchange:
    """Exchanges addresses over MPI. Failures before the exchange travel in it (every worker
    joins it, failed or not); connecting afterwards is bounded by the deadline."""

    def __init__(self, comm: Any):
        self.comm = comm

    def allgather(self, record: bytes) -> List[bytes]:
        return self.comm.allgather(record)

    def raise_if_aborted(self, store_may_be_gone: bool = False, wait: float = 0.0) -> None:
        pass


def _connect_workers(rank: int, size: int, config: Config, secret: bytes, job_id: bytes, deadline: float,
                     exchange: Any, find_address: Callable[[], str]) -> Tuple[List[List[int]], List[str]]:
    """Publishes this worker's address, checks that all agree, and builds the mesh."""
    if size == 1:
        return [[]], [f"rank {rank} (this process)"]
    # A worker that cannot listen still publishes (why), so that every worker fails alike
    # rather than one raising while the others wait for its address.
    listener = None
    try:
        address = find_address()
        listener = _netif.listen(address, config.port_range)
        port = listener.getsockname()[1]
        record = {"host": address, "port": port, "hostname": socket.gethostname(),
                  "protocol": _handshake.PROTOCOL_VERSION, "settings": (("size", size),) + config.must_match()}
    except (OSError, ValueError, CollectiveError) as e:
        local_failure = e
        record = {"failed": f"{type(e).__name__}: {e}"}
    try:
        records = [json.loads(r) for r in exchange.allgather(json.dumps(record).encode())]
        if listener is None:
            raise local_failure
        failed = [f"rank {p}: {r['failed']}" for p, r in enumerate(records) if "failed" in r]
        if failed:
            raise CollectiveError("workers could not start: " + "; ".join(failed))
        _check_records(records)
        names = [f"rank {p} ({r['host']}:{r['port']})" if p != rank else f"rank {p} (this process)"
                 for p, r in enumerate(records)]
        started = time.monotonic()
        mesh = _Mesh(listener, [(r["host"], r["port"]) for r in records], names, rank, size, config, secret,
                     job_id, deadline)
        peer_links = mesh.build(exchange)
    finally:
        if listener is not None:
            listener.close()
    log.info("rank %d of %d (%s:%d): connected to %d peers, %d connection(s) each, in %.2f s",
             rank, size, address, port, size - 1, config.connections_per_peer, time.monotonic() - started)
    return peer_links, names


def _check_records(records: List[Dict[str, Any]]) -> None:
    """Every worker runs this on the same records, so all of them raise, and alike."""
    for peer, record in enumerate(records):
        _check_protocol(f"rank {peer}", record)
    reference = dict(records[0]["settings"])
    differences = [f"rank {p} has {name}={value!r} where rank 0 has {reference.get(name)!r}"
                   for p, record in enumerate(records) for name, value in record["settings"]
                   if reference.get(name) != value]
    if differences:
        raise CollectiveError("settings that must be equal on every rank differ: " + "; ".join(differences) +
                              ". Set the same COLLECTIVES_* values (or init arguments) everywhere")
    hostnames = {r["hostname"] for r in records}
    local = [p for p, r in enumerate(records) if _netif.is_loopback(r["host"])]
    if local and len(hostnames) > 1:
        raise CollectiveError(
            f"{_plural(local, 'rank', 'ranks')} advertise a loopback address, but the ranks run on "
            f"{len(hostnames)} hosts ({', '.join(sorted(hostnames))}): set COLLECTIVES_SOCKET_IFNAME to the "
            "interface that connects the hosts, or use a rendezvous address that the other hosts reach")


def _check_protocol(name: str, record: Dict[str, Any]) -> None:
    mine = _handshake.PROTOCOL_VERSION
    if record.get("protocol") != mine:
        raise ProtocolVersionError(
            f"{name} (on {record.get('hostname')}) speaks collectives protocol {record.get('protocol')}, "
            f"this process speaks {mine}: install the same collectives version on every host")


def _dial(address: Tuple[str, int], me: str, peer: str, deadline: float, timeout: float) -> socket.socket:
    """A socket connected to ``peer`` (a name for messages) at ``address``, by the deadline."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        _netif.tune_socket(sock)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(address)
        return sock
    except socket.timeout:
        sock.close()
        raise TimeoutError(f"{me} could not connect to {peer} within {timeout:g} s: is the network between "
                           "them open?") from None
    except OSError as e:
        sock.close()
        # Peers listen before they publish their addresses, and stop only once all who
        # should have connected: a refusal means that it is gone.
        raise CollectiveError(f"{me} could not connect to {peer}: {e.strerror or e}; has it exited? "
                              "(its log says why)") from None


class _Mesh:
    """Connects to the lower ranks (one thread) while accepting from the higher ones."""

    def __init__(self, listener: socket.socket, addresses: List[Tuple[str, int]], names: List[str], rank: int,
                 size: int, config: Config, secret: bytes, job_id: bytes, deadline: float):
        self.listener, self.addresses, self.names = listener, addresses, names
        self.rank, self.size, self.config = rank, size, config
        self.secret, self.job_id, self.deadline = secret, job_id, deadline
        self.events: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.lock = threading.Lock()
        self.cancelled = False  # guarded by lock, as is claimed
        self.claimed: Set[Tuple[int, int]] = set()

    def build(self, exchange: Any) -> List[List[Any]]:
        cpp = self.config.connections_per_peer
        expected = {(p, i) for p in range(self.size) if p != self.rank for i in range(cpp)}
        got: Dict[Tuple[int, int], Tuple[socket.socket, SessionKeys]] = {}
        acceptor = _handshake.Acceptor(self.listener, self._authenticate, self._accepted, self._refused,
                                       expects=self._expects).start()
        threading.Thread(target=self._connect_loop, name="collectives-connect", daemon=True).start()
        try:
            while len(got) < len(expected):
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(self._missing(expected - set(got)))
                try:
                    kind, payload = self.events.get(timeout=min(remaining, _ABORT_POLL_S))
                except queue.Empty:
                    exchange.raise_if_aborted(store_may_be_gone=True)
                    continue
                if kind == "error":
                    if type(payload) is CollectiveError:  # refused or dropped: maybe a symptom
                        exchange.raise_if_aborted(store_may_be_gone=True, wait=_NOTICE_GRACE_S)
                    raise payload
                peer, index, sock, keys = payload
                got[(peer, index)] = sock, keys
        except BaseException:
            for sock, _ in got.values():
                sock.close()
            raise
        finally:
            self._stop()
            acceptor.stop()
        peer_links: List[List[Any]] = [[] for _ in range(self.size)]
        for (peer, index) in sorted(got):
            sock, keys = got[(peer, index)]
            peer_links[peer].append(keys.link(sock))
        return peer_links

    def _missing(self, missing: Set[Tuple[int, int]]) -> str:
        timeout = f"{self.config.timeout:g} s"
        lower = sorted({p for p, _ in missing if p < self.rank})
        higher = sorted({p for p, _ in missing if p > self.rank})
        parts = []
        if higher:
            many = len(higher) > 1
            parts.append(f"{_plural(higher, 'rank', 'ranks')} of {self.size} did not connect to rank {self.rank} "
                         f"within {timeout}: {'are they' if many else 'is it'} still running? "
                         f"({'their logs say' if many else 'its log says'} why)")
        if lower:
            parts.append(f"rank {self.rank} could not connect to "
                         f"{', '.join(self.names[p] for p in lower)} within {timeout}")
        return "; ".join(parts)

    def _post(self, kind: str, payload: Any) -> None:
        with self.lock:
            if not self.cancelled:
                self.events.put((kind, payload))
                return
        if kind == "socket":  # nobody will take it any more
            payload[2].close()

    def _stop(self) -> None:
        with self.lock:
            self.cancelled = True
        while True:
            try:
                kind, payload = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "socket":
                payload[2].close()

    def _handshake_deadline(self) -> float:
        return min(time.monotonic() + self.config.handshake_timeout, self.deadline)

    def _connect_loop(self) -> None:
        try:
            for peer in range(self.rank):
                for index in range(self.config.connections_per_peer):
                    sock = _dial(self.addresses[peer], f"rank {self.rank}", self.names[peer], self.deadline,
                                 self.config.timeout)
                    try:
                        keys = client_handshake(sock, self.secret, self.rank, peer, index,
                                                self._handshake_deadline(), job_id=self.job_id,
                                                security=self.config.wire_security)
                    except BaseException:
                        sock.close()
                        raise
                    self._post("socket", (peer, index, sock, keys))
        except Exception as e:  # noqa: BLE001 - handed to the main thread, which raises it
            self._post("error", e)

    def _authenticate(self, conn: socket.socket) -> PeerHello:
        return server_handshake(conn, self.secret, self.rank, self._handshake_deadline(), job_id=self.job_id,
                                check=self._claim, security=self.config.wire_security)

    def _accepted(self, hello: PeerHello, conn: socket.socket) -> None:
        self._post("socket", (hello.rank, hello.conn_index, conn, hello.keys))

    def _refused(self, address: str, error: Exception) -> None:
        # Whoever failed the handshake, this worker keeps waiting for its real peers: a stranger
        # must not be able to stop the job's start. A worker of this job with another secret
        # fails on its own side and posts why (which ends the wait here too); one with another
        # protocol version is caught from the published records before anyone connects.
        log.warning("rank %d: dropped an incoming connection from %s: %s", self.rank, address, error)

    def _expects(self, hello: PeerHello, job_id: bytes) -> bool:
        """Whether an unproven hello names a connection this worker still waits for (the
        acceptor keeps those over strangers' when full)."""
        with self.lock:
            return (job_id == self.job_id and hello.role == ROLE_WORKER and self.rank < hello.rank < self.size
                    and hello.conn_index < self.config.connections_per_peer
                    and (hello.rank, hello.conn_index) not in self.claimed)

    def _claim(self, hello: PeerHello) -> Optional[str]:
        if hello.role != ROLE_WORKER:
            return "only workers connect to a worker while the job starts"
        if not self.rank < hello.rank < self.size:
            return (f"rank {hello.rank} may not connect to rank {self.rank} in a job of {self.size}: "
                    f"only ranks {self.rank + 1} to {self.size - 1} do")
        if hello.conn_index >= self.config.connections_per_peer:
            return (f"connection index {hello.conn_index} is beyond "
                    f"COLLECTIVES_CONNECTIONS_PER_PEER={self.config.connections_per_peer}")
        with self.lock:
            if (hello.rank, hello.conn_index) in self.claimed:
                return (f"rank {hello.rank} already holds connection {hello.conn_index}: "
                        f"two processes claim rank {hello.rank}")
            self.claimed.add((hello.rank, hello.conn_index))
        return None
