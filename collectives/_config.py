"""Configuration, read in one place.

Precedence: explicit arguments > ``COLLECTIVES_*`` environment variables > defaults.
Every value is checked here, so that a typo fails at start-up with a message naming the
variable, not later as a hang or a slow run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Optional, Tuple

from . import _core
from ._topology import parse_levels

__all__ = ["Config", "ALGORITHMS", "TRANSPORTS", "WIRE_SECURITY", "parse_bytes", "parse_int", "parse_seconds"]

ALGORITHMS = ("auto", "ring", "recursive_doubling", "hierarchical", "reduction_server")
TRANSPORTS = ("auto", "tcp", "shm", "ucx")
# What workers do when every reducer has failed: raise CollectiveError, or go on with the ring.
RS_FALLBACKS = ("error", "ring")
RS_PLANS = ("auto", "flat")  # the reduction server's plan: the host plan where the hosts allow it, or flat
# What protects each frame after the handshake: nothing, a MAC, or a MAC and encryption (in
# the order of their codes in the core).
WIRE_SECURITY = tuple(_core.WIRE_SECURITY)

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_seconds(value: Any, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number of seconds (e.g. 300)") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{name}={value!r} must be a positive, finite number of seconds")
    return seconds


def _choice(choices: Tuple[str, ...], what: str) -> Callable[[Any, str], str]:
    def parse(value: Any, name: str) -> str:
        choice = str(value).strip().lower()
        if choice not in choices:
            raise ValueError(f"{name}={value!r} is not {what}; choose one of {', '.join(choices)}")
        return choice
    return parse


def _is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto"))


def parse_bytes(value: Any, name: str) -> Optional[int]:
    """A byte count such as 65536, 512K or 1M (binary units); None, "" or "auto" is None."""
    if _is_auto(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a byte count (e.g. 524288, 512K or 1M)")
    if isinstance(value, int):
        count = value
    else:
        match = _SIZE_RE.match(str(value))
        if match is None:
            raise ValueError(f"{name}={value!r} is not a byte count (e.g. 524288, 512K or 1M)")
        count = int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()]
    if count <= 0:
        raise ValueError(f"{name}={value!r} must be a positive byte count, or 'auto'")
    return count


def parse_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not an integer")
    try:
        number = int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if number != value and not isinstance(value, str):  # int() truncates 2.5 silently
        raise ValueError(f"{name}={value!r} is not an integer")
    if number < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return number


def _parse_optional_count(value: Any, name: str) -> Optional[int]:
    """An integer >= 1; None, "" or "auto" is None (the core's default)."""
    return None if _is_auto(value) else parse_int(value, name, 1)


def _parse_ifname(value: Any, name: str) -> Optional[str]:
    if value is None:
        return None
    ifname = str(value).strip()
    return ifname or None


def _parse_port_range(value: Any, name: str) -> Optional[Tuple[int, int]]:
    """"lo-hi" (or a single port) as a pair; None or "" means any port."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, str):
            parts = value.split("-")
            if len(parts) not in (1, 2):
                raise ValueError
            lo, hi = int(parts[0]), int(parts[-1])
        else:
            lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a port range; write it as LOW-HIGH, e.g. 40000-40100") from None
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{name}={value!r} must satisfy 1 <= LOW <= HIGH <= 65535")
    return (lo, hi)


def _parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use 1 or 0")


# field name -> (environment variable, parser); the order is that of Config's fields.
_FIELDS: Mapping[str, Tuple[str, Callable[[Any, str], Any]]] = {
    "timeout": ("COLLECTIVES_TIMEOUT", parse_seconds),
    "algorithm": ("COLLECTIVES_ALGORITHM", _choice(ALGORITHMS, "an algorithm")),
    "ring_segment_bytes": ("COLLECTIVES_RING_SEGMENT_BYTES", parse_bytes),
    "connections_per_peer": ("COLLECTIVES_CONNECTIONS_PER_PEER", lambda v, n: parse_int(v, n, 1)),
    "socket_ifname": ("COLLECTIVES_SOCKET_IFNAME", _parse_ifname),
    "port_range": ("COLLECTIVES_PORT_RANGE", _parse_port_range),
    "debug": ("COLLECTIVES_DEBUG", _parse_bool),
    "num_reducers": ("COLLECTIVES_NUM_REDUCERS", lambda v, n: parse_int(v, n, 0)),
    "handshake_timeout": ("COLLECTIVES_HANDSHAKE_TIMEOUT", parse_seconds),
    "rs_chunk_bytes": ("COLLECTIVES_RS_CHUNK_BYTES", parse_bytes),
    "rs_inflight": ("COLLECTIVES_RS_INFLIGHT", _parse_optional_count),
    "rs_heartbeat_timeout": ("COLLECTIVES_RS_HEARTBEAT_TIMEOUT", parse_seconds),
    "rs_fallback": ("COLLECTIVES_RS_FALLBACK", _choice(RS_FALLBACKS, "a fallback")),
    "rs_plan": ("COLLECTIVES_RS_PLAN", _choice(RS_PLANS, "a reduction-server plan")),
    "wire_security": ("COLLECTIVES_WIRE_SECURITY", _choice(WIRE_SECURITY, "a wire security")),
    "topology": ("COLLECTIVES_TOPOLOGY", parse_levels),
    "transport": ("COLLECTIVES_TRANSPORT", _choice(TRANSPORTS, "a transport")),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Effective settings of one communicator. Build it with :meth:`from_env`."""

    timeout: float = 300.0
    algorithm: str = "auto"
    ring_segment_bytes: Optional[int] = None
    connections_per_peer: int = 1
    socket_ifname: Optional[str] = None
    port_range: Optional[Tuple[int, int]] = None
    debug: bool = False
    num_reducers: int = 0
    handshake_timeout: float = 30.0
    rs_chunk_bytes: Optional[int] = None  # None: the core's default
    rs_inflight: Optional[int] = None  # None: the core's default
    rs_heartbeat_timeout: float = 10.0
    rs_fallback: str = "error"
    rs_plan: str = "auto"  # "flat": every worker exchanges its whole buffer, even where hosts share ranks
    wire_security: str = "mac"
    topology: Optional[str] = None  # levels above the host, outermost first (collectives._topology)
    transport: str = "auto"  # shared memory within a host and TCP between hosts, or one of them, or UCX

    def __post_init__(self) -> None:
        # Checked on construction too, so that Config(...) built by hand is as safe as
        # from_env(); parsing an already-valid value gives it back unchanged.
        for name, (_, parse) in _FIELDS.items():
            object.__setattr__(self, name, parse(getattr(self, name), name))
        # Only where there are reducers: a short COLLECTIVES_TIMEOUT alone is no mistake.
        if self.num_reducers and self.rs_heartbeat_timeout >= self.timeout:
            raise ValueError(
                f"COLLECTIVES_RS_HEARTBEAT_TIMEOUT={self.rs_heartbeat_timeout:g} s must be shorter than "
                f"COLLECTIVES_TIMEOUT={self.timeout:g} s, so that workers notice a silent reducer and go on "
                "without it before the collective times out: lower the first or raise the second")

    @classmethod
    def from_env(cls, overrides: Optional[Mapping[str, Any]] = None,
                 environ: Optional[Mapping[str, str]] = None) -> "Config":
        """Settings from ``overrides`` (None values ignored), then ``COLLECTIVES_*``, then defaults.

        ``environ`` defaults to ``os.environ``.
        """
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = sorted(set(overrides) - set(_FIELDS))
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
        environ = os.environ if environ is None else environ
        values = {}
        for name, (variable, parse) in _FIELDS.items():
            if name in overrides:
                values[name] = parse(overrides[name], name)
            elif variable in environ:
                values[name] = parse(environ[variable], variable)
        return cls(**values)

    def must_match(self) -> Tuple[Tuple[str, Any], ...]:
        """(name, value) pairs that every rank of a job must agree on, checked at init."""
        return tuple((name, getattr(self, name))
                     for name in ("algorithm", "ring_segment_bytes", "connections_per_peer", "num_reducers",
                                  "rs_chunk_bytes", "rs_inflight", "rs_fallback", "rs_plan", "wire_security",
                                  "transport"))

    @property
    def effective_algorithm(self) -> str:
        """The algorithm that allreduce runs: "auto" is the reduction server where there
        are reducers, else stays "auto": per call, where every worker runs on one host, the
        host's shared board (csrc/algorithms/allreduce_board.h); otherwise the
        ring, recursive doubling or (where ranks share hosts or racks) the hierarchical plan,
        whichever the cost model expects to finish first (recursive doubling for small
        messages)."""
        if self.algorithm == "auto" and self.num_reducers:
            return "reduction_server"
        return self.algorithm

    def check_runnable(self) -> None:
        """ValueError if the algorithm asked for cannot run; called once the job's reducers
        are counted (num_reducers)."""
        if self.algorithm == "reduction_server" and not self.num_reducers:
            raise ValueError(
                "algorithm 'reduction_server' needs reducers, and this job has none: launch them with "
                "`mpirun -np N python train.py : -np R collectives-reducer`, or start R of them with "
                "`collectives-reducer --rendezvous HOST:PORT` and set COLLECTIVES_NUM_REDUCERS=R on every worker")

    def as_dict(self) -> dict:
        """Effective settings keyed by environment variable, for ``collectives-info``."""
        return {variable: getattr(self, name) for name, (variable, _) in _FIELDS.items()}
