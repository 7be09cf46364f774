"""Authenticated connections: a mutual HMAC-SHA256 challenge-response over a fresh socket.

Every data connection passes this before its first frame. Messages (big-endian):

    prefix  = "COLL" version:u16                      (the same in every protocol version)
    hello   = prefix role:u8 rank:u32 conn:u16 job_id:16B challenge:32B         client -> server
    reply   = prefix status:u8, then if OK: role:u8 rank:u32 challenge:32B mac:32B
                                else: length:u16 text                            server -> client
    proof   = status:u8 mac:32B                                                  client -> server
    verdict = status:u8 length:u16 text                                          server -> client

Each side's MAC is HMAC-SHA256(secret, label || transcript), the transcript holding the
protocol version, the job id and both hellos (roles, ranks, connection index, both fresh
challenges), with a label that differs per side: a message replayed from another
connection, or reflected back to its sender, does not verify. The secret never crosses the
wire. The client is the first to check a MAC, so an honest client with the wrong secret
learns it first and tells the server, and both raise AuthenticationError. The connection
is authenticated, not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
import threading
import time
from typing import Callable, NamedTuple, Optional

from . import _core, _netif
from .errors import AuthenticationError, CollectiveError, ProtocolVersionError, TimeoutError

__all__ = ["PROTOCOL_VERSION", "ROLE_WORKER", "ROLE_REDUCER", "JOB_ID_BYTES", "MAX_PENDING_HANDSHAKES", "PeerHello",
           "Acceptor", "client_handshake", "server_handshake", "describe_peer"]

# The wire protocol's one version number lives in the core (transport/frame.h); the
# handshake refuses peers of another version before any frame is exchanged.
PROTOCOL_VERSION = _core.PROTOCOL_VERSION
ROLE_WORKER = 0
ROLE_REDUCER = 1
JOB_ID_BYTES = 16
# Accepted connections whose handshake is under way; more are closed at once, so that
# strangers cannot make a process start threads without limit.
MAX_PENDING_HANDSHAKES = 256

_MAGIC = b"COLL"
_PREFIX = struct.Struct("!4sH")
_HELLO = struct.Struct("!BIH16s32s")
_SERVER_HELLO = struct.Struct("!BI32s")  # followed by the MAC
_MAC_BYTES = 32
_PROOF = struct.Struct("!B32s")  # status, MAC
_STATUS = struct.Struct("!B")
_TEXT_LENGTH = struct.Struct("!H")
_MAX_TEXT = 1024
_CHALLENGE_BYTES = 32

# statuses; the refusal of another version's peer keeps this layout in every version
_OK, _REFUSED_VERSION, _REFUSED, _AUTH_FAILED = 0, 1, 2, 3
_ROLE_NAMES = {ROLE_WORKER: "rank", ROLE_REDUCER: "reducer"}


class PeerHello(NamedTuple):
    """Who connected, as proven by the handshake."""
    rank: int
    conn_index: int
    role: int


def describe_peer(role: int, rank: int, address: str) -> str:
    """'rank 3 at 10.0.0.2:4000' or 'reducer 1 at ...', for error messages."""
    return f"{_name(role, rank)} at {address}"


def _name(role: int, rank: int) -> str:
    return f"{_ROLE_NAMES.get(role, f'role-{role}')} {rank}"


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "an unknown address"
    return f"{host}:{port}"


class _Channel:
    """Blocking reads and writes that fail with a clear error at the handshake's deadline."""

    def __init__(self, sock: socket.socket, deadline: float, peer: str):
        self.sock = sock
        self.deadline = deadline
        self.start = time.monotonic()
        self.peer = peer

    def _arm(self, what: str) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self._timed_out(what)
        self.sock.settimeout(remaining)

    def _timed_out(self, what: str) -> None:
        raise TimeoutError(f"{self.peer} did not complete the connection handshake within "
                           f"{self.deadline - self.start:.3g} s (waiting for its {what})")

    def recv(self, n: int, what: str) -> bytes:
        buf = bytearray()
        try:
            while len(buf) < n:
                self._arm(what)
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    raise CollectiveError(f"{self.peer} closed the connection during the handshake "
                                          f"(waiting for its {what})")
                buf += chunk
        except socket.timeout:
            self._timed_out(what)
        except OSError as e:
            raise CollectiveError(f"connection to {self.peer} failed during the handshake "
                                  f"(waiting for its {what}): {e}") from None
        return bytes(buf)

    def send(self, data: bytes, what: str) -> None:
        try:
            self._arm(f"acceptance of our {what}")
            self.sock.sendall(data)
        except socket.timeout:
            self._timed_out(f"acceptance of our {what}")
        except OSError as e:
            raise CollectiveError(f"connection to {self.peer} failed during the handshake "
                                  f"(sending our {what}): {e}") from None

    def recv_text(self) -> str:
        (length,) = _TEXT_LENGTH.unpack(self.recv(_TEXT_LENGTH.size, "reason"))
        if length > _MAX_TEXT:
            raise CollectiveError(f"{self.peer} sent a malformed handshake message")
        return self.recv(length, "reason").decode("utf-8", errors="replace")


