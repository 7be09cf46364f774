"""The MPI path: a job that mpirun started, workers and reducers in one (MPMD) job.

- :func:`mpi_world`: mpi4py's COMM_WORLD.
- :class:`MpiJob`: the job's processes as each sees it: who is a worker and who a reducer
  (``mpirun -np N python train.py : -np R collectives-reducer``), a workers-only (or
  reducers-only) communicator, the start (worker 0's secret, job id and address, or any
  process's failure, to all) and the reducers' address records.
- :func:`count_reducers`: the settings for a job that holds that many reducer processes
  (which COLLECTIVES_NUM_REDUCERS may only agree with).
- :class:`MpiExchange`: the workers' records exchanged by MPI allgather (an Exchange).

Every process makes the same MPI_COMM_WORLD calls in the same order, and a failure travels
in the next of those calls, since a process that raised instead would leave the others
blocked in it for good.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import _netif
from ._config import Config
from ._handshake import JOB_ID_BYTES, ROLE_REDUCER, ROLE_WORKER
from ._launch import MPI_VARIABLES, SECRET_BYTES, read_secret
from .errors import CollectiveError, TimeoutError

__all__ = ["mpi_world", "MpiJob", "MpiExchange", "count_reducers"]

# How often a process waiting for the others of its mpirun job looks at its deadline.
_MPI_POLL_S = 0.02
# Set once a process has met reducers in its mpirun job: they serve that one communicator.
_mpi_job_had_reducers = False


def mpi_world(env: Mapping[str, str]) -> Any:
    """mpi4py's COMM_WORLD, for a process that mpirun started."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        found = next(name for name in MPI_VARIABLES if name in env)
        raise ImportError(f"this process was started by mpirun ({found} is set) but mpi4py is not installed: "
                          "pip install mpi4py, or launch with COLLECTIVES_RANK/SIZE/RENDEZVOUS instead") from e
    return MPI.COMM_WORLD


class MpiJob:
    """The processes of one mpirun job, workers and reducers (one MPMD job), as each of them
    sees it. Every process makes the same MPI_COMM_WORLD calls in the same order: this
    constructor, then :meth:`start` (a worker's: :meth:`start_worker`), then, where the job
    holds reducers, :meth:`reducer_records`."""

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

    def start_worker(self, config: Config, rendezvous: Optional[str],
                     env: Mapping[str, str]) -> Tuple[Config, bytes, bytes, str]:
        """A worker's :meth:`start`: (its settings with the job's reducers counted, secret,
        job id, worker 0's address)."""
        # Each worker checks its settings against the reducers in the job, and worker 0 makes
        # the secret (or takes COLLECTIVES_TOKEN, which processes launched outside this mpirun
        # need too), the job id, and the address the others route toward. A failure travels in
        # the exchange itself: a process that raised instead of joining the next MPI call would
        # leave the others blocked in it for good.
        mine: Any = None
        try:
            config = count_reducers(config, len(self.reducers), rendezvous)
            if self.comm.Get_rank() == 0:
                address = _netif.advertise_address(config.socket_ifname, "127.0.0.1" if self.one_host else None)
                mine = (read_secret(env) or secrets.token_bytes(SECRET_BYTES), secrets.token_bytes(JOB_ID_BYTES),
                        address)
        except (OSError, ValueError, CollectiveError) as e:
            mine = e
        secret, job_id, address0 = self.start(mine)
        return config, secret, job_id, address0

    def reducer_records(self, mine: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Every reducer's address record, by reducer index: reducers give theirs as
        ``mine`` (see collectives.reduction_server's reducer_record, or {"failed": why}),
        workers None. Every process then checks them alike (check_reducer_records there)."""
        gathered = self.world.allgather(mine)
        return [gathered[r] for r in self.reducers]


def count_reducers(config: Config, count: int, rendezvous: Optional[str]) -> Config:
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


class MpiExchange:
    """Exchanges addresses over MPI. Failures before the exchange travel in it (every worker
    joins it, failed or not); connecting afterwards is bounded by the deadline."""

    def __init__(self, comm: Any):
        self.comm = comm

    def allgather(self, record: bytes) -> List[bytes]:
        return self.comm.allgather(record)

    def raise_if_aborted(self, store_may_be_gone: bool = False, wait: float = 0.0) -> None:
        pass
