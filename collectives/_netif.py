"""Which local address data connections bind and advertise, and how their sockets are set up."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import selectors
import socket
import struct
import time
from typing import Callable, Iterator, List, Optional, Tuple

from .errors import CollectiveError

__all__ = ["FdExhaustion", "accept", "accepted", "advertise_address", "interface_address", "is_loopback", "listen", "names_loopback", "tune_socket"]

log = logging.getLogger("collectives")

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
# RFC 5737 documentation address: "connecting" a UDP socket to it asks the kernel which
# source address its default route would use, without sending a packet.
_DEFAULT_ROUTE_PROBE = "192.0.2.1"
def _ipv4_of(ifname: str) -> Optional[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:  # no such interface, or it has no IPv4 address
            return None
    return socket.inet_ntoa(reply[20:24])


def _matches(name: str, spec: str) -> bool:
    """NCCL_SOCKET_IFNAME syntax: comma-separated prefixes; '=' for exact names; a leading
    '^' excludes the listed interfaces instead."""
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    spec = spec[1:] if exact else spec
    listed = any(name == item if exact else name.startswith(item) for item in spec.split(",") if item)
    return listed != exclude


def interface_address(spec: str) -> str:
    """The IPv4 address of the first interface that ``spec`` (COLLECTIVES_SOCKET_IFNAME) names."""
    interfaces: List[Tuple[str, Optional[str]]] = [(name, _ipv4_of(name)) for _, name in socket.if_nameindex()]
    for name, address in interfaces:
        if address is not None and _matches(name, spec):
            log.debug("using interface %s (%s), from COLLECTIVES_SOCKET_IFNAME=%s", name, address, spec)
            return address
    available = ", ".join(f"{name} ({address or 'no IPv4 address'})" for name, address in interfaces)
    raise ValueError(f"COLLECTIVES_SOCKET_IFNAME={spec!r} names no interface with an IPv4 address; "
                     f"interfaces on this host: {available}")


def _route_source(host: str) -> Optional[str]:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return probe.getsockname()[0]
    except OSError:  # unresolvable name, no route
        return None


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def names_loopback(host: str) -> bool:
    """Whether ``host`` is written as a loopback address ("localhost", 127.x.x.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return is_loopback(host)
    except ValueError:  # a host name
        return False


def advertise_address(ifname: Optional[str], toward: Optional[str]) -> str:
    """The IPv4 address to bind data connections to and advertise to peers.

    ``ifname`` (COLLECTIVES_SOCKET_IFNAME) wins. Otherwise the address that reaches
    ``toward`` (the rendezvous host, or worker 0's address), and 127.0.0.1 when ``toward``
    is written as a loopback address. A host name that resolves to loopback here (Debian
    maps a host's own name to 127.0.1.1) does not tell where the other hosts are, so then,
    as with no ``toward`` at all, the default route's address, then any non-loopback
    interface's, then 127.0.0.1.
    """
    if ifname:
        return interface_address(ifname)
    if toward is not None:
        if names_loopback(toward):
            return "127.0.0.1"
        source = _route_source(toward)
        if source is not None and not is_loopback(source):
            return source
    source = _route_source(_DEFAULT_ROUTE_PROBE)
    if source is not None and not is_loopback(source):
        return source
    for _, name in socket.if_nameindex():
        address = _ipv4_of(name)
        if address is not None and not is_loopback(address):
            return address
    return "127.0.0.1"


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY; call before connect() or listen() (accepted sockets inherit it).

    Buffer sizes are left to Linux's autotuning: a fixed SO_SNDBUF/SO_RCVBUF turns it off,
    and fixed 4 MiB buffers made the 64 MiB loopback all-reduce 5-10% slower than autotuned
    ones (benchmarks/RESULTS.md)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listen(address: str, port_range: Optional[Tuple[int, int]]) -> socket.socket:
    """A tuned listening socket on ``address``: on the first free port of ``port_range``
    (COLLECTIVES_PORT_RANGE), or on a port the kernel picks."""
    ports = range(port_range[0], port_range[1] + 1) if port_range else [0]
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # lets a port in TIME_WAIT from an earlier job be used again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tune_socket(sock)
            sock.bind((address, port))
            # With SO_REUSEADDR, two local processes may bind one port and the second
            # learns only here that it is taken.
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE and port_range:
                continue
            raise CollectiveError(f"cannot listen on {address}:{port}: {e.strerror or e}") from e
    raise CollectiveError(f"every port of COLLECTIVES_PORT_RANGE={port_range[0]}-{port_range[1]} is in use "
                          f"on {address}: widen the range, or stop what holds those ports")


# Out of file descriptors, an accept loop pauses this long before it tries again: the
# listener stays readable, and retrying at once would spin a core while nothing is freed.
ACCEPT_BACKOFF_S = 0.05
_FD_EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class FdExhaustion:
    """Logs the first time a listener finds this process out of file descriptors, never
    once per failed accept(): under a flood it may run out again and again."""

    def __init__(self, what: str):
        self.what = what
        self.said = False

    def hit(self, error: OSError) -> None:
        if not self.said:
            log.warning("%s: cannot accept connections for now: %s; closing the connections that wait longest "
                        "and retrying (raise the open-file limit, ulimit -n, if the job's own processes need more)",
                        self.what, error.strerror or error)
        else:
            log.debug("%s: out of file descriptors again: %s", self.what, error.strerror or error)
        self.said = True


def accept(listener: socket.socket, exhaustion: FdExhaustion,
           on_exhausted: Optional[Callable[[], None]] = None) -> Optional[Tuple[socket.socket, tuple]]:
    """One connection from the non-blocking ``listener``, or None for now: none is
    waiting, or this process is out of file descriptors (EMFILE, ENFILE), which is logged
    once; ``on_exhausted`` may then free one (close an idle connection) before a short
    back-off. Never raises for a peer's doing, so that the loop around it keeps serving."""
    try:
        connection = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    except OSError as e:
        if e.errno not in _FD_EXHAUSTION:
            raise
        exhaustion.hit(e)
        if on_exhausted is not None:
            on_exhausted()
        time.sleep(ACCEPT_BACKOFF_S)
        return None
    return connection


def accepted(listener: socket.socket, wake: socket.socket, what: str,
             on_exhausted: Optional[Callable[[], None]] = None) -> Iterator[Tuple[socket.socket, tuple]]:
    """(connection, address) for each peer that connects to the non-blocking ``listener``,
    until ``wake`` becomes readable (the owner is closing). ``what`` names the listener in
    the log; see :func:`accept` for ``on_exhausted``."""
    exhaustion = FdExhaustion(what)
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is wake:
                    return
                connection = accept(listener, exhaustion, on_exhausted)
                if connection is not None:
                    yield connection
