"""Rendezvous: how the processes of a job meet before they are connected.

- :class:`Store`: the small key-value store a job meets in (as Gloo's ``rendezvous::Store``
  and c10d's ``Store``): collectives' own (collectives._store.StoreClient, served by worker 0:
  :func:`serve_store`), or an adapter of torch.distributed's store.
- :func:`signed_store`: the job's records in it signed with the job's secret, so that no
  stranger who can reach the store can pass for one of the job, and bound to this job, so
  that none can replay a record of an earlier job that used the same secret (below).
- :class:`StoreWaits`: waits for keys until a deadline, ended at once, with its message, by
  the failure notice that a worker posts.
- :class:`Exchange`: the all-to-all of records among the workers, with those waits;
  :class:`StoreExchange` does it through a store (collectives._mpi.MpiExchange over MPI).

The job's keys (below a prefix, "collectives/" unless given): "job", "size" and
"num_reducers" (written by rank 0 for the reducers), "claim/<rank>" and "addr/<rank>" (the
workers' exchange), "abort_claim" and "abort" (the first failure notice), "reducer_claim"
and "reducer/<index>" (the reducers' addresses).

Binding records to the job. A record's signature covers its key, its value and a context:
the store's nonce (collectives._store: random, made by the server that worker 0 starts for
this job, read-only to clients) and the job id (16 random bytes that rank 0 makes). The job
id does not exist when the first records are written: rank 0 makes it and publishes it as
"job", which the other workers and the reducers read before they know it, and a worker may
post its failure ("abort") before it has read it. So "job" and "abort" are bound to the
store's nonce alone, and every other record ("size", "num_reducers", "addr/<rank>",
"reducer/<index>"), written and read only once the writer and the reader hold the job id
(SignedStore.bind), to the nonce and the job id. A record copied from an earlier job's store
(a different nonce) is refused, and so is one copied between two jobs that share a store
(the job id). Over torch.distributed's store, which has no nonce, only the job id binds:
"job" and "abort" of an earlier job with the same COLLECTIVES_TOKEN could be replayed
there; such a replay can only make the start fail (every handshake is bound to the job id
and the secret), which anyone who can write to that store can do anyway.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, List, Optional, Protocol, Tuple

from . import _netif
from ._store import SignedStore, StoreServer
from .errors import AuthenticationError, CollectiveError, ProtocolVersionError, TimeoutError

__all__ = ["Store", "Exchange", "StoreWaits", "StoreExchange", "signed_store", "serve_store", "plural",
           "ABORT_POLL_S"]

log = logging.getLogger("collectives")

# While waiting, a worker looks for another's failure notice in the store this often.
ABORT_POLL_S = 0.5
_ERRORS = {cls.__name__: cls for cls in (TimeoutError, AuthenticationError, ProtocolVersionError)}


class Store(Protocol):
    """What the start-up uses of a job's store. ``get`` blocks until ``key`` is set, and
    raises collectives' TimeoutError after ``timeout`` seconds; a store that fails raises
    CollectiveError."""

    def set(self, key: str, value: bytes) -> None: ...

    def get(self, key: str, timeout: float) -> bytes: ...

    def add(self, key: str, amount: int) -> int: ...

    def check(self, keys: List[str]) -> bool: ...

    def close(self) -> None: ...


class Exchange(Protocol):
    """The all-to-all of records among a job's workers, each in its rank's place, and the
    failure notices of those that failed."""

    def allgather(self, record: bytes) -> List[bytes]:
        """Every worker's ``record``, by rank, once all have given theirs."""
        ...

    def raise_if_aborted(self, store_may_be_gone: bool = False, wait: float = 0.0) -> None:
        """Raises another worker's failure if it posts one within ``wait`` seconds."""
        ...


