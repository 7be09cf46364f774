"""How a reducer joins a job: learns its index, the workers' number and the job's secret,
publishes its address, and takes one authenticated connection from each worker.

- Under mpirun, as a process of the workers' MPMD job (mpirun -np N python train.py : -np R
  collectives-reducer): it makes the same MPI_COMM_WORLD calls as the workers (see
  collectives._mpi.MpiJob); its index is its place among the job's reducers.
- Otherwise through the job's store (--rendezvous, served by worker 0): it reads the job's
  id, size and COLLECTIVES_NUM_REDUCERS, which worker 0 publishes, claims the next index,
  and publishes its address under "reducer/<index>". The secret comes from
  COLLECTIVES_TOKEN or --token-file. A reducer under an mpirun that holds no workers joins
  this way too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from .. import _netif
from .._config import Config
from .._handshake import ROLE_REDUCER, ROLE_WORKER, Acceptor, PeerHello, SessionKeys, server_handshake
from .._launch import NO_SECRET, launched_by_mpirun, parse_address, read_secret
from .._mpi import MpiJob, mpi_world
from .._rendezvous import StoreWaits, signed_store
from .._store import SignedStore, StoreClient
from ..errors import AuthenticationError, CollectiveError, TimeoutError
from ._meet import check_reducer_records, reducer_record

__all__ = ["Joined", "join"]

log = logging.getLogger("collectives.reducer")

_PREFIX = "collectives/"  # the job's keys in its store, as the workers write them
# While waiting for the workers, a reducer looks for a worker's failure notice this often.
_POLL_S = 0.5


@dataclasses.dataclass
class Joined:
    """A reducer's place in a job, and one connection from each worker."""

    index: int
    num_reducers: int
    # worker_links[k]: the connected, authenticated socket of worker k (with its keys), for the core
    worker_links: List[Any]
    worker_names: List[str]  # "rank k (host:port)"
    gate: "WorkerGate"  # refuses every further connection until closed

    def close(self) -> None:
        self.gate.close()


def join(rendezvous: Optional[str], environ: Mapping[str, str], config: Config,
         on_index: Callable[[int], None] = lambda index: None) -> Joined:
    """Joins the job that mpirun started this process in, or else the one at ``rendezvous``
    (HOST:PORT), waiting for it up to config.timeout. ``environ`` holds the secret's
    variables (COLLECTIVES_TOKEN or COLLECTIVES_TOKEN_FILE) and the launcher's;
    ``on_index`` hears this reducer's index as soon as it is known."""
    deadline = time.monotonic() + config.timeout
    if launched_by_mpirun(environ):
        joined = _join_mpi(environ, config, deadline, on_index)
        if joined is not None:
            return joined
    if rendezvous is None:
        raise ValueError("collectives-reducer needs the job's rendezvous: pass --rendezvous HOST:PORT (the "
                         "workers' COLLECTIVES_RENDEZVOUS, or MASTER_ADDR:MASTER_PORT+1 under torchrun), or "
                         "launch it in the workers' mpirun job (mpirun ... : -np R collectives-reducer)")
    secret = read_secret(environ)
    if secret is None:
        raise ValueError(NO_SECRET + " (or pass collectives-reducer --token-file PATH)")
    return _join_store(rendezvous, secret, config, deadline, on_index)


def _join_mpi(environ: Mapping[str, str], config: Config, deadline: float,
              on_index: Callable[[int], None]) -> Optional[Joined]:
    job = MpiJob(mpi_world(environ), ROLE_REDUCER, deadline)
    index = job.comm.Get_rank()
    job.comm.Free()
    if not job.workers:
        log.info("this mpirun job holds no workers: joining through the rendezvous")
        return None
    on_index(index)
    log.info("joined an mpirun job of %d workers as reducer %d of %d", len(job.workers), index, len(job.reducers))
    secret, job_id, address0 = job.start(None)
    listener = None
    try:
        listener = _netif.listen(_netif.advertise_address(config.socket_ifname, address0), config.port_range)
        record = reducer_record(listener)
    except (OSError, ValueError, CollectiveError) as e:
        record = {"failed": f"{type(e).__name__}: {e}"}
    try:
        check_reducer_records(job.reducer_records(record))  # raises on every process alike if a reducer failed
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    gate = WorkerGate(listener, index, len(job.workers), secret, job_id, config)
    return Joined(index, len(job.reducers), *gate.wait(deadline, lambda: None), gate)


def _join_store(rendezvous: str, secret: bytes, config: Config, deadline: float,
                on_index: Callable[[int], None]) -> Joined:
    host, port = parse_address(rendezvous, "--rendezvous")
    # Signed: what it reads was published by the job, and the workers check what it publishes.
    store = signed_store(StoreClient(host, port, timeout=config.timeout), secret)
    try:
        waits = StoreWaits(store, _PREFIX, deadline, config.timeout)
        try:
            job_id = waits.get("job", f"no job started at the rendezvous {rendezvous} within {config.timeout:g} s: "
                                      "is worker 0 running, with this COLLECTIVES_RENDEZVOUS?")
        except AuthenticationError as e:
            _post_failure(store, e)
            raise
        store.bind(job_id)  # what it reads and writes from now on is this job's alone
        size = int(store.get(_PREFIX + "size"))
        num_reducers = int(store.get(_PREFIX + "num_reducers"))
        index = store.add(_PREFIX + "reducer_claim", 1) - 1
        if index >= num_reducers:
            raise CollectiveError(
                f"more reducers than COLLECTIVES_NUM_REDUCERS={num_reducers} joined the job at {rendezvous}: "
                f"this one would be reducer {index}; set COLLECTIVES_NUM_REDUCERS on every worker to the number "
                "of reducers you start")
        on_index(index)
        log.info("joined the job of %d workers at %s as reducer %d of %d", size, rendezvous, index, num_reducers)
        key = f"{_PREFIX}reducer/{index}"
        try:
            listener = _netif.listen(_netif.advertise_address(config.socket_ifname, host), config.port_range)
        except (OSError, ValueError, CollectiveError) as e:
            # so that the workers fail now, with this message, rather than at their deadline
            store.set(key, json.dumps({"failed": f"{type(e).__name__}: {e}"}).encode())
            raise
        try:
            store.set(key, json.dumps(reducer_record(listener)).encode())
        except BaseException:
            listener.close()
            raise
        gate = WorkerGate(listener, index, size, secret, job_id, config)
        return Joined(index, num_reducers, *gate.wait(deadline, waits.raise_if_aborted), gate)
    finally:
        store.close()


