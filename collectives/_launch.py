"""Launch detection: which launcher started this process, and where its rank, size,
rendezvous and secret come from.

Precedence: arguments (``rank``/``size``/``rendezvous``) > COLLECTIVES_RANK/SIZE/RENDEZVOUS >
the launcher's variables. First that applies:
  1. ``rank``/``size``, or COLLECTIVES_RANK/SIZE: the job meets at the rendezvous
     (``rendezvous`` or COLLECTIVES_RENDEZVOUS), where worker 0 serves its store.
  2. mpirun (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK, ...): rank and size come from MPI
     (collectives._mpi); a rendezvous, if given, is where reducers started on their own meet
     the job.
  3. torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): as 1, the store on MASTER_ADDR at
     MASTER_PORT+1 unless a rendezvous is given (torchrun's own store holds MASTER_PORT).
  4. nothing: a job of one process.

The job's secret comes from COLLECTIVES_TOKEN or COLLECTIVES_TOKEN_FILE (:func:`read_secret`);
it is never logged. Under torchrun with neither set, it goes through the store that torchrun's
agent serves, as everything of a gloo or NCCL job does (collectives._torch_store).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from typing import Mapping, Optional, Tuple

from ._config import Config

__all__ = ["Launch", "find_launch", "launched_by_mpirun", "read_secret", "torchrun_rendezvous", "parse_address",
           "NO_SECRET", "MPI_VARIABLES", "SECRET_BYTES"]

log = logging.getLogger("collectives")

# Variables that mpirun (Open MPI, MPICH, MVAPICH, PMIx launchers) sets in every process it starts.
MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
# The size of a secret that a process makes for its job.
SECRET_BYTES = 32
# 32 hex digits carry 128 bits: a token of at least this many characters, if random, cannot be guessed.
_STRONG_SECRET_CHARACTERS = 32

NO_SECRET = ("collectives needs a secret shared by the processes of this job to authenticate their "
              "connections: set COLLECTIVES_TOKEN to the same random string on every process (for example "
              "the output of `python -c 'import secrets; print(secrets.token_hex(32))'`), or "
              "COLLECTIVES_TOKEN_FILE to the path of a file that holds it")


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in its job, as :func:`find_launch` found it."""

    # "mpirun": rank and size come from MPI; "store": the job meets in the store at
    # ``address``; "alone": a job of one process.
    launcher: str
    rank: int = 0
    size: int = 1
    rendezvous: Optional[str] = None  # HOST:PORT, as given
    rendezvous_source: str = "rendezvous"  # where it was given, for messages
    address: Optional[Tuple[str, int]] = None  # the rendezvous parsed ("store" only)
    # "store" only; never logged. None under torchrun without COLLECTIVES_TOKEN: it goes through
    # the store torchrun's agent serves (collectives._torch_store).
    secret: Optional[bytes] = dataclasses.field(default=None, repr=False)


def find_launch(rank: Optional[int], size: Optional[int], rendezvous: Optional[str], config: Config,
                env: Mapping[str, str]) -> Launch:
    """Where this process's rank, size, rendezvous and secret come from (see the module's
    doc). Outside mpirun, also checks that ``config`` can run (under mpirun that waits until
    the job's reducers are counted). ValueError or TypeError for bad or missing settings."""
    if rendezvous is None:
        rendezvous = env.get("COLLECTIVES_RENDEZVOUS") or None
        rendezvous_source = "COLLECTIVES_RENDEZVOUS"
    else:
        rendezvous_source = "rendezvous"
    rank, rank_source = _setting(rank, "rank", env, "COLLECTIVES_RANK")
    size, size_source = _setting(size, "size", env, "COLLECTIVES_SIZE")

    if rank is None and size is None and launched_by_mpirun(env):
        # There the job's reducers are counted, and the settings checked, over MPI.
        return Launch("mpirun", rendezvous=rendezvous, rendezvous_source=rendezvous_source)
    config.check_runnable()
    launched_by_torchrun = False
    if rank is not None or size is not None:
        if rank is None or size is None:
            given = rank_source if rank is not None else size_source
            raise ValueError(f"{given} is set but not both of rank and size: set COLLECTIVES_RANK and "
                             "COLLECTIVES_SIZE (or pass rank= and size=) together")
    elif "RANK" in env and "WORLD_SIZE" in env:
        launched_by_torchrun = True
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
        return Launch("alone")

    if size < 1:
        raise ValueError(f"{size_source}={size} must be at least 1")
    if not 0 <= rank < size:
        raise ValueError(f"{rank_source}={rank} is out of range for {size_source}={size}: "
                         f"ranks are 0 to {size - 1}")
    if rendezvous is None:
        if size > 1 or config.num_reducers > 0:
            raise ValueError(f"a job of {size} workers needs a rendezvous: set COLLECTIVES_RENDEZVOUS=HOST:PORT "
                             "(worker 0's host and a free port) on every process, or pass rendezvous=")
        return Launch("alone")
    address = parse_address(rendezvous, rendezvous_source)
    secret = read_secret(env)
    if secret is None:
        if config.num_reducers > 0:
            raise ValueError(NO_SECRET + " (the reducers, started on their own, need it too)")
        if size == 1:
            secret = secrets.token_bytes(SECRET_BYTES)
        elif not (launched_by_torchrun and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
            raise ValueError(NO_SECRET)
        # else torchrun's agent serves torch's store, which gloo and NCCL trust with everything: the
        # secret goes through it (collectives._torch_store)
    return Launch("store", rank, size, rendezvous, rendezvous_source, address, secret)


def launched_by_mpirun(environ: Mapping[str, str]) -> bool:
    return any(name in environ for name in MPI_VARIABLES)


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
    """Where worker 0 serves collectives' store under torchrun: MASTER_ADDR:MASTER_PORT+1."""
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
    """(host, port) from HOST:PORT given in ``source`` (named in the ValueError if it is not that)."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not sep or not host or not 1 <= number <= 65535:
        raise ValueError(f"{source}={text!r} is not HOST:PORT (e.g. 10.0.0.1:29600)")
    return host, number