def _text(message: str) -> bytes:
    data = message.encode("utf-8")[:_MAX_TEXT]
    return _TEXT_LENGTH.pack(len(data)) + data


def _mac(secret: bytes, label: bytes, version: int, job_id: bytes, client_hello: bytes, server_hello: bytes) -> bytes:
    transcript = b"collectives-handshake|%d|" % version + job_id + client_hello + server_hello
    return hmac.new(secret, label + transcript, hashlib.sha256).digest()


def _version_error(peer: str, theirs: int, ours: int) -> ProtocolVersionError:
    return ProtocolVersionError(f"{peer} speaks collectives protocol {theirs}, this process speaks {ours}: "
                                "install the same collectives version on every host")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("the job secret must be non-empty bytes")


def client_handshake(sock: socket.socket, secret: bytes, my_rank: int, peer_rank: int, conn_index: int,
                     deadline: float, *, job_id: bytes = bytes(JOB_ID_BYTES), role: int = ROLE_WORKER,
                     peer_role: int = ROLE_WORKER, protocol_version: Optional[int] = None) -> None:
    """Authenticates a socket we connected to ``peer_rank`` (of ``peer_role``), as our
    connection number ``conn_index`` to it. ``deadline`` is a time.monotonic() value.
    ``protocol_version`` (default PROTOCOL_VERSION, looked up when called, so that the
    module's constant is the one place the version lives) lets tests play another version.

    Raises AuthenticationError, ProtocolVersionError, TimeoutError or CollectiveError, all
    naming the peer; on success the socket is left in blocking mode.
    """
    _check_secret(secret)
    if len(job_id) != JOB_ID_BYTES:
        raise ValueError(f"job_id must be {JOB_ID_BYTES} bytes")
    protocol_version = PROTOCOL_VERSION if protocol_version is None else protocol_version
    peer = describe_peer(peer_role, peer_rank, _address(sock))
    me = _name(role, my_rank)
    channel = _Channel(sock, deadline, peer)
    challenge = secrets.token_bytes(_CHALLENGE_BYTES)
    hello = _HELLO.pack(role, my_rank, conn_index, job_id, challenge)
    channel.send(_PREFIX.pack(_MAGIC, protocol_version) + hello, "hello")

    magic, version = _PREFIX.unpack(channel.recv(_PREFIX.size, "hello"))
    if magic != _MAGIC:
        raise CollectiveError(f"{peer} is not a collectives process (it answered with bytes {magic!r})")
    if version != protocol_version:
        raise _version_error(peer, version, protocol_version)
    (status,) = _STATUS.unpack(channel.recv(_STATUS.size, "hello"))
    if status != _OK:
        raise CollectiveError(f"{peer} refused the connection: {channel.recv_text()}")
    server_hello = channel.recv(_SERVER_HELLO.size, "hello")
    their_role, their_rank, _ = _SERVER_HELLO.unpack(server_hello)
    their_mac = channel.recv(_MAC_BYTES, "proof")

    expected = _mac(secret, b"server", version, job_id, hello, server_hello)
    if not hmac.compare_digest(expected, their_mac):
        channel.send(_PROOF.pack(_AUTH_FAILED, bytes(_MAC_BYTES)), "proof")
        raise AuthenticationError(f"{peer} failed to prove to {me} that it holds the job's secret: the two "
                                  "use different COLLECTIVES_TOKEN values, or a process of another job answered")
    if (their_role, their_rank) != (peer_role, peer_rank):
        channel.send(_PROOF.pack(_REFUSED, bytes(_MAC_BYTES)), "proof")
        raise CollectiveError(f"expected {peer}, but {describe_peer(their_role, their_rank, _address(sock))} "
                              "answered: its published address is stale, or two processes claim one rank")
    proof = _mac(secret, b"client", version, job_id, hello, server_hello)
    channel.send(_PROOF.pack(_OK, proof), "proof")

    (verdict,) = _STATUS.unpack(channel.recv(_STATUS.size, "verdict"))
    reason = channel.recv_text()
    if verdict == _AUTH_FAILED:
        raise AuthenticationError(f"{peer} rejected the proof of the job's secret from {me}: {reason}")
    if verdict != _OK:
        raise CollectiveError(f"{peer} refused the connection: {reason}")
    sock.settimeout(None)