def signed_store(store: Store, secret: bytes, job_id: Optional[bytes] = None) -> SignedStore:
    """``store`` with the job's records signed and checked (so that no stranger who can
    reach it can pass for one of the job), bound to the store and, once ``job_id`` is
    known (here or by ``bind``), to the job (see the module's docstring); refusals name who
    writes each record."""
    return SignedStore(store, secret, writer=_record_writer, job_bound=_bound_to_job, job_id=job_id)


def _bound_to_job(key: str) -> bool:
    """Whether every process that writes or reads the record at ``key`` knows the job id."""
    return key.rsplit("/", 1)[-1] not in ("job", "abort")


def _record_writer(key: str) -> str:
    """Who writes a record of the job (publish_job, the exchanges, the reducers)."""
    name = key.rsplit("/", 2)
    if name[-1] in ("job", "size", "num_reducers"):
        return "rank 0"
    if len(name) >= 2 and name[-2] in ("addr", "reducer") and name[-1].isdigit():
        return f"{'rank' if name[-2] == 'addr' else 'reducer'} {name[-1]}"
    return ""


def serve_store(host: str, port: int) -> StoreServer:
    """Worker 0's store for the job, served at ``host``:``port``."""
    # A host written as loopback is served there only; any other name on every interface,
    # since a host's own name may resolve to 127.0.1.1 here and to its real address elsewhere.
    if _netif.names_loopback(host):
        return StoreServer("127.0.0.1" if host == "localhost" else host, port).start()
    return StoreServer("", port).start()


def plural(ranks: List[int], one: str, many: str) -> str:
    """"rank 3" or "ranks 1, 2": ``ranks`` named after ``one`` or ``many``."""
    return f"{one} {ranks[0]}" if len(ranks) == 1 else f"{many} {', '.join(map(str, ranks))}"


class StoreWaits:
    """Waits for keys of a job's store until a deadline, failing at once instead when a
    worker posts its failure there."""

    def __init__(self, store: SignedStore, prefix: str, deadline: float, timeout: float):
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

    def wait_for_addresses(self, keys: List[str], one: str, many: str, where: str,
                           advice: Callable[[bool], str]) -> List[bytes]:
        """The values of ``keys``, the address records of ``one`` 0, 1, ... (``many`` for
        several), once all are set; at the deadline TimeoutError naming those missing,
        ``where`` they should have published, and ``advice(several are missing)``."""
        records, missing = self.wait_all(keys)
        if missing:
            several = len(missing) > 1
            raise TimeoutError(
                f"{plural(missing, one, many)} of {len(keys)} did not publish "
                f"{'their addresses' if several else 'its address'}{where} within {self.timeout:g} s: "
                + advice(several))
        return records

    def _wait(self, key: str) -> Optional[bytes]:
        while True:
            remaining = self.deadline - time.monotonic()
            try:
                return self.store.get(self.prefix + key, timeout=max(0.0, min(remaining, ABORT_POLL_S)))
            except TimeoutError:
                self.raise_if_aborted()
                if remaining <= ABORT_POLL_S:
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


class StoreExchange(StoreWaits):
    """Exchanges the workers' addresses and failure notices through the store (an
    :class:`Exchange`)."""

    def __init__(self, store: SignedStore, prefix: str, rank: int, size: int, deadline: float, timeout: float,
                 rendezvous: str):
        super().__init__(store, prefix, deadline, timeout)
        self.rank, self.size, self.rendezvous = rank, size, rendezvous

    def allgather(self, record: bytes) -> List[bytes]:
        if self.store.add(f"{self.prefix}claim/{self.rank}", 1) > 1:
            raise CollectiveError(f"two processes claim rank {self.rank} of this job: give each process its "
                                  "own COLLECTIVES_RANK (or RANK)")
        self.store.set(f"{self.prefix}addr/{self.rank}", record)
        return self.wait_for_addresses(
            [f"addr/{peer}" for peer in range(self.size)], "rank", "ranks", "",
            lambda many: f"{'are they' if many else 'is it'} running, and using the same rendezvous "
                         f"({self.rendezvous})?")

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
