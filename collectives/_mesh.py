"""The mesh: every worker of a job connected to every other by authenticated TCP links.

Every worker listens once and gives its address record to an Exchange (the store's or
MPI's); every worker checks the same records alike (protocol version, the settings that
must match, loopback addresses across hosts), so that all fail together or none does.
Then worker i connects to every worker j < i (connections_per_peer sockets each) and
accepts from every j > i, and each connection passes the HMAC handshake, which tells the
acceptor who connected. One deadline bounds it all; a failure another worker posts ends
the wait at once, with its message.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from . import _handshake, _netif, _shm, _ucx
from ._config import Config
from ._handshake import ROLE_WORKER, PeerHello, SessionKeys, client_handshake, server_handshake
from ._rendezvous import ABORT_POLL_S, Exchange, plural
from ._topology import own_label
from .errors import CollectiveError, ProtocolVersionError, TimeoutError

__all__ = ["Mesh", "connect_workers", "chosen_transport", "check_protocol", "dial", "close_links"]

log = logging.getLogger("collectives")

# A peer that fails closes its sockets moments before it posts why; a worker that sees a
# connection refused or dropped waits this long for that notice, to report the cause.
_NOTICE_GRACE_S = 1.0


class Mesh(NamedTuple):
    """By rank: connections_per_peer authenticated links (socket and keys) to each other
    worker, whoever takes them closes them; names for messages; topology labels
    (collectives._topology)."""
    links: List[List[Any]]
    names: List[str]
    topology: List[str]
    shm: _shm.SharedMemory = _shm.SharedMemory()  # with same-host workers
    transport: str = "auto"  # config.transport, or "ucx" where auto chose it (chosen_transport)


def connect_workers(rank: int, size: int, config: Config, secret: bytes, job_id: bytes, deadline: float,
                    exchange: Exchange, find_address: Callable[[], str]) -> Mesh:
    """Publishes this worker's address (at ``find_address()``) and topology label through
    ``exchange``, checks that all agree, and builds the mesh."""
    label = own_label(config.topology)
    if size == 1:
        return Mesh([[]], [f"rank {rank} (this process)"], [label], transport=config.transport)
    # A worker that cannot listen still publishes (why), so that every worker fails alike
    # rather than one raising while the others wait for its address.
    listener = unix_listener = None
    try:
        if config.transport == "ucx":  # every worker fails alike where one cannot load it
            _ucx.load()
        address = find_address()
        listener = _netif.listen(address, config.port_range)
        port = listener.getsockname()[1]
        unix_listener = _shm.open_listener(config)
        record = {"host": address, "port": port, "hostname": socket.gethostname(), "topology": label,
                  "protocol": _handshake.PROTOCOL_VERSION, "settings": (("size", size),) + config.must_match(),
                  **_shm.record_fields(unix_listener)}
        if config.transport == "auto":
            record["rdma"], record["no_rdma_why"] = _ucx.rdma_devices()
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
        transport, why = chosen_transport(config.transport, records)
        if rank == 0 and config.transport == "auto":
            log.info("COLLECTIVES_TRANSPORT=auto: %s", why)
        if transport == "ucx" and unix_listener is not None:  # UCX has its own shared memory
            unix_listener.close()
            unix_listener = None
        names = [f"rank {p} ({r['host']}:{r['port']})" if p != rank else f"rank {p} (this process)"
                 for p, r in enumerate(records)]
        started = time.monotonic()
        mesh = _Mesh(listener, [(r["host"], r["port"]) for r in records], names, rank, size, config, secret,
                     job_id, deadline)
        peer_links = mesh.build(exchange)
        try:
            shm = _shm.pair_same_host(rank, records, unix_listener, config, deadline)
        except BaseException:
            close_links(link for links in peer_links for link in links)
            raise
    finally:
        for closable in (listener, unix_listener):
            if closable is not None:
                closable.close()
    log.info("rank %d of %d (%s:%d): connected to %d peers, %d connection(s) each, in %.2f s",
             rank, size, address, port, size - 1, config.connections_per_peer, time.monotonic() - started)
    return Mesh(peer_links, names, [r["topology"] for r in records], shm, transport)


def chosen_transport(asked: str, records: List[Dict[str, Any]]) -> Tuple[str, str]:
    """The transport that the job's workers run over, and, for auto, why: asked (the
    configured one), but UCX for auto where the job spans hosts and every worker's UCX sees an
    RDMA-capable device (the records' "rdma", from _ucx.rdma_devices); one host without keeps
    the whole job off UCX. Every worker decides alike from the same records."""
    if asked != "auto":
        return asked, ""
    if len({r["hostname"] for r in records}) == 1:  # RDMA would not carry a byte: the host's own memory does
        return "auto", "shared memory: every worker runs on one host"
    lacking: Dict[str, List[int]] = {}  # why -> ranks
    for p, r in enumerate(records):
        if not r.get("rdma"):
            lacking.setdefault(r.get("no_rdma_why") or "no RDMA device", []).append(p)
    if not lacking:
        return "ucx", f"UCX, since every worker's UCX sees an RDMA-capable device (rank 0: {', '.join(records[0]['rdma'])})"
    return "auto", ("shared memory within a host, TCP between hosts; not UCX: " +
                    "; ".join(f"{'every rank' if len(ranks) == len(records) else plural(ranks, 'rank', 'ranks')}: {why}"
                              for why, ranks in lacking.items()))


def _check_records(records: List[Dict[str, Any]]) -> None:
    """Every worker runs this on the same records, so all of them raise, and alike."""
    for peer, record in enumerate(records):
        check_protocol(f"rank {peer}", record)
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
            f"{plural(local, 'rank', 'ranks')} advertise a loopback address, but the ranks run on "
            f"{len(hostnames)} hosts ({', '.join(sorted(hostnames))}): set COLLECTIVES_SOCKET_IFNAME to the "
            "interface that connects the hosts, or use a rendezvous address that the other hosts reach")


def check_protocol(name: str, record: Dict[str, Any]) -> None:
    """ProtocolVersionError unless the process that published ``record`` (``name``, for the
    message) speaks this process's protocol."""
    mine = _handshake.PROTOCOL_VERSION
    if record.get("protocol") != mine:
        raise ProtocolVersionError(
            f"{name} (on {record.get('hostname')}) speaks collectives protocol {record.get('protocol')}, "
            f"this process speaks {mine}: install the same collectives version on every host")


def dial(address: Tuple[str, int], me: str, peer: str, deadline: float, timeout: float) -> socket.socket:
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

    def build(self, exchange: Exchange) -> List[List[Any]]:
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
                    kind, payload = self.events.get(timeout=min(remaining, ABORT_POLL_S))
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
            parts.append(f"{plural(higher, 'rank', 'ranks')} of {self.size} did not connect to rank {self.rank} "
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
                    sock = dial(self.addresses[peer], f"rank {self.rank}", self.names[peer], self.deadline,
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


def close_links(links: Iterable[Any]) -> None:
    """Closes the fds of links that no core took."""
    for link in links:
        os.close(link.fd)