def server_handshake(sock: socket.socket, secret: bytes, my_rank: int, deadline: float, *,
                     job_id: bytes = bytes(JOB_ID_BYTES), role: int = ROLE_WORKER,
                     check: Optional[Callable[[PeerHello], Optional[str]]] = None,
                     protocol_version: Optional[int] = None) -> PeerHello:
    """Authenticates a socket we accepted and returns who is on the other end.

    ``check``, given the authenticated peer, may return a reason to refuse it (a duplicate
    or out-of-range rank); the peer is told the reason and CollectiveError is raised here.
    Raises as :func:`client_handshake` does; on success the socket is in blocking mode.
    """
    _check_secret(secret)
    if len(job_id) != JOB_ID_BYTES:
        raise ValueError(f"job_id must be {JOB_ID_BYTES} bytes")
    protocol_version = PROTOCOL_VERSION if protocol_version is None else protocol_version
    address = _address(sock)
    me = _name(role, my_rank)
    channel = _Channel(sock, deadline, f"the peer at {address}")
    magic, version = _PREFIX.unpack(channel.recv(_PREFIX.size, "hello"))
    if magic != _MAGIC:
        raise CollectiveError(f"the peer at {address} is not a collectives process (it sent bytes {magic!r})")
    if version != protocol_version:
        # Text for humans reading a capture; the client words its own error from the prefix.
        channel.send(_PREFIX.pack(_MAGIC, protocol_version) + _STATUS.pack(_REFUSED_VERSION) +
                     _text(f"this process speaks collectives protocol {protocol_version}, you speak {version}"),
                     "refusal")
        raise _version_error(f"the peer at {address}", version, protocol_version)
    hello = channel.recv(_HELLO.size, "hello")
    their_role, their_rank, conn_index, their_job, _ = _HELLO.unpack(hello)
    channel.peer = peer = describe_peer(their_role, their_rank, address)
    if their_job != job_id:
        channel.send(_PREFIX.pack(_MAGIC, protocol_version) + _STATUS.pack(_REFUSED) +
                     _text("the connecting process belongs to another job (its address list is stale)"), "refusal")
        raise CollectiveError(f"{peer} belongs to another job: it connected to a stale address")

    challenge = secrets.token_bytes(_CHALLENGE_BYTES)
    server_hello = _SERVER_HELLO.pack(role, my_rank, challenge)
    mac = _mac(secret, b"server", version, job_id, hello, server_hello)
    channel.send(_PREFIX.pack(_MAGIC, protocol_version) + _STATUS.pack(_OK) + server_hello + mac, "hello")

    status, their_mac = _PROOF.unpack(channel.recv(_PROOF.size, "proof"))
    if status == _AUTH_FAILED:
        raise AuthenticationError(f"{peer} rejected the proof of the job's secret from {me}: the two use "
                                  "different COLLECTIVES_TOKEN values")
    if status != _OK:
        raise CollectiveError(f"{peer} refused the connection: it expected another process at this address")
    expected = _mac(secret, b"client", version, job_id, hello, server_hello)
    if not hmac.compare_digest(expected, their_mac):
        channel.send(_STATUS.pack(_AUTH_FAILED) + _text("its proof is wrong: the two use different "
                                                         "COLLECTIVES_TOKEN values"), "verdict")
        raise AuthenticationError(f"{peer} failed to prove to {me} that it holds the job's secret: the two "
                                  "use different COLLECTIVES_TOKEN values")
    peer_hello = PeerHello(their_rank, conn_index, their_role)
    reason = check(peer_hello) if check is not None else None
    if reason is not None:
        channel.send(_STATUS.pack(_REFUSED) + _text(reason), "verdict")
        raise CollectiveError(f"refused {peer}: {reason}")
    channel.send(_STATUS.pack(_OK) + _text(""), "verdict")
    sock.settimeout(None)
    return peer_hello


class Acceptor:
    """Accepts connections on a listening socket, in a thread, and authenticates each in a
    thread of its own, so that a silent stranger delays nobody.

    ``authenticate(conn)`` runs the server side of the handshake (usually
    :func:`server_handshake` with a ``check``). The connections that pass it go to
    ``on_peer(hello, conn)``; each one that fails, or that arrives while
    MAX_PENDING_HANDSHAKES are under way, is closed and its ``(address, error)`` goes to
    ``on_refused``. Both are called from the acceptor's threads, also after :meth:`stop`
    for handshakes that were under way.
    """

    def __init__(self, listener: socket.socket, authenticate: Callable[[socket.socket], PeerHello],
                 on_peer: Callable[[PeerHello, socket.socket], None],
                 on_refused: Callable[[str, Exception], None]):
        self._listener = listener
        self._authenticate, self._on_peer, self._on_refused = authenticate, on_peer, on_refused
        self._lock = threading.Lock()
        self._pending = 0  # guarded by _lock
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Acceptor":
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._accept_loop, name="collectives-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting; idempotent. The listener stays open (its owner closes it)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._wake_w.send(b"\0")
        thread.join()
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        for conn, addr in _netif.accepted(self._listener, self._wake_r):
            address = f"{addr[0]}:{addr[1]}"
            with self._lock:
                busy = self._pending >= MAX_PENDING_HANDSHAKES
                if not busy:
                    self._pending += 1
            if busy:
                conn.close()
                self._on_refused(address, CollectiveError(f"{MAX_PENDING_HANDSHAKES} handshakes are under way"))
                continue
            threading.Thread(target=self._accept_one, args=(conn, address), name="collectives-handshake",
                             daemon=True).start()

    def _accept_one(self, conn: socket.socket, address: str) -> None:
        try:
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = self._authenticate(conn)
        except (CollectiveError, OSError) as e:
            conn.close()
            self._on_refused(address, e)
        else:
            self._on_peer(hello, conn)
        finally:
            with self._lock:
                self._pending -= 1