def _post_failure(store: SignedStore, error: Exception) -> None:
    """Publishes why this reducer cannot join under the next reducer index, so that the
    workers fail now, naming it, rather than at their deadline. Signed with this reducer's
    secret: with another token than the workers', they refuse the record, naming its key."""
    try:
        index = store.add(_PREFIX + "reducer_claim", 1) - 1
        store.set(f"{_PREFIX}reducer/{index}", json.dumps({"failed": f"{type(error).__name__}: {error}"}).encode())
    except CollectiveError as e:
        log.debug("could not post this reducer's failure to the store: %s", e)


class WorkerGate:
    """Takes one connection from each of the job's ``size`` workers on ``listener`` (its
    own from then on), then refuses every other connection until closed, so that a stranger
    can neither take a worker's place nor disturb the job. Each refusal is logged, and
    touches nothing of the job."""

    def __init__(self, listener: socket.socket, index: int, size: int, secret: bytes, job_id: bytes,
                 config: Config):
        self.listener, self.index, self.size = listener, index, size
        self.secret, self.job_id, self.config = secret, job_id, config
        self.changed = threading.Condition()
        self.claimed: Set[int] = set()  # guarded by changed, as are the two below
        self.connections: Dict[int, Tuple[socket.socket, SessionKeys]] = {}  # until handed over
        self.closed = False
        self.acceptor = Acceptor(listener, self._authenticate, self._accepted, self._refused,
                                 expects=self._expects).start()

    def wait(self, deadline: float, raise_if_aborted: Callable[[], None]) -> Tuple[List[Any], List[str]]:
        """(links, names) of the workers by rank once all have connected; the links are the
        caller's from then on. TimeoutError at the deadline, naming who is missing, or what
        ``raise_if_aborted`` raises; the gate is closed then."""
        try:
            return self._wait(deadline, raise_if_aborted)
        except BaseException:
            self.close()
            raise

    def _wait(self, deadline: float, raise_if_aborted: Callable[[], None]) -> Tuple[List[Any], List[str]]:
        started = time.monotonic()
        while True:
            with self.changed:
                if len(self.connections) == self.size:
                    connections, self.connections = self.connections, {}
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.size)) - set(self.connections))
                    many = len(missing) > 1
                    raise TimeoutError(
                        f"{'ranks' if many else 'rank'} {', '.join(map(str, missing))} of {self.size} did not "
                        f"connect to reducer {self.index} within {self.config.timeout:g} s: "
                        f"{'are they' if many else 'is it'} running? ({'their logs say' if many else 'its log says'} "
                        "why)")
                self.changed.wait(min(remaining, _POLL_S))
                complete = len(self.connections) == self.size
            if not complete:  # once all are in, worker 0 may close the store at any time
                raise_if_aborted()
        names = [f"rank {rank} ({_peer_address(connections[rank][0])})" for rank in range(self.size)]
        log.info("all %d workers connected in %.2f s", self.size, time.monotonic() - started)
        return [keys.link(conn) for conn, keys in (connections[rank] for rank in range(self.size))], names

    def close(self) -> None:
        """Stops accepting and closes what was not handed over; idempotent."""
        with self.changed:
            self.closed = True
            connections, self.connections = self.connections, {}
        for conn, _ in connections.values():
            conn.close()
        self.acceptor.stop()
        self.listener.close()

    def _authenticate(self, conn: socket.socket) -> PeerHello:
        return server_handshake(conn, self.secret, self.index, time.monotonic() + self.config.handshake_timeout,
                                job_id=self.job_id, role=ROLE_REDUCER, check=self._claim,
                                security=self.config.wire_security)

    def _expects(self, hello: PeerHello, job_id: bytes) -> bool:
        """Whether an unproven hello names a worker this reducer still waits for."""
        with self.changed:
            return (job_id == self.job_id and hello.role == ROLE_WORKER and 0 <= hello.rank < self.size
                    and hello.conn_index == 0 and hello.rank not in self.claimed)

    def _claim(self, hello: PeerHello) -> Optional[str]:
        if hello.role != ROLE_WORKER:
            return "only workers connect to a reducer"
        if not 0 <= hello.rank < self.size:
            return f"rank {hello.rank} is not a worker of this job of {self.size}"
        if hello.conn_index != 0:
            return "a worker opens one connection to each reducer"
        with self.changed:
            if hello.rank in self.claimed:
                return f"rank {hello.rank} is connected already: two processes claim rank {hello.rank}"
            self.claimed.add(hello.rank)
        return None

    def _accepted(self, hello: PeerHello, conn: socket.socket) -> None:
        with self.changed:
            if not self.closed:
                self.connections[hello.rank] = conn, hello.keys
                self.changed.notify_all()
                return
        conn.close()

    def _refused(self, address: str, error: Exception) -> None:
        log.warning("refused a connection from %s: %s", address, error)


def _peer_address(conn: socket.socket) -> str:
    host, port = conn.getpeername()[:2]
    return f"{host}:{port}"
