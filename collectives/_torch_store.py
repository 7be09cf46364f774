"""torch.distributed's store, where a job has one: torchrun's (its agent serves one at
MASTER_ADDR:MASTER_PORT for the job's processes) or the one a torch process group is handed.
Used as collectives' bootstrap uses a store (:class:`TorchStore`), and, when no
COLLECTIVES_TOKEN is set, to share the job's secret (:func:`secret_through_store`), as gloo and
NCCL jobs trust that store with everything. torch is imported only to reach torchrun's store.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import time
from typing import Any, Callable, List, Mapping

from ._launch import SECRET_BYTES
from .errors import CollectiveError, TimeoutError

__all__ = ["TorchStore", "secret_through_store", "torchrun_store"]

log = logging.getLogger("collectives")

_SECRET_KEY = "collectives/job_secret"
_said_secret_through_store = False


class TorchStore:
    """A torch.distributed Store as collectives' bootstrap uses a store: its errors become
    CollectiveError, a missing key collectives' TimeoutError."""

    # How often get() looks for its key: torch's timed wait() logs a warning at every timeout.
    _POLL_S = (0.001, 0.05)

    def __init__(self, store: Any):
        self._store = store

    def set(self, key: str, value: bytes) -> None:
        self._call(self._store.set, key, value)

    def get(self, key: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        pause = self._POLL_S[0]
        while not self.check([key]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{key} was not set in the torch.distributed store within {timeout:g} s")
            time.sleep(min(pause, remaining))
            pause = min(2 * pause, self._POLL_S[1])
        return self._call(self._store.get, key)

    def add(self, key: str, amount: int) -> int:
        return self._call(self._store.add, key, amount)

    def check(self, keys: List[str]) -> bool:
        return self._call(self._store.check, keys)

    def set_once(self, key: str, value: bytes) -> bytes:
        """Sets ``key`` to ``value`` unless it is set already; returns what it holds then."""
        return self._call(self._store.compare_set, key, b"", value)

    def close(self) -> None:
        pass  # torch.distributed owns its store

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except RuntimeError as e:  # torch's DistStoreError, or a FileStore's error
            raise CollectiveError(f"the torch.distributed store failed: {e}") from e


def secret_through_store(store: TorchStore) -> bytes:
    """The job's secret when no COLLECTIVES_TOKEN is set: the first process to ask puts a
    random one in ``store`` and every process takes that one, so that the job is exactly as
    protected as the store (said once per process at INFO). COLLECTIVES_TOKEN keeps the
    stronger mode, where the secret crosses no wire."""
    global _said_secret_through_store
    secret = store.set_once(_SECRET_KEY, secrets.token_bytes(SECRET_BYTES))
    if not _said_secret_through_store:
        _said_secret_through_store = True
        log.info("collectives: no COLLECTIVES_TOKEN, so the job's secret was made by one of its processes and shared "
                 "through the torch.distributed store: this job is as protected as that store (as gloo and NCCL "
                 "jobs are); set COLLECTIVES_TOKEN on every process for a secret that crosses no wire")
    return secret


def torchrun_store(env: Mapping[str, str], timeout: float) -> TorchStore:
    """A client of the store that torchrun's agent serves for the job at MASTER_ADDR:MASTER_PORT
    (where TORCHELASTIC_USE_AGENT_STORE=True, as torch's env:// rendezvous finds it)."""
    try:
        from torch.distributed import TCPStore
    except ImportError as e:
        raise ValueError("under torchrun without COLLECTIVES_TOKEN, collectives shares the job's secret through "
                         f"torch's store, but torch.distributed cannot be imported ({e}): set COLLECTIVES_TOKEN") from e
    try:
        store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:
        raise CollectiveError(f"torchrun's store at {env['MASTER_ADDR']}:{env['MASTER_PORT']} (MASTER_ADDR:"
                              f"MASTER_PORT) cannot be reached: {e}") from e
    return TorchStore(store)
